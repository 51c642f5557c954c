"""Raw parallel text to an encoded corpus on disk: the token ids of both sides, flat, and their offsets.

The work goes in chunks of CHUNK line pairs, encoded by worker processes (one SentencePiece thread
each) and written in their order, so the files are the same for any number of workers. A pair of
plain text files is cut by byte ranges, found in one fast pass over the bytes, and each worker reads
its own range; other sources (.gz, TSV, Hugging Face) are read here and handed out chunk by chunk.
Progress is recorded after every chunk, once its bytes are on disk (fsync): an interrupted encoding
continues where it stopped, and a record that the files on disk do not bear out starts it over.

This module does not import torch: worker processes start in well under a second.
"""

from __future__ import annotations

import collections
import fcntl
import itertools
import json
import multiprocessing
import os
import shutil
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import sentencepiece as spm

from mtrain.config import DataConfig, DataSource
from mtrain.corpus import check_input, decode_lines, is_plain_file, line_index, raw_pairs
from mtrain.errors import MtrainError
from mtrain.files import atomic_write, fsync_dir
from mtrain.progress import Progress
from mtrain.tokenizer import Tokenizers, is_one_piece, usable_cores

CHUNK = 50_000  # line pairs encoded at once: bounds memory, and is the unit of parallel work and of resuming
PROGRESS = "progress.json"


def tag_id(source: DataSource, toks: Tokenizers) -> int | None:
    """The source piece of the corpus's tag, which the tokenizer must hold as one piece."""
    if not source.tag:
        return None
    if not is_one_piece(source.tag, toks.src):
        raise MtrainError(f"{source.label}: tag {source.tag} is not one piece of the source tokenizer; train the "
                          f"tokenizer with the tags of data.train (fit does when it trains one) or add it to "
                          f"tokenizer.user_defined_symbols")
    return toks.src.sp.piece_to_id(source.tag)


def length_filter(n_src: np.ndarray, n_tgt: np.ndarray, max_len: int, max_ratio: float) -> tuple[np.ndarray, np.ndarray]:
    """Pure: (too long, bad length ratio) masks for pairs of piece counts, counted with the EOS each
    side gets; a pair that is too long is not also counted as a bad ratio."""
    longest, shortest = np.maximum(n_src, n_tgt) + 1, np.minimum(n_src, n_tgt) + 1
    long = longest > max_len
    return long, ~long & (longest > max_ratio * shortest)


@dataclass(frozen=True)
class Settings:
    """What a worker needs to encode a chunk: sent once to each."""

    src_model: bytes
    tgt_model: bytes
    tag: int | None
    filtered: bool
    max_len: int
    max_ratio: float
    dtype: str
    threads: int  # SentencePiece's threads per chunk: 1 in a worker process


@dataclass(frozen=True)
class LineRange:
    """Lines first .. first + n - 1 (numbered from 1) of both files of a pair, by byte range."""

    src: str
    tgt: str
    src_bytes: tuple[int, int]
    tgt_bytes: tuple[int, int]
    first: int

    def sides(self) -> tuple[list[str], list[str]]:
        def lines(path: str, span: tuple[int, int]) -> list[str]:
            with open(path, "rb") as f:
                f.seek(span[0])
                data = f.read(span[1] - span[0])
            n = data.count(b"\n") + (bool(data) and not data.endswith(b"\n"))  # a last line may lack its newline
            try:  # the whole range at once: 2-3x as fast as line by line, which names a bad line
                text = data.decode("utf-8").split("\n")[:n]
            except UnicodeDecodeError:
                return list(decode_lines(data.split(b"\n")[:n], path, self.first))
            if self.first == 1 and text and text[0].startswith("\ufeff"):  # a byte-order mark is not text
                text[0] = text[0][1:]
            return text
        return lines(self.src, self.src_bytes), lines(self.tgt, self.tgt_bytes)


