"""`mtrain export --format hf`: a Hugging Face Transformers model directory that
`AutoModelForSeq2SeqLM.from_pretrained` and `AutoTokenizer.from_pretrained` load without custom code.

mtrain's two layouts map onto existing classes that compute the same functions, weight for weight:

- pre-norm (the default): Pegasus, pre-norm with a final LayerNorm after each stack, sinusoidal
  positions counted from 0, embeddings scaled by sqrt(d_model), one embedding table shared by the
  encoder, the decoder and the output layer;
- post-norm (`model.pre_norm: false`): Marian, post-norm without final LayerNorms, the same
  positions and scaling, and either one shared table or separate source and target tables (its
  `share_encoder_decoder_embeddings`), so separate vocabularies map too.

Self-attention's fused `qkv` is split into q, k and v; cross-attention's `kv` into k and v. Both
classes build their own sinusoid table, whose frequencies differ from mtrain's (10000^(-i/half) against
mtrain's, fairseq's, 10000^(-i/(half-1))): mtrain's table is written into the weights file, and
from_pretrained keeps it. (Transformers' own `save_pretrained` of a Marian model leaves the table
out, and a reload then builds Transformers' own: re-export from mtrain rather than re-save.) What no
class computes (a pre-norm model with separate embedding tables: Pegasus has one) is refused in
one line, and nothing is written.

The tokenizer is a fast tokenizer (tokenizer.json) built from the SentencePiece model by
Transformers' own converter, with a post-processor that ends each source in EOS as mtrain does; its
ids are mtrain's, tags included. A separate target vocabulary gets its own tokenizer in `target/`.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from mtrain.errors import MtrainError
from mtrain.files import check_folder, check_parent, first_names
from mtrain.model import Transformer, sinusoids
from mtrain.tokenizer import Tokenizer, Tokenizers

# What export_hf writes: only a folder holding nothing else is replaced.
HF_FILES = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json", "README.md", "target", "chat_template.jinja"}


def require_transformers():
    try:
        import safetensors.torch  # noqa: F401
        import transformers
    except ImportError:
        raise MtrainError('export --format hf needs Transformers: pip install -e ".[hf]" (or pip install transformers)') \
            from None
    return transformers


def exportable(model: Transformer) -> str:
    """The Transformers class that computes `model`, or one line saying why none does."""
    c = model.cfg
    if c.pre_norm and not c.share_embeddings:
        raise MtrainError("a pre-norm model with separate embedding tables has no exact Transformers class "
                          "(Pegasus, which computes the pre-norm layout, shares one table); CTranslate2 export takes it")
    return "pegasus" if c.pre_norm else "marian"


def hf_config(model: Transformer, toks: Tokenizers, kind: str):
    """The PegasusConfig or MarianConfig of `model`: shapes, special ids, no dropout change."""
    transformers = require_transformers()
    c = model.cfg
    common = dict(vocab_size=toks.src.vocab_size, d_model=c.d_model, encoder_layers=c.encoder_layers,
                  decoder_layers=c.decoder_layers, encoder_attention_heads=c.heads, decoder_attention_heads=c.heads,
                  encoder_ffn_dim=c.ffn_dim, decoder_ffn_dim=c.ffn_dim, activation_function=c.activation,
                  max_position_embeddings=c.max_positions, scale_embedding=True, dropout=c.dropout,
                  attention_dropout=c.attention_dropout, activation_dropout=c.activation_dropout,
                  pad_token_id=toks.tgt.pad, bos_token_id=toks.tgt.bos, eos_token_id=toks.tgt.eos,
                  decoder_start_token_id=toks.tgt.bos, forced_eos_token_id=None, tie_word_embeddings=c.share_embeddings)
    if kind == "pegasus":
        return transformers.PegasusConfig(**common)
    return transformers.MarianConfig(**common, decoder_vocab_size=toks.tgt.vocab_size,
                                     share_encoder_decoder_embeddings=c.share_embeddings)


def hf_weights(model: Transformer, kind: str) -> dict[str, torch.Tensor]:
    """mtrain's parameters under the Transformers names (fp32, each tensor its own copy)."""
    out: dict[str, torch.Tensor] = {}

    def put(name: str, tensor: torch.Tensor) -> None:
        out[name] = tensor.detach().float().cpu().clone().contiguous()

    def linear(name: str, weight: torch.Tensor, bias: torch.Tensor) -> None:
        put(f"{name}.weight", weight)
        put(f"{name}.bias", bias)

    def norm(name: str, layer_norm: torch.nn.LayerNorm) -> None:
        linear(name, layer_norm.weight, layer_norm.bias)

    def attention(name: str, attn) -> None:
        if attn.cross:
            linear(f"{name}.q_proj", attn.q.weight, attn.q.bias)
            parts = zip("kv", attn.kv.weight.chunk(2), attn.kv.bias.chunk(2))
        else:
            parts = zip("qkv", attn.qkv.weight.chunk(3), attn.qkv.bias.chunk(3))
        for letter, weight, bias in parts:
            linear(f"{name}.{letter}_proj", weight, bias)
        linear(f"{name}.out_proj", attn.out.weight, attn.out.bias)

    c = model.cfg
    positions = sinusoids(c.max_positions, c.d_model)
    if c.share_embeddings:
        put("model.shared.weight", model.tgt_embed.weight)
    put("model.encoder.embed_tokens.weight", model.src_embed.weight)
    put("model.decoder.embed_tokens.weight", model.tgt_embed.weight)
    put("lm_head.weight", model.output.weight)
    out["final_logits_bias"] = torch.zeros(1, model.output.out_features)
    for side in ("encoder", "decoder"):
        put(f"model.{side}.embed_positions.weight", positions)
    for i, layer in enumerate(model.encoder):
        name = f"model.encoder.layers.{i}"
        attention(f"{name}.self_attn", layer.attn)
        norm(f"{name}.self_attn_layer_norm", layer.sub_attn.norm)
        linear(f"{name}.fc1", layer.ffn.up.weight, layer.ffn.up.bias)
        linear(f"{name}.fc2", layer.ffn.down.weight, layer.ffn.down.bias)
        norm(f"{name}.final_layer_norm", layer.sub_ffn.norm)
    for i, layer in enumerate(model.decoder):
        name = f"model.decoder.layers.{i}"
        attention(f"{name}.self_attn", layer.self_attn)
        norm(f"{name}.self_attn_layer_norm", layer.sub_self.norm)
        attention(f"{name}.encoder_attn", layer.cross_attn)
        norm(f"{name}.encoder_attn_layer_norm", layer.sub_cross.norm)
        linear(f"{name}.fc1", layer.ffn.up.weight, layer.ffn.up.bias)
        linear(f"{name}.fc2", layer.ffn.down.weight, layer.ffn.down.bias)
        norm(f"{name}.final_layer_norm", layer.sub_ffn.norm)
    if kind == "pegasus":
        norm("model.encoder.layer_norm", model.encoder_norm)
        norm("model.decoder.layer_norm", model.decoder_norm)
    return out


