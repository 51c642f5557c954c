"""Device and precision resolution, with CUDA mocked where this machine has none."""

from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from mtrain import device as device_module
from mtrain.device import World, init_world, pick_device, rng_state, set_rng_state
from mtrain.errors import MtrainError


@pytest.fixture
def fake_cuda(monkeypatch):
    """Two GPUs that support bf16 only through emulation (a V100/T4-class machine)."""
    calls = {"set_device": []}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)

    def set_device(dev):
        if isinstance(dev, torch.device) and dev.index is None:  # what the real one refuses
            raise ValueError("Expected a cuda device with a specified index or an integer")
        calls["set_device"].append(dev)

    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    return calls


def test_cuda_device_always_gets_an_index(fake_cuda):
    for name in ("auto", "cuda"):
        dev = pick_device(name, "fp32")
        assert dev.device == torch.device("cuda", 0)
    assert pick_device("cuda:1", "fp32").device == torch.device("cuda", 1)
    assert fake_cuda["set_device"] == [torch.device("cuda", i) for i in (0, 0, 1)]
    with pytest.raises(MtrainError, match="train.device: cuda:5 does not exist"):
        pick_device("cuda:5", "fp32")


def test_emulated_bf16_is_not_bf16_support(fake_cuda):
    dev = pick_device("cuda", "auto")
    assert dev.precision == "fp16" and dev.scaler.is_enabled()
    with pytest.raises(MtrainError, match="bf16 is not supported by this GPU"):
        pick_device("cuda", "bf16")


def test_each_torchrun_process_takes_its_own_gpu(fake_cuda, monkeypatch):
    seen = {}
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: seen.update(backend=backend, **kw))
    monkeypatch.setattr(dist, "new_group", lambda **kw: seen.setdefault("groups", []).append(kw) or "prep")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    world = init_world("cuda:0", 60)  # a config that names one GPU still gives each process its own
    assert (world.rank, world.size, world.local_rank, world.prepare_group) == (1, 2, 1, "prep")
    assert seen["backend"] == "nccl" and seen["device_id"] == torch.device("cuda", 1)
    assert seen["timeout"] == timedelta(seconds=60)
    assert seen["groups"] == [{"backend": "gloo", "timeout": device_module.PREPARE_TIMEOUT}]
    assert pick_device("cuda:0", "fp32", world=world).device == torch.device("cuda", 1)


def test_cpu_without_native_bf16(monkeypatch):
    monkeypatch.setattr(device_module, "cpu_has_bf16", lambda: False)
    assert pick_device("cpu", "auto").precision == "fp32"
    with pytest.raises(MtrainError, match="train.precision: this CPU has no native bf16"):
        pick_device("cpu", "bf16")
    with pytest.raises(MtrainError, match="--precision: this CPU has no native bf16"):
        pick_device("cpu", "bf16", setting="--")
    monkeypatch.setattr(device_module, "cpu_bf16_speedup", lambda: pytest.fail("emulated bf16 is never timed"))
    assert pick_device("cpu", "auto").precision == "fp32"


@pytest.mark.parametrize("speedup, expected", [(0.6, "fp32"), (1.2, "fp32"), (1.5, "bf16"), (4.0, "bf16")])
def test_auto_takes_bf16_on_a_cpu_only_where_it_is_faster(monkeypatch, speedup, expected):
    """Native bf16 is not enough: without AMX, bf16 matmuls measured 0.6x fp32 on a Xeon with AVX512-BF16."""
    monkeypatch.setattr(device_module, "cpu_has_bf16", lambda: True)
    monkeypatch.setattr(device_module, "cpu_bf16_speedup", lambda: speedup)
    assert pick_device("cpu", "auto").precision == expected
    assert pick_device("cpu", "bf16").precision == "bf16"  # asked for by name: allowed, it is native


def test_processes_agree_on_the_cpu_precision(monkeypatch):
    monkeypatch.setattr(device_module, "cpu_has_bf16", lambda: True)
    monkeypatch.setattr(device_module, "cpu_bf16_speedup", lambda: 4.0)

    class TwoProcesses(World):
        def max(self, value):  # the other process measured bf16 slower
            return max(int(value), 1)

    assert pick_device("cpu", "auto", world=TwoProcesses(rank=0, size=2)).precision == "fp32"
    assert pick_device("cpu", "auto", world=World()).precision == "bf16"


def test_bf16_speedup_is_measured():
    if not device_module.cpu_has_bf16():
        pytest.skip("this CPU has no native bf16")
    speedup = device_module.cpu_bf16_speedup()
    assert 0.05 < speedup < 50  # a ratio of two timings of the same product, not a constant


def test_rng_state_round_trips_through_a_safe_checkpoint(tmp_path):
    import random

    import numpy as np

    from mtrain import checkpoint

    state = rng_state()
    checkpoint.save(tmp_path / "rng.pt", {"rng": [state]})
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    loaded = checkpoint.load(tmp_path / "rng.pt")["rng"][0]  # weights_only: no pickled numpy objects
    set_rng_state(loaded)
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected


def test_threads_follow_omp_num_threads_for_one_process(monkeypatch):
    """OMP_NUM_THREADS, when set, is the thread count of a lone process (jobs side by side); several
    torchrun processes split the CPUs instead, and train.threads overrides both."""
    monkeypatch.setattr(device_module.os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        assert device_module.default_threads(1) == 3 and device_module.default_threads(2) == 4
        pick_device("cpu", "fp32")
        assert torch.get_num_threads() == 3
        pick_device("cpu", "fp32", threads=2)
        assert torch.get_num_threads() == 2
        for unset in ("", "0", "many"):
            monkeypatch.setenv("OMP_NUM_THREADS", unset)
            assert device_module.default_threads(1) == 8 and device_module.default_threads(3) == 2
    finally:
        torch.set_num_threads(before)


def test_fp32_on_a_gpu_means_ieee_fp32_not_tf32(fake_cuda, monkeypatch):
    """TF32 speeds up the fp32 parts of mixed precision; precision fp32 asks for fp32 itself, whose
    results match a CPU's (test_gpu compares CUDA and CPU translations token for token)."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        pick_device("cuda", "auto")
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        pick_device("cuda", "fp32")
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_a_resume_with_fewer_gpus_restores_its_own_devices_stream(monkeypatch):
    """Each process saves the generator of its own GPU only; resumed where fewer GPUs are visible (an
    8-GPU run on 4, a narrower CUDA_VISIBLE_DEVICES), it restores that one on the device it now has,
    instead of indexing GPUs that are not there."""
    restored = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: torch.tensor([device.index], dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.append((state.tolist(), device)))
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: pytest.fail("saved every visible GPU's state"))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: pytest.fail("set every GPU's state"))
    saved = rng_state(torch.device("cuda", 5))  # the process of local rank 5 in an 8-GPU run
    assert saved["cuda"].tolist() == [5]
    set_rng_state(saved, torch.device("cuda", 1))  # resumed as local rank 1 of 4
    assert restored == [([5], torch.device("cuda", 1))]
    # A checkpoint from before holds one state per GPU then visible: this device's is the one.
    restored.clear()
    old = {**saved, "cuda": [torch.tensor([i], dtype=torch.uint8) for i in range(8)]}
    set_rng_state(old, torch.device("cuda", 3))
    assert restored == [([3], torch.device("cuda", 3))]
    restored.clear()
    set_rng_state({**saved, "cuda": old["cuda"][:2]}, torch.device("cuda", 3))  # more GPUs than the run had
    set_rng_state(saved)  # on the CPU: no GPU stream to restore
    assert restored == []
    assert "cuda" not in rng_state()
