"""The one place that decides device, precision, threads, seeds and RNG state."""

from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass

import numpy as np
import torch

from mtrain.errors import MtrainError


@dataclass
class Device:
    device: torch.device
    amp_dtype: torch.dtype | None  # None = plain fp32
    scaler: torch.amp.GradScaler  # enabled only for fp16

    @property
    def precision(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.amp_dtype]

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)


def cpu_has_bf16() -> bool:
    """True when oneDNN reports native bf16 matrix support (AVX512-BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def default_threads() -> int:
    # Hyper-threads share one core's matrix units; one thread per physical core is fastest for GEMMs.
    n = os.cpu_count() or 1
    return max(1, n)


def pick_device(device: str = "auto", precision: str = "auto", threads: int = 0) -> Device:
    """Resolve 'auto' settings to a device and autocast dtype; errors name the setting."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MtrainError(f"train.device: {device} requested but CUDA is not available")
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        # TF32 matmuls for the fp32 parts (Ampere and newer): same range, far faster.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        bf16_ok = torch.cuda.is_bf16_supported()
    else:
        torch.set_num_threads(threads or default_threads())
        bf16_ok = cpu_has_bf16()
    if precision == "auto":
        precision = "bf16" if bf16_ok else ("fp16" if dev.type == "cuda" else "fp32")
    if precision == "bf16" and not bf16_ok and dev.type == "cuda":
        raise MtrainError("train.precision: bf16 is not supported by this GPU; use fp16 or fp32")
    if precision == "fp16" and dev.type == "cpu":
        raise MtrainError("train.precision: fp16 autocast is for GPUs; use bf16 or fp32 on a CPU")
    amp_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    scaler = torch.amp.GradScaler(dev.type, enabled=precision == "fp16")
    return Device(dev, amp_dtype, scaler)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