@dataclass
class Chunk:
    """An encoded chunk: the kept pairs' ids, flat, with their lengths, and what was dropped."""

    src: np.ndarray
    tgt: np.ndarray
    n_src: np.ndarray
    n_tgt: np.ndarray
    read: int = 0
    empty: int = 0
    too_long: int = 0
    bad_ratio: int = 0


_worker: tuple | None = None  # (settings, source processor, target processor) of this process


def _start(settings: Settings) -> None:
    global _worker
    src = spm.SentencePieceProcessor(model_proto=settings.src_model)
    tgt = src if settings.tgt_model == settings.src_model else spm.SentencePieceProcessor(model_proto=settings.tgt_model)
    _worker = (settings, src, tgt)


def _start_worker(settings: Settings, parent: int) -> None:
    """A worker process's start: its tokenizers, and a watch that ends it when the process that started it
    is gone (killed before it could shut the pool down), instead of leaving it waiting for work forever."""
    _start(settings)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="mtrain-parent-watch", daemon=True).start()


def _encode(job: LineRange | tuple[list[str], list[str]]) -> Chunk:
    """One chunk, in a worker: read (a line range) or given, stripped, empty pairs dropped, encoded,
    filtered by length."""
    settings, src_sp, tgt_sp = _worker
    src, tgt = job.sides() if isinstance(job, LineRange) else (job[0], job[1])
    read = len(src)
    src, tgt = [x.strip() for x in src], [x.strip() for x in tgt]
    if not all(src) or not all(tgt):  # pairs with an empty side are dropped
        kept = [(s, t) for s, t in zip(src, tgt) if s and t]
        src, tgt = [s for s, _ in kept], [t for _, t in kept]
    ids = {"src": src_sp.encode(src, out_type=int, num_threads=settings.threads),
           "tgt": tgt_sp.encode(tgt, out_type=int, num_threads=settings.threads)}
    if settings.tag is not None:  # the tag's id, not its text: the same piece whatever the sentence
        ids["src"] = [[settings.tag, *x] for x in ids["src"]]
    n = {side: np.fromiter(map(len, ids[side]), dtype=np.int64, count=len(src)) for side in ids}
    keep, too_long, bad_ratio = np.ones(len(src), dtype=bool), 0, 0
    if settings.filtered:
        long, ratio = length_filter(n["src"], n["tgt"], settings.max_len, settings.max_ratio)
        too_long, bad_ratio, keep = int(long.sum()), int(ratio.sum()), ~(long | ratio)
    flat = {}
    for side in ids:
        kept = ids[side] if keep.all() else itertools.compress(ids[side], keep)
        flat[side] = np.fromiter(itertools.chain.from_iterable(kept), dtype=settings.dtype,
                                 count=int(n[side][keep].sum()))
    return Chunk(flat["src"], flat["tgt"], n["src"][keep], n["tgt"][keep], read=read, empty=read - len(src),
                 too_long=too_long, bad_ratio=bad_ratio)


def _jobs(source: DataSource, skip: int) -> tuple[int | None, Iterator[LineRange | tuple[list[str], list[str]]]]:
    """The pairs of a source when known (a plain file pair: both files' line counts, checked now), and
    its chunks from chunk `skip` on: byte ranges of a plain file pair, else lists of line pairs read
    here."""
    if source.src and is_plain_file(source.src) and is_plain_file(source.tgt):
        (src_starts, n_src), (tgt_starts, n_tgt) = (line_index(p, CHUNK) for p in (source.src, source.tgt))
        if n_src != n_tgt:
            raise MtrainError(f"line counts differ: {source.src} has {n_src} lines, {source.tgt} has {n_tgt}")
        sizes = [os.path.getsize(source.src), os.path.getsize(source.tgt)]

        def ranges() -> Iterator[LineRange]:
            for k in range(skip, len(src_starts) if n_src else 0):
                ends = [starts[k + 1] if k + 1 < len(starts) else size
                        for starts, size in zip((src_starts, tgt_starts), sizes)]
                yield LineRange(source.src, source.tgt, (src_starts[k], ends[0]), (tgt_starts[k], ends[1]),
                                k * CHUNK + 1)
        return n_src, ranges()
    if source.src:  # named before anything is read, as for plain files
        check_input(Path(source.src))
        check_input(Path(source.tgt))

    def chunks() -> Iterator[tuple[list[str], list[str]]]:
        pairs = raw_pairs(source)
        for _ in itertools.islice(pairs, skip * CHUNK):  # chunks done before an interruption: read past, not encoded
            pass
        while chunk := list(itertools.islice(pairs, CHUNK)):
            yield [s for s, _ in chunk], [t for _, t in chunk]
    return None, chunks()


