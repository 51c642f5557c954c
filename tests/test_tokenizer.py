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


def test_the_tokenizer_trains_on_a_streamed_sample_beside_its_model(tmp_path, monkeypatch):
    """At most input_sentence_size lines, sampled uniformly in one pass (or the first ones without
    shuffling), written next to the model rather than in $TMPDIR, and removed after."""
    import tempfile

    from conftest import SAMPLE_DE, SAMPLE_EN

    from mtrain.config import TokenizerConfig
    from mtrain.tokenizer import sample_lines, train_tokenizer
    lines = [x.strip() for x in SAMPLE_EN.read_text().splitlines() + SAMPLE_DE.read_text().splitlines() if x.strip()]
    assert sample_lines([SAMPLE_EN, SAMPLE_DE], 1000, True) == lines  # all, in order
    assert sample_lines([SAMPLE_EN, SAMPLE_DE], 7, False) == lines[:7]
    picked = sample_lines([SAMPLE_EN, SAMPLE_DE], 7, True)
    assert len(picked) == 7 and picked == [x for x in lines if x in picked]  # a subset, in input order
    assert picked == sample_lines([SAMPLE_EN, SAMPLE_DE], 7, True)  # the same draw each time
    assert {x for s in range(1, 30) for x in sample_lines([SAMPLE_EN, SAMPLE_DE], 7, True, seed=s)} != set(picked)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "no-such-tmp"))  # $TMPDIR unusable
    seen = []
    real = tempfile.TemporaryDirectory

    def spy(*args, **kwargs):
        seen.append(kwargs.get("dir"))
        return real(*args, **kwargs)

    monkeypatch.setattr(tempfile, "TemporaryDirectory", spy)
    model = train_tokenizer([SAMPLE_EN, SAMPLE_DE], TokenizerConfig(vocab_size=60), tmp_path / "out" / "spm")
    assert model.is_file() and seen == [tmp_path / "out"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["spm.model", "spm.vocab"]


def test_tsv_and_several_corpora_are_sampled_as_read_without_a_copy(tmp_path, monkeypatch):
    """A TSV file and a file pair train one joint model (and one a side) from the pairs as they are
    read: nothing is written out but the sample SentencePiece reads, beside the model."""
    import subprocess
    import sys

    import yaml
    from conftest import ROOT

    from mtrain import tokenizer as tokenizer_module
    from mtrain.config import DataSource, TokenizerConfig
    en, de = SAMPLE_EN.read_text().splitlines(), SAMPLE_DE.read_text().splitlines()
    (tmp_path / "c.tsv").write_text("".join(f"{s}\t{t}\n" for s, t in zip(en[:10], de[:10])) + "\t\n")
    sources = [DataSource(tsv=str(tmp_path / "c.tsv")), DataSource(src=str(SAMPLE_EN), tgt=str(SAMPLE_DE), name="b")]
    joint, = tokenizer_module.sample_sources(sources, TokenizerConfig(input_sentence_size=1000))
    pairs = [*zip(en[:10], de[:10]), *zip(en, de)]
    assert joint == [x.strip() for pair in pairs for x in pair]  # every line, both sides, in the order read
    src, tgt = tokenizer_module.sample_sources(sources, TokenizerConfig(joint=False, input_sentence_size=1000))
    assert (src, tgt) == ([s.strip() for s, _ in pairs], [t.strip() for _, t in pairs])
    few = tokenizer_module.sample_sources(sources, TokenizerConfig(input_sentence_size=5, shuffle_input_sentence=False))
    assert few == [joint[:5]]
    raw = {"data": {"train": [{"tsv": str(tmp_path / "c.tsv")}, {"src": str(SAMPLE_EN), "tgt": str(SAMPLE_DE)}]},
           "tokenizer": {"vocab_size": 60, "model": str(tmp_path / "tok" / "spm.model")}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    run = subprocess.run([sys.executable, "-m", "mtrain", "tokenize", "--config", str(tmp_path / "c.yaml")],
                         capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    assert "pieces/sentence" in run.stdout
    assert sorted(p.name for p in (tmp_path / "tok").iterdir()) == ["spm.model", "spm.vocab"]
    assert Tokenizer.load(tmp_path / "tok" / "spm.model").vocab_size == 60
