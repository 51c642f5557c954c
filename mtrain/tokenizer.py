"""SentencePiece: train a model from text files, and encode/decode with fixed special ids."""

from __future__ import annotations

import dataclasses
import hashlib
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
from mtrain.progress import Progress, note


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


def _proto_fields(data: bytes) -> Iterator[tuple[int, bytes, bytes]]:
    """The top-level fields of a protobuf message: (field number, the field's bytes with its key,
    the value's bytes when it is length-delimited, else b"")."""
    def varint(at: int) -> tuple[int, int]:
        value, shift = 0, 0
        while True:
            byte = data[at]
            value |= (byte & 0x7F) << shift
            at, shift = at + 1, shift + 7
            if byte < 0x80:
                return value, at
    at = 0
    while at < len(data):
        start = at
        key, at = varint(at)
        kind, value = key & 7, b""
        if kind == 0:
            _, at = varint(at)
        elif kind == 1:
            at += 8
        elif kind == 5:
            at += 4
        elif kind == 2:
            size, at = varint(at)
            value, at = data[at:at + size], at + size
        else:
            raise ValueError(f"protobuf wire type {kind} not expected in a SentencePiece model")
        yield key >> 3, data[start:at], value


# Fields of SentencePiece's TrainerSpec (field 2 of ModelProto) that say where and how fast the model
# was trained, not what it does: input, model_prefix, input_format, num_threads.
_WHERE_TRAINED = {1, 2, 7, 16}


def identity(proto: bytes) -> str:
    """What decides a SentencePiece model's output (pieces, scores, normalizer, the trainer settings
    encoding reads), hashed. SentencePiece writes its input and output paths and thread count into
    the model, so the same data trained into two folders gives other bytes but the same identity."""
    h = hashlib.sha256()
    for number, raw, value in _proto_fields(proto):
        if number == 2:  # trainer_spec: without the fields that name paths or threads
            h.update(b"".join(r for n, r, _ in _proto_fields(value) if n not in _WHERE_TRAINED))
        else:
            h.update(raw)
    return h.hexdigest()


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
        self.identity = identity(model_proto)

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
        return self.src.identity == self.tgt.identity

    @property
    def identity(self) -> str:
        """Both sides' identities: equal for tokenizers that encode and decode alike."""
        return hashlib.sha256(f"{self.src.identity} {self.tgt.identity}".encode()).hexdigest()


class Reservoir:
    """The non-empty lines offered (stripped), all of them in order when they are at most `size` (0:
    all, as SentencePiece's input_sentence_size); else `size` of them: a uniform sample (reservoir
    sampling, Vitter's algorithm R, from `seed`) kept in the order offered, or the first `size` without
    `shuffle`. Memory is the sample's, whatever the corpus's."""

    def __init__(self, size: int, shuffle: bool, seed: int = 1):
        self.size, self.shuffle, self.rng = size or float("inf"), shuffle, random.Random(seed)
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
    with Progress("tokenizer: reading", unit="lines") as shown:
        for path in inputs:
            for line in open_text(path):
                if sample.full:
                    return sample.lines()
                sample.offer(line)
                shown.update()
    return sample.lines()


def sample_sources(sources: Sequence[DataSource], tok_cfg: TokenizerConfig) -> list[list[str]]:
    """What SentencePiece trains on, taken from the training corpora in one streaming pass, with nothing
    written out: one sample of both sides for a joint model, else one per side. A file pair is read as
    its two files, source then target."""
    size, shuffle = tok_cfg.input_sentence_size, tok_cfg.shuffle_input_sentence
    if len(sources) == 1 and sources[0].src:
        paths = [sources[0].src, sources[0].tgt]
        if tok_cfg.joint:
            return [sample_lines(paths, size, shuffle)]
        return [sample_lines(paths[:1], size, shuffle), sample_lines(paths[1:], size, shuffle)]
    samples = [Reservoir(size, shuffle)] if tok_cfg.joint else [Reservoir(size, shuffle), Reservoir(size, shuffle)]
    with Progress("tokenizer: reading", unit="pairs") as shown:
        for source in sources:
            for src, tgt in read_pairs(source):
                if all(sample.full for sample in samples):
                    break
                samples[0].offer(src)
                samples[-1].offer(tgt)
                shown.update()
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
        if len(lines) >= 100_000:  # minutes of work ahead, without progress of SentencePiece's own
            note(f"tokenizer: SentencePiece trains on {len(lines):,} lines (it reports no progress of its own)")
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

    tok_cfg, inputs, sources, paths = TokenizerConfig(), list(inputs), [], None
    if overrides and config is None:  # nothing to override: they would be ignored
        raise MtrainError(f"--set {overrides[0]}: --set overrides keys of a --config; without one, use the "
                          f"flags (--vocab-size, --model-type, ...)")
    if config is not None:
        cfg = load_config(config, overrides)
        tok_cfg = with_tags(cfg.tokenizer, cfg.data.tags)
        if not inputs:
            sources = cfg.data.train  # any kind, one or several: as plain text below
        per_language = per_language or not tok_cfg.joint
        if output is None and tok_cfg.model:  # where fit will look for them (tokenizer_paths)
            output = Path(tok_cfg.model).with_suffix("")
            paths = tokenizer_paths(dataclasses.replace(tok_cfg, joint=not per_language), Path("."))
    try:
        tok_cfg = dataclasses.replace(tok_cfg, **{k: v for k, v in settings.items() if v is not None})
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
        samples = sample_sources(sources, dataclasses.replace(tok_cfg, joint=not per_language))
        names = ", ".join(source.label for source in sources)
        sides = [paths[n].with_suffix("") if paths else Path(f"{output}.{side}") for n, side in enumerate(("src", "tgt"))]
        groups = [([f"{names} ({side})"], prefix) for side, prefix in zip(("src", "tgt"), sides)] if per_language \
            else [([f"{names} (both sides)"], output)]
        yield from _train_groups(groups, tok_cfg, samples)
    else:
        groups = [([p], Path(f"{output}.{_language(p)}")) for p in inputs] if per_language else [(inputs, output)]
        yield from _train_groups(groups, tok_cfg)


