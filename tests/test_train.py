import dataclasses
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
from conftest import ROOT, SAMPLE_DE, SAMPLE_EN, tiny_raw

from mtrain import checkpoint
from mtrain.config import DecodeConfig
from mtrain.device import pick_device
from mtrain.errors import MtrainError
from mtrain.report import read_metrics
from mtrain.score import bleu
from mtrain.train import fit, lr_at
from mtrain.translate import translate_lines


def losses(run_dir):
    return {r["step"]: r["loss"] for r in map(json.loads, open(run_dir / "metrics.jsonl")) if "loss" in r}


def test_lr_schedule_matches_formula():
    d, w = 512, 4000
    for step in (1, 100, 3999, 4000, 4001, 20000):
        paper = d ** -0.5 * min(step ** -0.5, step * w ** -1.5)  # Vaswani et al. 2017, eq. (3)
        assert lr_at(step, w, peak=d ** -0.5 * w ** -0.5) == pytest.approx(paper)
    assert lr_at(10, 100, 1e-3) == pytest.approx(1e-4) and lr_at(400, 100, 1e-3) == pytest.approx(5e-4)


def plain_full_and_resumed(tmp_path, tiny_cfg, steps: int, **train):
    """Losses of a run without `train`, and of runs with it: uninterrupted, and stopped halfway then resumed."""
    quiet = lambda *_: None  # noqa: E731
    fit(tiny_cfg(max_steps=steps), tmp_path / "plain", log=quiet)
    fit(tiny_cfg(max_steps=steps, **train), tmp_path / "full", log=quiet)
    fit(tiny_cfg(max_steps=steps // 2, **train), tmp_path / "part", log=quiet)
    fit(tiny_cfg(max_steps=steps, **train), tmp_path / "part", resume=True, log=quiet)
    return losses(tmp_path / "plain"), losses(tmp_path / "full"), losses(tmp_path / "part")


def test_resume_equals_uninterrupted(tmp_path, tiny_cfg):
    full = fit(tiny_cfg(max_steps=20), tmp_path / "full", log=lambda *_: None)
    assert full.name == "final.pt"
    fit(tiny_cfg(max_steps=10), tmp_path / "part", log=lambda *_: None)
    fit(tiny_cfg(max_steps=20), tmp_path / "part", resume=True, log=lambda *_: None)
    a, b = losses(tmp_path / "full"), losses(tmp_path / "part")
    assert sorted(b) == list(range(1, 21))
    assert [a[s] for s in range(11, 21)] == [b[s] for s in range(11, 21)]  # exactly, dropout included
    assert checkpoint.load(tmp_path / "part" / "last.pt")["step"] == 20


def test_weight_decay_shrinks_matrices_and_embeddings_only():
    from mtrain.config import ModelConfig
    from mtrain.model import Transformer
    from mtrain.train import param_groups
    model = Transformer(ModelConfig(encoder_layers=1, decoder_layers=1, d_model=16, heads=2, ffn_dim=32), 50, 50, 0)
    assert len(param_groups(model, 0.0)) == 1  # as checkpoints from before the option hold
    groups = param_groups(model, 0.1)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(groups, lr=0.5, fused=True)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # Adam's own step is 0: what moves is the decay alone
    opt.step()
    names = dict(model.named_parameters())
    shrunk = [n for n, p in names.items() if not torch.equal(p, before[n])]
    assert "tgt_embed.weight" in shrunk and any("norm" in n for n in names) and any(n.endswith("bias") for n in names)
    for n, p in names.items():
        if p.dim() >= 2:  # decoupled: w <- w (1 - lr * wd)
            torch.testing.assert_close(p.detach(), before[n] * (1 - 0.5 * 0.1), rtol=1e-6, atol=1e-7)
        else:
            assert n not in shrunk, n


def test_weight_decay_changes_training_and_resumes_exactly(tmp_path, tiny_cfg):
    plain, a, b = plain_full_and_resumed(tmp_path, tiny_cfg, 8, weight_decay=0.5)
    assert [a[s] for s in range(5, 9)] == [b[s] for s in range(5, 9)]
    assert a[1] == plain[1] and a[8] != plain[8]  # the first loss precedes any update
    # Turned on for the second half of a run, the optimizer state no longer fits: one line, no traceback.
    with pytest.raises(MtrainError, match=r"plain[/\\]last\.pt: this run trained with train.weight_decay off"):
        fit(tiny_cfg(max_steps=12, weight_decay=0.5), tmp_path / "plain", resume=True, log=lambda *_: None)
    assert "weight_decay: 0.0" in (tmp_path / "plain" / "config.yaml").read_text()  # the record is untouched


@pytest.mark.parametrize("damage", [
    lambda c: c.pop("optimizer"),
    lambda c: c.update(model={k: v[:1] for k, v in c["model"].items()}),
    lambda c: c.update(ema={"model": {}}),
    lambda c: c["ema"].update(updates="many"),
    lambda c: c.update(data={"batch_tokens": 200}),
    lambda c: c.update(rng=["x"]),
    lambda c: c.update(train_state=[]),
])
def test_a_damaged_checkpoint_is_one_line_on_resume(tmp_path, tiny_cfg, damage):
    cfg = tiny_cfg(max_steps=4, save_every=2, ema=0.9)
    fit(cfg, tmp_path / "run", log=lambda *_: None)
    state = checkpoint.load(tmp_path / "run" / "last.pt")
    damage(state)
    checkpoint.save(tmp_path / "run" / "last.pt", state)
    with pytest.raises(MtrainError, match=r"last\.pt: damaged checkpoint, cannot resume \(\w+Error"):
        fit(tiny_cfg(max_steps=6, save_every=2, ema=0.9), tmp_path / "run", resume=True, log=lambda *_: None)


@pytest.mark.parametrize("clip, moved", [(1.0, [0.6, 0.8]), (0.0, [3.0, 4.0])])
def test_update_returns_the_norm_before_clipping(clip, moved):
    from mtrain.train import optimizer_update
    layer = torch.nn.Linear(2, 1, bias=False)
    before = layer.weight.detach().clone()
    layer.weight.grad = torch.tensor([[3.0, 4.0]])
    opt = torch.optim.SGD(layer.parameters(), lr=1.0)
    assert optimizer_update(opt, layer.parameters(), torch.amp.GradScaler("cpu", enabled=False), clip) == pytest.approx(5.0)
    torch.testing.assert_close(before - layer.weight.detach(), torch.tensor([moved]))


def test_metrics_log_gradient_norms(tmp_path, tiny_cfg):
    fit(tiny_cfg(max_steps=6, log_every=2, clip_norm=0.5), tmp_path / "run", log=lambda *_: None)
    records = [r for r in map(json.loads, open(tmp_path / "run" / "metrics.jsonl")) if "loss" in r]
    assert [r["step"] for r in records] == [2, 4, 6]
    assert all(0 < r["grad_norm"] < 1e3 and r["clipped"] in (0.0, 0.5, 1.0) for r in records)


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


def cpu_fp16(*args, **kwargs):
    """fp16 autocast with a GradScaler, on the CPU: the GPU's fp16 code path, testable here."""
    from mtrain.device import Device
    return Device(torch.device("cpu"), torch.float16, torch.amp.GradScaler("cpu", init_scale=2.0 ** 16))


def test_fp16_loss_scale_never_collapses():
    from mtrain.train import MIN_LOSS_SCALE, optimizer_update
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    before = [p.detach().clone() for p in layer.parameters()]
    for _ in range(200):  # more overflows than halvings from 2^16 to 0
        scaler.scale(layer(torch.ones(1, 4)).sum() * float("inf")).backward()
        assert not math.isfinite(optimizer_update(opt, layer.parameters(), scaler, 1.0))
    assert scaler.get_scale() >= MIN_LOSS_SCALE
    assert all(torch.equal(a, b) for a, b in zip(before, layer.parameters()))  # skipped: untouched
    scaler.scale(layer(torch.ones(1, 4)).sum()).backward()
    assert math.isfinite(optimizer_update(opt, layer.parameters(), scaler, 1.0))
    assert all(torch.isfinite(p).all() for p in layer.parameters())
    assert not all(torch.equal(a, b) for a, b in zip(before, layer.parameters()))


@pytest.mark.parametrize("fp16", [False, True], ids=["fp32", "fp16-scaler"])
def test_nonfinite_updates_are_skipped_then_stop(tmp_path, tiny_cfg, monkeypatch, fp16):
    import mtrain.train as train_module
    if fp16:
        monkeypatch.setattr(train_module, "pick_device", cpu_fp16)
    real_loss = train_module.batch_loss
    calls = {"n": 0}

    def flaky(*args, **kw):  # the 3rd and 4th batches give NaN
        calls["n"] += 1
        loss = real_loss(*args, **kw)
        return loss * float("nan") if calls["n"] in (3, 4) else loss

    monkeypatch.setattr(train_module, "batch_loss", flaky)
    fit(tiny_cfg(max_steps=6, warmup=4), tmp_path / "ok", log=lambda *_: None)
    records = [r for r in read_metrics(tmp_path / "ok" / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in records] == list(range(1, 7))  # skipped updates are not steps
    assert all(math.isfinite(r["loss"]) for r in records)
    assert [r["lr"] for r in records] == pytest.approx([lr_at(s, 4, 3e-3) for s in range(1, 7)])
    assert calls["n"] == 8  # two skipped updates were redone with the next batches
    state = checkpoint.load(tmp_path / "ok" / "last.pt")
    assert all(torch.isfinite(v).all() for v in state["model"].values())

    monkeypatch.setattr(train_module, "batch_loss", lambda *a, **k: real_loss(*a, **k) * float("nan"))
    with pytest.raises(MtrainError, match="3 non-finite updates in a row"):
        fit(tiny_cfg(max_steps=6, max_nonfinite=3), tmp_path / "bad", log=lambda *_: None)


def test_resume_loads_on_the_cpu_and_into_fp16(tmp_path, tiny_cfg, monkeypatch):
    import mtrain.train as train_module
    fit(tiny_cfg(max_steps=3), tmp_path / "run", log=lambda *_: None)  # fp32: an empty scaler state
    seen = []
    real_load = checkpoint.load

    def spy(path, *args, **kwargs):
        state = real_load(path, *args, **kwargs)
        seen.append((kwargs.get("map_location", "cpu"), kwargs.get("mmap", False)))
        return state

    monkeypatch.setattr(train_module.checkpoint, "load", spy)
    monkeypatch.setattr(train_module, "pick_device", cpu_fp16)
    fit(tiny_cfg(max_steps=5), tmp_path / "run", resume=True, log=lambda *_: None)
    # RNG states must stay on the CPU; the optimizer moves its own state. Mapped: no memory of its own
    # while the data loads.
    assert seen and seen[0] == ("cpu", True)
    assert real_load(tmp_path / "run" / "last.pt")["step"] == 5
    assert real_load(tmp_path / "run" / "last.pt")["scaler"]["scale"] > 0


def test_kept_checkpoints_survive_resumes(tmp_path, tiny_cfg):
    run = tmp_path / "run"
    fit(tiny_cfg(max_steps=4, save_every=2, keep_last=2), run, log=lambda *_: None)
    for end in (6, 8, 10):
        fit(tiny_cfg(max_steps=end, save_every=2, keep_last=2, average_last=2), run, resume=True,
            log=lambda *_: None)
    assert sorted(p.name for p in run.glob("ckpt_*.pt")) == ["ckpt_10.pt", "ckpt_8.pt"]
    assert checkpoint.load(run / "last.pt")["train_state"]["kept"] == ["ckpt_8.pt", "ckpt_10.pt"]
    final = checkpoint.load(run / "final.pt")
    if "average" in final["chosen"]:
        assert final["averaged_from"] == ["ckpt_8.pt", "ckpt_10.pt"]


def test_without_validation_the_average_is_final(tmp_path, spm_model):
    from mtrain.config import config_from_dict
    raw = tiny_raw(tmp_path, spm_model, max_steps=6, save_every=2, average_last=3)
    del raw["data"]["valid"]
    final = checkpoint.load(fit(config_from_dict(raw), tmp_path / "run", log=lambda *_: None))
    assert final["chosen"] == "average of 3"
    assert final["averaged_from"] == ["ckpt_2.pt", "ckpt_4.pt", "ckpt_6.pt"]


def test_out_of_memory_is_one_line(tmp_path, tiny_cfg, monkeypatch):
    import mtrain.train as train_module

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(train_module, "batch_loss", oom)
    with pytest.raises(MtrainError, match=r"out of memory .* lower train.batch_tokens \(now 200\)"):
        fit(tiny_cfg(), tmp_path / "run", log=lambda *_: None)


def test_only_collective_failures_count_as_lost_processes():
    import torch.distributed as dist

    from mtrain.train import is_lost_peer
    assert is_lost_peer(dist.DistError("connection to rank 1 closed"))
    assert is_lost_peer(RuntimeError("[gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:1"))
    assert not is_lost_peer(RuntimeError("index 7 is out of bounds for dimension 0 with size 4"))
    assert not is_lost_peer(ValueError("gloo"))


def test_resume_with_another_batch_order_is_refused(tmp_path, tiny_cfg):
    fit(tiny_cfg(max_steps=3), tmp_path / "run", log=lambda *_: None)
    with pytest.raises(MtrainError, match=r"last.pt: train.batch_tokens was 200, now 300, so the saved position"):
        fit(tiny_cfg(max_steps=5, batch_tokens=300), tmp_path / "run", resume=True, log=lambda *_: None)
    fit(tiny_cfg(max_steps=5), tmp_path / "run", resume=True, log=lambda *_: None)
    assert checkpoint.load(tmp_path / "run" / "last.pt")["step"] == 5


def test_resume_with_another_model_shape_names_the_keys(tmp_path, spm_model):
    from conftest import tiny_raw

    from mtrain.config import config_from_dict
    fit(config_from_dict(tiny_raw(tmp_path, spm_model, max_steps=2)), tmp_path / "run", log=lambda *_: None)
    raw = tiny_raw(tmp_path, spm_model, max_steps=4)
    raw["model"].update(d_model=64, heads=4)
    with pytest.raises(MtrainError, match=r"last\.pt: model settings differ from the config \(model\.d_model: 32 in "
                                          r"the checkpoint, 64 in the config; model\.heads: 2 in the checkpoint, 4 "
                                          r"in the config\); cannot resume"):
        fit(config_from_dict(raw), tmp_path / "run", resume=True, log=lambda *_: None)
    assert checkpoint.load(tmp_path / "run" / "last.pt")["step"] == 2
    kept = (tmp_path / "run" / "config.yaml").read_text()
    assert "d_model: 32" in kept  # a refused resume leaves the run's record as it was

    raw = tiny_raw(tmp_path, spm_model, max_steps=4)
    raw["tokenizer"]["vocab_size"] = 90  # ignored on resume (the run's tokenizer is kept): refused
    with pytest.raises(MtrainError, match=r"last\.pt: tokenizer settings differ from the config "
                                          r"\(tokenizer\.vocab_size: 100 in the checkpoint, 90 in the config\)"):
        fit(config_from_dict(raw), tmp_path / "run", resume=True, log=lambda *_: None)
    assert (tmp_path / "run" / "config.yaml").read_text() == kept


def test_resume_with_another_sentencepiece_file_is_refused(tmp_path, spm_model):
    """tokenizer.model names a file; if it now holds another model, the ids no longer mean what the
    weights learnt. Refused before the run directory's copy (spm.model) is replaced."""
    import shutil

    from conftest import SAMPLE_EN, tiny_raw

    from mtrain.config import config_from_dict
    from mtrain.tokenizer import train_tokenizer
    mine = tmp_path / "mine.model"
    shutil.copy(spm_model, mine)
    raw = tiny_raw(tmp_path, mine, max_steps=2)
    fit(config_from_dict(raw), tmp_path / "run", log=lambda *_: None)
    before = (tmp_path / "run" / "spm.model").read_bytes()
    other = train_tokenizer([SAMPLE_EN], config_from_dict({**raw, "tokenizer": {"vocab_size": 70}}).tokenizer,
                            tmp_path / "other")
    shutil.copy(other, mine)
    with pytest.raises(MtrainError, match=r"mine\.model: not the SentencePiece model this run trained with "
                                          r"\(in .*last\.pt\); cannot resume"):
        fit(config_from_dict({**raw, "train": {**raw["train"], "max_steps": 4}}), tmp_path / "run", resume=True,
            log=lambda *_: None)
    assert (tmp_path / "run" / "spm.model").read_bytes() == before


def test_a_tsv_corpus_trains_its_tokenizer_into_a_new_run_that_overwrite_can_clean(tmp_path, spm_model):
    """SentencePiece reads plain files: the TSV's sides are copied for it and removed after, so the run
    directory (created for the tokenizer) holds only what a run writes."""
    from conftest import SAMPLE_DE, SAMPLE_EN, tiny_raw

    from mtrain.config import config_from_dict
    from mtrain.train import RUN_FILES
    tsv = tmp_path / "c.tsv"
    tsv.write_text("".join(f"{s}\t{t}\n" for s, t in zip(SAMPLE_EN.read_text().splitlines(),
                                                           SAMPLE_DE.read_text().splitlines())))
    raw = tiny_raw(tmp_path, spm_model, max_steps=2)
    raw["data"]["train"] = {"tsv": str(tsv)}
    raw["tokenizer"] = {"model": "", "vocab_size": 60}
    run = tmp_path / "runs" / "tsv"  # neither folder exists yet
    fit(config_from_dict(raw), run, log=lambda *_: None)
    names = sorted(p.name for p in run.iterdir())
    assert "spm.model" in names and all(RUN_FILES.fullmatch(n) for n in names), names
    fit(config_from_dict(raw), run, overwrite=True, log=lambda *_: None)
    assert checkpoint.load(run / "last.pt")["step"] == 2


def test_overwrite_touches_only_what_mtrain_wrote(tmp_path, tiny_cfg):
    theirs = tmp_path / "shared"
    theirs.mkdir()
    (theirs / "model.pt").write_bytes(b"someone else's model")
    for overwrite in (False, True):
        with pytest.raises(MtrainError, match="shared: holds files mtrain did not write \\(model.pt\\)"):
            fit(tiny_cfg(max_steps=2), theirs, overwrite=overwrite, log=lambda *_: None)
    assert (theirs / "model.pt").read_bytes() == b"someone else's model"
    run = tmp_path / "run"
    fit(tiny_cfg(max_steps=2, save_every=1), run, log=lambda *_: None)
    fit(tiny_cfg(max_steps=1, save_every=1), run, overwrite=True, log=lambda *_: None)
    assert sorted(p.name for p in run.glob("ckpt_*.pt")) == ["ckpt_1.pt"]  # ckpt_2 of the old run is gone


def test_torn_metrics_line_is_skipped_and_not_continued(tmp_path, tiny_cfg):
    run = tmp_path / "run"
    fit(tiny_cfg(max_steps=2), run, log=lambda *_: None)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 4.')  # what a kill -9 in the middle of a write leaves
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2, 2]  # 2 twice: loss, then valid
    fit(tiny_cfg(max_steps=4), run, resume=True, log=lambda *_: None)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert lines[2 + 1] == '{"step": 3, "loss": 4.'  # the torn line stays alone on its line
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r] == [1, 2, 3, 4]


def test_last_pt_without_hard_links(tmp_path, tiny_cfg, monkeypatch):
    import mtrain.files as files

    def no_links(*args, **kwargs):
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(files.os, "link", no_links)
    run = tmp_path / "run"
    fit(tiny_cfg(max_steps=4, save_every=2), run, log=lambda *_: None)
    assert (run / "last.pt").read_bytes() == (run / "ckpt_4.pt").read_bytes()
    assert os.stat(run / "last.pt").st_ino != os.stat(run / "ckpt_4.pt").st_ino
    assert not [p for p in run.iterdir() if p.name.startswith(".")]


def test_disk_full_while_training_stops_with_one_line(tmp_path, tiny_cfg, monkeypatch):
    import errno

    import mtrain.train as train_module
    run = tmp_path / "run"
    fit(tiny_cfg(max_steps=2, save_every=2), run, log=lambda *_: None)
    real_save = torch.save

    def disk_full(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(train_module.checkpoint.torch, "save", disk_full)
    with pytest.raises(MtrainError, match=f"{run}: cannot write the checkpoint ckpt_4.pt"):
        fit(tiny_cfg(max_steps=6, save_every=2), run, resume=True, log=lambda *_: None)
    monkeypatch.setattr(train_module.checkpoint.torch, "save", real_save)
    assert checkpoint.load(run / "last.pt")["step"] == 2
    assert not [p for p in run.iterdir() if p.name.startswith(".")]


def test_budget_schedules_decay_to_zero_at_the_plan():
    w, peak, total = 100, 1e-3, 1100
    for schedule in ("linear", "cosine"):
        assert lr_at(50, w, peak, schedule, total) == pytest.approx(peak / 2)  # warm-up as before
        assert lr_at(w, w, peak, schedule, total) == pytest.approx(peak)
        assert lr_at(total, w, peak, schedule, total) == pytest.approx(0.0, abs=1e-12)
        assert lr_at(total + 50, w, peak, schedule, total) == pytest.approx(0.0, abs=1e-12)
    assert lr_at(600, w, peak, "linear", total) == pytest.approx(peak * 0.5)
    assert lr_at(600, w, peak, "cosine", total) == pytest.approx(peak * 0.5)
    assert lr_at(350, w, peak, "cosine", total) == pytest.approx(peak * 0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_at(400, w, peak, "inverse_sqrt", total) == pytest.approx(peak * 0.5)  # total is ignored


def test_log_lines_say_how_much_of_the_time_budget_is_spent(tmp_path, tiny_cfg, capsys):
    from mtrain.report import progress
    assert progress(750.0, 3600.0) == "12.5 of 60.0 min"
    assert progress(90.0, float("inf")) == "1.5 min"
    fit(tiny_cfg(max_steps=4, log_every=2, max_time="10m"), tmp_path / "run")  # the default channel
    lines = [line for line in capsys.readouterr().out.splitlines() if "tok/s" in line]  # no terminal: no bar
    assert [line.split(":")[0] for line in lines] == ["step 2", "step 4"]
    spent = [float(line.rsplit(", ", 1)[1].split()[0]) for line in lines]
    assert all(line.endswith(" of 10.0 min") for line in lines) and 0 <= spent[0] <= spent[1] < 10


def test_time_budget_plan_is_re_estimated_from_the_measured_speed():
    from mtrain.train import planned_updates
    assert planned_updates(0, 0.0, 600.0, 0) == 0  # nothing measured yet
    assert planned_updates(100, 60.0, 600.0, 0) == 1000  # 100 updates per minute, 10 minutes
    assert planned_updates(100, 120.0, 600.0, 0) == 500  # slower than thought: the plan shrinks
    assert planned_updates(100, 60.0, 600.0, 700) == 700  # max_steps comes first
    assert planned_updates(100, 60.0, float("inf"), 700) == 700
    assert planned_updates(500, 700.0, 600.0, 0) == 501  # over budget: ends now


def test_linear_schedule_resumes_exactly_and_saves_its_plan(tmp_path, tiny_cfg):
    full = tmp_path / "full"
    fit(tiny_cfg(max_steps=16, warmup=4, schedule="linear"), full, log=lambda *_: None)
    # Stopped by max_epochs, so that the plan (max_steps) is the same as the full run's.
    fit(tiny_cfg(max_steps=16, max_epochs=2, warmup=4, schedule="linear"), tmp_path / "part", log=lambda *_: None)
    stopped = checkpoint.load(tmp_path / "part" / "last.pt")["step"]
    assert 4 < stopped < 16
    fit(tiny_cfg(max_steps=16, warmup=4, schedule="linear"), tmp_path / "part", resume=True, log=lambda *_: None)
    a, b = losses(full), losses(tmp_path / "part")
    assert [a[s] for s in range(stopped + 1, 17)] == [b[s] for s in range(stopped + 1, 17)]
    lrs = {r["step"]: r["lr"] for r in map(json.loads, open(full / "metrics.jsonl")) if "lr" in r}
    assert lrs[16] == pytest.approx(0.0, abs=1e-12) and lrs[10] == pytest.approx(3e-3 * (1 - 6 / 12))
    assert checkpoint.load(full / "last.pt")["train_state"]["plan"] == 16
    # Under a time budget the plan is measured, saved, and continued after a resume.
    timed = tmp_path / "timed"
    fit(tiny_cfg(max_steps=0, max_time="4s", warmup=4, schedule="linear", save_every=1000), timed,
        log=lambda *_: None)
    state = checkpoint.load(timed / "last.pt")["train_state"]
    assert state["step"] >= 25 and abs(state["plan"] - state["step"]) <= 0.25 * state["step"] + 25
    lrs = [r["lr"] for r in map(json.loads, open(timed / "metrics.jsonl")) if "lr" in r]
    assert lrs[-1] < 0.25 * 3e-3  # the run ended near the end of its decay, not at the peak


def test_moving_average_follows_its_formula_and_resumes_exactly(tmp_path, tiny_cfg):
    d = 0.9
    one, two = tmp_path / "one", tmp_path / "two"
    fit(tiny_cfg(max_steps=1, ema=d), one, log=lambda *_: None)
    fit(tiny_cfg(max_steps=2, ema=d), two, log=lambda *_: None)
    w1, ema1 = (checkpoint.load(one / "last.pt")[k] for k in ("model", "ema"))
    w2, ema2 = (checkpoint.load(two / "last.pt")[k] for k in ("model", "ema"))
    assert ema1["updates"] == 1 and ema2["updates"] == 2
    for k in w1:  # a copy at the first update, then ema = d * ema + (1 - d) * weights
        torch.testing.assert_close(ema1["model"][k], w1[k], rtol=0, atol=0)
        torch.testing.assert_close(ema2["model"][k], d * w1[k] + (1 - d) * w2[k], rtol=1e-5, atol=1e-7)
    assert any(not torch.equal(ema2["model"][k], w2[k]) for k in w2)

    # Stopped and resumed, the moving average is the one of an uninterrupted run.
    full, part = tmp_path / "full", tmp_path / "part"
    fit(tiny_cfg(max_steps=12, ema=d), full, log=lambda *_: None)
    fit(tiny_cfg(max_steps=6, ema=d), part, log=lambda *_: None)
    fit(tiny_cfg(max_steps=12, ema=d), part, resume=True, log=lambda *_: None)
    a, b = (checkpoint.load(run / "last.pt")["ema"] for run in (full, part))
    assert a["updates"] == b["updates"] == 12
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=0)


def test_moving_average_is_a_final_candidate_and_translates(tmp_path, tiny_cfg, spm_model):
    from mtrain.config import config_from_dict
    lines = []
    final = checkpoint.load(fit(tiny_cfg(max_steps=8, ema=0.5), tmp_path / "run", log=lines.append))
    assert any(line.startswith("final candidate moving average (decay 0.5): valid BLEU") for line in lines)
    assert final["chosen"] in ("best", "moving average (decay 0.5)")
    # Without a validation set the moving average is final.pt, and it loads for translation.
    raw = tiny_raw(tmp_path, spm_model, max_steps=8, ema=0.5)
    del raw["data"]["valid"]
    path = fit(config_from_dict(raw), tmp_path / "novalid", log=lambda *_: None)
    final, last = checkpoint.load(path), checkpoint.load(tmp_path / "novalid" / "last.pt")
    assert final["chosen"] == "moving average (decay 0.5)"
    model, _, _ = checkpoint.load_for_inference([path])
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, last["ema"]["model"][k], rtol=0, atol=0)
    assert any(not torch.equal(last["ema"]["model"][k], v) for k, v in last["model"].items())


def test_validation_reads_unknown_characters_as_translate_does(tmp_path, spm_model, monkeypatch):
    """A validation source character the tokenizer does not know is left out, as `mtrain translate`
    leaves it out: validation BLEU is the BLEU that translating the file gives."""
    import mtrain.train as train_module
    from mtrain import translate as translate_module
    from mtrain.config import config_from_dict
    src, tgt = SAMPLE_EN.read_text().splitlines(), SAMPLE_DE.read_text().splitlines()
    src[1] = src[1].replace(" ", " \U0001F415", 1)
    (tmp_path / "valid.en").write_text("\n".join(src) + "\n")
    raw = tiny_raw(tmp_path, spm_model, max_steps=6, valid_every=6, save_every=6)
    raw["data"]["valid"] = {"src": str(tmp_path / "valid.en"), "tgt": str(SAMPLE_DE)}
    decoded = []  # the source ids that validation decodes
    monkeypatch.setattr(train_module, "decode_ids",
                        lambda model, ids, *args: decoded.extend(ids) or translate_module.decode_ids(model, ids, *args))
    logged = []
    fit(config_from_dict(raw), tmp_path / "run", log=logged.append)
    assert any(line.startswith("data: 1 validation source line held characters the tokenizer does not know")
               for line in logged)
    model, toks, cfg = checkpoint.load_for_inference([tmp_path / "run" / "last.pt"])
    encoded = toks.src.encode_batch(src)
    assert toks.src.unk in encoded[1]
    assert decoded[:len(src)] == [[x for x in ids if x != toks.src.unk] for ids in encoded]
    valid_bleu = [r["valid_bleu"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "valid_bleu" in r]
    out = list(translate_lines(src, model, toks, dataclasses.replace(cfg.decode, beam=1), pick_device("cpu", "fp32")))
    assert valid_bleu == [pytest.approx(bleu(out, tgt), abs=1e-6)]


def test_the_last_validation_reaches_last_pt(tmp_path, tiny_cfg):
    """The last step is a checkpoint step but not a validation step: the end-of-run validation's best
    BLEU and patience count reach last.pt, which a resume that extends the run compares against."""
    run = tmp_path / "run"
    fit(tiny_cfg(max_steps=4, save_every=2, valid_every=3), run, log=lambda *_: None)
    valid = [r for r in read_metrics(run / "metrics.jsonl") if "valid_bleu" in r]
    assert [r["step"] for r in valid] == [3, 4]
    state = checkpoint.load(run / "last.pt")["train_state"]
    best_at = max(range(len(valid)), key=lambda i: (valid[i]["valid_bleu"], -i))  # the first of the best
    assert state["best_bleu"] == valid[best_at]["valid_bleu"]
    assert state["bad_valid"] == len(valid) - 1 - best_at
    assert state["elapsed"] >= max(r["wall_s"] for r in valid) - 60  # not the time before the validation
    assert state["kept"] == ["ckpt_2.pt", "ckpt_4.pt"]  # saved again under its own name, counted once


def test_a_time_budget_decays_from_the_peak_before_its_first_estimate(tmp_path, tiny_cfg):
    """Until a time budget's first estimate (update 25) the decay's end is unknown: the rate holds the
    peak after warm-up, never 0; a plan shorter than the warm-up still decays to 0 at its end."""
    peak = 3e-3
    assert [lr_at(s, 0, peak, "linear", 0) for s in (1, 2, 24)] == [peak] * 3
    assert lr_at(60, 100, peak, "linear", 60) == 0.0 and lr_at(30, 100, peak, "cosine", 60) == pytest.approx(peak)
    assert 0 < lr_at(45, 100, peak, "linear", 60) < peak
    run = tmp_path / "run"
    budget = dict(max_steps=0, max_time="10m", warmup=0, schedule="linear")
    fit(tiny_cfg(max_epochs=1, **budget), run, log=lambda *_: None)
    last = checkpoint.load(run / "last.pt")
    del last["train_state"]["plan"]  # a checkpoint from before the plan was saved
    checkpoint.save(run / "last.pt", last)
    fit(tiny_cfg(max_epochs=2, **budget), run, resume=True, log=lambda *_: None)
    lrs = {r["step"]: r["lr"] for r in read_metrics(run / "metrics.jsonl") if "lr" in r}
    assert max(lrs) > last["step"] and all(lr == pytest.approx(peak) for lr in lrs.values()), lrs


def test_the_end_of_a_resumed_older_run_honours_trust_checkpoint(tmp_path, tiny_cfg):
    """A run of an older checkpoint format (pickled numpy objects) resumes with --trust-checkpoint,
    and the end of the run (best.pt, the averaged checkpoints) loads them with it too."""
    import numpy as np
    run = tmp_path / "run"
    fit(tiny_cfg(max_steps=4, save_every=2, valid_every=2, keep_last=3, average_last=2), run, log=lambda *_: None)
    for path in run.glob("*.pt"):
        state = checkpoint.load(path)
        if "rng" in state:
            state["rng"][0]["numpy"][1] = state["rng"][0]["numpy"][1].numpy()  # as version 1 saved it
        else:
            state["old"] = np.zeros(2)
        checkpoint.save(path, {**state, "version": 1})
    more = tiny_cfg(max_steps=6, save_every=2, valid_every=2, keep_last=3, average_last=2)
    with pytest.raises(MtrainError, match="pass --trust-checkpoint"):
        fit(more, run, resume=True, log=lambda *_: None)
    lines = []
    final = fit(more, run, resume=True, trust=True, log=lines.append)
    assert final.name == "final.pt" and checkpoint.load(run / "last.pt")["step"] == 6
    assert any(line.startswith("final candidate average of 2: valid BLEU") for line in lines)


def test_checkpoints_of_removed_options_are_refused_by_name(tmp_path, tiny_cfg):
    """A run that trained with an option since removed: its resume is refused naming the option, and a
    model whose shape the option changed (output_vocab seen) cannot be loaded; one trained with R-Drop
    still translates."""
    run = tmp_path / "run"
    fit(tiny_cfg(max_steps=2), run, log=lambda *_: None)
    state = checkpoint.load(run / "last.pt")
    state["config"]["train"]["rdrop"] = 5.0
    checkpoint.save(run / "last.pt", state)
    with pytest.raises(MtrainError, match=r"last\.pt: train\.rdrop: 5\.0 is an option this version of mtrain removed"):
        fit(tiny_cfg(max_steps=4), run, resume=True, log=lambda *_: None)
    assert checkpoint.load_for_inference([run / "last.pt"])[0] is not None
    state["config"]["model"]["output_vocab"] = "seen"
    checkpoint.save(run / "seen.pt", state)
    with pytest.raises(MtrainError, match=r"seen\.pt config: model\.output_vocab: seen is an option .* cannot be built"):
        checkpoint.load_for_inference([run / "seen.pt"])
    state["config"]["model"]["output_vocab"] = "all"  # what every checkpoint from before the removal holds
    state["config"]["train"]["rdrop"] = 0.0
    checkpoint.save(run / "last.pt", state)
    fit(tiny_cfg(max_steps=4), run, resume=True, log=lambda *_: None)
    assert checkpoint.load(run / "last.pt")["step"] == 4


def test_two_weighted_tagged_corpora_train_resume_exactly_and_report_their_pairs(tmp_path, spm_model):
    """data.train as a list: the tokenizer fit trains learns each tag as one piece, each epoch draws
    the corpora by weight, metrics.jsonl says what each gave, and a resume continues exactly."""
    from mtrain.config import config_from_dict
    from mtrain.tokenizer import Tokenizer
    lines_en, lines_de = SAMPLE_EN.read_text().splitlines(), SAMPLE_DE.read_text().splitlines()
    (tmp_path / "half.en").write_text("\n".join(lines_en[:10]) + "\n")
    (tmp_path / "half.de").write_text("\n".join(lines_de[:10]) + "\n")

    def cfg(**train):
        raw = tiny_raw(tmp_path, spm_model, **train)
        raw["data"]["train"] = [{"name": "all", "src": str(SAMPLE_EN), "tgt": str(SAMPLE_DE), "tag": "<a>"},
                                {"name": "half", "src": str(tmp_path / "half.en"), "tgt": str(tmp_path / "half.de"),
                                 "weight": 1.5, "tag": "<b>"}]
        raw["data"]["valid"]["tag"] = "<a>"
        raw["tokenizer"] = {"vocab_size": 100}  # trained into the run directory, with the tags
        return config_from_dict(raw)

    lines = []
    fit(cfg(max_steps=12), tmp_path / "full", log=lines.append)
    tok = Tokenizer.load(tmp_path / "full" / "spm.model")
    for tag in ("<a>", "<b>"):  # one piece each
        assert tok.sp.piece_to_id(tag) != tok.unk and tok.sp.piece_to_id(tag) in tok.sp.encode(tag)
    assert "epoch 1: all 20 pairs, half 15 pairs" in lines
    records = [r for r in read_metrics(tmp_path / "full" / "metrics.jsonl") if "epoch_pairs" in r]
    assert records and all(r["epoch_pairs"] == {"all": 20, "half": 15} for r in records)
    fit(cfg(max_steps=6), tmp_path / "part", log=lambda *_: None)
    fit(cfg(max_steps=12), tmp_path / "part", resume=True, log=lambda *_: None)
    a, b = losses(tmp_path / "full"), losses(tmp_path / "part")
    assert [a[s] for s in range(7, 13)] == [b[s] for s in range(7, 13)]
    assert checkpoint.load(tmp_path / "full" / "last.pt")["data"]["epoch"] > 1  # it crossed an epoch


def test_collating_ahead_trains_the_same_as_in_the_loop(tmp_path, tiny_cfg):
    fit(tiny_cfg(max_steps=8, prefetch=0), tmp_path / "loop", log=lambda *_: None)
    fit(tiny_cfg(max_steps=8, prefetch=3), tmp_path / "ahead", log=lambda *_: None)
    assert losses(tmp_path / "loop") == losses(tmp_path / "ahead")
    a, b = (checkpoint.load(tmp_path / run / "last.pt")["data"] for run in ("loop", "ahead"))
    assert a == b  # the position of the loop, not of the batches collated ahead


def test_the_moving_average_is_torchs_ema_with_its_count_on_the_host():
    """MovingAverage gives what torch's AveragedModel with its EMA function gives (a copy at the first
    update, then ema += (1 - decay)(w - ema)), with its count of updates a Python int: AveragedModel
    reads its device counter back at every update."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    from mtrain.config import ModelConfig
    from mtrain.model import Transformer
    from mtrain.train import MovingAverage
    torch.manual_seed(0)
    model = Transformer(ModelConfig(encoder_layers=1, decoder_layers=1, d_model=16, heads=2, ffn_dim=32), 20, 20, 0)
    ours, theirs = MovingAverage(model, 0.9), AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9))
    for _ in range(4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ours.update(model)
        theirs.update_parameters(model)
    assert ours.updates == 4 and isinstance(ours.updates, int)
    for a, b in zip(ours.module.parameters(), theirs.module.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    assert not any(p.requires_grad for p in ours.module.parameters())
    assert ours.module.output.weight is ours.module.tgt_embed.weight  # tied weights stay tied in the copy


def test_ddp_does_not_broadcast_the_positions_table(tmp_path):
    """The positions table is each process's own computation: DDP's broadcast of buffers before every
    forward (no_sync micro-batches included) is switched off."""
    import torch.distributed as dist

    from mtrain.config import ModelConfig
    from mtrain.device import World
    from mtrain.model import Transformer
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = Transformer(ModelConfig(encoder_layers=1, decoder_layers=1, d_model=16, heads=2, ffn_dim=32), 20, 20, 0)
        wrapped = World(size=2).wrap(model, torch.device("cpu"))
        assert wrapped.broadcast_buffers is False and wrapped.module is model
    finally:
        dist.destroy_process_group()


def test_the_shipped_tiny_config_learns_the_sample_by_heart(tmp_path):
    """configs/tiny.yaml as shipped (only its cache moved out of the checkout): `fit`, then `translate`
    gives the sample's German back, every line exactly."""
    import subprocess
    import sys

    from conftest import ROOT, SAMPLE_DE, SAMPLE_EN

    def mtrain(*args):
        r = subprocess.run([sys.executable, "-m", "mtrain", *map(str, args)], cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]
        return r
    run = tmp_path / "run"
    fitted = mtrain("fit", "configs/tiny.yaml", "-o", run, "--set", f"data.cache_dir={tmp_path / 'cache'}")
    assert "stopped at step 200: reached train.max_steps" in fitted.stdout
    mtrain("translate", "-c", run / "final.pt", "-i", SAMPLE_EN, "-o", tmp_path / "out.de")
    assert (tmp_path / "out.de").read_text().splitlines() == SAMPLE_DE.read_text().splitlines()
