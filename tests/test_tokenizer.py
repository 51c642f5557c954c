from pathlib import Path

import pytest
from conftest import SAMPLE_DE, SAMPLE_EN, tiny_raw

from mtrain.config import config_from_dict
from mtrain.errors import MtrainError
from mtrain.tokenizer import Tokenizer, get_tokenizers


def test_only_the_writing_process_trains(tmp_path, spm_model):
    raw = tiny_raw(tmp_path, spm_model)
    raw["tokenizer"] = {"model": "", "vocab_size": 60}
    cfg = config_from_dict(raw)
    run = tmp_path / "run"
    with pytest.raises(MtrainError, match="spm.model: SentencePiece model not found"):
        get_tokenizers(cfg, run, log=lambda *_: None, write=False)  # it waits for the writer's model
    assert not run.exists()
    writer = get_tokenizers(cfg, run, log=lambda *_: None, write=True)
    assert sorted(p.name for p in run.iterdir()) == ["spm.model", "spm.vocab"]
    reader = get_tokenizers(cfg, run, log=lambda *_: None, write=False)
    assert reader.src.proto == writer.src.proto


def test_saving_replaces_the_file_instead_of_rewriting_it(tmp_path, spm_model):
    path = tmp_path / "spm.model"
    path.write_bytes(b"old model bytes")
    with open(path, "rb") as reader:  # another process has the old file open
        Tokenizer.load(spm_model).save(path)
        assert reader.read() == b"old model bytes"  # never truncated under it
    assert path.read_bytes() == Path(spm_model).read_bytes()
    assert [p.name for p in tmp_path.iterdir()] == ["spm.model"]


@pytest.mark.parametrize("side", ["train", "valid"])
def test_mismatched_corpus_is_named_before_tokenizer_training(tmp_path, spm_model, side):
    from mtrain.train import fit
    short = tmp_path / "short.de"
    short.write_text("\n".join(SAMPLE_DE.read_text().splitlines()[:7]) + "\n")
    raw = tiny_raw(tmp_path, spm_model)
    raw["data"][side] = {"src": str(SAMPLE_EN), "tgt": str(short)}
    raw["tokenizer"] = {"model": "", "vocab_size": 500}  # would be too large for 7 lines: not what we report
    with pytest.raises(MtrainError, match=r"line counts differ: .*train.en has 20 lines, .*short.de has 7"):
        fit(config_from_dict(raw), tmp_path / "run", log=lambda *_: None)
    assert not (tmp_path / "run").exists()  # nothing trained, nothing written
