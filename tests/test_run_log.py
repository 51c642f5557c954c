"""What a run leaves for its user besides checkpoints: train.log, TensorBoard events, and config.yaml
equal to what `mtrain config` prints."""

import re
import subprocess
import sys

import pytest
import yaml
from conftest import ROOT, tiny_raw

from mtrain.config import config_from_dict, dump_config
from mtrain.errors import MtrainError
from mtrain.train import fit

STAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d "


def test_train_log_holds_every_line_and_marks_each_resume(tmp_path, tiny_cfg):
    run, printed = tmp_path / "run", []
    fit(tiny_cfg(max_steps=4, save_every=2, valid_every=2), run, log=printed.append)
    first = (run / "train.log").read_text().splitlines()
    assert re.fullmatch(STAMP + r"---- mtrain fit: new run in .*", first[0])
    # every printed line, in order, each after a time stamp: those from before the run directory existed too
    assert [re.sub("^" + STAMP, "", x) for x in first[1:]] == printed
    assert any(x.startswith("device:") for x in printed) and any("BLEU" in x for x in printed)
    printed.clear()
    fit(tiny_cfg(max_steps=6, save_every=2, valid_every=2), run, resume=True, log=printed.append)
    both = (run / "train.log").read_text().splitlines()
    assert both[:len(first)] == first  # appended
    assert re.fullmatch(STAMP + r"---- mtrain fit: resumed at step 4 in .*", both[len(first)])
    assert [re.sub("^" + STAMP, "", x) for x in both[len(first) + 1:]] == printed


def test_train_log_keeps_the_error_that_stopped_a_run(tmp_path, tiny_cfg, monkeypatch):
    import mtrain.train as train_module
    run = tmp_path / "run"

    def broken(*args, **kwargs):
        raise MtrainError("data: something the user must fix")
    monkeypatch.setattr(train_module.Trainer, "run", broken)
    with pytest.raises(MtrainError):
        fit(tiny_cfg(max_steps=4), run, log=lambda *_: None)
    assert re.fullmatch(STAMP + "mtrain: data: something the user must fix",
                        (run / "train.log").read_text().splitlines()[-1])


def test_overwrite_starts_a_new_log(tmp_path, tiny_cfg):
    run = tmp_path / "run"
    fit(tiny_cfg(max_steps=2), run, log=lambda *_: None)
    fit(tiny_cfg(max_steps=2), run, overwrite=True, log=lambda *_: None)
    assert sum("---- mtrain fit" in x for x in (run / "train.log").read_text().splitlines()) == 1


def test_tensorboard_events_hold_the_documented_scalars(tmp_path, tiny_cfg):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run = tmp_path / "run"
    fit(tiny_cfg(max_steps=6, log_every=2, valid_every=3), run, log=lambda *_: None)
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    scalars = events.Tags()["scalars"]
    documented = re.findall(r"^\| `(\w+)` \|", (ROOT / "docs" / "commands.md").read_text(), re.MULTILINE)
    for tag in ("loss", "lr", "tokens_per_s", "grad_norm", "valid_loss", "valid_ppl", "valid_bleu"):
        assert tag in scalars and tag in documented, (tag, scalars, documented)
    assert [e.step for e in events.Scalars("loss")] == [2, 4, 6]
    assert [e.step for e in events.Scalars("valid_bleu")] == [3, 6]
    metrics = [r for r in map(__import__("json").loads, (run / "metrics.jsonl").read_text().splitlines())
               if "loss" in r]
    assert [e.value for e in events.Scalars("loss")] == pytest.approx([r["loss"] for r in metrics], rel=1e-6)


def test_mtrain_config_prints_what_fit_writes_and_checks_as_fit_does(tmp_path, spm_model):
    raw = tiny_raw(tmp_path, spm_model, max_steps=2)
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump(raw))
    child = tmp_path / "child.yaml"
    child.write_text("base: base.yaml\ntrain:\n  lr: 1.0e-3\n")
    shown = subprocess.run([sys.executable, "-m", "mtrain", "config", str(child), "--set", "train.warmup=7"],
                           capture_output=True, text=True, cwd=ROOT)
    assert shown.returncode == 0, shown.stderr
    resolved = yaml.safe_load(shown.stdout)
    assert resolved["train"]["lr"] == 1e-3 and resolved["train"]["warmup"] == 7
    assert resolved["model"]["d_model"] == 32 and resolved["decode"]["lenpen"] == 0.6  # a default, filled in
    run = tmp_path / "run"
    fit(config_from_dict(resolved), run, log=lambda *_: None)
    assert (run / "config.yaml").read_text() == shown.stdout  # the same text, byte for byte
    dump_config(config_from_dict(resolved), tmp_path / "again.yaml")
    assert (tmp_path / "again.yaml").read_text() == shown.stdout
    for bad, message in ((["--set", "train.lr=fast"], "train.lr: expected a number"),
                         (["--set", "data.train=[]"], "data.train: no training corpus given")):
        r = subprocess.run([sys.executable, "-m", "mtrain", "config", str(child), *bad], capture_output=True,
                           text=True, cwd=ROOT)
        assert r.returncode == 1 and r.stdout == "" and message in r.stderr and len(r.stderr.splitlines()) == 1


def test_shell_completion_is_offered():
    r = subprocess.run([sys.executable, "-m", "mtrain", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert "--install-completion" in r.stdout
    r = subprocess.run([sys.executable, "-m", "mtrain", "--show-completion", "bash"], capture_output=True, text=True,
                       cwd=ROOT, env={**__import__("os").environ, "_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION": "1"})
    assert r.returncode == 0 and "complete" in r.stdout and "mtrain" in r.stdout.lower(), r.stdout + r.stderr
