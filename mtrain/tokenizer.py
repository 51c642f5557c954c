"""SentencePiece: train a model from text files, and encode/decode with fixed special ids."""

from __future__ import annotations

import dataclasses
import itertools
import os
import random
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import sentencepiece as spm

from mtrain.config import Config, DataSource, TokenizerConfig
from mtrain.corpus import check_line_counts, open_text, read_pairs
from mtrain.errors import MtrainError
from mtrain.files import atomic_write, make_folder


def is_one_piece(text: str, tok: "Tokenizer") -> bool:
    """True when the tokenizer holds `text` (a tag such as <2de>) as one piece of its own, which encoding
    the text keeps whole (SentencePiece may put a word-boundary piece before it)."""
    piece = tok.sp.piece_to_id(text)
    return piece != tok.unk and piece in tok.sp.encode(text)


def usable_cores() -> int:
    """The cores this process may run on (a container or taskset may allow fewer than the machine has)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


# Fixed ids so that every model built by mtrain agrees on them.
PAD, UNK, BOS, EOS = 0, 1, 2, 3


class Tokenizer:
    """A SentencePiece model held as bytes, so it can travel inside a checkpoint."""

    def __init__(self, model_proto: bytes):
        self.proto = model_proto
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.pad, self.unk, self.bos, self.eos = (self.sp.pad_id(), self.sp.unk_id(), self.sp.bos_id(),
                                                  self.sp.eos_id())
        self.vocab_size = self.sp.get_piece_size()

    @classmethod
    def load(cls, path: Path | str) -> "Tokenizer":
        path = Path(path)
        if not path.is_file():
            raise MtrainError(f"{path}: SentencePiece model not found")
        try:
            return cls(path.read_bytes())
        except RuntimeError:
            raise MtrainError(f"{path}: not a SentencePiece model") from None

    def encode_batch(self, lines: Sequence[str], threads: int = 0) -> list[list[int]]:
        """Ids of each line, SentencePiece's threads splitting the batch (0: every core this process may use)."""
        return self.sp.encode(list(lines), out_type=int, num_threads=threads or usable_cores())

    def unknown_chars(self, line: str) -> str:
        """The characters of `line` that this model can only encode as <unk>, each once."""
        return "".join(c for c in dict.fromkeys(line) if not c.isspace() and self.unk in self.sp.encode(c))

    def decode_batch(self, ids: Iterable[Sequence[int]]) -> list[str]:
        """Text of each id sequence without padding, BOS and EOS; <unk> prints as SentencePiece's ' ⁇ '
        (decoding emits it only with decode.allow_unk)."""
        return self.sp.decode([[i for i in seq if i > EOS or i == self.unk] for seq in ids])

    def save(self, path: Path) -> None:
        """Atomically: another process reading the file meanwhile sees the old model or the new one."""
        with atomic_write(path, "wb", "SentencePiece model") as f:
            f.write(self.proto)


@dataclass
class Tokenizers:
    """Source and target tokenizers; the same object twice when the model is joint."""

    src: Tokenizer
    tgt: Tokenizer

    @property
    def joint(self) -> bool:
        return self.src.proto == self.tgt.proto


class Reservoir:
    """The non-empty lines offered (stripped), all of them in order when they are at most `size`; else
    `size` of them: a uniform sample (reservoir sampling, Vitter's algorithm R, from `seed`) kept in the
    order offered, or the first `size` without `shuffle`. Memory is the sample's, whatever the corpus's."""

    def __init__(self, size: int, shuffle: bool, seed: int = 1):
        self.size, self.shuffle, self.rng = size, shuffle, random.Random(seed)
        self.kept: list[tuple[int, str]] = []
        self.seen = 0

    @property
    def full(self) -> bool:
        """True when no line offered now would be kept."""
        return not self.shuffle and len(self.kept) >= self.size

    def offer(self, line: str) -> None:
        line = line.strip()
        if not line or self.full:
            return
        if len(self.kept) < self.size:
            self.kept.append((self.seen, line))
        else:
            j = self.rng.randrange(self.seen + 1)
            if j < self.size:
                self.kept[j] = (self.seen, line)
        self.seen += 1

    def lines(self) -> list[str]:
        return [x for _, x in sorted(self.kept)]


def sample_lines(inputs: Sequence[Path | str], size: int, shuffle: bool, seed: int = 1) -> list[str]:
    """A Reservoir's sample of the lines of `inputs`, in one streaming pass."""
    sample = Reservoir(size, shuffle, seed)
    for path in inputs:
        for line in open_text(path):
            if sample.full:
                return sample.lines()
            sample.offer(line)
    return sample.lines()