def fast_tokenizer(tok: Tokenizer, add_eos: bool, tags: list[str] = ()):
    """A Transformers fast tokenizer that encodes as `tok` does (Transformers' SentencePiece converter,
    in its `legacy` mode, which follows SentencePiece's whitespace handling exactly), with mtrain's
    special tokens, and EOS after each text when `add_eos` (the source side). `tags` are matched
    before the rest of the text is encoded: "<2de> A man." gives the tag's id, then the ids of "A man.",
    as `mtrain translate --tag '<2de>'` feeds the encoder."""
    transformers = require_transformers()
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import AddedToken, processors
    from transformers.convert_slow_tokenizer import SpmConverter

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(tok.proto)
    sp = tok.sp
    if proto.trainer_spec.model_type == 2:  # BPE: a piece -> id mapping, merges from the scores
        vocab = {sp.id_to_piece(i): i for i in range(tok.vocab_size)}
    else:  # unigram: (piece, score) in id order
        vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(tok.vocab_size)]
    backend = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab, legacy=True)
    if backend is None:
        raise MtrainError(f"tokenizer: SentencePiece model type {proto.trainer_spec.model_type} has no "
                          f"Transformers converter")
    eos = sp.id_to_piece(tok.eos)
    if add_eos:
        backend.post_processor = processors.TemplateProcessing(single=f"$A {eos}", pair=f"$A $B {eos}",
                                                               special_tokens=[(eos, tok.eos)])
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=sp.id_to_piece(tok.bos), eos_token=eos, unk_token=sp.id_to_piece(tok.unk),
        pad_token=sp.id_to_piece(tok.pad), model_max_length=None)
    if tags:
        fast.add_tokens([AddedToken(tag, normalized=False, special=False) for tag in tags])
        if [fast.convert_tokens_to_ids(tag) for tag in tags] != [sp.piece_to_id(tag) for tag in tags]:
            raise MtrainError(f"tokenizer: the tags {', '.join(tags)} did not keep their ids")
    return fast