def _train_groups(groups: list[tuple[list, Path]], tok_cfg: TokenizerConfig, samples: list[list[str]] | None = None
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
        model = train_tokenizer(files, tok_cfg, prefix, sample=None if samples is None else samples[n])
        tok = Tokenizer.load(model)
        yield f"wrote {model} and {prefix}.vocab ({tok.vocab_size} pieces, {time.time() - start:.1f} s)"
        for path in files:
            s = tokenizer_stats(tok, path, lines=None if samples is None else samples[n])
            yield (f"  {s['file']}: {s['pieces_per_sentence']:.2f} pieces/sentence, "
                   f"unknown rate {100 * s['unk_rate']:.3f}% (first {s['sentences']} lines)")


def with_tags(tok_cfg: TokenizerConfig, tags: Sequence[str]) -> TokenizerConfig:
    """The tokenizer settings with the corpora's tags among its user-defined symbols, so that each
    tag is one piece."""
    return dataclasses.replace(tok_cfg, user_defined_symbols=list(dict.fromkeys([*tok_cfg.user_defined_symbols, *tags])))


def model_paths(folder: Path, joint: bool) -> tuple[Path, Path]:
    """The one naming rule of the SentencePiece models mtrain writes into a folder (a run, a prepared
    directory): a joint model is spm.model; separate ones are spm.src.model and spm.tgt.model, so that
    a folder never holds a spm.model that is one side only."""
    folder = Path(folder)
    return (folder / "spm.model",) * 2 if joint else (folder / "spm.src.model", folder / "spm.tgt.model")


def tokenizer_paths(tok_cfg: TokenizerConfig, folder: Path) -> tuple[Path, Path]:
    """(source, target) model paths of the tokenizer settings: tokenizer.model (and tgt_model) where
    given, else `model_paths` in `folder`. A tgt_model left empty is next to model: X.src.model ->
    X.tgt.model, X.model -> X.tgt.model."""
    if not tok_cfg.model:
        return model_paths(folder, tok_cfg.joint)
    main = Path(tok_cfg.model)
    if tok_cfg.joint:
        return main, main
    if tok_cfg.tgt_model:
        return main, Path(tok_cfg.tgt_model)
    stem = main.name[:-len(".src.model")] if main.name.endswith(".src.model") else main.stem
    return main, main.with_name(stem + ".tgt.model")


def configured_otherwise(tok_cfg: TokenizerConfig, toks: Tokenizers) -> Path | None:
    """The first model file the settings name (tokenizer.model, and tgt_model or the path next to
    it) that exists and holds another tokenizer than that side of `toks`; None when there is none."""
    if not tok_cfg.model:
        return None
    for path, mine in zip(tokenizer_paths(tok_cfg, Path(".")), (toks.src, toks.tgt)):
        if path.is_file() and Tokenizer.load(path).identity != mine.identity:
            return path
    return None


def get_tokenizers(cfg: Config, run_dir: Path, log=print, write: bool = True) -> Tokenizers:
    """Load the configured SentencePiece model(s), training them on the training data if missing
    (into the run directory when no path is configured). Only one process of a torchrun job may
    `write` (train); the others read what it wrote."""
    tok_cfg = cfg.tokenizer
    main, tgt_path = tokenizer_paths(tok_cfg, run_dir)
    if write and (not main.is_file() or not tgt_path.is_file()):
        if not cfg.data.train:
            raise MtrainError("data.train: no training corpus given")
        for source in (*cfg.data.train, cfg.data.valid):  # mismatched or missing files: named before SentencePiece
            if source.src:
                check_line_counts(Path(source.src), Path(source.tgt))
        tok_cfg = with_tags(tok_cfg, cfg.data.tags)
        log(f"tokenizer: training SentencePiece ({tok_cfg.model_type}, {tok_cfg.vocab_size}) on "
            f"{', '.join(s.label for s in cfg.data.train)}")
        samples = sample_sources(cfg.data.train, tok_cfg)
        names = [source.label for source in cfg.data.train]
        train_tokenizer(names, tok_cfg, main.with_suffix(""), sample=samples[0])
        if not tok_cfg.joint:
            train_tokenizer(names, tok_cfg, tgt_path.with_suffix(""), sample=samples[1])
    src_tok = Tokenizer.load(main)
    return Tokenizers(src_tok, src_tok if tok_cfg.joint else Tokenizer.load(tgt_path))


def save_to_run(toks: Tokenizers, run_dir: Path) -> None:
    """A copy of the tokenizer(s) in a run (or prepared) directory, named by `model_paths`, so that
    it is self-contained."""
    src, tgt = model_paths(run_dir, toks.joint)
    toks.src.save(src)
    if not toks.joint:
        toks.tgt.save(tgt)
