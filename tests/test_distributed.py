"""torchrun + DDP on CPU with gloo: two processes must train exactly like one process accumulating two batches."""

import json
import os
import subprocess
import sys

import pytest
import yaml
from conftest import ROOT, tiny_raw

from mtrain import checkpoint

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="gloo on loopback")


def run_fit(cfg_path, run, procs, *extra):
    cmd = [sys.executable, "-m", "mtrain", "fit", str(cfg_path), "--output", str(run), *extra]
    if procs > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}",
               "-m", "mtrain", "fit", str(cfg_path), "--output", str(run), *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def losses(run):
    return {r["step"]: r["loss"] for r in map(json.loads, open(run / "metrics.jsonl")) if "loss" in r}


@pytest.fixture
def configs(tmp_path, spm_model):
    def write(name, **train):
        settings = dict(batch_tokens=120, max_steps=8, save_every=4, valid_every=4, threads=1)
        raw = tiny_raw(tmp_path, spm_model, **{**settings, **train})
        raw["model"]["dropout"] = 0.0  # processes draw different dropout masks than one process would
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(raw))
        return path
    return write


def test_two_processes_equal_one_with_update_freq_two(tmp_path, configs):
    run_fit(configs("one", update_freq=2), tmp_path / "one", 1)
    out = run_fit(configs("two", update_freq=1), tmp_path / "two", 2)
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(a) == sorted(b) == list(range(1, 9))
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5), step
    one, two = checkpoint.load(tmp_path / "one" / "last.pt"), checkpoint.load(tmp_path / "two" / "last.pt")
    assert one["data"] == two["data"]  # the same global position in the batch order
    for name, value in one["model"].items():
        assert (value - two["model"][name]).abs().max() < 1e-4, name
    # Only rank 0 writes: one metrics line per step and validation, one set of checkpoints.
    lines = (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 8
    assert sorted(p.name for p in (tmp_path / "two").glob("*.pt")) == \
        ["best.pt", "ckpt_4.pt", "ckpt_8.pt", "final.pt", "last.pt"]
    assert len(two["rng"]) == 2 and "2 processes" in out.stdout


def test_resume_across_process_counts(tmp_path, configs):
    reference = configs("ref", update_freq=2)
    run_fit(reference, tmp_path / "ref", 1)
    # 2 processes to step 4, then 1 process (update_freq 2) to step 8
    run_fit(configs("a", update_freq=1, max_steps=4), tmp_path / "a", 2)
    run_fit(reference, tmp_path / "a", 1, "--resume")
    # 1 process to step 4, then 2 processes to step 8
    run_fit(configs("b", update_freq=2, max_steps=4), tmp_path / "b", 1)
    run_fit(configs("b8", update_freq=1), tmp_path / "b", 2, "--resume")
    ref = losses(tmp_path / "ref")
    for run in ("a", "b"):
        got = losses(tmp_path / run)
        assert sorted(got) == list(range(1, 9)), run
        for step in range(5, 9):
            assert got[step] == pytest.approx(ref[step], rel=1e-5), (run, step)


def children(pid):
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(x) for x in f.read().split()]


def test_a_dead_process_ends_the_job_and_resume_continues(tmp_path, configs):
    import signal
    import time
    cfg = configs("long", max_steps=100000, save_every=2, valid_every=100000, dist_timeout=30)
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    job = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                            "-m", "mtrain", "fit", str(cfg), "--output", str(run)],
                           env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (run / "ckpt_6.pt").exists():
        time.sleep(0.2)
    workers = children(job.pid)
    assert len(workers) == 2
    os.kill(workers[-1], signal.SIGKILL)
    start = time.time()
    out, _ = job.communicate(timeout=120)
    assert job.returncode != 0
    assert time.time() - start < 60  # well within train.dist_timeout + torchrun's grace period
    assert "process 0: lost the other processes" in out and "is intact, continue with --resume" in out, out[-3000:]
    step = checkpoint.load(run / "last.pt")["step"]
    assert step >= 6
    result = run_fit(configs("short", max_steps=step + 2, save_every=2, valid_every=100000), run, 1, "--resume")
    assert f"resumed from step {step}" in result.stdout


