"""What the model looked at: cross-attention of a chosen translation, word alignments, heatmaps.

The weights come from one exact teacher-forced pass over the chosen output (not from the beam's
running state): forward hooks on each decoder layer's cross-attention recompute
softmax(q k^T / sqrt(d)) from the very inputs that layer received.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

import torch

from mtrain.data import pad_batch
from mtrain.errors import MtrainError
from mtrain.model import Transformer


@torch.no_grad()
def cross_attention(model: Transformer, src_ids: Sequence[Sequence[int]], out_ids: Sequence[Sequence[int]],
                    bos: int, eos: int, pad: int) -> torch.Tensor:
    """(B, layers, heads, T, S) cross-attention weights, fp32, for source ids (EOS is added) and chosen
    outputs (without BOS/EOS): row t is the step that predicted output token t (the last row, EOS).
    Padded source columns get exactly 0; rows past a sentence's end are 0 as well."""
    src = torch.from_numpy(pad_batch(src_ids, pad, suffix=eos))
    tgt_in = torch.from_numpy(pad_batch(out_ids, pad, prefix=bos))
    device = next(model.parameters()).device
    src, tgt_in = src.to(device), tgt_in.to(device)
    src_pad = src == pad
    captured: list[torch.Tensor] = []

    def hook(module, args, kwargs, output):
        q = module.split(module.q(args[0])).float()
        k, _ = module.project_kv(kwargs["memory"])
        scores = (q @ k.float().transpose(-1, -2)) * module.head_dim ** -0.5
        captured.append(scores.masked_fill(~kwargs["mask"], float("-inf")).softmax(-1))

    handles = [layer.cross_attn.register_forward_hook(hook, with_kwargs=True) for layer in model.decoder]
    was_training = model.training
    model.eval()
    try:
        model.decode_hidden(tgt_in, model.encode(src, src_pad), src_pad)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    weights = torch.stack(captured, dim=1)  # (B, layers, heads, T, S)
    rows = torch.tensor([len(o) + 1 for o in out_ids], device=device)
    real_row = torch.arange(weights.shape[3], device=device)[None, :] < rows[:, None]  # (B, T)
    return (weights * real_row[:, None, None, :, None]).cpu()


def alignment_layer(layers: int) -> int:
    """The penultimate decoder layer: its averaged heads align best (Garg et al. 2019)."""
    return max(0, layers - 2)


def align(weights: torch.Tensor, src_pieces: Sequence[str] | None = None, out_pieces: Sequence[str] | None = None,
          words: bool = False, src_positions: Sequence[int] | None = None) -> str:
    """Pharaoh `i-j` pairs (source-target, 0-based) for one sentence from its (layers, heads, T, S)
    weights: each target piece links to the source piece it attends to most (EOS on either side
    excluded), in the penultimate layer averaged over heads. With `words`, pieces are grouped into
    words (a SentencePiece piece starting with '▁' begins one) and pairs deduplicated; otherwise
    `src_positions` renumbers the source pieces (translate left <unk> pieces out of the model's input,
    and its user counts them, as SentencePiece encodes the line)."""
    layer = weights[alignment_layer(weights.shape[0])].mean(0)  # (T, S)
    T, S = layer.shape[0] - 1, layer.shape[1] - 1  # drop the EOS row and column
    if T <= 0 or S <= 0:
        return ""
    best = layer[:T, :S].argmax(-1).tolist()
    pairs = [(i, j) for j, i in enumerate(best)]
    if words:
        src_word, out_word = word_index(src_pieces or []), word_index(out_pieces or [])
        pairs = sorted({(src_word[i], out_word[j]) for i, j in pairs}, key=lambda p: (p[1], p[0]))
    elif src_positions is not None:
        pairs = [(src_positions[i], j) for i, j in pairs]
    return " ".join(f"{i}-{j}" for i, j in pairs)


def word_index(pieces: Sequence[str]) -> list[int]:
    """The word each SentencePiece piece belongs to."""
    out, word = [], -1
    for n, piece in enumerate(pieces):
        if piece.startswith("\u2581") or n == 0:
            word += 1
        out.append(word)
    return out


