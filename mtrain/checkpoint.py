"""Checkpoints: atomic save, safe checked load, streaming averaging, and loading a model for translation."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Sequence

import torch

from mtrain.config import config_from_dict
from mtrain.errors import MtrainError
from mtrain.files import atomic_write
from mtrain.model import Transformer
from mtrain.tokenizer import Tokenizer, Tokenizers

# Version 2 holds only tensors and plain data (numbers, strings, bytes, lists, dicts), so it loads
# with torch.load(weights_only=True), which cannot run code. Version 1 pickled numpy objects.
FORMAT, VERSION = "mtrain", 2
# Before this torch release, torch.load(weights_only=True) can still run code from a crafted file
# (CVE-2025-32434, fixed in 2.6; a later advisory puts the complete fix at 2.10).
SAFE_LOAD_TORCH = (2, 10)
INFERENCE_KEYS = ("config", "model", "tokenizer_src", "tokenizer_tgt", "step", "averaged_from", "chosen",
                  "valid_bleu")


def save(path: Path, state: dict) -> None:
    """Write to a temporary file, fsync, then rename: a crash or a full disk leaves the old file or
    the new one, never a part."""
    with atomic_write(path, "wb", "checkpoint") as f:
        torch.save({"format": FORMAT, "version": VERSION, **state}, f)


def torch_release() -> tuple[int, int]:
    major, minor = (torch.__version__.split("+")[0].split(".") + ["0"])[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def load(path: Path | str, map_location="cpu", trust: bool = False, mmap: bool = False, own: bool = False) -> dict:
    """Load a checkpoint written by `save`; anything else is refused with one clear line.

    Loading never runs code from the file (weights_only=True) unless `trust` is set, which only an
    older mtrain checkpoint needs. On a torch older than SAFE_LOAD_TORCH that promise does not hold,
    so a file from elsewhere is refused there unless trusted; `own` marks the files a run wrote itself
    (resume, final.pt). `mmap` maps tensors instead of reading them: parts never touched (the
    optimizer's moments, when averaging) cost no memory."""
    path = Path(path)
    if not trust and not own and torch_release() < SAFE_LOAD_TORCH:
        raise MtrainError(f"{path}: torch {torch.__version__} cannot load a checkpoint safely (CVE-2025-32434: a "
                          f"crafted file runs code before torch {'.'.join(map(str, SAFE_LOAD_TORCH))}); upgrade "
                          f"torch, or pass --trust-checkpoint if you trust where the file came from")
    if path.is_dir():  # most often a run's output folder; its final.pt is what the user meant
        final = " (its final.pt?)" if (path / "final.pt").is_file() else ""
        raise MtrainError(f"{path}: is a folder, expected a checkpoint file{final}")
    if not path.is_file():
        raise MtrainError(f"{path}: checkpoint not found")
    if not zipfile.is_zipfile(path):  # torch's own error here (about mmap or a load key) misleads
        raise MtrainError(f"{path}: not a readable checkpoint (not a torch zip archive: cut short, or another kind of file)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=not trust, mmap=mmap)
    except pickle.UnpicklingError as e:
        if "weights_only" in str(e) or "Weights only" in str(e):
            raise MtrainError(f"{path}: holds Python objects beyond tensors and plain data (an mtrain checkpoint "
                              f"older than version {VERSION}, or a crafted file); loading it could run code. "
                              f"Only if you trust its origin, pass --trust-checkpoint") from None
        raise MtrainError(f"{path}: not a readable checkpoint (truncated or corrupt: {str(e).splitlines()[0]})") from None
    except Exception as e:  # a cut or corrupt file fails anywhere in zip reading or unpickling
        raise MtrainError(f"{path}: not a readable checkpoint (truncated or corrupt: {str(e).splitlines()[0]})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise MtrainError(f"{path}: not an mtrain checkpoint")
    if state.get("version") not in (1, VERSION):  # a version 1 file that loaded safely holds no pickled objects
        raise MtrainError(f"{path}: checkpoint version {state.get('version')} is not supported (expected {VERSION})")
    return state


def average(paths: Sequence[Path | str], trust: bool = False, own: bool = False) -> dict:
    """Mean of the model weights of several checkpoints of one run (Vaswani et al. 2017 §6.1).

    One checkpoint at a time, model weights only: the running sum (float64) is the only model-sized
    memory besides the checkpoint being read, so averaging 20 transformer-big checkpoints needs
    about as much as one."""
    resolved = [Path(p).resolve() for p in paths]
    for n, r in enumerate(resolved):  # a shell glob and a name typed again give one checkpoint twice its weight
        if r in resolved[:n]:
            raise MtrainError(f"{paths[n]}: given twice (also as {paths[resolved.index(r)]}); each checkpoint "
                              f"counts once")
    total: dict[str, torch.Tensor] = {}
    first: dict = {}
    for p in paths:
        state = load(p, trust=trust, mmap=True, own=own)
        weights = state["model"]
        if not first:
            first = {k: state[k] for k in ("config", "tokenizer_src", "tokenizer_tgt", "step") if k in state}
            total = {k: v.double() if v.is_floating_point() else v.clone() for k, v in weights.items()}
            dtypes = {k: v.dtype for k, v in weights.items()}
        elif weights.keys() != total.keys() or any(weights[k].shape != v.shape for k, v in total.items()) \
                or any(not v.is_floating_point() and not torch.equal(weights[k], v) for k, v in total.items()):
            raise MtrainError(f"{p}: its model does not match {paths[0]}; only checkpoints of one model can be averaged")
        elif any(state.get(k) != first.get(k) for k in ("tokenizer_src", "tokenizer_tgt")):
            # Same shapes, other vocabularies: row i of the embeddings is another piece in each.
            raise MtrainError(f"{p}: its tokenizer differs from that of {paths[0]}; only checkpoints of one run "
                              f"can be averaged")
        else:
            for k, v in total.items():
                if v.is_floating_point():
                    v += weights[k].double()
        del state, weights  # before the next load: never two checkpoints in memory
    averaged = {k: (v / len(paths)).to(dtypes[k]) if v.is_floating_point() else v for k, v in total.items()}
    return {**first, "model": averaged, "averaged_from": [str(p) for p in paths]}


def check_average_output(output: Path | str, inputs: Sequence[Path | str], trust: bool = False) -> None:
    """Refuse to write an average (model weights only) over a file that training needs: one of the
    inputs, or any checkpoint holding the optimizer state and data position that `fit --resume` reads."""
    output = Path(output)
    if not output.is_file():
        return
    if any(Path(p).is_file() and output.samefile(p) for p in inputs):
        raise MtrainError(f"-o {output}: is one of the checkpoints being averaged; write the average to another file")
    try:
        state = load(output, trust=trust, mmap=True)
    except MtrainError:  # not a checkpoint (or an unreadable one): an ordinary output file to replace
        return
    if "optimizer" in state:
        raise MtrainError(f"-o {output}: is a training checkpoint that fit --resume needs (step {state.get('step')}); "
                          f"write the average to another file")


def build_model(state: dict, toks: Tokenizers, source: str = "checkpoint") -> Transformer:
    cfg = config_from_dict(state["config"], f"{source} config", training=False)
    model = Transformer(cfg.model, toks.src.vocab_size, toks.tgt.vocab_size, toks.tgt.pad)
    model.load_state_dict(state["model"])
    return model


def load_for_inference(paths: Sequence[Path | str], trust: bool = False):
    """(model in eval mode, tokenizers, config) from one checkpoint or the average of several."""
    state = load(paths[0], trust=trust, mmap=True) if len(paths) == 1 else average(paths, trust)
    model, toks = model_and_tokenizers(state, paths[0])
    return model.eval(), toks, config_from_dict(state["config"], f"{paths[0]} config", training=False)


def load_models(paths: Sequence[Path | str], trust: bool = False):
    """(model in eval mode, tokenizers, config) of one checkpoint, or an Ensemble of several, which must
    share both vocabularies (one line otherwise); the config is the first one's."""
    from mtrain.ensemble import Ensemble
    loaded = [load_for_inference([path], trust) for path in paths]
    model, toks, cfg = loaded[0]
    for path, (_, other, _) in zip(paths[1:], loaded[1:]):
        for side, mine, theirs in (("source", toks.src, other.src), ("target", toks.tgt, other.tgt)):
            if mine.identity != theirs.identity:
                raise MtrainError(f"{path}: another {side} vocabulary than {paths[0]}; the models of an ensemble "
                                  f"must share both (mtrain average makes one model of checkpoints of one run)")
    return (model if len(loaded) == 1 else Ensemble([m for m, _, _ in loaded])), toks, cfg


def model_and_tokenizers(state: dict, path: Path | str, model: bool = True) -> tuple[Transformer | None, Tokenizers]:
    """Rebuild what a loaded checkpoint describes (the tokenizers alone without `model`); a missing part
    is named in one line."""
    try:
        toks = Tokenizers(Tokenizer(state["tokenizer_src"]), Tokenizer(state["tokenizer_tgt"]))
        return build_model(state, toks, str(path)) if model else None, toks
    except (KeyError, RuntimeError, ValueError) as e:
        raise MtrainError(f"{path}: incomplete checkpoint ({type(e).__name__}: {e})") from None


def describe(path: Path | str, trust: bool = False) -> dict:
    """What a checkpoint holds, for `mtrain info`: settings, size, progress, vocabularies, scores."""
    path = Path(path)
    state = load(path, trust=trust, mmap=True)
    model, toks = model_and_tokenizers(state, path)
    train_state = state.get("train_state", {})
    return {
        "path": str(path), "format_version": state["version"], "file_mb": round(path.stat().st_size / 2 ** 20, 2),
        "step": state.get("step"), "parameters": model.num_parameters(),
        "model": state["config"]["model"],
        "vocabulary": {"joint": toks.joint, "source_size": toks.src.vocab_size, "target_size": toks.tgt.vocab_size},
        "valid_bleu": state.get("valid_bleu", train_state.get("best_bleu")),
        "chosen": state.get("chosen"), "averaged_from": state.get("averaged_from"),
        "data_position": state.get("data"), "resumable": "optimizer" in state,
        "tags": config_from_dict(state["config"], f"{path} config", training=False).data.tags,
        "init_from": state.get("init_from"),
        "config": state["config"],
    }


def describe_text(d: dict) -> str:
    """`mtrain info`'s lines for what `describe` found."""
    m, vocab = d["model"], d["vocabulary"]
    return "\n".join([
        f"checkpoint:   {d['path']} ({d['file_mb']} MB, format version {d['format_version']}"
        + (", resumable" if d["resumable"] else ", weights only") + ")",
        f"model:        {m['encoder_layers']}+{m['decoder_layers']} layers, d_model {m['d_model']}, "
        f"{m['heads']} heads, FFN {m['ffn_dim']}, {'pre' if m['pre_norm'] else 'post'}-norm, dropout {m['dropout']}",
        f"parameters:   {d['parameters']:,}",
        f"step:         {d['step']}",
        "vocabulary:   " + (f"joint, {vocab['source_size']} pieces" if vocab["joint"] else
                             f"source {vocab['source_size']}, target {vocab['target_size']} pieces"),
        "valid BLEU:   " + (f"{d['valid_bleu']:.2f}" if d["valid_bleu"] is not None else "-")
        + (f" ({d['chosen']})" if d["chosen"] else ""),
        f"averaged:     {', '.join(d['averaged_from']) if d['averaged_from'] else 'no'}",
        f"tags:         {', '.join(d['tags']) if d['tags'] else 'none'}",
    ] + ([f"initialised:  from {d['init_from']}"] if d["init_from"] else []))
