"""`mtrain prepare`: the data work of `fit` done once, before training: the tokenizer and every corpus
encoded into one directory, with a manifest written last, which `fit` reads (`data.prepared`).

A prepared directory does not depend on where it was made: its manifest identifies each source by
its settings and, for files, by their size and a sample of their content (`data.source_fingerprint`:
not their absolute path or modification time), so a copy of the data on another machine matches it. An interrupted
`prepare` keeps the corpora it finished and continues the one it was writing; without the manifest,
`fit` never takes a directory as complete. Prepare writes only into a new or empty folder, which it
marks as its own (MARKER), or one it made before: it never replaces or removes the user's files.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from mtrain.config import Config, DataSource
from mtrain.corpus import raw_pairs
from mtrain.data import CACHE_VERSION, EncodedCorpus, open_encoded, source_fingerprint
from mtrain.encode import encode_to, tag_id
from mtrain.errors import MtrainError
from mtrain.files import atomic_write, first_names, make_folder
from mtrain.tokenizer import Tokenizers, configured_otherwise, get_tokenizers, model_paths, save_to_run

FORMAT = 2  # of the prepared directory, beside the encoded corpora's own CACHE_VERSION
MANIFEST = "manifest.json"
MARKER = ".mtrain-prepare"  # written first into the folder prepare claims: what is inside is prepare's own


def claim(out_dir: Path) -> None:
    """Make `out_dir` a prepared directory: a new or empty folder gets the marker; one with the marker
    or a manifest is prepare's already. Anything else (the user's own files) is refused in one line,
    with nothing touched: prepare replaces and removes what is inside its folder."""
    if out_dir.is_dir() and not (out_dir / MARKER).is_file() and not (out_dir / MANIFEST).is_file():
        names = sorted(p.name for p in out_dir.iterdir())
        if names:
            raise MtrainError(f"{out_dir}: holds files mtrain prepare did not write ({first_names(names)}); give "
                              f"prepare a new or empty folder")
    make_folder(out_dir, "prepared data")
    if not (out_dir / MARKER).is_file():
        with atomic_write(out_dir / MARKER, "w", "marker") as f:
            f.write("A folder of mtrain prepare: it replaces and removes what is inside.\n")


def expected_manifest(cfg: Config, toks: Tokenizers) -> dict:
    """What a prepared directory must say for `cfg`, with these tokenizers, to be the one it trains on."""
    return {"format": FORMAT, "encoding": CACHE_VERSION, "tokenizer": toks.identity,
            "filters": {"max_len": cfg.data.max_len, "max_len_ratio": cfg.data.max_len_ratio},
            "train": [source_fingerprint(s) for s in cfg.data.train],
            "valid": None if cfg.data.valid.empty else source_fingerprint(cfg.data.valid)}


def _parts(cfg: Config) -> list[tuple[str, DataSource, bool]]:
    """(folder name, source, filtered) of every corpus a prepared directory holds."""
    parts = [(f"train{n}", s, True) for n, s in enumerate(cfg.data.train)]
    return parts + ([] if cfg.data.valid.empty else [("valid", cfg.data.valid, False)])


def stream_once(source: DataSource, folder: Path, fingerprint: dict) -> DataSource:
    """A streamed Hugging Face source, read once into plain text in the prepared directory, so that
    training the tokenizer and encoding (in parallel, by byte ranges) do not stream it twice; returns
    the files' source. A copy that was finished for the same fingerprint is kept."""
    src, tgt, done = folder / "src.txt", folder / "tgt.txt", folder / "complete.json"
    if not (done.is_file() and json.loads(done.read_text()) == fingerprint):
        make_folder(folder, "prepared data")
        done.unlink(missing_ok=True)
        with open(src, "w", encoding="utf-8") as fs, open(tgt, "w", encoding="utf-8") as ft:
            for s, t in raw_pairs(source):  # a line break inside a record is a space: one record, one line
                fs.write(s.replace("\r", " ").replace("\n", " ") + "\n")
                ft.write(t.replace("\r", " ").replace("\n", " ") + "\n")
        done.write_text(json.dumps(fingerprint))
    return DataSource(src=str(src), tgt=str(tgt), name=source.label, weight=source.weight, tag=source.tag)


def _streamed_once(cfg: Config, out_dir: Path) -> Config:
    """`cfg` with each streamed Hugging Face source replaced by its copy in `out_dir/raw/`."""
    def local(source: DataSource, name: str) -> DataSource:
        if not (source.hf and source.hf_streaming):
            return source
        return stream_once(source, out_dir / "raw" / name, source_fingerprint(source))
    train = [local(s, f"train{n}") for n, s in enumerate(cfg.data.train)]
    valid = cfg.data.valid if cfg.data.valid.empty else local(cfg.data.valid, "valid")
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, train=train, valid=valid))


