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
    # two processes (gloo on the CPU) with a resume train as one process accumulating two batches
    assert re.search(r"DDP, 2 processes with a resume = 1 process x update_freq 2 +\| yes \(largest loss "
                     r"difference [\d.]+%\) \|", run.stdout), run.stdout
    cost = re.search(r"the loader's cost \(tokens/s with it / premade\) +\| (-?[\d.]+)% \(([\d,]+) / ([\d,]+)\)",
                     run.stdout)
    assert cost, run.stdout
    with_it, premade = (float(x.replace(",", "")) for x in cost.groups()[1:])
    # the printed speeds are whole tokens/s and the share has one decimal: allow for both roundings
    slack = 100 * (0.5 / premade + 0.5 * with_it / premade ** 2) + 0.05 + 1e-9
    assert with_it > 0 and premade > 0 and abs(float(cost[1]) - 100 * (1 - with_it / premade)) <= slack


def test_the_gpu_check_picks_what_the_gpu_supports():
    """bf16 only where the GPU has it natively (a V100 or T4 would report a false failure, where
    precision auto trains in fp16), and a batch that fits the card: 25k tokens from 40 GB, fewer in
    proportion below."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import gpu_check
    finally:
        sys.path.pop(0)
    assert gpu_check.precisions_for(True) == ["bf16", "fp16"] and gpu_check.precisions_for(False) == ["fp16"]
    gib = 2 ** 30
    assert [gpu_check.batch_tokens_for(g * gib) for g in (80, 40, 32, 16, 1)] == [25000, 25000, 20000, 10000, 1000]