def sample_sources(sources: Sequence[DataSource], tc: TokenizerConfig) -> list[list[str]]:
    """What SentencePiece trains on, taken from the training corpora in one streaming pass, with nothing
    written out: one sample of both sides for a joint model, else one per side. A file pair is read as
    its two files, source then target."""
    size, shuffle = tc.input_sentence_size, tc.shuffle_input_sentence
    if len(sources) == 1 and sources[0].src:
        paths = [sources[0].src, sources[0].tgt]
        if tc.joint:
            return [sample_lines(paths, size, shuffle)]
        return [sample_lines(paths[:1], size, shuffle), sample_lines(paths[1:], size, shuffle)]
    samples = [Reservoir(size, shuffle)] if tc.joint else [Reservoir(size, shuffle), Reservoir(size, shuffle)]
    for source in sources:
        for src, tgt in read_pairs(source):
            if all(sample.full for sample in samples):
                break
            samples[0].offer(src)
            samples[-1].offer(tgt)
    return [sample.lines() for sample in samples]


def train_tokenizer(inputs: Sequence[Path | str], cfg: TokenizerConfig, output_prefix: Path | str,
                    sample: list[str] | None = None) -> Path:
    """Train one SentencePiece model on the lines of `inputs` (plain or .gz files), or on `sample` (lines
    taken from `inputs`, which then only name them); returns PREFIX.model."""
    output_prefix = Path(output_prefix)
    make_folder(output_prefix.parent, "tokenizer model")
    # Beside the model, not in $TMPDIR, which may be too small for a large corpus's sample.
    with tempfile.TemporaryDirectory(prefix=".spm-input.tmp", dir=output_prefix.parent) as tmp:
        # SentencePiece reads plain text only: the lines it trains on, sampled in one streaming pass.
        joined = Path(tmp) / "input.txt"
        lines = sample if sample is not None else sample_lines(inputs, cfg.input_sentence_size,
                                                               cfg.shuffle_input_sentence)
        if not lines:
            raise MtrainError(f"{', '.join(map(str, inputs))}: no text to train a tokenizer on")
        joined.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        del lines, sample
        log = open(Path(tmp) / "spm.log", "w")  # SentencePiece needs a real file descriptor
        try:
            spm.SentencePieceTrainer.train(
                input=str(joined), model_prefix=str(output_prefix), vocab_size=cfg.vocab_size,
                model_type=cfg.model_type, character_coverage=cfg.character_coverage,
                input_sentence_size=0, shuffle_input_sentence=False,  # sampled above
                user_defined_symbols=list(cfg.user_defined_symbols),
                pad_id=PAD, unk_id=UNK, bos_id=BOS, eos_id=EOS,
                num_threads=usable_cores(), minloglevel=2, logstream=log,
            )
        except RuntimeError as e:
            msg = str(e).strip().splitlines()[-1]
            too_high = re.search(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)", msg)
            if too_high:
                raise MtrainError(f"{', '.join(map(str, inputs))}: vocabulary size {too_high[1]} is too large for "
                                  f"this text, which allows at most {too_high[2]} pieces; lower the vocabulary size "
                                  f"(--vocab-size or tokenizer.vocab_size)") from None
            msg = re.sub(r"^[A-Z_]+: \S+\(\d+\) \[.*?\] ", "", msg)  # SentencePiece's source location
            raise MtrainError(f"sentencepiece: {msg}") from None
        finally:
            log.close()
    return Path(f"{output_prefix}.model")  # not with_suffix: prefixes like "spm.en" have dots


def tokenizer_stats(tok: Tokenizer, path: Path | str, limit: int = 200_000, lines: list[str] | None = None) -> dict:
    """Pieces per sentence and unknown-piece rate over the first `limit` lines of a file (or of `lines`,
    which `path` then names)."""
    if lines is None:
        lines = [line.strip() for line in itertools.islice(open_text(path), limit)]
    lines = lines[:limit]
    ids = tok.encode_batch(lines)
    pieces = sum(len(x) for x in ids)
    unk = sum(x.count(tok.unk) for x in ids)
    return {"file": str(path), "sentences": len(lines), "pieces_per_sentence": pieces / max(1, len(lines)),
            "unk_rate": unk / max(1, pieces)}


def _language(path: Path) -> str:
    """'train.en.gz' -> 'en': the last suffix that is not a compression or text suffix."""
    suffixes = [s.lstrip(".") for s in path.suffixes if s not in (".gz", ".txt")]
    return suffixes[-1] if suffixes else path.stem


