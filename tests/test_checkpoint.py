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
