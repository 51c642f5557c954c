"""The CUDA path, run where CUDA is present (`pytest -m gpu`; scripts/gpu_check.sh runs these first)."""

import os
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import ROOT, SAMPLE_EN, tiny_raw

from mtrain import checkpoint
from mtrain.config import DecodeConfig, config_from_dict
from mtrain.device import pick_device
from mtrain.report import read_metrics
from mtrain.train import fit
from mtrain.translate import translate_texts

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def gpu_cfg(tmp_path, spm_model, **train):
    raw = tiny_raw(tmp_path, spm_model, **{"device": "cuda", "max_steps": 30, **train})
    return config_from_dict(raw)


def losses(run):
    return {r["step"]: r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r}


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_fit_on_cuda(tmp_path, spm_model, precision):
    if precision == "bf16" and not torch.cuda.is_bf16_supported(including_emulation=False):
        pytest.skip("this GPU has no native bf16")
    lines = []
    fit(gpu_cfg(tmp_path, spm_model, precision=precision), tmp_path / "run", log=lines.append)
    assert any(f"device: cuda:0, precision {precision}" in line for line in lines)
    got = losses(tmp_path / "run")
    assert sorted(got) == list(range(1, 31))  # every step is logged once
    # A skipped update does not advance the step, so the steps cannot show one: the log line does.
    assert not [line for line in lines if "update skipped" in line], lines
    assert sum(got[s] for s in range(26, 31)) < sum(got[s] for s in range(1, 6))  # the loss falls
    state = checkpoint.load(tmp_path / "run" / "last.pt")
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_resume_on_cuda_equals_uninterrupted(tmp_path, spm_model):
    fit(gpu_cfg(tmp_path, spm_model, max_steps=20), tmp_path / "full", log=lambda *_: None)
    fit(gpu_cfg(tmp_path, spm_model, max_steps=10), tmp_path / "part", log=lambda *_: None)
    fit(gpu_cfg(tmp_path, spm_model, max_steps=20), tmp_path / "part", resume=True, log=lambda *_: None)
    a, b = losses(tmp_path / "full"), losses(tmp_path / "part")
    # Same batches, same dropout masks (the CUDA RNG state is restored), but CUDA attention backward
    # kernels may sum in a different order from run to run: equal up to float rounding, not bit for bit.
    for step in range(11, 21):
        assert b[step] == pytest.approx(a[step], rel=1e-3), step


def test_translate_on_cuda_matches_cpu(tmp_path, spm_model):
    final = fit(gpu_cfg(tmp_path, spm_model, precision="fp32", save_every=10, average_last=2), tmp_path / "run",
                log=lambda *_: None)
    lines = SAMPLE_EN.read_text().splitlines()
    outputs = {}
    for device in ("cpu", "cuda"):
        model, toks, cfg = checkpoint.load_for_inference([final])
        dev = pick_device(device, "fp32")
        model.to(dev.device)
        outputs[device] = translate_texts(lines, model, toks, DecodeConfig(beam=4, max_len_b=20), dev)
    # CPU and GPU attention and matmul kernels sum in other orders: the scores agree to float rounding,
    # and a line may differ only where two outputs tie within it.
    same = [c.texts == g.texts for c, g in zip(outputs["cpu"], outputs["cuda"])]
    assert sum(same) >= len(lines) - len(lines) // 10, outputs
    for c, g in zip(outputs["cpu"], outputs["cuda"]):
        assert g.scores == pytest.approx(c.scores, abs=1e-3)
    ckpts = sorted((tmp_path / "run").glob("ckpt_*.pt"))
    assert len(ckpts) == 2
    args = [sys.executable, "-m", "mtrain", "translate", "--device", "cuda", "--beam", "4", "-i", str(SAMPLE_EN)]
    for c in ckpts:
        args += ["-c", str(c)]
    out = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    assert len(out.stdout.splitlines()) == len(lines)


def test_torchrun_one_process_on_cuda(tmp_path, spm_model):
    raw = tiny_raw(tmp_path, spm_model, device="cuda", max_steps=6, save_every=3)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                          "-m", "mtrain", "fit", str(cfg), "--output", str(tmp_path / "run")],
                         capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                         timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "device: cuda:0" in out.stdout
    assert checkpoint.load(tmp_path / "run" / "last.pt")["step"] == 6


def test_a_training_step_makes_no_host_sync(tmp_path):
    """The loss finds the real target positions from indices made on the host: forward and backward
    of a batch never make the host wait for the GPU (only the logged loss and the gradient norm do,
    once per update)."""
    from mtrain.config import ModelConfig
    from mtrain.data import collate
    from mtrain.model import Transformer
    from mtrain.train import batch_loss
    model = Transformer(ModelConfig(encoder_layers=1, decoder_layers=1, d_model=32, heads=2, ffn_dim=64), 50, 50,
                        pad=0).cuda().train()
    batch = collate([[5, 6, 7, 8], [9, 10]], [[11, 12], [13, 14, 15, 16]], pad=0, bos=2, eos=3).to(torch.device("cuda"))
    batch_loss(model, batch, 0.1).backward()  # warm-up: kernels chosen, memory allocated
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16):
            loss = batch_loss(model, batch, 0.1)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss).item()