def generation_settings(cfg, toks: Tokenizers) -> dict:
    """generate()'s settings for mtrain's `decode` section, where Transformers can say the same; see
    the model card for what differs."""
    d = cfg.decode
    settings = dict(decoder_start_token_id=toks.tgt.bos, bos_token_id=toks.tgt.bos, eos_token_id=toks.tgt.eos,
                    pad_token_id=toks.tgt.pad, num_beams=d.beam, max_length=cfg.model.max_positions,
                    # mtrain never emits padding or BOS, nor <unk> unless decode.allow_unk
                    suppress_tokens=[toks.tgt.pad, toks.tgt.bos] + ([] if d.allow_unk else [toks.tgt.unk]))
    if d.min_len > 1:
        settings["min_new_tokens"] = d.min_len
    if d.no_repeat_ngram:
        settings["no_repeat_ngram_size"] = d.no_repeat_ngram
    # Transformers divides a finished hypothesis's score by length^length_penalty: mtrain's lenpen_type
    # plain. GNMT's ((5 + length) / 6)^alpha has no equivalent; generate() then divides by the length.
    settings["length_penalty"] = d.lenpen if d.lenpen_type == "plain" else 1.0
    return settings


def model_card(cfg, state: dict, kind: str, toks: Tokenizers, settings: dict) -> str:
    """README.md: what the model is, what it was trained on, how to use it, what differs from mtrain."""
    from mtrain import __version__
    data = cfg.data
    langs = [lang for lang in (data.src_lang, *data.tgt_lang.split("+")) if lang]
    corpora = "\n".join(f"- {source.describe()}" + (f" (tag `{source.tag}`)" if source.tag else "")
                        for source in data.train)
    bleu = state.get("valid_bleu", (state.get("train_state") or {}).get("best_bleu"))
    separate = toks.src.identity != toks.tgt.identity
    front = ["---", "library_name: transformers", "pipeline_tag: translation", "tags:", "- translation", "- mtrain"]
    if langs:
        front += ["language:"] + [f"- {lang}" for lang in dict.fromkeys(langs)]
    front.append("---")
    lenpen = (f"`length_penalty` {cfg.decode.lenpen} (mtrain's `lenpen_type: plain`, the same length^α)"
              if cfg.decode.lenpen_type == "plain" else
              f"`length_penalty` 1.0: mtrain's GNMT penalty (α {cfg.decode.lenpen}) has no equivalent in "
              "`generate`, so beam search may pick other hypotheses than `mtrain translate`")
    target = ('\ntarget = AutoTokenizer.from_pretrained("DIR", subfolder="target")  # separate target vocabulary'
              if separate else "")
    decoder = "target" if separate else "tokenizer"
    return "\n".join(front) + f"""

# A translation model trained with mtrain

A Transformer encoder-decoder trained with mtrain {__version__} (a command-line trainer) and exported
as Transformers' `{"PegasusForConditionalGeneration" if kind == "pegasus" else "MarianMTModel"}`,
which computes the same function ({"pre-norm" if kind == "pegasus" else "post-norm"} layers,
{cfg.model.encoder_layers}+{cfg.model.decoder_layers} layers, d_model {cfg.model.d_model},
{cfg.model.heads} heads, FFN {cfg.model.ffn_dim}, {cfg.model.activation}).

- Trained on:
{corpora}
- Validation set: {data.valid.describe() if not data.valid.empty else "none"}; validation BLEU
  {f"{bleu:.2f}" if isinstance(bleu, (int, float)) else "not recorded"} (sacreBLEU), after {state.get("step", "?")} updates.
- Vocabulary: {"one joint" if not separate else "separate source and target"} SentencePiece
  model{"s" if separate else ""}, {toks.src.vocab_size} pieces{"" if not separate else f" / {toks.tgt.vocab_size}"}.

## Use

```python
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained("DIR"){target}
model = AutoModelForSeq2SeqLM.from_pretrained("DIR")
batch = tokenizer(["A man is riding a bike."], return_tensors="pt", padding=True)
out = model.generate(**batch)
print({decoder}.batch_decode(out, skip_special_tokens=True))
```

`generation_config.json` holds mtrain's decoding settings: beam {settings["num_beams"]}, {lenpen}.
`mtrain translate` also bounds each output at {cfg.decode.max_len_a} × the source length + {cfg.decode.max_len_b}
pieces; `generate` at {settings["max_length"]} positions. mtrain leaves characters the tokenizer does not know out of the
source; this tokenizer gives `<unk>` for them (mtrain's `--keep-unknown`): drop id {toks.src.unk}
from `input_ids` to translate as mtrain does by default.
"""


