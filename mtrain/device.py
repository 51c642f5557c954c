"""The one place that decides device, precision, threads, seeds and RNG state."""

from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass
from datetime import timedelta

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
    """The CPUs this process may run on (a container or taskset may allow fewer than the machine has)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


@dataclass
class World:
    """The processes of a torchrun job; one process (size 1) runs no distributed code at all."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    timeout_s: float = 600.0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.size > 1:
            import torch.distributed as dist
            if dist.get_backend() == "gloo":  # names the rank that did not arrive, within the timeout
                dist.monitored_barrier(timeout=timedelta(seconds=self.timeout_s))
            else:
                dist.barrier()

    def max(self, value: int) -> int:
        return int(self._reduce(torch.tensor(float(value)), "MAX"))

    def sum(self, value: torch.Tensor) -> float:
        return float(self._reduce(value.detach().float().clone(), "SUM"))

    def _reduce(self, tensor: torch.Tensor, op: str) -> torch.Tensor:
        if self.size > 1:
            import torch.distributed as dist
            device = torch.device("cuda", self.local_rank) if dist.get_backend() == "nccl" else torch.device("cpu")
            tensor = tensor.to(device)
            dist.all_reduce(tensor, op=getattr(dist.ReduceOp, op))
        return tensor

    def gather(self, obj) -> list:
        if self.size == 1:
            return [obj]
        import torch.distributed as dist
        out = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def wrap(self, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        from torch.nn.parallel import DistributedDataParallel
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    def close(self) -> None:
        if self.size > 1:
            import torch.distributed as dist
            dist.destroy_process_group()


def init_world(device: str, timeout_s: float) -> World:
    """Join the torchrun job described by the environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR):
    NCCL between GPUs, gloo between CPU processes. Without torchrun: a world of one, untouched."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    import torch.distributed as dist
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device != "cpu" and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local)
    try:
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s))
    except Exception as e:  # the rendezvous failed: name it in one line
        raise MtrainError(f"torchrun: cannot join the process group ({type(e).__name__}: {e})") from None
    return World(rank, size, local, timeout_s)


def pick_device(device: str = "auto", precision: str = "auto", threads: int = 0, world: World = World()) -> Device:
    """Resolve 'auto' settings to a device and autocast dtype; errors name the setting."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and world.size > 1:
        device = f"cuda:{world.local_rank}"
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
        torch.set_num_threads(threads or max(1, default_threads() // world.size))
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
