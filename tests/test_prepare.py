"""`mtrain prepare` and `data.prepared`: encoded once, read by fit, the same whoever made it."""

import json
import subprocess
import sys

import pytest
from conftest import ROOT, SAMPLE_DE, SAMPLE_EN, tiny_raw

from mtrain import checkpoint
from mtrain.config import config_from_dict
from mtrain.errors import MtrainError
from mtrain.prepare import MANIFEST, load_prepared, prepare
from mtrain.report import read_metrics
from mtrain.train import fit


def two_corpora(tmp_path, spm_model, **train) -> dict:
    raw = tiny_raw(tmp_path, spm_model, **train)
    en, de = SAMPLE_EN.read_text().splitlines(), SAMPLE_DE.read_text().splitlines()
    (tmp_path / "half.en").write_text("\n".join(en[:10]) + "\n")
    (tmp_path / "half.de").write_text("\n".join(de[:10]) + "\n")
    raw["data"]["train"] = [raw["data"]["train"], {"name": "half", "src": str(tmp_path / "half.en"),
                                                  "tgt": str(tmp_path / "half.de"), "weight": 2}]
    return raw


def files_of(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_prepared_data_trains_as_the_cache_does_and_is_the_same_for_any_worker_count(tmp_path, spm_model,
                                                                                   monkeypatch):
    from mtrain import encode
    raw = two_corpora(tmp_path, spm_model, max_steps=6)
    cfg = config_from_dict(raw)
    monkeypatch.setattr(encode, "CHUNK", 7)  # several chunks: two workers share them
    one, two = prepare(cfg, tmp_path / "one", log=lambda *_: None, workers=1), \
        prepare(cfg, tmp_path / "two", log=lambda *_: None, workers=2)
    assert files_of(one) == files_of(two)  # byte for byte
    manifest = json.loads((one / MANIFEST).read_text())
    assert [f["files"][0][0] for f in manifest["train"]] == [str(SAMPLE_EN), str(tmp_path / "half.en")]
    fit(cfg, tmp_path / "cached", log=lambda *_: None)
    fit(config_from_dict({**raw, "data": {**raw["data"], "prepared": str(one)}}), tmp_path / "prepared",
        log=lambda *_: None)
    losses = [[r["loss"] for r in read_metrics(tmp_path / run / "metrics.jsonl") if "loss" in r]
              for run in ("cached", "prepared")]
    assert losses[0] == losses[1] and len(losses[0]) == 6


def test_an_interrupted_prepare_keeps_what_it_finished_and_fit_waits_for_the_manifest(tmp_path, spm_model):
    raw = two_corpora(tmp_path, spm_model, max_steps=2)
    (tmp_path / "half.de").rename(tmp_path / "later.de")  # the second corpus fails
    out = tmp_path / "prepared"
    with pytest.raises(MtrainError, match="half.de"):
        prepare(config_from_dict(raw), out, log=lambda *_: None)
    assert not (out / MANIFEST).exists() and (out / "train0" / "prepared.json").is_file()
    assert not list(out.glob(".*tmp*"))  # nothing half-written
    with pytest.raises(MtrainError, match=r"prepared: no prepared data \(manifest.json missing\); run `mtrain "
                                          r"prepare CONFIG -o .*` where every process of the job can read it"):
        load_prepared(config_from_dict(raw), out, log=lambda *_: None)  # what another node sees
    (tmp_path / "later.de").rename(tmp_path / "half.de")
    lines = []
    prepare(config_from_dict(raw), out, log=lines.append)
    assert any(line.startswith("prepare: " + str(SAMPLE_EN)) and "already encoded" in line for line in lines)
    assert (out / MANIFEST).is_file()


def test_fit_prepares_what_is_missing_and_refuses_a_directory_for_other_data(tmp_path, spm_model):
    raw = two_corpora(tmp_path, spm_model, max_steps=2)
    raw["data"]["prepared"] = str(tmp_path / "prepared")
    fit(config_from_dict(raw), tmp_path / "run", log=lambda *_: None)  # prepares it first
    assert (tmp_path / "prepared" / MANIFEST).is_file()
    assert checkpoint.load(tmp_path / "run" / "last.pt")["step"] == 2
    (tmp_path / "half.de").write_text("\n".join(SAMPLE_DE.read_text().splitlines()[10:]) + "\n")  # new data
    with pytest.raises(MtrainError, match=r"prepared: prepared for other data than data.train\[1\] \(half\); run "
                                          r"mtrain prepare again"):
        fit(config_from_dict(raw), tmp_path / "run2", log=lambda *_: None)
    assert not (tmp_path / "run2").exists()
    raw["data"]["max_len"] = 50
    with pytest.raises(MtrainError, match="prepared with other data.max_len or max_len_ratio"):
        load_prepared(config_from_dict(raw), tmp_path / "prepared", log=lambda *_: None)
    del raw["data"]["max_len"]
    manifest = tmp_path / "prepared" / MANIFEST
    (tmp_path / "half.de").write_text("\n".join(SAMPLE_DE.read_text().splitlines()[:10]) + "\n")
    load_prepared(config_from_dict(raw), tmp_path / "prepared", log=lambda *_: None)  # the data it was made for
    from mtrain.config import TokenizerConfig
    from mtrain.tokenizer import train_tokenizer
    other = train_tokenizer([SAMPLE_DE], TokenizerConfig(vocab_size=60), tmp_path / "other" / "spm")
    with pytest.raises(MtrainError, match=rf"prepared: prepared with another tokenizer than {other}; run mtrain "
                                          r"prepare again"):
        load_prepared(config_from_dict({**raw, "tokenizer": {"model": str(other)}}), tmp_path / "prepared",
                      log=lambda *_: None)
    manifest.write_text(manifest.read_text().replace('"format": 2', '"format": 0'))
    with pytest.raises(MtrainError, match="prepared: prepared with another mtrain format; run mtrain prepare again"):
        load_prepared(config_from_dict(raw), tmp_path / "prepared", log=lambda *_: None)
    manifest.write_text("{not json")
    with pytest.raises(MtrainError, match="manifest.json: not a readable manifest; run mtrain prepare again"):
        load_prepared(config_from_dict(raw), tmp_path / "prepared", log=lambda *_: None)


def test_the_prepare_command(tmp_path, spm_model):
    import yaml
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(two_corpora(tmp_path, spm_model)))
    run = subprocess.run([sys.executable, "-m", "mtrain", "prepare", str(config), "-o", str(tmp_path / "p"),
                          "--workers", "1"], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    assert f"{tmp_path / 'p'} is ready" in run.stdout and (tmp_path / "p" / MANIFEST).is_file()
    bad = subprocess.run([sys.executable, "-m", "mtrain", "prepare", str(config), "--workers", "-1"],
                         capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 1 and bad.stderr.strip() == "mtrain: --workers: must be >= 0, got -1"


def test_a_streamed_dataset_is_read_once_into_the_prepared_directory(tmp_path, spm_model, monkeypatch):
    """A streamed Hugging Face source (a local json loader here) is read once, into raw/ in the
    prepared directory, which the tokenizer's sample and the encoding then read: the encoded corpus
    is the one the same records give unstreamed, and a second prepare reads the stream no more."""
    import datasets

    from mtrain import corpus as corpus_module
    en, de = SAMPLE_EN.read_text().splitlines(), SAMPLE_DE.read_text().splitlines()
    rows = [{"translation": {"en": s, "de": t}} for s, t in zip(en, de)]
    datasets.Dataset.from_list(rows).to_json(tmp_path / "d.json")
    reads = []
    real = corpus_module._hf_pairs

    def counted(source):
        reads.append(source.hf_streaming)
        yield from real(source)

    monkeypatch.setattr(corpus_module, "_hf_pairs", counted)

    def config(streaming: bool, **tokenizer):
        raw = tiny_raw(tmp_path, spm_model)
        raw["data"]["train"] = {"hf": "json", "hf_data_files": [str(tmp_path / "d.json")], "hf_streaming": streaming,
                                "name": "d"}
        raw["tokenizer"].update(tokenizer)
        return config_from_dict(raw)

    prepared = {streaming: prepare(config(streaming), tmp_path / f"p{streaming}", log=lambda *_: None)
                for streaming in (True, False)}
    assert reads == [True, False]  # with the tokenizer given: encoding alone reads it
    assert (prepared[True] / "raw" / "train0" / "src.txt").read_text().splitlines() == en
    for name in ("train0/src.bin", "train0/tgt.bin", "train0/src_offsets.npy", "train0/tgt_offsets.npy"):
        assert (prepared[True] / name).read_bytes() == (prepared[False] / name).read_bytes(), name
    trained = prepare(config(True, model="", vocab_size=100), tmp_path / "trained", log=lambda *_: None)
    assert reads == [True, False, True]  # once, for the tokenizer's sample and the encoding both
    assert (trained / "spm.model").is_file() and (trained / MANIFEST).is_file()
    prepare(config(True, model="", vocab_size=100), trained, log=lambda *_: None)
    assert reads == [True, False, True]  # the finished copy and corpus are kept


def test_a_tag_the_tokenizer_lacks_is_named_before_any_corpus_is_encoded(tmp_path, spm_model):
    """The second corpus's tag is not a piece of the given tokenizer: prepare and fit say so before
    encoding the first corpus (hours on a large one), and leave nothing encoded."""
    raw = two_corpora(tmp_path, spm_model)
    raw["data"]["train"][1]["tag"] = "<2xx>"
    with pytest.raises(MtrainError, match="half: tag <2xx> is not one piece of the source tokenizer"):
        prepare(config_from_dict(raw), tmp_path / "p", log=lambda *_: None)
    assert not (tmp_path / "p" / "train0").exists()
    with pytest.raises(MtrainError, match="half: tag <2xx> is not one piece of the source tokenizer"):
        fit(config_from_dict(raw), tmp_path / "run", log=lambda *_: None)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_prepare_refuses_a_folder_of_the_users_own_files_and_touches_nothing(tmp_path, spm_model):
    """The raw validation text in DIR/valid/: prepare used to read it, encode it, then remove DIR/valid
    to put its own output there. Now a folder that neither prepare's marker nor a manifest makes its
    own is refused in one line, before anything is read or written."""
    raw = tiny_raw(tmp_path, spm_model)
    out = tmp_path / "data"
    (out / "valid").mkdir(parents=True)
    (out / "valid" / "val.en").write_text(SAMPLE_EN.read_text())
    (out / "valid" / "val.de").write_text(SAMPLE_DE.read_text())
    raw["data"]["valid"] = {"src": str(out / "valid" / "val.en"), "tgt": str(out / "valid" / "val.de")}
    before = files_of(out)
    with pytest.raises(MtrainError, match=r"data: holds files mtrain prepare did not write \(valid\); give prepare "
                                          r"a new or empty folder"):
        prepare(config_from_dict(raw), out, log=lambda *_: None)
    assert files_of(out) == before and sorted(p.name for p in out.iterdir()) == ["valid"]
    # A new folder is prepare's, and a second prepare into it is fine; so is an empty folder.
    prepare(config_from_dict(raw), tmp_path / "new", log=lambda *_: None)
    prepare(config_from_dict(raw), tmp_path / "new", log=lambda *_: None)
    (tmp_path / "empty").mkdir()
    prepare(config_from_dict(raw), tmp_path / "empty", log=lambda *_: None)
    assert files_of(tmp_path / "empty") == files_of(tmp_path / "new")


def test_encoding_never_replaces_a_folder_that_is_not_an_encoded_corpus(tmp_path, toks):
    from mtrain import encode
    from mtrain.config import DataConfig, DataSource

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(MtrainError, match=r"out: exists and is not an encoded corpus, so it is not replaced"):
        encode.encode_to(tmp_path / "out", DataSource(src=str(SAMPLE_EN), tgt=str(SAMPLE_DE)), toks, DataConfig(),
                         True, stamp={}, workers=1)
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"


class Crash(BaseException):
    """A stop at a write boundary: not an Exception, so no handler of mtrain's takes it for bad data."""


def stop_at(monkeypatch, boundary: int) -> list:
    """Make the `boundary`-th call (from 0) of any file-system primitive that writes, renames, removes
    or makes durable raise Crash; the calls seen are listed in the returned list."""
    import builtins
    import os
    import shutil

    calls = []

    def wrap(module, name):
        real = getattr(module, name)

        def call(*args, **kwargs):
            if name == "open" and not any(c in str(args[1] if len(args) > 1 else kwargs.get("mode", "r"))
                                          for c in "wax+"):
                return real(*args, **kwargs)  # reading is no boundary
            calls.append((name, str(args[0])))
            if len(calls) - 1 == boundary:
                raise Crash(f"stopped at {name} {args[0]}")
            return real(*args, **kwargs)
        monkeypatch.setattr(module, name, call)

    for module, name in ((builtins, "open"), (os, "replace"), (os, "rename"), (os, "unlink"), (os, "fsync"),
                         (os, "mkdir"), (os, "rmdir"), (os, "truncate"), (shutil, "rmtree")):
        wrap(module, name)
    return calls


def test_a_prepare_stopped_at_every_write_boundary_resumes_to_the_same_bytes(tmp_path, spm_model, monkeypatch):
    """Fault injection: prepare is stopped at each write, rename, removal, mkdir and fsync in turn
    (monkeypatched to raise), then run again. Every time, the directory ends byte for byte as an
    uninterrupted prepare's, holds no temporary file, and `fit` takes it. Before, a stop between the
    removal of src.len and that of progress.json resumed to a corpus of empty sources."""
    from mtrain import encode

    raw = two_corpora(tmp_path, spm_model)
    cfg = config_from_dict(raw)
    monkeypatch.setattr(encode, "CHUNK", 7)  # several chunks, each with its own progress record
    reference = files_of(prepare(cfg, tmp_path / "reference", log=lambda *_: None, workers=1))
    boundary = 0
    while True:
        out = tmp_path / f"stopped{boundary}"
        with monkeypatch.context() as m:
            calls = stop_at(m, boundary)
            try:
                prepare(cfg, out, log=lambda *_: None, workers=1)
                finished = True
            except Crash:
                finished = False
        if finished:  # the boundary lies past the last write: every one has been tried
            break
        prepare(cfg, out, log=lambda *_: None, workers=1)
        got = files_of(out)
        assert got == reference, f"stopped at {calls[-1]} (boundary {boundary}): {sorted(set(got) ^ set(reference))}"
        load_prepared(cfg, out, log=lambda *_: None)
        boundary += 1
    assert boundary > 60  # chunks of two corpora, each with its writes, fsyncs and renames
