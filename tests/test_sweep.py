"""scripts/sweep.py: variants run one after another under one budget, and the table reports them."""

import subprocess
import sys
from pathlib import Path

import yaml
from conftest import ROOT, tiny_raw

from mtrain import checkpoint


def run_sweep(tmp_path: Path, spm_model: Path, *budget: str) -> tuple[subprocess.CompletedProcess, Path]:
    raw = tiny_raw(tmp_path, spm_model, max_time="30m", max_steps=0, schedule="linear", save_every=3)
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(raw))
    (tmp_path / "variants.yaml").write_text(yaml.safe_dump({"base": [], "low_lr": ["train.lr=1e-3"]}))
    table = tmp_path / "results.md"
    result = subprocess.run([sys.executable, "scripts/sweep.py", str(tmp_path / "tiny.yaml"),
                             str(tmp_path / "variants.yaml"), *budget, "--output", str(tmp_path / "sweep"),
                             "--table", str(table)], capture_output=True, text=True, cwd=ROOT, timeout=300)
    return result, table


def test_a_step_budget_replaces_the_time_budget(tmp_path, spm_model):
    result, table = run_sweep(tmp_path, spm_model, "--steps", "7")
    assert result.returncode == 0, result.stderr[-2000:]
    for name, lr in (("base", 3e-3), ("low_lr", 1e-3)):
        last = checkpoint.load(tmp_path / "sweep" / name / "last.pt")
        assert last["step"] == 7
        assert last["config"]["train"]["max_steps"] == 7 and last["config"]["train"]["max_time"] == ""
        assert last["config"]["train"]["lr"] == lr
        # The linear decay planned for the 7 updates, not for the config's 30 minutes.
        assert last["train_state"]["plan"] == 7
    text = table.read_text()
    assert "--steps 7`" in text
    rows = [line for line in text.splitlines() if line.startswith("| base |") or line.startswith("| low_lr |")]
    assert len(rows) == 2 and all("| 7 |" in row for row in rows), text


def test_step_and_time_budgets_exclude_each_other(tmp_path, spm_model):
    result, _ = run_sweep(tmp_path, spm_model, "--steps", "7", "--budget", "1m")
    assert result.returncode != 0 and "not allowed with" in result.stderr
    assert not (tmp_path / "sweep" / "base").exists()
