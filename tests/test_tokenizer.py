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


def test_input_sentence_size_zero_samples_every_sentence(tmp_path):
    """0 is SentencePiece's "use every sentence": it sampled none, and training failed on no text."""
    from mtrain.config import TokenizerConfig
    from mtrain.tokenizer import sample_lines

    lines = [x for x in SAMPLE_EN.read_text().splitlines() if x.strip()]
    assert sample_lines([SAMPLE_EN], 0, shuffle=True) == lines
    assert sample_lines([SAMPLE_EN], 0, shuffle=False) == lines
    assert len(sample_lines([SAMPLE_EN], 3, shuffle=True)) == 3
    from mtrain.tokenizer import train_tokenizer
    model = train_tokenizer([SAMPLE_EN], TokenizerConfig(vocab_size=60, input_sentence_size=0), tmp_path / "all")
    assert Tokenizer.load(model).vocab_size == 60
    with pytest.raises(MtrainError, match="input_sentence_size must be >= 0"):
        config_from_dict({**tiny_raw(tmp_path, model), "tokenizer": {"input_sentence_size": -1}})


def test_a_tokenizer_is_identified_by_what_it_does_not_by_where_it_was_trained(tmp_path, spm_model):
    """SentencePiece writes its input and output paths and thread count into the model: the same text
    trained into two folders gives other bytes, the same identity; a tokenizer that encodes
    otherwise has another identity."""
    from mtrain.config import TokenizerConfig
    from mtrain.tokenizer import train_tokenizer

    here = Tokenizer.load(spm_model)
    there = Tokenizer.load(train_tokenizer([SAMPLE_EN, SAMPLE_DE], TokenizerConfig(vocab_size=100),
                                           tmp_path / "elsewhere" / "x"))
    assert here.proto != there.proto and here.identity == there.identity
    other = Tokenizer.load(train_tokenizer([SAMPLE_EN, SAMPLE_DE], TokenizerConfig(vocab_size=90), tmp_path / "o"))
    assert other.identity != here.identity


def test_the_same_data_prepared_into_two_folders_is_one_tokenizer(tmp_path, spm_model):
    """Two prepared directories of the same data (a tokenizer trained into each: per_node preparation
    does that on every node) hold the same tokenizer; either's model is accepted for the other."""
    from mtrain.prepare import MANIFEST, load_prepared, prepare

    raw = tiny_raw(tmp_path, spm_model)
    raw["tokenizer"] = {"vocab_size": 100}
    cfg = config_from_dict(raw)
    a = prepare(cfg, tmp_path / "a", log=lambda *_: None, workers=1)
    b = prepare(cfg, tmp_path / "b", log=lambda *_: None, workers=2)
    assert (a / "spm.model").read_bytes() != (b / "spm.model").read_bytes()  # paths inside differ
    import json
    assert json.loads((a / MANIFEST).read_text())["tokenizer"] == json.loads((b / MANIFEST).read_text())["tokenizer"]
    raw["tokenizer"] = {"model": str(a / "spm.model")}
    load_prepared(config_from_dict(raw), b, log=lambda *_: None)  # refused as "another tokenizer" before
