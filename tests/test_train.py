import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from mtrain import checkpoint
from mtrain.config import DecodeConfig
from mtrain.device import pick_device
from mtrain.errors import MtrainError
from mtrain.train import fit, label_smoothed_loss, lr_at
from mtrain.translate import translate_lines
from conftest import ROOT, SAMPLE_DE, SAMPLE_EN, tiny_raw


def losses(run_dir):
    return {r["step"]: r["loss"] for r in map(json.loads, open(run_dir / "metrics.jsonl")) if "loss" in r}


def test_lr_schedule_matches_formula():
    d, w = 512, 4000
    for step in (1, 100, 3999, 4000, 4001, 20000):
        paper = d ** -0.5 * min(step ** -0.5, step * w ** -1.5)  # Vaswani et al. 2017, eq. (3)
        assert lr_at(step, w, peak=d ** -0.5 * w ** -0.5) == pytest.approx(paper)
    assert lr_at(10, 100, 1e-3) == pytest.approx(1e-4) and lr_at(400, 100, 1e-3) == pytest.approx(5e-4)


def test_label_smoothed_loss_by_hand():
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 3.0]])
    target = torch.tensor([0, 2])
    eps, V = 0.1, 3
    expected = 0.0
    for row, t in zip(logits.tolist(), target.tolist()):
        logz = math.log(sum(math.exp(x) for x in row))
        logp = [x - logz for x in row]
        q = [(1 - eps) * (c == t) + eps / V for c in range(V)]
        expected -= sum(qc * lp for qc, lp in zip(q, logp))
    assert label_smoothed_loss(logits, target, eps).item() == pytest.approx(expected, rel=1e-6)
    assert label_smoothed_loss(logits, target, 0.0).item() == pytest.approx(
        -sum(torch.log_softmax(logits, -1)[i, t].item() for i, t in enumerate(target.tolist())), rel=1e-6)


def test_resume_equals_uninterrupted(tmp_path, tiny_cfg):
    full = fit(tiny_cfg(max_steps=20), tmp_path / "full", log=lambda *_: None)
    assert full.name == "final.pt"
    fit(tiny_cfg(max_steps=10), tmp_path / "part", log=lambda *_: None)
    fit(tiny_cfg(max_steps=20), tmp_path / "part", resume=True, log=lambda *_: None)
    a, b = losses(tmp_path / "full"), losses(tmp_path / "part")
    assert sorted(b) == list(range(1, 21))
    assert [a[s] for s in range(11, 21)] == [b[s] for s in range(11, 21)]  # exactly, dropout included
    assert checkpoint.load(tmp_path / "part" / "last.pt")["step"] == 20


def test_run_dir_is_not_overwritten_silently(tmp_path, tiny_cfg):
    fit(tiny_cfg(max_steps=2), tmp_path / "run", log=lambda *_: None)
    with pytest.raises(MtrainError, match="already holds a run"):
        fit(tiny_cfg(max_steps=2), tmp_path / "run", log=lambda *_: None)
    fit(tiny_cfg(max_steps=3), tmp_path / "run", overwrite=True, log=lambda *_: None)
    assert max(losses(tmp_path / "run")) == 3
    with pytest.raises(MtrainError, match="nothing to resume"):
        fit(tiny_cfg(max_steps=2), tmp_path / "empty", resume=True, log=lambda *_: None)
    for name in ("config.yaml", "metrics.jsonl", "last.pt", "best.pt", "final.pt"):
        assert (tmp_path / "run" / name).is_file() or name == "best.pt"


def test_max_epochs_stops_training(tmp_path, tiny_cfg):
    fit(tiny_cfg(max_steps=0, max_epochs=3, batch_tokens=10_000), tmp_path / "run", log=lambda *_: None)
    state = checkpoint.load(tmp_path / "run" / "last.pt")
    assert state["step"] == 3  # one batch holds the whole sample corpus: one update per epoch
    assert (state["data"]["epoch"], state["data"]["index"]) == (3, 1)


