"""Checkpoints: atomic save, checked load, averaging, and loading a model for translation."""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Sequence

import torch

from mtrain.config import config_from_dict
from mtrain.errors import MtrainError
from mtrain.model import Transformer
from mtrain.tokenizer import Tokenizer, Tokenizers

FORMAT, VERSION = "mtrain", 1


def save(path: Path, state: dict) -> None:
    """Write to a temporary file, fsync, then rename: a crash leaves the old file or the new one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save({"format": FORMAT, "version": VERSION, **state}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load(path: Path | str, map_location="cpu") -> dict:
    """Load a checkpoint written by `save`; anything else is refused with one clear line."""
    path = Path(path)
    if not path.is_file():
        raise MtrainError(f"{path}: checkpoint not found")
    try:
        # weights_only=False: the checkpoint holds RNG states and numpy objects; load only your own files.
        state = torch.load(path, map_location=map_location, weights_only=False)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, OSError) as e:
        raise MtrainError(f"{path}: not a readable checkpoint (truncated or corrupt: {str(e).splitlines()[0]})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise MtrainError(f"{path}: not an mtrain checkpoint")
    if state.get("version") != VERSION:
        raise MtrainError(f"{path}: checkpoint version {state.get('version')} is not supported (expected {VERSION})")
    return state


def average(paths: Sequence[Path | str]) -> dict:
    """Mean of the model weights of several checkpoints of one run (Vaswani et al. 2017 §6.1)."""
    states = [load(p) for p in paths]
    first = states[0]
    for p, s in zip(paths[1:], states[1:]):
        if s["model"].keys() != first["model"].keys() or any(
                s["model"][k].shape != v.shape for k, v in first["model"].items()):
            raise MtrainError(f"{p}: its model does not match {paths[0]}; only checkpoints of one model can be averaged")
    averaged = {}
    for key, value in first["model"].items():
        if value.is_floating_point():
            averaged[key] = sum(s["model"][key].double() for s in states).div(len(states)).to(value.dtype)
        else:
            averaged[key] = value
    keep = ("config", "tokenizer_src", "tokenizer_tgt", "step")
    return {**{k: first[k] for k in keep if k in first}, "model": averaged, "averaged_from": [str(p) for p in paths]}


def build_model(state: dict, toks: Tokenizers) -> Transformer:
    cfg = config_from_dict(state["config"], "checkpoint config")
    model = Transformer(cfg.model, toks.src.vocab_size, toks.tgt.vocab_size, toks.tgt.pad)
    model.load_state_dict(state["model"])
    return model


def load_for_inference(paths: Sequence[Path | str]):
    """(model in eval mode, tokenizers, config) from one checkpoint or the average of several."""
    state = load(paths[0]) if len(paths) == 1 else average(paths)
    try:
        toks = Tokenizers(Tokenizer(state["tokenizer_src"]), Tokenizer(state["tokenizer_tgt"]))
        cfg = config_from_dict(state["config"], f"{paths[0]} config")
        model = build_model(state, toks)
    except (KeyError, RuntimeError) as e:
        raise MtrainError(f"{paths[0]}: incomplete checkpoint ({type(e).__name__}: {e})") from None
    return model.eval(), toks, cfg
