"""The one place that decides device, precision, threads, seeds and RNG state."""

from __future__ import annotations

import contextlib
import functools
import os
import random
import re
import time
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


# bf16 autocast on a CPU pays for casts around every matmul: it must win the matmuls clearly to win a
# training step. 2-core Xeon (Emerald Rapids, AVX512-BF16 exposed, AMX not) measured bf16 matmuls at
# 0.6x fp32 and bf16 training at 0.68x fp32 (d_model 128); AMX does bf16 matmuls several times faster.
BF16_MIN_SPEEDUP = 1.5


@functools.cache
def cpu_bf16_speedup(n: int = 1024, reps: int = 4) -> float:
    """fp32 time / bf16 time of an n x n x n matmul on this CPU (about 0.1 s, once per process).
    Native bf16 is no promise of speed: without AMX, oneDNN's bf16 kernels can be slower than fp32."""
    timings = []
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.ones(n, n, dtype=dtype), torch.ones(n, n, dtype=dtype)
        a @ b  # warm-up: kernel selection and first-touch allocation
        start = time.perf_counter()
        for _ in range(reps):
            a @ b
        timings.append(time.perf_counter() - start)
    return timings[0] / timings[1]


def default_threads(processes: int = 1) -> int:
    """Threads for one of `processes` processes: OMP_NUM_THREADS when one process runs and it is set
    (someone running several jobs side by side; overriding it made them fight over the cores), else the
    CPUs this process may run on (a container or taskset may allow fewer than the machine has) split
    among the processes. torchrun sets OMP_NUM_THREADS=1 for each of several processes; the split
    serves them better."""
    omp = os.environ.get("OMP_NUM_THREADS", "")
    if processes == 1 and omp.isdigit() and int(omp) > 0:
        return int(omp)
    from mtrain.tokenizer import usable_cores
    return max(1, usable_cores() // processes)


# Rank 0 may train SentencePiece and encode a corpus of tens of millions of pairs while the other
# processes wait: that wait has its own group and a bound of its own, not train.dist_timeout.
PREPARE_TIMEOUT = timedelta(days=1)


@dataclass
class World:
    """The processes of a torchrun job; one process (size 1) runs no distributed code at all."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    timeout_s: float = 600.0
    prepare_group: object = None  # a gloo group whose barrier waits up to PREPARE_TIMEOUT

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

    @contextlib.contextmanager
    def main_first(self):
        """Rank 0 runs the block first (training the tokenizer, encoding the corpus, filling the run
        directory), the others after it, finding its files. The wait can take hours on a large corpus,
        so it is not bounded by the collective timeout; if rank 0 fails, torchrun ends the others."""
        if not self.main:
            self._wait_for_main()
        yield
        if self.main:
            self._wait_for_main()

    def wait_for_preparation(self) -> None:
        """Every process waits here until all have arrived, however long one prepares the data."""
        self._wait_for_main()

    def wait_for_main_work(self) -> None:
        """Every process waits here while rank 0 validates or writes a checkpoint: a large validation
        set or a slow shared filesystem may take longer than train.dist_timeout, which bounds the
        collectives of training, not this wait."""
        self._wait_for_main()

    def _wait_for_main(self) -> None:
        if self.size > 1:
            import torch.distributed as dist
            dist.barrier(group=self.prepare_group)

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
        """DDP around the model. Its only buffer, the positions table, is computed alike by every
        process: broadcasting it before every forward (DDP's default) would be work for nothing."""
        from torch.nn.parallel import DistributedDataParallel
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                       broadcast_buffers=False)

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
    world = World(rank, size, local, timeout_s)
    dev = resolve_device(device, world)
    kwargs = {}
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        kwargs["device_id"] = dev  # NCCL binds this process to its GPU instead of guessing rank % GPUs
    try:
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", timeout=timedelta(seconds=timeout_s),
                                **kwargs)
        world.prepare_group = dist.new_group(backend="gloo", timeout=PREPARE_TIMEOUT)
    except Exception as e:  # the rendezvous failed: name it in one line
        raise MtrainError(f"torchrun: cannot join the process group ({type(e).__name__}: {e})") from None
    return world


