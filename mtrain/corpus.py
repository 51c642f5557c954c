"""Reading raw parallel text (file pairs, TSV, Hugging Face datasets) with every line checked."""

from __future__ import annotations

import gzip
import itertools
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from mtrain.config import DataSource
from mtrain.errors import MtrainError


def check_input(path: Path) -> None:
    """One line for an input that cannot be read as a file."""
    if not path.exists():  # exists(), not is_file(): /dev/stdin and <(...) pipes are fine
        # a config's data paths are read from the current folder, not the config's: say which it was
        where = "" if path.is_absolute() else f" (in {Path.cwd()})"
        raise MtrainError(f"{path}: file not found{where}")
    if path.is_dir():
        raise MtrainError(f"{path}: is a folder, not a file")


def _open_binary(path: Path):
    check_input(path)
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def open_text(path: Path | str) -> Iterator[str]:
    """Lines of a plain or .gz UTF-8 file ("-" = stdin) without their newline; bad bytes are an
    error naming the line."""
    if str(path) == "-":
        yield from decode_lines(sys.stdin.buffer, "stdin")
        return
    path = Path(path)
    with _open_binary(path) as f:
        try:
            yield from decode_lines(f, path)
        except (OSError, EOFError) as e:  # truncated or not-really-gzip files
            raise MtrainError(f"{path}: cannot read ({e})") from None


def decode_lines(f, name, first: int = 1) -> Iterator[str]:
    """Lines numbered from `first` (the number of the file's line the first one is)."""
    for number, raw in enumerate(f, start=first):
        try:
            # utf-8-sig on the first line: a byte-order mark (Windows editors write one) is not text.
            yield raw.decode("utf-8-sig" if number == 1 else "utf-8").rstrip("\r\n")
        except UnicodeDecodeError as e:
            raise MtrainError(f"{name}:{number}: invalid UTF-8 (byte {e.start + 1} of the line)") from None


def is_plain_file(path: Path | str) -> bool:
    """A regular, uncompressed file: one whose lines can be found by byte offset."""
    return Path(path).suffix != ".gz" and Path(path).is_file()


def line_index(path: Path | str, every: int) -> tuple[list[int], int]:
    """Pure over the file: the byte offsets where lines 0, every, 2 x every, ... of a plain file start,
    and its number of lines (a last line without a newline counts), from the bytes alone, in blocks:
    ~1 s a GB, without decoding a line."""
    starts, lines, size, last = [0], 0, 0, 10
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            newlines = np.flatnonzero(np.frombuffer(block, dtype=np.uint8) == 10)
            # the line after newline i of this block is line number lines + i + 1 of the file
            first = -(lines + 1) % every
            starts.extend((size + newlines[first::every] + 1).tolist())
            lines, size, last = lines + len(newlines), size + len(block), block[-1]
    if len(starts) > 1 and starts[-1] >= size:  # the end of the file, after its last newline: no line
        starts.pop()
    return starts, lines + (size > 0 and last != 10)


def count_lines(path: Path | str) -> int:
    if is_plain_file(path):
        check_input(Path(path))
        return line_index(path, 1 << 62)[1]
    with _open_binary(Path(path)) as f:
        try:
            return sum(1 for _ in f)
        except (OSError, EOFError) as e:  # truncated or not-really-gzip files
            raise MtrainError(f"{path}: cannot read ({e})") from None


def check_line_counts(src: Path, tgt: Path) -> None:
    """Both files exist and have as many lines: a fast byte-level pass, before any slow work."""
    counts = count_lines(src), count_lines(tgt)
    if counts[0] != counts[1]:
        raise MtrainError(f"line counts differ: {src} has {counts[0]} lines, {tgt} has {counts[1]}")


@dataclass
class ReadStats:
    """What reading dropped, for the report printed before training."""

    pairs: int = 0
    empty: int = 0

    def __str__(self) -> str:
        return f"{self.pairs} pairs read, {self.empty} empty pairs dropped"


def read_pairs(source: DataSource, stats: ReadStats | None = None) -> Iterator[tuple[str, str]]:
    """(source, target) strings of a corpus; empty or whitespace-only pairs are dropped and counted."""
    stats = stats if stats is not None else ReadStats()
    if source.empty:
        raise MtrainError("data: no corpus given (set src and tgt, tsv, or hf)")
    for src, tgt in raw_pairs(source):
        src, tgt = src.strip(), tgt.strip()
        if not src or not tgt:
            stats.empty += 1
            continue
        stats.pairs += 1
        yield src, tgt


def raw_pairs(source: DataSource) -> Iterator[tuple[str, str]]:
    """Every line pair of a source as it is, empty ones included."""
    if source.tsv:
        yield from _tsv_pairs(Path(source.tsv))
    elif source.hf:
        yield from _hf_pairs(source)
    else:
        yield from _file_pairs(Path(source.src), Path(source.tgt))


def _file_pairs(src: Path, tgt: Path) -> Iterator[tuple[str, str]]:
    # Check both files exist before yielding anything, so a typo fails at once.
    for path in (src, tgt):
        check_input(path)
    sentinel = object()
    for s, t in itertools.zip_longest(open_text(src), open_text(tgt), fillvalue=sentinel):
        if s is sentinel or t is sentinel:
            check_line_counts(src, tgt)
        yield s, t


def _tsv_pairs(path: Path) -> Iterator[tuple[str, str]]:
    for number, line in enumerate(open_text(path), start=1):
        if not line.strip():
            yield "", ""
            continue
        fields = line.split("\t")
        if len(fields) != 2:
            raise MtrainError(f"{path}:{number}: expected 2 tab-separated fields, found {len(fields)}")
        yield fields[0], fields[1]


def _lookup(record: dict, dotted: str, where: str):
    value = record
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            raise MtrainError(f"{where}: no field '{dotted}' (record keys: {', '.join(map(str, record))})")
        value = value[part]
    return "" if value is None else str(value)


HF_BATCH = 10_000  # records read at a time from a Hugging Face dataset


def _hf_pairs(source: DataSource) -> Iterator[tuple[str, str]]:
    """A Hugging Face dataset: a hub name (needs internet) or a local loader such as json/csv/parquet."""
    import datasets  # imported here: it is slow to import and only this path needs it

    where = f"datasets:{source.hf}"
    # The hub client logs a warning per failed request (no network) before the error we report:
    # the user gets that error alone, in one line.
    loggers = [logging.getLogger(name) for name in ("huggingface_hub", "datasets")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        ds = datasets.load_dataset(source.hf, source.hf_config or None, split=source.hf_split,
                                   data_files=list(source.hf_data_files) or None,
                                   revision=source.hf_revision or None, streaming=source.hf_streaming)
    except Exception as e:  # datasets raises many types (FileNotFoundError, ConnectionError, DatasetNotFoundError)
        raise MtrainError(f"{where}: cannot load ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
    # In batches of columns: reading a split row by row costs ~30x as much per record.
    i = 0
    for columns in ds.iter(batch_size=HF_BATCH):
        for values in zip(*columns.values()):
            record = dict(zip(columns, values))
            yield _lookup(record, source.src_key, f"{where} record {i}"), _lookup(record, source.tgt_key, f"{where} record {i}")
            i += 1