def check_hf_dir(out_dir: Path) -> None:
    check_folder(out_dir, "Transformers model")
    others = sorted(p.name for p in out_dir.iterdir() if p.name not in HF_FILES) if out_dir.is_dir() else []
    if others:
        raise MtrainError(f"-o {out_dir}: holds files export did not write ({first_names(others)}); give a new or "
                          f"an earlier export's folder")


def export_hf(checkpoint: Path, out_dir: Path, trust: bool = False) -> str:
    """Write a Transformers model directory; returns a summary line. Everything is checked and built
    before the folder is touched, then written beside it and renamed into place."""
    from mtrain import checkpoint as ckpt

    transformers = require_transformers()
    from safetensors.torch import save_file
    check_parent(out_dir, "export", folder=True)
    check_hf_dir(out_dir)
    model, toks, cfg = ckpt.load_for_inference([checkpoint], trust)
    state = ckpt.load(checkpoint, trust=trust, mmap=True)
    kind = exportable(model)
    config = hf_config(model, toks, kind)
    weights = hf_weights(model.float(), kind)
    settings = generation_settings(cfg, toks)
    tokenizers = [("", fast_tokenizer(toks.src, add_eos=True, tags=cfg.data.tags))]
    if toks.src.identity != toks.tgt.identity:
        tokenizers.append(("target", fast_tokenizer(toks.tgt, add_eos=False)))
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        config.save_pretrained(tmp)
        transformers.GenerationConfig(**settings).save_pretrained(tmp)
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        for sub, tokenizer in tokenizers:
            tokenizer.save_pretrained(tmp / sub)
        (tmp / "README.md").write_text(model_card(cfg, state, kind, toks, settings), encoding="utf-8")
        shutil.rmtree(out_dir, ignore_errors=True)
        tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    name = "PegasusForConditionalGeneration" if kind == "pegasus" else "MarianMTModel"
    return f"wrote {out_dir} (Transformers {name}, {model.num_parameters():,} parameters)"