def resolve_device(device: str, world: World = World(), setting: str = "train.device") -> torch.device:
    """'auto', 'cpu', 'cuda' or 'cuda:N' -> a torch.device; a CUDA device always carries its index.
    Under torchrun every process takes the GPU of its LOCAL_RANK, whatever index the config names,
    so that N processes use N GPUs instead of sharing one."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
        raise MtrainError(f"{setting}: must be auto, cpu, cuda or cuda:N, got {device!r}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if not device.startswith("cuda"):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise MtrainError(f"{setting}: {device} requested but CUDA is not available")
    index = world.local_rank if world.size > 1 else torch.device(device).index
    if index is None:
        index = torch.cuda.current_device()
    if index >= torch.cuda.device_count():
        raise MtrainError(f"{setting}: cuda:{index} does not exist ({torch.cuda.device_count()} GPUs visible)")
    return torch.device("cuda", index)


def pick_device(device: str = "auto", precision: str = "auto", threads: int = 0, world: World = World(),
                setting: str = "train.") -> Device:
    """Resolve 'auto' settings to a device and autocast dtype; errors name the setting
    (`setting` is the prefix of its name: "train." in a config, "--" on the command line)."""
    if precision not in ("auto", "fp32", "bf16", "fp16"):
        raise MtrainError(f"{setting}precision: must be auto, fp32, bf16 or fp16, got {precision!r}")
    dev = resolve_device(device, world, f"{setting}device")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        # TF32 matmuls for the fp32 parts of mixed precision (Ampere and newer): same range, far faster.
        # precision fp32 asked for IEEE fp32, and gets it: results that match a CPU's.
        tf32 = precision != "fp32"
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
        # Without emulation: emulated bf16 (V100, T4) is slower than fp16 there.
        bf16_ok = torch.cuda.is_bf16_supported(including_emulation=False)
    else:
        torch.set_num_threads(threads or default_threads(world.size))
        bf16_ok = cpu_has_bf16()
    if precision == "auto" and dev.type == "cuda":
        precision = "bf16" if bf16_ok else "fp16"
    elif precision == "auto":
        # Measured after the thread count is set. Under torchrun, bf16 only where every process found it faster.
        fast = bf16_ok and cpu_bf16_speedup() >= BF16_MIN_SPEEDUP
        if world.size > 1:
            fast = not world.max(not fast)
        precision = "bf16" if fast else "fp32"
    if precision == "bf16" and not bf16_ok:
        if dev.type == "cuda":
            raise MtrainError(f"{setting}precision: bf16 is not supported by this GPU; use fp16 or fp32")
        raise MtrainError(f"{setting}precision: this CPU has no native bf16 (AVX512-BF16 or AMX), and emulated "
                          f"bf16 is about 100 times slower than fp32; use fp32 (or auto)")
    if precision == "fp16" and dev.type == "cpu":
        raise MtrainError(f"{setting}precision: fp16 autocast is for GPUs; use bf16 or fp32 on a CPU")
    amp_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    scaler = torch.amp.GradScaler(dev.type, enabled=precision == "fp16")
    return Device(dev, amp_dtype, scaler)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state(device: torch.device = torch.device("cpu")) -> dict:
    """This process's generators as tensors and plain data, which checkpoints load without pickle
    (numpy's key array becomes an int64 tensor), always on the CPU: the setters accept nothing else.
    On a GPU, the generator of this process's own device only: a run resumed with fewer GPUs visible
    has no other to restore."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)]}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device = torch.device("cpu")) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]  # a tensor, or an array in version 1 checkpoints
    np.random.set_state((kind, np.asarray(keys).astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda")
    if device.type != "cuda" or cuda is None:
        return
    if isinstance(cuda, (list, tuple)):  # older checkpoints: one state per GPU then visible
        if device.index >= len(cuda):
            return  # more GPUs than the run had: this device's stream starts from the seed
        cuda = cuda[device.index]
    torch.cuda.set_rng_state(cuda.cpu(), device)
