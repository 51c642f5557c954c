"""Translating lines: sort by length, batch, beam search, restore input order, yield per block."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from mtrain.config import DecodeConfig
from mtrain.data import cut_sorted, pad_batch
from mtrain.device import Device
from mtrain.ensemble import Ensemble
from mtrain.errors import MtrainError
from mtrain.files import atomic_text, check_folder, check_parent
from mtrain.guide import Guide, Wish, make_guide, met
from mtrain.model import Transformer
from mtrain.progress import Progress
from mtrain.search import Hypothesis, beam_search, output_limits, sample
from mtrain.tokenizer import Tokenizers, is_one_piece

BLOCK = 2000  # lines read before decoding: enough to sort by length, small enough to stream a pipe


@dataclass
class Sampling:
    """Ancestral sampling instead of beam search (back-translation). One generator serves the whole
    input, so every block of lines continues the random stream instead of repeating it."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 1
    generator: torch.Generator | None = None

    def __post_init__(self):
        if not self.temperature > 0:
            raise MtrainError(f"--temperature: must be > 0, got {self.temperature}")
        if self.top_k < 0:
            raise MtrainError(f"--top-k: must be >= 0 (0 = all tokens), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise MtrainError(f"--top-p: must be in (0, 1], got {self.top_p}")

    def generator_on(self, device: torch.device) -> torch.Generator:
        if self.generator is None or self.generator.device != device:
            self.generator = torch.Generator(device).manual_seed(self.seed)
        return self.generator


def length_batches(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Pure: indices sorted by length and cut so that n * longest <= max_tokens (at least one each)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    return [b.tolist() for b in cut_sorted(np.argsort(lengths, kind="stable"), lengths, max_tokens)]


def beam_options(cfg: DecodeConfig, toks: Tokenizers) -> dict:
    """BeamSearch's options from the decode section: <unk> is never emitted unless cfg.allow_unk."""
    return dict(beam=cfg.beam, lenpen=cfg.lenpen, lenpen_type=cfg.lenpen_type, max_len_a=cfg.max_len_a,
                max_len_b=cfg.max_len_b, min_len=cfg.min_len, nbest=cfg.nbest, no_repeat_ngram=cfg.no_repeat_ngram,
                bos=toks.tgt.bos, eos=toks.tgt.eos, pad=toks.tgt.pad, unk=None if cfg.allow_unk else toks.tgt.unk)


def fit_positions(src_ids: Sequence[Sequence[int]], max_positions: int) -> list[list[int]]:
    """Each id sequence cut to leave room for its EOS within the model's positions."""
    return [list(s[:max_positions - 2]) for s in src_ids]


def source_batch(src_ids: Sequence[Sequence[int]], toks: Tokenizers, device: torch.device) -> torch.Tensor:
    """(B, S) source ids, each sequence ending in EOS, padded after."""
    return torch.from_numpy(pad_batch(src_ids, toks.src.pad, suffix=toks.src.eos)).to(device)


def decode_ids(model: Transformer | Ensemble, src_ids: Sequence[Sequence[int]], cfg: DecodeConfig, toks: Tokenizers,
               dev: Device, sampling: Sampling | None = None, done: Callable[[int], None] | None = None,
               guides: Sequence[Guide | None] | None = None) -> list[list[Hypothesis]]:
    """n-best hypotheses for each id sequence (EOS is added here), in input order; with `sampling`
    one sampled hypothesis each instead. <unk> is never emitted unless cfg.allow_unk. `done(n)` hears
    of each batch of n sentences decoded. `guides`: each sequence's constraints and prefix (beam
    search only)."""
    results: list[list[Hypothesis]] = [[] for _ in src_ids]
    options = beam_options(cfg, toks)
    src_ids = fit_positions(src_ids, model.cfg.max_positions)
    for batch in length_batches([len(s) + 1 for s in src_ids], max(1, cfg.batch_tokens // cfg.beam)):
        src = source_batch([src_ids[i] for i in batch], toks, dev.device)
        with dev.autocast():
            if sampling:
                hyps = [[h] for h in sample(
                    model, src, src == toks.src.pad, temperature=sampling.temperature, top_k=sampling.top_k,
                    top_p=sampling.top_p, max_len_a=cfg.max_len_a, max_len_b=cfg.max_len_b, min_len=cfg.min_len,
                    bos=toks.tgt.bos, eos=toks.tgt.eos, pad=toks.tgt.pad, unk=options["unk"],
                    generator=sampling.generator_on(dev.device))]
            else:
                hyps = beam_search(model, src, src == toks.src.pad,
                                   guides=[guides[i] for i in batch] if guides is not None else None, **options)
        for i, h in zip(batch, hyps):
            results[i] = h
        if done is not None:
            done(len(batch))
    return results


@dataclass
class Inspect:
    """What to show besides the translations: word alignments after ` ||| ` on each line
    (`alignment` = "pieces" or "words") and cross-attention heatmaps of the first lines."""

    alignment: str | None = None
    attention_dir: Path | None = None
    attention_limit: int = 20

    def __post_init__(self):
        if self.alignment not in (None, "pieces", "words"):
            raise MtrainError(f"--alignment: pieces or words, got {self.alignment!r}")
        if self.attention_limit < 0:
            raise MtrainError(f"--attention-limit: must be >= 0, got {self.attention_limit}")
        if self.attention_dir is not None:
            from mtrain.attention import require_matplotlib
            require_matplotlib()
            if not self.attention_dir.parent.is_dir():
                raise MtrainError(f"{self.attention_dir.parent}: directory for --attention does not exist")
            check_folder(self.attention_dir, "--attention heatmaps")
            self.attention_dir.mkdir(exist_ok=True)


def drop_unknown(ids: list[list[int]], unk: int) -> tuple[list[list[int]], list[list[int]]]:
    """The id sequences without <unk>, and for each the positions of the pieces kept. With a tokenizer
    that covers every character of the training text (character_coverage 1.0, the default) the model
    never saw <unk> in training, and one in the source derails the whole sentence: on Multi30k's `val`
    with an unknown emoji before each final full stop, beam-5 BLEU fell from 40.6 to 33.3."""
    kept = [[p for p, x in enumerate(s) if x != unk] for s in ids]
    return [[s[p] for p in k] for s, k in zip(ids, kept)], kept


@dataclass
class TranslatedLine:
    """One input line's result: its n-best texts and scores (best first), the hypotheses behind them,
    and the source ids the model read besides the tag (`kept`: where each stood in the line's
    encoding, when translate left <unk> pieces out). An empty line has nothing; a line copied
    through (unknown characters alone) has no hypotheses and itself as its one text, scored 0."""

    texts: list[str]
    scores: list[float]
    hyps: list[Hypothesis]
    src_ids: list[int]
    kept: list[int] | None = None


@dataclass
class EncodedLines:
    """Stripped lines made ready to decode: `todo` are the lines to decode and `ids` the pieces the
    model reads of each (the tag first, when there is one; cut to fit the model's positions). `done` holds the lines that need no
    decoding (empty, or copied through) and, after `finish`, all of them."""

    done: list[TranslatedLine]
    todo: list[int]
    ids: list[list[int]]
    plain: list[list[int]]  # the ids without the tag
    kept: list[list[int]] | None

    def finish(self, hyps: Sequence[list[Hypothesis]], toks: Tokenizers) -> list[TranslatedLine]:
        """Every line's result, given the hypotheses of each line to decode (in `todo` order)."""
        for n, (i, h) in enumerate(zip(self.todo, hyps)):
            self.done[i] = TranslatedLine(toks.tgt.decode_batch([x.tokens for x in h]), [x.score for x in h], h,
                                      self.plain[n], self.kept[n] if self.kept else None)
        return self.done


def read_sources(text: Sequence[str], toks: Tokenizers, max_positions: int, keep_unknown: bool = False,
                 tag: int | None = None, first_line: int = 1) -> EncodedLines:
    """Encode stripped lines. Source pieces the tokenizer could only make <unk> are left out (said
    on stderr, counting lines from `first_line`) unless keep_unknown; a line of nothing else is
    copied through. `tag`: a piece put before every source line, as training puts a corpus's tag."""
    todo = [i for i, t in enumerate(text) if t]  # empty lines stay empty, and cost nothing
    ids = toks.src.encode_batch([text[i] for i in todo])
    kept, copied = None, set()
    unknown = [n for n, x in enumerate(ids) if toks.src.unk in x]
    if unknown:
        first = todo[unknown[0]]
        if not keep_unknown:
            ids, kept = drop_unknown(ids, toks.src.unk)
            # A line of unknown characters alone (an emoji) has nothing left to translate, and the
            # model would make a sentence up from a lone '▁': it is copied through instead.
            copied = {todo[n] for n in unknown if not toks.src.sp.decode(ids[n]).strip()}
            rest = [n for n, i in enumerate(todo) if i not in copied]
            todo, ids, kept = [todo[n] for n in rest], [ids[n] for n in rest], [kept[n] for n in rest]
        print(f"mtrain: {len(unknown)} input line{'s' * (len(unknown) > 1)} held characters the source "
              f"tokenizer does not know (line {first_line + first}: {toks.src.unknown_chars(text[first])!r}); "
              + ("kept as <unk>" if keep_unknown else "translated without them"
                 + (f", {len(copied)} copied through for holding nothing else" if copied else "")
                 + " (--keep-unknown keeps them as <unk>)"), file=sys.stderr)
    long = sum(len(x) >= max_positions - 1 for x in ids)
    if long:
        print(f"mtrain: {long} input lines longer than {max_positions - 2} pieces were truncated",
              file=sys.stderr)
    done = [TranslatedLine([text[i]], [0.0], [], []) if i in copied else TranslatedLine([], [], [], [])
            for i in range(len(text))]
    tagged = ids if tag is None else [[tag, *x] for x in ids]
    return EncodedLines(done, todo, fit_positions(tagged, max_positions), ids, kept)


def translate_texts(text: Sequence[str], model: Transformer | Ensemble, toks: Tokenizers, cfg: DecodeConfig,
                    dev: Device, sampling: Sampling | None = None, keep_unknown: bool = False,
                    tag: int | None = None, first_line: int = 1, done: Callable[[int], None] | None = None,
                    wishes: Sequence[Wish | None] | None = None, where: str = "line") -> list[TranslatedLine]:
    """Translate stripped lines in one go (sorted by length and batched inside); see read_sources.
    `done(n)` hears of n more lines translated, as batches finish. `wishes`: each line's constraints
    and prefix (`where` names their source in messages, e.g. a file's name)."""
    sources = read_sources(text, toks, model.cfg.max_positions, keep_unknown, tag, first_line)
    if done is not None and len(text) > len(sources.todo):
        done(len(text) - len(sources.todo))  # empty lines and lines copied through
    guides = None
    if wishes is not None and any(wishes):
        if sampling is not None:
            raise MtrainError("constraints and prefixes guide beam search; --sample draws without them")
        guides, warnings = line_guides([wishes[i] for i in sources.todo], sources.ids,
                                       [f"{where} {first_line + i}" for i in sources.todo], cfg, toks,
                                       model.cfg.max_positions)
        for warning in filter(None, warnings):
            print(f"mtrain: {warning}", file=sys.stderr)
    results = sources.finish(decode_ids(model, sources.ids, cfg, toks, dev, sampling, done, guides), toks)
    if guides is not None:
        for i, guide in zip(sources.todo, guides):
            hyps = results[i].hyps
            if hyps and not met(guide, hyps[0].tokens):
                print(f"mtrain: {where} {first_line + i}: the output limit came before every constraint was met; "
                      f"the best output reaching it is given", file=sys.stderr)
    return results


def line_guides(wishes: Sequence[Wish | None], ids: Sequence[Sequence[int]], names: Sequence[str], cfg: DecodeConfig,
                toks: Tokenizers, max_positions: int) -> tuple[list[Guide | None], list[str]]:
    """The Guide of each line to decode (`ids`: its source pieces), checked against its output limit
    (MtrainError naming the line for bad input), and a warning per line ('' for none) where
    constraints could not fit. `names` name the lines in messages. translate and serve both use it."""
    limits = output_limits(torch.tensor([len(x) for x in ids]), cfg.max_len_a, cfg.max_len_b, max_positions - 1)
    made = [make_guide(wish, toks.tgt, limit, name) for wish, limit, name in zip(wishes, limits.tolist(), names)]
    return [guide for guide, _ in made], [warning for _, warning in made]


def translate_lines(lines: Iterable[str], model: Transformer | Ensemble, toks: Tokenizers, cfg: DecodeConfig,
                    dev: Device, sampling: Sampling | None = None, inspect: Inspect | None = None,
                    block: int = BLOCK, keep_unknown: bool = False, tag: int | None = None,
                    done: Callable[[int], None] | None = None, wishes: Iterable[Wish | None] | None = None,
                    where: str = "line") -> Iterator[str]:
    """One output line per input line (nbest lines `INDEX ||| TEXT ||| SCORE` when cfg.nbest > 1;
    `TEXT ||| ALIGNMENT` with inspect.alignment). Reads `block` lines at a time and yields all their
    outputs before reading more, so that block=1 answers each line before the next is read."""
    if inspect and inspect.alignment and cfg.nbest > 1:
        raise MtrainError("--alignment works with one translation per line, not --nbest")
    if inspect and isinstance(model, Ensemble):
        raise MtrainError("--alignment and --attention show one model's attention; give one --checkpoint")
    model.eval()
    index = 0
    lines = iter(lines)
    wishes = iter(wishes) if wishes is not None else None
    while chunk := list(itertools.islice(lines, block)):
        text = [line.rstrip("\r\n").strip() for line in chunk]
        asked = list(itertools.islice(wishes, len(chunk))) if wishes is not None else None
        if asked is not None and len(asked) < len(chunk):
            raise MtrainError(f"{where.removesuffix(': line')}: {index + len(asked)} lines, fewer than the input")
        results = translate_texts(text, model, toks, cfg, dev, sampling, keep_unknown, tag, first_line=index + 1,
                                  done=done, wishes=asked, where=where)
        shown = [""] * len(text)
        if inspect and (inspect.alignment or inspect.attention_dir):
            from mtrain.attention import annotate
            todo = [i for i, d in enumerate(results) if d.hyps]
            notes = annotate(model, toks, [results[i].src_ids for i in todo],
                             [results[i].hyps[0].tokens for i in todo], [index + i + 1 for i in todo],
                             inspect.alignment, inspect.attention_dir, inspect.attention_limit,
                             src_positions=[results[i].kept for i in todo], tag=tag)
            for i, note in zip(todo, notes):
                shown[i] = note
        for d, note in zip(results, shown):
            if cfg.nbest == 1:
                best = d.texts[0] if d.texts else ""
                yield f"{best} ||| {note}" if inspect and inspect.alignment else best
            else:
                for j in range(cfg.nbest):
                    out, sc = (d.texts[j], d.scores[j]) if j < len(d.texts) else ("", float("-inf"))
                    yield f"{index} ||| {out} ||| {sc:.4f}"
            index += 1


def with_overrides(cfg: DecodeConfig, **changes) -> DecodeConfig:
    """The decode section with command-line flags applied (None = keep), re-validated."""
    try:
        return dataclasses.replace(cfg, **{k: v for k, v in changes.items() if v is not None})
    except ValueError as e:
        raise MtrainError(f"decode options: {e}") from None


def given(flags: dict) -> list[str]:
    """The names of the flags given on the command line (an Optional flag left out is None)."""
    return [name for name, value in flags.items() if value is not None]


def translate_modes(*, sample: bool, beam_flags: dict, sampling_flags: dict, alignment: str | None,
                    attention_dir: Path | None, attention_limit: int | None) -> tuple[Sampling | None, Inspect | None]:
    """`translate`'s flags that choose between beam search and sampling, and what to show besides the
    translations; a flag that would be ignored in silence is refused with one line. The flag dicts map
    '--name' to its value (None: not given); sampling_flags hold --temperature, --top-k, --top-p, --seed."""
    beam_given = given(beam_flags)
    if sample and beam_given:
        raise MtrainError(f"--sample draws one translation per line; {', '.join(beam_given)} set beam search, "
                          f"which it replaces")
    sampling_given = given(sampling_flags)
    if not sample and sampling_given:
        raise MtrainError(f"{', '.join(sampling_given)} set{'s' * (len(sampling_given) == 1)} sampling, which "
                          f"needs --sample (without it, translate runs beam search)")
    sampling = Sampling(**{k.removeprefix("--").replace("-", "_"): v for k, v in sampling_flags.items()
                           if v is not None}) if sample else None
    if attention_limit is not None and attention_dir is None:
        raise MtrainError("--attention-limit counts the heatmaps of --attention DIR, which is not given")
    limit = Inspect.attention_limit if attention_limit is None else attention_limit  # the dataclass default
    inspect = Inspect(alignment, attention_dir, limit) if alignment or attention_dir else None
    return sampling, inspect


def tag_piece(tag: str, toks: Tokenizers, known: Sequence[str], option: str = "--tag") -> int:
    """The source piece of a tag the model was trained with (data.train's tags); one line otherwise."""
    if tag not in known or not is_one_piece(tag, toks.src):
        raise MtrainError(f"{option} {tag}: not a tag this model was trained with "
                          + (f"(its tags: {', '.join(known)})" if known else "(it was trained without tags)"))
    return toks.src.sp.piece_to_id(tag)


def run_translate(checkpoints: Sequence[Path], input: Path | None, output: Path | None, device: str,
                  precision: str, decode_flags: dict, sampling: Sampling | None, trust: bool = False,
                  inspect: Inspect | None = None, buffer_lines: int | None = None, keep_unknown: bool = False,
                  tag: str | None = None, constraints: Path | None = None, prefix: Path | None = None) -> None:
    """`mtrain translate`: load a checkpoint or an ensemble of several, stream lines from a file or stdin.
    `buffer_lines` lines are read, translated and written at a time (None: one at a time when stdin
    is a terminal, so that each typed line is answered at once, else BLOCK).
    A file output appears whole when every line is translated, or not at all: an error on line 2000
    leaves no half-written file (and an older file of that name untouched)."""
    from mtrain.checkpoint import load_models
    from mtrain.corpus import check_input, count_lines, open_text
    from mtrain.device import pick_device

    if not checkpoints:
        raise MtrainError("--checkpoint: give at least one checkpoint")
    if buffer_lines is None:
        buffer_lines = 1 if input is None and sys.stdin.isatty() else BLOCK
    if buffer_lines < 1:
        raise MtrainError(f"--buffer-lines: must be >= 1, got {buffer_lines}")
    if output is not None:
        check_parent(output, "output")
    if input is not None:
        check_input(input)
    for path in (constraints, prefix):
        if path is not None:
            check_input(path)
    if sampling is not None and (constraints or prefix):
        raise MtrainError("--constraints and --prefix guide beam search; --sample draws without them")
    model, toks, cfg = load_models(checkpoints, trust)
    tag_id = None if tag is None else tag_piece(tag, toks, cfg.data.tags)
    dev = pick_device(device, precision, setting="--")
    model.to(dev.device)
    decode = with_overrides(cfg.decode, **decode_flags)
    lines = open_text(input if input is not None else "-")
    # Progress on stderr, unless translations or typed lines share the terminal with it
    shown = (Progress("translate", count_lines(input) if input is not None else None)  # input was checked
             if (output is not None or not sys.stdout.isatty()) and buffer_lines > 1 else None)
    with atomic_text(output) if output is not None else contextlib.nullcontext(sys.stdout) as out, \
            shown if shown is not None else contextlib.nullcontext():
        wishes = read_wishes(constraints, prefix) if constraints or prefix else None
        where = f"{', '.join(str(p) for p in (constraints, prefix) if p)}: line"
        for line in translate_lines(lines, model, toks, decode, dev, sampling, inspect, buffer_lines, keep_unknown,
                                    tag_id, done=shown.update if shown is not None else None, wishes=wishes,
                                    where=where):
            out.write(line + "\n")
            if out is sys.stdout:
                out.flush()  # each block reaches the next command of the pipe at once
        if wishes is not None and next(wishes, None) is not None:
            raise MtrainError(f"{where.removesuffix(': line')}: more lines than the input")


def read_wishes(constraints: Path | None, prefix: Path | None) -> Iterator[Wish]:
    """Each line's Wish from the constraints file (tab-separated target phrases; an empty line asks
    for none) and the prefix file (one prefix a line), read as the input is. It ends with the files;
    files that end apart are one line."""
    from mtrain.corpus import open_text
    files = {path: open_text(path) for path in (constraints, prefix) if path is not None}
    n = 0
    while True:
        parts = {path: next(lines, None) for path, lines in files.items()}
        ended = [str(path) for path, text in parts.items() if text is None]
        if len(ended) == len(files):
            return
        if ended:
            raise MtrainError(f"{', '.join(ended)}: {n} lines, fewer than {', '.join(str(p) for p in files)}")
        n += 1
        phrases = tuple(parts[constraints].split("\t")) if constraints and parts[constraints].strip() else ()
        if any(not p.strip() for p in phrases):
            raise MtrainError(f"{constraints}: line {n}: an empty constraint phrase (a tab at an end, or two in a row)")
        yield Wish(phrases, parts[prefix].rstrip("\r\n") if prefix else "")
