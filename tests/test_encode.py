"""Encoding a corpus: chunks by byte range or read here, in worker processes, resumed after a kill."""

import gzip
import subprocess
import sys

import pytest
from conftest import ROOT, SAMPLE_DE, SAMPLE_EN

from mtrain import encode
from mtrain.config import DataConfig, DataSource
from mtrain.corpus import count_lines, line_index
from mtrain.data import open_encoded
from mtrain.errors import MtrainError


def files_of(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def corpus_files(tmp_path, copies: int = 3):
    """The sample corpus three times over (60 pairs), with an empty pair and a long one in it."""
    en, de = SAMPLE_EN.read_text().splitlines() * copies, SAMPLE_DE.read_text().splitlines() * copies
    en[5], de[5] = "", "nur Ziel"
    en[9] = " ".join(["word"] * 200)
    (tmp_path / "c.en").write_text("\n".join(en) + "\n")
    (tmp_path / "c.de").write_text("\n".join(de))  # no newline after the last line: still a line
    return DataSource(src=str(tmp_path / "c.en"), tgt=str(tmp_path / "c.de"))


@pytest.mark.parametrize("every", [1, 7, 20, 1000])
def test_line_index_finds_every_nth_line_start(tmp_path, every):
    text = b"a\n\nbb\r\nc\xc3\xa9\nlast"
    (tmp_path / "f").write_bytes(text)
    starts, n = line_index(tmp_path / "f", every)
    lines = [0] + [i + 1 for i, b in enumerate(text) if b == 10]
    assert n == 5 and count_lines(tmp_path / "f") == 5
    assert starts == lines[::every]
    (tmp_path / "g").write_bytes(text + b"\n")
    assert line_index(tmp_path / "g", 5) == ([0], 5)  # the end of the file starts no sixth line


def test_the_encoded_bytes_are_the_same_for_any_worker_count_chunk_size_and_source_kind(tmp_path, toks, monkeypatch):
    source = corpus_files(tmp_path)
    cfg = DataConfig(max_len=64)
    whole = tmp_path / "whole"
    encode.encode_to(whole, source, toks, cfg, True, stamp={}, workers=2)  # one chunk: in this process
    reference = files_of(whole)
    report = open_encoded(whole).report
    assert (report["read"], report["empty"], report["too_long"], report["kept"]) == (60, 1, 1, 58)
    with gzip.open(tmp_path / "c.en.gz", "wb") as f:
        f.write((tmp_path / "c.en").read_bytes())
    gz = DataSource(src=str(tmp_path / "c.en.gz"), tgt=str(tmp_path / "c.de"))  # read here, in chunks of pairs
    monkeypatch.setattr(encode, "CHUNK", 7)
    for n, (kind, workers) in enumerate([(source, 1), (source, 2), (gz, 2)]):
        encode.encode_to(tmp_path / f"out{n}", kind, toks, cfg, True, stamp={}, workers=workers)
        assert files_of(tmp_path / f"out{n}") == reference, (kind, workers)
    assert not list(tmp_path.glob(".*partial"))


def test_bad_utf8_deep_in_a_chunk_is_named_by_its_line_and_leaves_nothing(tmp_path, toks, monkeypatch):
    source = corpus_files(tmp_path)
    lines = (tmp_path / "c.de").read_bytes().split(b"\n")
    lines[44] = b"caf\xe9"
    (tmp_path / "c.de").write_bytes(b"\n".join(lines))
    monkeypatch.setattr(encode, "CHUNK", 7)
    with pytest.raises(MtrainError, match=r"c\.de:45: invalid UTF-8 \(byte 4 of the line\)"):
        encode.encode_to(tmp_path / "out", source, toks, DataConfig(), True, stamp={}, workers=2)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".*partial"))
    (tmp_path / "c.de").write_bytes(b"\n".join(lines[:50]))
    with pytest.raises(MtrainError, match=r"line counts differ: .*c\.en has 60 lines, .*c\.de has 50"):
        encode.encode_to(tmp_path / "out", source, toks, DataConfig(), True, stamp={}, workers=2)