def test_memorises_twenty_pairs(tmp_path, spm_model):
    raw = tiny_raw(tmp_path, spm_model, max_steps=400, lr=3e-3, warmup=40, batch_tokens=600,
                   valid_every=400, save_every=400, log_every=50, label_smoothing=0.0)
    raw["model"].update(encoder_layers=2, decoder_layers=2, d_model=64, heads=4, ffn_dim=128, dropout=0.0)
    from mtrain.config import config_from_dict
    final = fit(config_from_dict(raw), tmp_path / "run", log=lambda *_: None)
    model, toks, cfg = checkpoint.load_for_inference([final])
    sources = SAMPLE_EN.read_text().splitlines()
    targets = SAMPLE_DE.read_text().splitlines()
    out = list(translate_lines(sources, model, toks, DecodeConfig(beam=1), pick_device("cpu", "fp32")))
    assert out == targets


def test_sigkill_then_resume(tmp_path, spm_model):
    raw = tiny_raw(tmp_path, spm_model, max_steps=100000, save_every=5)
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "mtrain", "fit", str(cfg_path), "--output", str(run)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (run / "ckpt_15.pt").exists():
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    step = checkpoint.load(run / "last.pt")["step"]
    assert step >= 15
    result = subprocess.run([sys.executable, "-m", "mtrain", "fit", str(cfg_path), "--output", str(run), "--resume",
                             "--set", f"train.max_steps={step + 3}"], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert f"resumed from step {step}" in result.stdout
    assert checkpoint.load(run / "last.pt")["step"] == step + 3


def test_sigterm_saves_a_checkpoint(tmp_path, spm_model):
    raw = tiny_raw(tmp_path, spm_model, max_steps=100000, save_every=100000)
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "mtrain", "fit", str(cfg_path), "--output", str(run)],
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (run / "metrics.jsonl").exists():
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    assert "interrupted" in out
    assert checkpoint.load(run / "last.pt")["step"] >= 1


def test_nonfinite_updates_are_skipped_then_stop(tmp_path, tiny_cfg, monkeypatch):
    import mtrain.train as train_module
    real_loss = train_module.batch_loss
    calls = {"n": 0}

    def flaky(*args, **kw):  # the 3rd and 4th batches give NaN
        calls["n"] += 1
        loss = real_loss(*args, **kw)
        return loss * float("nan") if calls["n"] in (3, 4) else loss

    monkeypatch.setattr(train_module, "batch_loss", flaky)
    fit(tiny_cfg(max_steps=6), tmp_path / "ok", log=lambda *_: None)
    steps = losses(tmp_path / "ok")
    assert sorted(steps) == list(range(1, 7)) and all(math.isfinite(v) for v in steps.values())
    assert calls["n"] == 8  # two skipped updates were redone with the next batches

    monkeypatch.setattr(train_module, "batch_loss", lambda *a, **k: real_loss(*a, **k) * float("nan"))
    with pytest.raises(MtrainError, match="3 non-finite updates in a row"):
        fit(tiny_cfg(max_steps=6, max_nonfinite=3), tmp_path / "bad", log=lambda *_: None)


def test_separate_vocabularies_are_trained_and_used(tmp_path, spm_model):
    from mtrain.config import config_from_dict
    raw = tiny_raw(tmp_path, spm_model, max_steps=3)
    raw["tokenizer"] = {"model": str(tmp_path / "spm" / "sides.model"), "joint": False, "vocab_size": 60}
    raw["model"]["share_embeddings"] = False
    final = fit(config_from_dict(raw), tmp_path / "run", log=lambda *_: None)
    assert (tmp_path / "spm" / "sides.model").is_file() and (tmp_path / "spm" / "sides.tgt.model").is_file()
    model, toks, _ = checkpoint.load_for_inference([final])
    assert not toks.joint and model.src_embed is not model.tgt_embed
    assert (tmp_path / "run" / "spm.src.model").is_file() and (tmp_path / "run" / "spm.tgt.model").is_file()
