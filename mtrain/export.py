"""`mtrain export --ctranslate2`: a CTranslate2 model built through CTranslate2's own specification
API (`ctranslate2.specs.TransformerSpec`), vocabularies and SentencePiece models included.

The layout maps one to one: the fused `qkv` of self-attention is the spec's first linear, the
cross-attention's `q` and fused `kv` its first two, then the output projection; mtrain's [sin | cos]
position table is given explicitly; sources end in EOS (`add_source_eos`); the tied output layer is
the projection with a zero bias.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch

from mtrain.config import DecodeConfig
from mtrain.errors import MtrainError
from mtrain.files import check_folder, check_parent, first_names
from mtrain.model import sinusoids


def require_ctranslate2():
    try:
        import ctranslate2
    except ImportError:
        raise MtrainError('export needs CTranslate2: pip install -e ".[ctranslate2]" (or pip install ctranslate2)') \
            from None
    return ctranslate2


def _array(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().cpu().numpy().copy()


def _linear(spec, layer: torch.nn.Linear) -> None:
    spec.weight = _array(layer.weight)
    spec.bias = _array(layer.bias) if layer.bias is not None else np.zeros(layer.weight.shape[0], np.float32)


def _norm(spec, norm: torch.nn.LayerNorm) -> None:
    spec.gamma, spec.beta = _array(norm.weight), _array(norm.bias)


def _ffn(spec, ffn, sub) -> None:
    _norm(spec.layer_norm, sub.norm)
    _linear(spec.linear_0, ffn.up)
    _linear(spec.linear_1, ffn.down)


# CTranslate2's translate_batch defaults: inputs cut at 1,024 tokens, at most 256 decoded.
CT2_DEFAULT_LIMITS = 1024 + 256


def _embeddings(spec, table: torch.nn.Embedding, max_positions: int) -> None:
    embeddings = spec.embeddings[0] if isinstance(spec.embeddings, list) else spec.embeddings  # encoder: a list
    embeddings.weight = _array(table.weight)
    # mtrain cuts sources and outputs to model.max_positions (ctranslate2_options passes those limits);
    # a caller who does not reaches positions beyond them, where CTranslate2 fails the whole batch. The
    # sinusoids go on past max_positions, so the table is written long enough for CTranslate2's defaults.
    spec.position_encodings.encodings = _array(sinusoids(max(max_positions, CT2_DEFAULT_LIMITS), table.weight.shape[1]))
    spec.scale_embeddings = True  # embeddings * sqrt(d_model), as mtrain (the paper's §3.4)


def build_spec(model, toks):
    """The model as a `ctranslate2.specs.TransformerSpec`, weights and vocabularies set."""
    require_ctranslate2()
    from ctranslate2.specs import common_spec, transformer_spec

    c = model.cfg
    activation = common_spec.Activation.RELU if c.activation == "relu" else common_spec.Activation.GELU
    spec = transformer_spec.TransformerSpec.from_config((c.encoder_layers, c.decoder_layers), c.heads,
                                                        pre_norm=c.pre_norm, activation=activation)
    enc, dec = spec.encoder, spec.decoder
    _embeddings(enc, model.src_embed, c.max_positions)
    for layer_spec, layer in zip(enc.layer, model.encoder):
        _linear(layer_spec.self_attention.linear[0], layer.attn.qkv)
        _linear(layer_spec.self_attention.linear[1], layer.attn.out)
        _norm(layer_spec.self_attention.layer_norm, layer.sub_attn.norm)
        _ffn(layer_spec.ffn, layer.ffn, layer.sub_ffn)
    _embeddings(dec, model.tgt_embed, c.max_positions)
    for layer_spec, layer in zip(dec.layer, model.decoder):
        _linear(layer_spec.self_attention.linear[0], layer.self_attn.qkv)
        _linear(layer_spec.self_attention.linear[1], layer.self_attn.out)
        _norm(layer_spec.self_attention.layer_norm, layer.sub_self.norm)
        _linear(layer_spec.attention.linear[0], layer.cross_attn.q)
        _linear(layer_spec.attention.linear[1], layer.cross_attn.kv)
        _linear(layer_spec.attention.linear[2], layer.cross_attn.out)
        _norm(layer_spec.attention.layer_norm, layer.sub_cross.norm)
        _ffn(layer_spec.ffn, layer.ffn, layer.sub_ffn)
    if c.pre_norm:
        _norm(enc.layer_norm, model.encoder_norm)
        _norm(dec.layer_norm, model.decoder_norm)
    _linear(dec.projection, model.output)
    spec.register_source_vocabulary([toks.src.sp.id_to_piece(i) for i in range(toks.src.vocab_size)])
    spec.register_target_vocabulary([toks.tgt.sp.id_to_piece(i) for i in range(toks.tgt.vocab_size)])
    spec.config.add_source_eos = True  # mtrain's sources end in EOS
    spec.config.decoder_start_token = toks.tgt.sp.id_to_piece(toks.tgt.bos)
    spec.config.bos_token = toks.tgt.sp.id_to_piece(toks.tgt.bos)
    spec.config.eos_token = toks.tgt.sp.id_to_piece(toks.tgt.eos)
    spec.config.unk_token = toks.tgt.sp.id_to_piece(toks.tgt.unk)
    return spec


# What spec.save and export_ctranslate2 write: only a folder holding nothing else is replaced.
EXPORT_FILES = {"model.bin", "config.json", "shared_vocabulary.json", "source_vocabulary.json",
                "target_vocabulary.json", "shared_vocabulary.txt", "source_vocabulary.txt",
                "target_vocabulary.txt", "source.spm", "target.spm"}


def check_export_dir(out_dir: Path) -> None:
    """The output folder is replaced whole; refuse one that holds anything else (a run directory)."""
    out_dir = Path(out_dir)
    check_folder(out_dir, "CTranslate2 model")
    others = sorted(p.name for p in out_dir.iterdir() if p.name not in EXPORT_FILES) if out_dir.is_dir() else []
    if others:
        raise MtrainError(f"--ctranslate2 {out_dir}: holds files export did not write ({first_names(others)}); "
                          f"give a new or an earlier export's folder")


def export_ctranslate2(checkpoint: Path, out_dir: Path, quantization: str | None = None, trust: bool = False) -> str:
    """Write a CTranslate2 model directory (model.bin, vocabularies, config.json) plus the
    SentencePiece model(s) as source.spm / target.spm; returns a summary line."""
    from mtrain.checkpoint import load_for_inference

    require_ctranslate2()
    from ctranslate2.specs.model_spec import ACCEPTED_MODEL_TYPES
    if quantization is not None and quantization not in ACCEPTED_MODEL_TYPES:  # before loading anything
        raise MtrainError(f"--quantization: unknown weight type {quantization!r} (CTranslate2 takes "
                          f"{', '.join(ACCEPTED_MODEL_TYPES)})")
    check_parent(out_dir, "export", folder=True)
    check_export_dir(out_dir)
    model, toks, cfg = load_for_inference([checkpoint], trust)
    with torch.no_grad():
        spec = build_spec(model.float(), toks)
    spec.validate()
    spec.optimize(quantization=quantization)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        spec.save(str(tmp))
        (tmp / "source.spm").write_bytes(toks.src.proto)
        (tmp / "target.spm").write_bytes(toks.tgt.proto)
        shutil.rmtree(out_dir, ignore_errors=True)
        tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    note = ("" if cfg.decode.lenpen_type == "plain" else
            "; note: CTranslate2's length penalty is len^alpha (mtrain's lenpen_type plain), not GNMT's")
    limits = (f"; mtrain's length limits: translate_batch(max_input_length={cfg.model.max_positions - 1}, "
              f"max_decoding_length <= {cfg.model.max_positions - 2})")
    return (f"wrote {out_dir} (CTranslate2 {quantization or 'float32'} model, {model.num_parameters():,} "
            f"parameters){limits}{note}")


def ctranslate2_options(decode: DecodeConfig, src_len: int, max_positions: int) -> dict:
    """translate_batch keyword arguments equivalent to mtrain's decode settings for a source of
    `src_len` pieces (EOS not counted) and a model of `max_positions`. CTranslate2 normalises scores by
    length^alpha, as mtrain's lenpen_type plain; its decoding lengths count pieces without the EOS, and
    at the maximum it stops without one where mtrain scores a forced EOS (the two agree unless the
    limit is reached). mtrain cuts a source to max_positions - 2 pieces and its EOS, and an output to
    max_positions - 1 positions with the EOS; it never emits BOS or padding, nor <unk> unless
    allow_unk. CTranslate2 is told the same."""
    src_len = min(src_len, max_positions - 2)
    return dict(beam_size=decode.beam, num_hypotheses=decode.nbest, length_penalty=decode.lenpen,
                suppress_sequences=[["<s>"], ["<pad>"]], max_input_length=max_positions - 1,
                max_decoding_length=min(int(decode.max_len_a * src_len + decode.max_len_b), max_positions - 2),
                min_decoding_length=decode.min_len, no_repeat_ngram_size=decode.no_repeat_ngram,
                disable_unk=not decode.allow_unk, return_scores=True)