def test_preparation_wait_is_not_bounded_by_the_collective_timeout(tmp_path):
    """Rank 0 may train SentencePiece and encode a corpus for hours while the others wait."""
    script = tmp_path / "prep.py"
    script.write_text(
        "import os, time\n"
        "from mtrain.device import init_world\n"
        "world = init_world('cpu', timeout_s=2)\n"
        "with world.main_first():\n"
        "    if world.main:\n"
        "        time.sleep(6)  # longer than the 2 s collective timeout\n"
        "world.barrier()\n"
        "os.write(1, f'rank {world.rank} prepared\\n'.encode())  # one write: two processes share the pipe\n"
        "world.close()\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(script)], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "rank 0 prepared" in result.stdout and "rank 1 prepared" in result.stdout


def two_nodes(tmp_path, cfg_path, run, cwds, timeout=240):
    """Two torchrun "nodes" of one process each on this host (static rendezvous), each in its own folder."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    jobs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                              f"--node_rank={rank}", "--master_addr=127.0.0.1", f"--master_port={port}",
                              "-m", "mtrain", "fit", str(cfg_path), "--output", str(run)],
                             cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for rank, cwd in enumerate(cwds)]
    return [(job.wait(timeout=timeout), *job.communicate()) for job in jobs]


def test_a_node_without_the_prepared_data_stops_with_one_line_and_shared_data_trains(tmp_path, spm_model):
    """Nodes without a shared filesystem: the second finds no prepared data where the config points
    and stops, naming it, instead of encoding the corpus itself. With the directory shared, or with
    data.prepare: per_node, two nodes train like one process with update_freq 2."""
    raw = tiny_raw(tmp_path, spm_model, batch_tokens=120, max_steps=4, save_every=4, valid_every=4, threads=1,
                   dist_timeout=30)
    raw["model"]["dropout"] = 0.0
    raw["data"]["prepared"] = "prepared"  # relative: each node reads its own folder
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    for node in ("node0", "node1"):
        (tmp_path / node).mkdir()
    (rc0, out0, err0), (rc1, out1, err1) = two_nodes(tmp_path, cfg, tmp_path / "run", [tmp_path / "node0",
                                                                                       tmp_path / "node1"])
    assert rc1 != 0 and "prepared: no prepared data (manifest.json missing)" in err1, err1[-2000:]
    assert (tmp_path / "node0" / "prepared" / "manifest.json").is_file()  # rank 0 prepared its own
    assert not (tmp_path / "node1" / "prepared").exists()  # the other never encodes on its own

    shared = tmp_path / "shared"
    shared.mkdir()
    results = two_nodes(tmp_path, cfg, tmp_path / "two", [shared, shared])
    assert all(rc == 0 for rc, _, _ in results), results[0][2][-2000:] + results[1][2][-2000:]
    single = {**raw, "train": {**raw["train"], "update_freq": 2}}
    single["data"] = {**raw["data"], "prepared": str(shared / "prepared")}
    one_cfg = tmp_path / "one.yaml"
    one_cfg.write_text(yaml.safe_dump(single))
    run_fit(one_cfg, tmp_path / "one", 1)
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    assert all(b[s] == pytest.approx(a[s], rel=1e-5) for s in a)

    # data.prepare: per_node: the first process of each node prepares the node's own copy.
    per_node = {**raw, "data": {**raw["data"], "prepare": "per_node"}}
    cfg.write_text(yaml.safe_dump(per_node))
    for node in ("node2", "node3"):
        (tmp_path / node).mkdir()
    results = two_nodes(tmp_path, cfg, tmp_path / "three", [tmp_path / "node2", tmp_path / "node3"])
    assert all(rc == 0 for rc, _, _ in results), results[0][2][-2000:] + results[1][2][-2000:]
    assert (tmp_path / "node2" / "prepared" / "train0" / "src.bin").read_bytes() == \
        (tmp_path / "node3" / "prepared" / "train0" / "src.bin").read_bytes()
    c = losses(tmp_path / "three")
    assert sorted(c) == [1, 2, 3, 4] and all(c[s] == pytest.approx(a[s], rel=1e-5) for s in a)


def test_a_validation_longer_than_the_collective_timeout_does_not_end_the_job(tmp_path, configs):
    """Only rank 0 validates and writes checkpoints; the others wait for it on the preparation group,
    not in a collective bounded by train.dist_timeout (2 s here, against a 6-second validation)."""
    cfg = configs("slow", max_steps=4, valid_every=2, save_every=2, dist_timeout=2)
    script = tmp_path / "slow_valid.py"
    script.write_text(
        "import sys, time\n"
        "import mtrain.train as train\n"
        "real = train.validate\n"
        "def slow(*args, **kwargs):\n"
        "    time.sleep(6)\n"
        "    return real(*args, **kwargs)\n"
        "train.validate = slow\n"
        "from mtrain.cli import main\n"
        f"sys.argv = ['mtrain', 'fit', {str(cfg)!r}, '--output', {str(tmp_path / 'run')!r}]\n"
        "main()\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(script)], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert sorted(losses(tmp_path / "run")) == [1, 2, 3, 4]
    assert checkpoint.load(tmp_path / "run" / "last.pt")["step"] == 4
