import pytest
import torch

from mtrain import checkpoint
from mtrain.errors import MtrainError


def test_truncated_foreign_and_missing_files_are_refused(tmp_path):
    checkpoint.save(tmp_path / "ok.pt", {"model": {"w": torch.ones(3)}})
    data = (tmp_path / "ok.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(MtrainError, match="cut.pt: not a readable checkpoint"):
        checkpoint.load(tmp_path / "cut.pt")
    torch.save({"state_dict": {}}, tmp_path / "foreign.pt")
    with pytest.raises(MtrainError, match="foreign.pt: not an mtrain checkpoint"):
        checkpoint.load(tmp_path / "foreign.pt")
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(MtrainError, match="text.pt: not a readable checkpoint"):
        checkpoint.load(tmp_path / "text.pt")
    with pytest.raises(MtrainError, match="none.pt: checkpoint not found"):
        checkpoint.load(tmp_path / "none.pt")
    (tmp_path / "run").mkdir()
    with pytest.raises(MtrainError, match=r"run: is a folder, expected a checkpoint file$"):
        checkpoint.load(tmp_path / "run")
    checkpoint.save(tmp_path / "run" / "final.pt", {"model": {}})
    with pytest.raises(MtrainError, match=r"run: is a folder, expected a checkpoint file \(its final.pt\?\)"):
        checkpoint.load(tmp_path / "run")
    assert torch.equal(checkpoint.load(tmp_path / "ok.pt")["model"]["w"], torch.ones(3))


def test_save_is_atomic(tmp_path):
    checkpoint.save(tmp_path / "a.pt", {"model": {"w": torch.zeros(2)}})
    assert [p.name for p in tmp_path.iterdir()] == ["a.pt"]  # no temporary file left behind


def test_average(tmp_path):
    for i, value in enumerate((1.0, 2.0, 6.0)):
        checkpoint.save(tmp_path / f"{i}.pt", {"model": {"w": torch.full((2,), value), "n": torch.tensor(7)},
                                               "config": {}, "step": i})
    avg = checkpoint.average([tmp_path / f"{i}.pt" for i in range(3)])
    assert torch.allclose(avg["model"]["w"], torch.full((2,), 3.0))
    assert avg["model"]["n"].item() == 7
    checkpoint.save(tmp_path / "other.pt", {"model": {"w": torch.ones(3), "n": torch.tensor(7)}})
    with pytest.raises(MtrainError, match="does not match"):
        checkpoint.average([tmp_path / "0.pt", tmp_path / "other.pt"])
    # integer buffers (a model's output_ids) are not averaged: they must agree
    checkpoint.save(tmp_path / "ids.pt", {"model": {"w": torch.ones(2), "n": torch.tensor(8)}, "config": {}})
    with pytest.raises(MtrainError, match="does not match"):
        checkpoint.average([tmp_path / "0.pt", tmp_path / "ids.pt"])


class RunsCode:
    """Unpickling this object runs a command: what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (eval, (f"open({str(self.marker)!r}, 'w').close()",))


def test_a_checkpoint_cannot_run_code(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"format": "mtrain", "version": 2, "model": {}, "payload": RunsCode(marker)}, tmp_path / "evil.pt")
    with pytest.raises(MtrainError, match="evil.pt: holds Python objects .* --trust-checkpoint"):
        checkpoint.load(tmp_path / "evil.pt")
    with pytest.raises(MtrainError, match="evil.pt: holds Python objects"):
        checkpoint.average([tmp_path / "evil.pt"])
    assert not marker.exists()
    checkpoint.load(tmp_path / "evil.pt", trust=True)  # the explicit opt-in does what it says
    assert marker.exists()


def test_averaging_holds_one_checkpoint_at_a_time(tmp_path, monkeypatch):
    import weakref
    paths = []
    for i in range(4):
        paths.append(tmp_path / f"{i}.pt")
        checkpoint.save(paths[-1], {"model": {"w": torch.full((64,), float(i))},
                                    "optimizer": {"exp_avg": torch.zeros(64)}, "config": {}})
    alive = []
    real_load = checkpoint.load

    def tracking_load(*args, **kwargs):
        assert not any(ref() is not None for ref in alive), "an earlier checkpoint is still in memory"
        state = real_load(*args, **kwargs)
        alive.extend([weakref.ref(state["model"]["w"]), weakref.ref(state["optimizer"]["exp_avg"])])
        return state

    monkeypatch.setattr(checkpoint, "load", tracking_load)
    avg = checkpoint.average(paths)
    assert torch.allclose(avg["model"]["w"], torch.full((64,), 1.5))
    assert "optimizer" not in avg and avg["averaged_from"] == [str(p) for p in paths]


def test_save_failing_partway_keeps_the_old_file(tmp_path, monkeypatch):
    import errno
    checkpoint.save(tmp_path / "last.pt", {"model": {"w": torch.zeros(2)}, "step": 1})
    real_save = torch.save

    def disk_full(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(MtrainError, match=f"{tmp_path}: cannot write the checkpoint last.pt "
                                          r"\(No space left on device\); the previous last.pt"):
        checkpoint.save(tmp_path / "last.pt", {"model": {"w": torch.ones(2)}, "step": 2})
    monkeypatch.setattr(torch, "save", real_save)
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # the temporary file is gone
    assert checkpoint.load(tmp_path / "last.pt")["step"] == 1


def test_an_unsafe_torch_refuses_checkpoints_from_elsewhere(tmp_path, monkeypatch):
    """weights_only=True can still run code from a crafted file before torch 2.10 (CVE-2025-32434 and a
    later advisory): there a checkpoint is refused unless trusted, or written by the run itself."""
    import re

    from conftest import ROOT
    path = tmp_path / "c.pt"
    checkpoint.save(path, {"step": 3})
    monkeypatch.setattr(torch, "__version__", "2.5.1+cu121")
    with pytest.raises(MtrainError, match=r"c\.pt: torch 2\.5\.1\+cu121 cannot load a checkpoint safely "
                                          r"\(CVE-2025-32434.*pass --trust-checkpoint"):
        checkpoint.load(path)
    assert checkpoint.load(path, trust=True)["step"] == 3
    assert checkpoint.load(path, own=True)["step"] == 3  # fit's own last.pt and best.pt
    monkeypatch.setattr(torch, "__version__", "2.10.0")
    assert checkpoint.load(path)["step"] == 3
    # and the package asks for such a torch in the first place
    floor = re.search(r'"torch>=(\d+)\.(\d+)', (ROOT / "pyproject.toml").read_text())
    assert floor and (int(floor[1]), int(floor[2])) >= checkpoint.SAFE_LOAD_TORCH