KILLED_MIDWAY = """
import os, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from mtrain import encode
from mtrain.config import DataConfig, DataSource
from mtrain.tokenizer import Tokenizer, Tokenizers
encode.CHUNK = 7
encoded = encode._encode
def dies_at_the_fourth(job, calls=[]):
    calls.append(job)
    if len(calls) == 4:
        os._exit(9)  # as a kill: no cleanup, no finally
    return encoded(job)
encode._encode = dies_at_the_fourth
tok = Tokenizer.load({model!r})
encode.encode_to(Path({out!r}), DataSource(src={src!r}, tgt={tgt!r}), Tokenizers(tok, tok), DataConfig(max_len=64),
                 True, stamp={{"run": 1}}, workers=1)
"""


def test_a_killed_encoding_continues_from_its_last_chunk_to_the_same_bytes(tmp_path, toks, spm_model, monkeypatch):
    source = corpus_files(tmp_path)
    cfg = DataConfig(max_len=64)
    encode.encode_to(tmp_path / "fresh", source, toks, cfg, True, stamp={}, workers=1)
    out = tmp_path / "out"
    for killed in (out, tmp_path / "other", tmp_path / "resized"):
        script = KILLED_MIDWAY.format(tests=str(ROOT / "tests"), model=str(spm_model), out=str(killed),
                                      src=source.src, tgt=source.tgt)
        run = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True)
        assert run.returncode == 9, run.stderr
    partial = tmp_path / ".out.partial"
    assert not out.exists() and (partial / "progress.json").is_file()
    with open(partial / "src.bin", "ab") as f:
        f.write(b"\x07" * 5)  # a chunk the kill cut in the middle of writing
    monkeypatch.setattr(encode, "CHUNK", 7)
    encoded, calls = encode._encode, []
    monkeypatch.setattr(encode, "_encode", lambda job: calls.append(job) or encoded(job))
    encode.encode_to(out, source, toks, cfg, True, stamp={"run": 1}, workers=1)
    assert len(calls) == 9 - 3  # 60 lines in chunks of 7: the three written before the kill are kept
    assert files_of(out) == files_of(tmp_path / "fresh") and not partial.exists()
    encode.encode_to(tmp_path / "other", source, toks, cfg, True, stamp={"run": 2}, workers=1)
    assert len(calls) == 6 + 9  # another stamp (other data or tokenizer): everything again
    assert files_of(tmp_path / "other") == files_of(out)
    monkeypatch.setattr(encode, "CHUNK", 5)  # chunks of another size than the kill's (a newer mtrain)
    encode.encode_to(tmp_path / "resized", source, toks, cfg, True, stamp={"run": 1}, workers=1)
    assert len(calls) == 15 + 12 and files_of(tmp_path / "resized") == files_of(out)  # counted anew


@pytest.mark.parametrize("n", [0, 1, 5, 2500])
def test_offsets_written_a_block_at_a_time_are_the_cumulative_lengths(tmp_path, n):
    import numpy as np
    lengths = np.random.default_rng(n).integers(1, 200, n).astype(np.int32)
    (tmp_path / "len").write_bytes(lengths.tobytes())
    encode.write_offsets(tmp_path / "len", tmp_path / "offsets.npy", block=7)
    offsets = np.load(tmp_path / "offsets.npy")
    assert offsets.dtype == np.int64 and offsets.tolist() == [0, *np.cumsum(lengths, dtype=np.int64).tolist()]


ORPHANED = """
import multiprocessing, sys, time
sys.path.insert(0, {tests!r})
from mtrain import encode
proto = open({model!r}, "rb").read()
settings = encode.Settings(proto, proto, None, False, 100, 3.0, "uint16", 1)
results = encode._encoded(iter([(["a man ."], ["ein Mann ."])] * 3), settings, 2)
next(results)  # the pool is up
print(" ".join(str(p.pid) for p in multiprocessing.active_children()), flush=True)
time.sleep(120)
"""


def test_worker_processes_end_when_the_process_that_started_them_is_killed(spm_model):
    """A kill (no cleanup) of prepare must not leave its workers waiting for work forever."""
    import os
    import signal
    import time
    main = subprocess.Popen([sys.executable, "-c", ORPHANED.format(tests=str(ROOT / "tests"), model=str(spm_model))],
                            cwd=ROOT, stdout=subprocess.PIPE, text=True)
    workers = [int(pid) for pid in main.stdout.readline().split()]
    assert len(workers) == 2
    os.kill(main.pid, signal.SIGKILL)
    main.wait()

    def alive(pid):
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended
        except FileNotFoundError:
            return False

    deadline = time.monotonic() + 10
    while any(map(alive, workers)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(map(alive, workers))