def require_matplotlib():
    try:
        import matplotlib
    except ImportError:
        raise MtrainError("plots need matplotlib: pip install -e \".[plot]\" (or pip install matplotlib)") from None
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt
    return plt


def heatmap(weights: torch.Tensor, src_pieces: Sequence[str], out_pieces: Sequence[str], path: Path,
            title: str = "") -> None:
    """One PNG: a panel per decoder layer (heads averaged), then each head of the last layer."""
    plt = require_matplotlib()
    layers, heads = weights.shape[:2]
    cols = [f"{s}" for s in src_pieces] + ["</s>"]
    rows = [f"{s}" for s in out_pieces] + ["</s>"]
    panels = [(f"layer {n + 1} (heads averaged)", weights[n].mean(0)) for n in range(layers)]
    panels += [(f"layer {layers}, head {h + 1}", weights[-1, h]) for h in range(heads)]
    ncols = min(4, len(panels))
    nrows = (len(panels) + ncols - 1) // ncols
    width, height = 0.2 * len(cols) + 1.2, 0.2 * len(rows) + 1.2
    fig, axes = plt.subplots(nrows, ncols, figsize=(ncols * width, nrows * height), squeeze=False)
    for ax, (name, w) in zip(axes.flat, panels):
        ax.imshow(w[:len(rows), :len(cols)].numpy(), cmap="Greys", vmin=0.0, vmax=1.0, aspect="auto")
        ax.set_title(name, fontsize=8)
        ax.set_xticks(range(len(cols)), cols, rotation=90, fontsize=7)
        ax.set_yticks(range(len(rows)), rows, fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def line_attention(model: Transformer, toks, src_ids: Sequence[Sequence[int]], out_ids: Sequence[Sequence[int]],
                   tag: int | None = None, batch: int = 32) -> Iterator[tuple[torch.Tensor, list[str], list[str]]]:
    """For each line in order: its (layers, heads, T + 1, S + 1) cross-attention weights (EOS row and
    column included), the source pieces the model read (`tag`, the piece translate put before each
    line, first) and the output pieces."""
    limit = model.cfg.max_positions - 1
    first = [] if tag is None else [tag]
    model_ids = [([*first, *s])[:limit - 1] for s in src_ids]  # what decoding saw: tagged, truncated
    for start in range(0, len(model_ids), batch):
        chunk = range(start, min(start + batch, len(model_ids)))
        weights = cross_attention(model, [model_ids[i] for i in chunk], [out_ids[i] for i in chunk],
                                  toks.tgt.bos, toks.tgt.eos, toks.tgt.pad)
        for b, i in enumerate(chunk):
            yield (weights[b, :, :, :len(out_ids[i]) + 1, :len(model_ids[i]) + 1],
                   [toks.src.sp.id_to_piece(x) for x in model_ids[i]],
                   [toks.tgt.sp.id_to_piece(x) for x in out_ids[i]])


def annotate(model: Transformer, toks, src_ids: Sequence[Sequence[int]], out_ids: Sequence[Sequence[int]],
             line_numbers: Sequence[int], alignment: str | None, attention_dir: Path | None,
             attention_limit: int, batch: int = 32,
             src_positions: Sequence[Sequence[int] | None] | None = None, tag: int | None = None) -> list[str]:
    """Alignments (`alignment` = "pieces" or "words", else "") for each translated line, and heatmaps
    `attention_dir/line<N>.png` for lines N <= attention_limit (1-based input line numbers).
    `src_positions`: for each line, where its source pieces stood before translate left some out.
    `tag`: the piece translate put before each line; the heatmaps show it, the alignments (which
    number the line's own pieces) leave it out."""
    first = 0 if tag is None else 1
    out = []
    for i, (w, shown, out_pieces) in enumerate(line_attention(model, toks, src_ids, out_ids, tag, batch)):
        out.append(align(w[..., first:], shown[first:], out_pieces, words=alignment == "words",
                         src_positions=src_positions[i] if src_positions else None) if alignment else "")
        if attention_dir is not None and line_numbers[i] <= attention_limit:
            heatmap(w, shown, out_pieces, attention_dir / f"line{line_numbers[i]}.png",
                    title=f"line {line_numbers[i]}: cross-attention")
    return out