def prepare(cfg: Config, out_dir: Path | str, log=print, workers: int = 0, toks: Tokenizers | None = None) -> Path:
    """Tokenizer (trained into `out_dir` when tokenizer.model is not given or missing) and every corpus,
    encoded by `workers` processes (0: one per core this process may use; the result is the same for
    any number); the manifest last. Corpora already encoded for the same source and tokenizer are
    kept, and one that was interrupted continues from its last chunk."""
    out_dir = Path(out_dir)
    claim(out_dir)
    (out_dir / MANIFEST).unlink(missing_ok=True)  # incomplete until written again, at the end
    local = _streamed_once(cfg, out_dir)  # what is read from here on: files for streamed sources
    toks = toks or get_tokenizers(local, out_dir, log)
    save_to_run(toks, out_dir)
    manifest = expected_manifest(cfg, toks)
    for _, source, _ in _parts(local):  # a tag the tokenizer lacks: named before any corpus is encoded
        tag_id(source, toks)
    for (name, source, filtered), fingerprint in zip(_parts(local), [*manifest["train"], manifest["valid"]]):
        folder = out_dir / name
        stamp = {"source": fingerprint, "tokenizer": manifest["tokenizer"], "filters": manifest["filters"],
                 "filtered": filtered, "encoding": CACHE_VERSION}
        done = folder / "prepared.json"
        if done.is_file() and json.loads(done.read_text()) == stamp:
            log(f"prepare: {source.label}: already encoded in {folder}")
            continue
        encode_to(folder, source, toks, cfg.data, filtered, stamp, workers=workers,
                  finish=lambda t, s=stamp: _write_json(t / "prepared.json", s))
        log(f"prepare: {source.label}: {json.loads((folder / 'report.json').read_text())['summary']}")
    _write_json(out_dir / MANIFEST, manifest)
    log(f"prepare: {out_dir} is ready; train on it with data.prepared: {out_dir}")
    return out_dir


def _write_json(path: Path, value) -> None:
    with atomic_write(path, "w", path.name) as f:
        f.write(json.dumps(value, indent=1))


def load_prepared(cfg: Config, prepared: Path | str, log=print) -> tuple[Tokenizers, list[EncodedCorpus],
                                                                        EncodedCorpus | None]:
    """The tokenizers, training corpora and validation corpus of a prepared directory made for `cfg`;
    anything else is refused with one line (it is never encoded again here)."""
    from mtrain.tokenizer import Tokenizer
    prepared = Path(prepared)
    path = prepared / MANIFEST
    if not path.is_file():
        raise MtrainError(f"{prepared}: no prepared data ({MANIFEST} missing); run `mtrain prepare CONFIG -o "
                          f"{prepared}` where every process of the job can read it (a shared filesystem)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise MtrainError(f"{path}: not a readable manifest; run mtrain prepare again") from None
    paths = model_paths(prepared, cfg.tokenizer.joint)
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise MtrainError(f"{prepared}: prepared with another tokenizer ({missing[0]} missing for tokenizer.joint: "
                          f"{str(cfg.tokenizer.joint).lower()}); run mtrain prepare again")
    src = Tokenizer.load(paths[0])
    toks = Tokenizers(src, src if cfg.tokenizer.joint else Tokenizer.load(paths[1]))
    other = configured_otherwise(cfg.tokenizer, toks)
    if other is not None:
        raise MtrainError(f"{prepared}: prepared with another tokenizer than {other}; run mtrain prepare again")
    expected = expected_manifest(cfg, toks)
    for key, what in (("format", "another mtrain format"), ("encoding", "another mtrain format"),
                      ("tokenizer", "another tokenizer"), ("filters", "other data.max_len or max_len_ratio")):
        if manifest.get(key) != expected[key]:
            raise MtrainError(f"{prepared}: prepared with {what}; run mtrain prepare again")
    if len(manifest.get("train", [])) != len(expected["train"]):
        raise MtrainError(f"{prepared}: prepared for {len(manifest.get('train', []))} training corpora, the config "
                          f"has {len(expected['train'])}; run mtrain prepare again")
    for n, (was, now) in enumerate(zip(manifest["train"], expected["train"])):
        if was != now:
            raise MtrainError(f"{prepared}: prepared for other data than data.train[{n}] "
                              f"({cfg.data.train[n].label}); run mtrain prepare again")
    if manifest.get("valid") != expected["valid"]:
        raise MtrainError(f"{prepared}: prepared for another data.valid; run mtrain prepare again")
    parts = [open_encoded(prepared / f"train{n}") for n in range(len(cfg.data.train))]
    for source, part in zip(cfg.data.train, parts):
        log(f"data: {source.label}: {part.report['summary']} (prepared in {prepared})")
    valid = None if cfg.data.valid.empty else open_encoded(prepared / "valid")
    return toks, parts, valid