def _encoded(jobs: Iterator, settings: Settings, workers: int) -> Iterator[Chunk]:
    """The jobs' chunks in order; with several chunks and workers, encoded by that many processes, at
    most two chunks each in flight (memory stays bounded whatever the corpus's size)."""
    first = list(itertools.islice(jobs, 2))
    if workers == 1 or len(first) < 2:  # one chunk: SentencePiece's threads, without starting processes
        _start(settings)
        yield from map(_encode, itertools.chain(first, jobs))
        return
    # spawn, not fork: a forked copy of a process that runs torch's threads can deadlock
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_start_worker,
                               initargs=(Settings(**{**settings.__dict__, "threads": 1}), os.getpid()))
    try:
        pending = collections.deque()
        for job in itertools.chain(first, jobs):
            pending.append(pool.submit(_encode, job))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def write_offsets(lengths: Path, out: Path, block: int = 1 << 20) -> None:
    """The .npy of offsets (int64, n + 1) of a file of int32 lengths, a block at a time: memory stays
    the same whatever the corpus's size (whole, 4.5M pairs added ~100 MB to the peak). Written whole
    or not at all (atomic_write)."""
    n = lengths.stat().st_size // 4
    with open(lengths, "rb") as f, atomic_write(out, "wb", "offsets") as o:
        np.lib.format.write_array_header_1_0(o, {"descr": np.dtype(np.int64).str, "fortran_order": False,
                                                 "shape": (n + 1,)})
        o.write(np.zeros(1, dtype=np.int64).tobytes())
        total = 0
        while len(part := np.fromfile(f, dtype=np.int32, count=block)):
            sums = np.cumsum(part, dtype=np.int64) + total
            o.write(sums.tobytes())
            total = int(sums[-1])