def run_tokenize(inputs: Sequence[Path], output: Path | None, config: Path | None, overrides: Sequence[str],
                 per_language: bool, **settings) -> Iterator[str]:
    """`mtrain tokenize`: settings from flags (None = default) or a config; yields report lines."""
    from mtrain.config import load_config

    tc, inputs, sources = TokenizerConfig(), list(inputs), []
    if overrides and config is None:  # nothing to override: they would be ignored
        raise MtrainError(f"--set {overrides[0]}: --set overrides keys of a --config; without one, use the "
                          f"flags (--vocab-size, --model-type, ...)")
    if config is not None:
        cfg = load_config(config, overrides)
        tc = with_tags(cfg.tokenizer, cfg.data.tags)
        if not inputs:
            sources = cfg.data.train  # any kind, one or several: as plain text below
        if output is None and tc.model:
            output = Path(tc.model).with_suffix("")
        per_language = per_language or not tc.joint
    try:
        tc = dataclasses.replace(tc, **{k: v for k, v in settings.items() if v is not None})
    except ValueError as e:
        raise MtrainError(f"tokenize: {e}") from None
    if not inputs and not sources:
        raise MtrainError("--input: give at least one text file (or --config with data.train)")
    if output is None:
        raise MtrainError("--output: give the output prefix, e.g. --output data/spm8k")
    output = Path(output)
    if output.suffix == ".model":  # `-o spm.model` means the file spm.model, not spm.model.model
        output = output.with_suffix("")
    if sources:  # one model, or one a side: sampled from the corpora as they are read
        samples = sample_sources(sources, dataclasses.replace(tc, joint=not per_language))
        names = ", ".join(source.label for source in sources)
        groups = [([f"{names} ({side})"], Path(f"{output}.{side}")) for side in ("src", "tgt")] if per_language else \
            [([f"{names} (both sides)"], output)]
        yield from _train_groups(groups, tc, samples)
    else:
        groups = [([p], Path(f"{output}.{_language(p)}")) for p in inputs] if per_language else [(inputs, output)]
        yield from _train_groups(groups, tc)


def _train_groups(groups: list[tuple[list, Path]], tc: TokenizerConfig, samples: list[list[str]] | None = None
                  ) -> Iterator[str]:
    """One model per group of inputs (files, or the names of `samples`, one for each); report lines."""
    prefixes = [prefix for _, prefix in groups]
    for n, (files, prefix) in enumerate(groups):
        if prefix in prefixes[:n]:  # the second model would replace the first
            first = groups[prefixes.index(prefix)][0][0]
            raise MtrainError(f"--per-language: {first} and {files[0]} would both write {prefix}.model; "
                              f"give one file per language")
    for n, (files, prefix) in enumerate(groups):
        start = time.time()
        model = train_tokenizer(files, tc, prefix, sample=None if samples is None else samples[n])
        tok = Tokenizer.load(model)
        yield f"wrote {model} and {prefix}.vocab ({tok.vocab_size} pieces, {time.time() - start:.1f} s)"
        for path in files:
            s = tokenizer_stats(tok, path, lines=None if samples is None else samples[n])
            yield (f"  {s['file']}: {s['pieces_per_sentence']:.2f} pieces/sentence, "
                   f"unknown rate {100 * s['unk_rate']:.3f}% (first {s['sentences']} lines)")


def with_tags(tc: TokenizerConfig, tags: Sequence[str]) -> TokenizerConfig:
    """The tokenizer settings with the corpora's tags among its user-defined symbols, so that each
    tag is one piece."""
    return dataclasses.replace(tc, user_defined_symbols=list(dict.fromkeys([*tc.user_defined_symbols, *tags])))


def get_tokenizers(cfg: Config, run_dir: Path, log=print, write: bool = True) -> Tokenizers:
    """Load the configured SentencePiece model(s), training them on the training data if missing
    (into the run directory when no path is configured). Only one process of a torchrun job may
    `write` (train); the others read what it wrote."""
    tc = cfg.tokenizer
    main = Path(tc.model) if tc.model else run_dir / "spm.model"
    tgt_path = main if tc.joint else (Path(tc.tgt_model) if tc.tgt_model else main.with_name(main.stem + ".tgt.model"))
    if write and (not main.is_file() or not tgt_path.is_file()):
        if not cfg.data.train:
            raise MtrainError("data.train: no training corpus given")
        for source in (*cfg.data.train, cfg.data.valid):  # mismatched or missing files: named before SentencePiece
            if source.src:
                check_line_counts(Path(source.src), Path(source.tgt))
        tc = with_tags(tc, cfg.data.tags)
        log(f"tokenizer: training SentencePiece ({tc.model_type}, {tc.vocab_size}) on "
            f"{', '.join(s.label for s in cfg.data.train)}")
        samples = sample_sources(cfg.data.train, tc)
        names = [source.label for source in cfg.data.train]
        train_tokenizer(names, tc, main.with_suffix(""), sample=samples[0])
        if not tc.joint:
            train_tokenizer(names, tc, tgt_path.with_suffix(""), sample=samples[1])
    src_tok = Tokenizer.load(main)
    return Tokenizers(src_tok, src_tok if tc.joint else Tokenizer.load(tgt_path))


def save_to_run(toks: Tokenizers, run_dir: Path) -> None:
    """A copy of the tokenizer(s) in the run directory, so that it is self-contained."""
    toks.src.save(run_dir / ("spm.model" if toks.joint else "spm.src.model"))
    if not toks.joint:
        toks.tgt.save(run_dir / "spm.tgt.model")
