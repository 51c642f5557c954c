"""The GPU check, run the way a CPU can: every step with tiny sizes, its table complete."""

import re
import subprocess
import sys

from conftest import ROOT


def test_the_gpu_check_dry_run_measures_every_row(tmp_path):
    run = subprocess.run([sys.executable, "scripts/gpu_check.py", "--cpu-dry-run", "--runs", str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert re.search(r"target tokens/s \(2,000-token batches\) +\| [\d,]+ \|", run.stdout)
    cost = re.search(r"the loader's cost \(tokens/s with it / premade\) +\| (-?[\d.]+)% \(([\d,]+) / ([\d,]+)\)",
                     run.stdout)
    assert cost, run.stdout
    with_it, premade = (float(x.replace(",", "")) for x in cost.groups()[1:])
    # the printed speeds are whole tokens/s and the share has one decimal: allow for both roundings
    slack = 100 * (0.5 / premade + 0.5 * with_it / premade ** 2) + 0.05 + 1e-9
    assert with_it > 0 and premade > 0 and abs(float(cost[1]) - 100 * (1 - with_it / premade)) <= slack