def encode_to(folder: Path, source: DataSource, toks: Tokenizers, cfg: DataConfig, filtered: bool, stamp: dict,
              finish=None, workers: int = 0) -> None:
    """Encode `source` into `folder`, which appears whole or not at all (`finish(partial)` may add files
    first). The work happens in a hidden folder beside it, `.NAME.partial`, which records after every
    chunk how far it got for `stamp` (what identifies the source, tokenizer and filters): a run killed
    midway continues from there; one for another stamp starts over; an error in the data removes it.
    `workers` processes (0: one per core this process may use) give the same bytes for any number.
    An existing `folder` is replaced only if it is an encoded corpus (its report.json): nothing else
    is ever removed."""
    workers = workers or usable_cores()
    if folder.exists() and not (folder / "report.json").is_file():
        raise MtrainError(f"{folder}: exists and is not an encoded corpus, so it is not replaced; move it away")
    partial = folder.with_name(f".{folder.name}.partial")
    partial.mkdir(parents=True, exist_ok=True)
    with open(partial / ".lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise MtrainError(f"{folder}: being encoded by another process now; wait for it to finish") from None
        try:
            _encode_into(partial, source, toks, cfg, filtered, stamp, workers)
        except MtrainError:  # bad data: nothing to continue from once it is fixed (its stamp changes)
            shutil.rmtree(partial, ignore_errors=True)
            raise
        if finish is not None:
            finish(partial)
        (partial / ".lock").unlink()
        if folder.exists():  # an older encoding of this corpus (checked above)
            shutil.rmtree(folder)
        os.replace(partial, folder)
        fsync_dir(folder.parent)


def _encode_into(partial: Path, source: DataSource, toks: Tokenizers, cfg: DataConfig, filtered: bool, stamp: dict,
                 workers: int) -> None:
    # Two bytes a piece where the vocabularies allow (most do): half the disk and page cache of int32.
    dtype = np.dtype(np.uint16 if max(toks.src.vocab_size, toks.tgt.vocab_size) <= 1 << 16 else np.int32)
    files = {name: partial / name for name in ("src.bin", "tgt.bin", "src.len", "tgt.len")}
    zero = {"stamp": stamp, "chunk": CHUNK, "chunks": 0, "read": 0, "empty": 0, "too_long": 0, "bad_ratio": 0,
            "bytes": dict.fromkeys(files, 0)}
    for stale in partial.glob(".*.tmp*"):  # atomic_write's temporary files of a process that was killed
        stale.unlink()
    try:
        progress = json.loads((partial / PROGRESS).read_text())
    except (OSError, ValueError):
        progress = zero
    # A record counts only for this stamp and chunk size, and only if every file it vouches for holds at
    # least the bytes it counts (a stop while the last steps removed them): anything else starts over.
    if ((progress.get("stamp"), progress.get("chunk")) != (stamp, CHUNK)
            or not all(path.is_file() and path.stat().st_size >= progress["bytes"][name]
                       for name, path in files.items())):
        progress = zero
    for name, path in files.items():  # what was written after the last recorded chunk is cut off
        with open(path, "ab") as f:
            f.truncate(progress["bytes"][name])
    settings = Settings(toks.src.proto, toks.tgt.proto, tag_id(source, toks), filtered, cfg.max_len,
                        cfg.max_len_ratio, dtype.name, workers)
    total, jobs = _jobs(source, progress["chunks"])
    handles = {name: open(path, "ab") for name, path in files.items()}
    try:
        # counted here, as the chunks come back from the worker processes
        with Progress(f"encoding {source.label}", total, unit="pairs", initial=progress["read"]) as shown:
            for chunk in _encoded(jobs, settings, workers):
                for name, array in (("src.bin", chunk.src), ("tgt.bin", chunk.tgt),
                                    ("src.len", chunk.n_src.astype(np.int32)),
                                    ("tgt.len", chunk.n_tgt.astype(np.int32))):
                    handles[name].write(array.tobytes())
                    handles[name].flush()
                    os.fsync(handles[name].fileno())  # on disk before the record that vouches for it
                    progress["bytes"][name] += array.nbytes
                for key in ("read", "empty", "too_long", "bad_ratio"):
                    progress[key] += getattr(chunk, key)
                progress["chunks"] += 1
                with atomic_write(partial / PROGRESS, "w", "progress record") as f:
                    f.write(json.dumps(progress))
                shown.update(chunk.read)
    finally:
        for f in handles.values():
            f.close()
    for side in ("src", "tgt"):
        write_offsets(files[f"{side}.len"], partial / f"{side}_offsets.npy")
    p = progress
    kept = p["read"] - p["empty"] - p["too_long"] - p["bad_ratio"]
    summary = (f"{p['read']} pairs read, {p['empty']} empty dropped, {p['too_long']} longer than {cfg.max_len} tokens "
               f"dropped, {p['bad_ratio']} with length ratio > {cfg.max_len_ratio} dropped, {kept} kept")
    report = {"read": p["read"], "empty": p["empty"], "too_long": p["too_long"], "bad_ratio": p["bad_ratio"],
              "kept": kept, "summary": summary, "dtype": dtype.name}
    with atomic_write(partial / "report.json", "w", "report") as f:
        f.write(json.dumps(report))
    (partial / PROGRESS).unlink()
    for side in ("src", "tgt"):  # without the record they are stale: a stop before this starts over
        files[f"{side}.len"].unlink()
