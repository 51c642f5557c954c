"""The encoder-decoder Transformer of Vaswani et al. 2017, with an explicit KV cache for decoding."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mtrain.config import ModelConfig


def sinusoids(length: int, dim: int) -> torch.Tensor:
    """(length, dim) positions as [sin | cos] halves (the fairseq/Marian layout), §3.5."""
    half = dim // 2
    freq = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / max(half - 1, 1))
    angles = torch.arange(length, dtype=torch.float32)[:, None] * freq[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class Dropout(nn.Module):
    """Inverted dropout from random 16-bit integers, four from each 64-bit draw. On a CPU the random
    draw is most of dropout's cost (with nn.Dropout's bernoulli_, dropout took 16% of a training
    step): one int16 draw per value is cheaper than torch.rand's floats, and four to a draw is 2.2x
    faster again. A value is dropped when its draw (uniform on -32768..32767) is below
    -32768 + round(p * 65536): p to within 8e-6, and the scale is exactly 1 / P(keep), so the
    expectation is unchanged."""

    LEVELS = 65536

    def __init__(self, p: float):
        super().__init__()
        self.p = p
        dropped = min(round(p * self.LEVELS), self.LEVELS - 1)  # p < 1 (the config checks it)
        self.threshold = dropped - self.LEVELS // 2
        self.scale = self.LEVELS / (self.LEVELS - dropped)

    def forward(self, x):
        if not self.training or self.threshold == -self.LEVELS // 2:
            return x
        n = x.numel()
        # random_ from the int64 minimum with no upper bound draws all 64 bits uniformly
        bits = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_(-2 ** 63, None)
        keep = bits.view(torch.int16)[:n].view(x.shape) >= self.threshold
        return x * (keep.to(x.dtype) * self.scale)  # one pass over x forward, one backward


def explicit_attention(q, k, v, mask, causal: bool, dropout: float) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v written out. Used on CPUs where the flash kernel is slower for our
    short sequences: in bf16 (forward + backward, 200x4x22x64: 50 ms against 10 ms), and in decoding
    steps, whose queries are one position or a sentence's beams (a 4-layer d_model 128 model's
    whole step at 370 rows: 30.0 ms against 33.6 ms)."""
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5  # (B, heads, T, S)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    if causal:
        T, S = scores.shape[-2:]
        scores = scores.masked_fill(torch.ones(T, S, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    weights = F.dropout(scores.softmax(-1), dropout) if dropout else scores.softmax(-1)
    return weights @ v


def storage_size(have: int, need: int) -> int:
    """One dimension of a KV cache's storage (rows, or columns) that must hold `need`: what it has
    while that holds `need` and is at most twice it; else 1.25x `need`. Growing to 1.25x leaves room
    for the next sentences to join without new storage; shrinking once the live rows use less than
    half gives memory back on a server whose search never empties."""
    if need <= have <= 2 * need:
        return have
    return max(1, need + (need + 3) // 4)


@dataclass
class KVCache:
    """Per-layer key/value buffers for incremental decoding; passed in, never stored on modules.

    Each row holds its own number of target positions, left-aligned: rows that joined a running
    search (`keep` with `more`) are shorter than the others, attend to their own positions only and
    take their own position embeddings. While every row holds the same number (one batch decoded
    from its start), the cheaper path runs: one column written for all rows, no self-attention mask.

    Rows come in groups of `beams`, one group per sentence: the self-attention buffers have a row
    per hypothesis, the cross-attention ones a row per sentence, whose beams are its queries (all
    beams of a sentence read the same source).

    The buffers are views of the first rows (and source columns) of `store`, and are in the dtype
    the model computes in (bf16 under bf16 autocast). Sentences that leave free their rows and those
    that join take them, copied within the storage, and only the columns in use. Each dimension of
    the storage (rows, target columns, sentences, source columns) is sized by `storage_size`: new,
    zero-filled storage 1.25x what the live rows need when they need more than it has or less than
    half of it; otherwise the same storage. A running server has sentences leaving and joining at
    almost every step: its cache never holds more than twice what its live rows need, per dimension."""

    self_k: list[torch.Tensor]  # per decoder layer (N, heads, columns, head_dim)
    self_v: list[torch.Tensor]
    cross_k: list[torch.Tensor]  # per decoder layer (N / beams, heads, S, head_dim), computed once
    cross_v: list[torch.Tensor]
    src_mask: torch.Tensor  # (N / beams, 1, 1, S) True where the source is a real token
    lengths: torch.Tensor  # (N,) target positions written in each row
    limits: torch.Tensor  # (N,) positions each row may come to hold: the columns it needs
    beams: int = 1  # rows per sentence
    longest: int = 0  # the most positions a row holds: the columns attention reads
    ragged: bool = False  # rows hold different numbers of positions
    store: list[list[torch.Tensor]] | None = None  # self_k, self_v, cross_k, cross_v storage (default: themselves)

    def __post_init__(self):
        if self.store is None:
            self.store = [self.self_k, self.self_v, self.cross_k, self.cross_v]

    def reorder(self, rows: torch.Tensor) -> None:
        """Make row i hold what row rows[i] held (beam reordering within sentences, whose rows
        hold the same number of positions)."""
        for buf in self.self_k + self.self_v:
            _copy_rows(buf, buf, rows, self.longest)

    def keep(self, rows: torch.Tensor, more: "KVCache | None" = None) -> None:
        """Keep only `rows` (at least one), in that order (drop finished sentences, and reorder beams
        at the same time), then `more`'s rows after them (sentences joining a running search); each
        group of `beams` rows must come from one sentence. Source columns that only the sentences
        which left needed are dropped."""
        sentences = rows[::self.beams] // self.beams
        src_mask, lengths, limits = self.src_mask[sentences], self.lengths[rows], self.limits[rows]
        if more is not None:
            width = max(src_mask.shape[-1], more.src_mask.shape[-1])
            src_mask = torch.cat([F.pad(m, (0, width - m.shape[-1])) for m in (src_mask, more.src_mask)])
            lengths, limits = torch.cat([lengths, more.lengths]), torch.cat([limits, more.limits])
        # One transfer to the host: sources are padded after their tokens, so S counts real columns.
        S, columns, longest, shortest = torch.stack(
            [src_mask.sum(-1).max(), limits.max(), lengths.max(), lengths.min()]).tolist()
        old = self.store
        self._fit(len(lengths), columns, len(src_mask), S)
        self._move(old, rows, sentences, min(S, old[2][0].shape[2]))
        if more is not None:
            self._join(more, len(rows), len(sentences))
        self.self_k, self.self_v = ([buf[:len(lengths)] for buf in bufs] for bufs in self.store[:2])
        self.cross_k, self.cross_v = ([buf[:len(src_mask), :, :S] for buf in bufs] for bufs in self.store[2:])
        self.src_mask, self.lengths, self.limits = src_mask[..., :S], lengths, limits
        self.longest, self.ragged = longest, longest != shortest

    def _fit(self, rows: int, columns: int, sentences: int, src_columns: int) -> None:
        """Storage that holds this many rows of `columns` positions and sentences of `src_columns`
        source columns, sized by `storage_size`: the same where it already fits, else new."""
        for kinds, (n, width) in (((0, 1), (rows, columns)), ((2, 3), (sentences, src_columns))):
            buf = self.store[kinds[0]][0]
            shape = (storage_size(buf.shape[0], n), storage_size(buf.shape[2], width))
            if shape != (buf.shape[0], buf.shape[2]):
                # zeros: columns no row has written must hold finite values (masked, they weigh 0 exactly)
                self.store = [[b.new_zeros((shape[0], b.shape[1], shape[1], b.shape[3])) for b in bufs]
                              if kind in kinds else bufs for kind, bufs in enumerate(self.store)]

    def _move(self, old: list[list[torch.Tensor]], rows: torch.Tensor, sentences: torch.Tensor,
              src_columns: int) -> None:
        """The kept rows of `old` storage, first in the current one (which may be `old` itself)."""
        for kind, (was, now) in enumerate(zip(old, self.store)):
            index, columns = (rows, self.longest) if kind < 2 else (sentences, src_columns)
            for a, b in zip(was, now):
                _copy_rows(b, a, index, columns)

    def _join(self, more: "KVCache", at_row: int, at_sentence: int) -> None:
        """`more`'s rows after the first `at_row` rows (and its sentences after `at_sentence`)."""
        for kind, joining in enumerate([more.self_k, more.self_v, more.cross_k, more.cross_v]):
            at = at_row if kind < 2 else at_sentence
            columns = more.longest if kind < 2 else joining[0].shape[2]
            for b, j in zip(self.store[kind], joining):
                b[at:at + len(j), :, :columns] = j[:, :, :columns]

    def append(self, other: "KVCache") -> None:
        """Add `other`'s rows after these."""
        self.keep(torch.arange(len(self.lengths), device=self.lengths.device), other)

    def write(self, i: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store one new position's keys and values (N, heads, 1, head_dim) in layer i; the keys and
        values to attend to."""
        if self.ragged:  # index_put takes no other dtype than the buffer's
            rows = torch.arange(len(self.lengths), device=k.device)
            self.self_k[i][rows, :, self.lengths] = k[:, :, 0].to(self.self_k[i].dtype)
            self.self_v[i][rows, :, self.lengths] = v[:, :, 0].to(self.self_v[i].dtype)
        else:
            self.self_k[i][:, :, self.longest] = k[:, :, 0]
            self.self_v[i][:, :, self.longest] = v[:, :, 0]
        n = self.longest + 1
        return self.self_k[i][:, :, :n], self.self_v[i][:, :, :n]

    def self_mask(self) -> torch.Tensor | None:
        """(N, 1, 1, longest + 1) True where a row's own positions are, this step's included; None
        when every row may read every column."""
        if not self.ragged:
            return None
        columns = torch.arange(self.longest + 1, device=self.lengths.device)
        return (columns <= self.lengths[:, None])[:, None, None, :]

    def advance(self) -> None:
        self.lengths += 1
        self.longest += 1


def _copy_rows(dst: torch.Tensor, src: torch.Tensor, index: torch.Tensor, columns: int) -> None:
    """dst[i, :, :columns] = src[index[i], :, :columns], dst and src may be one tensor (the rows are
    read before any is written). index_select on the columns' view is 2-4x faster on a CPU than
    indexing src[index, :, :columns]."""
    dst[:len(index), :, :columns] = src[:, :, :columns].index_select(0, index)


class Attention(nn.Module):
    """Multi-head attention on F.scaled_dot_product_attention (fused/flash kernels where available).

    Self-attention has one fused `qkv` projection; cross-attention has `q` and a fused `kv` (the
    CTranslate2 layout, and one matmul fewer than three separate projections).
    """

    def __init__(self, d_model: int, heads: int, dropout: float, cross: bool):
        super().__init__()
        self.heads, self.head_dim, self.dropout, self.cross = heads, d_model // heads, dropout, cross
        if cross:
            self.q = nn.Linear(d_model, d_model)
            self.kv = nn.Linear(d_model, 2 * d_model)
        else:
            self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def split(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, d_model) -> (B, heads, T, head_dim)
        return x.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)

    def project_kv(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.kv(memory).chunk(2, dim=-1)
        return self.split(k), self.split(v)

    def attend(self, q, k, v, mask=None, causal=False, step=False) -> torch.Tensor:
        drop = self.dropout if self.training else 0.0
        if q.device.type == "cpu" and (q.dtype == torch.bfloat16 or step):
            y = explicit_attention(q, k, v, mask, causal, drop)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop, is_causal=causal)
        return self.out(y.transpose(1, 2).flatten(2))  # (B, T, d_model)

    def forward(self, x, mask=None, causal=False, memory=None):
        if self.cross:
            k, v = self.project_kv(memory)
            return self.attend(self.split(self.q(x)), k, v, mask)
        q, k, v = map(self.split, self.qkv(x).chunk(3, dim=-1))
        return self.attend(q, k, v, mask, causal)


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.up = nn.Linear(cfg.d_model, cfg.ffn_dim)
        self.down = nn.Linear(cfg.ffn_dim, cfg.d_model)
        self.act = nn.ReLU() if cfg.activation == "relu" else nn.GELU()
        self.drop = Dropout(cfg.activation_dropout)

    def forward(self, x):
        return self.down(self.drop(self.act(self.up(x))))


class Sublayer(nn.Module):
    """Residual + dropout + LayerNorm around one block, pre-norm or post-norm (the paper's §5.4)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = nn.LayerNorm(cfg.d_model)
        self.drop = Dropout(cfg.dropout)
        self.pre_norm = cfg.pre_norm

    def forward(self, x, fn):
        if self.pre_norm:
            return x + self.drop(fn(self.norm(x)))
        return self.norm(x + self.drop(fn(x)))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn = Attention(cfg.d_model, cfg.heads, cfg.attention_dropout, cross=False)
        self.ffn = FeedForward(cfg)
        self.sub_attn, self.sub_ffn = Sublayer(cfg), Sublayer(cfg)

    def forward(self, x, mask):
        x = self.sub_attn(x, lambda h: self.attn(h, mask=mask))
        return self.sub_ffn(x, self.ffn)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.self_attn = Attention(cfg.d_model, cfg.heads, cfg.attention_dropout, cross=False)
        self.cross_attn = Attention(cfg.d_model, cfg.heads, cfg.attention_dropout, cross=True)
        self.ffn = FeedForward(cfg)
        self.sub_self, self.sub_cross, self.sub_ffn = Sublayer(cfg), Sublayer(cfg), Sublayer(cfg)

    def forward(self, x, memory, src_mask):
        x = self.sub_self(x, lambda h: self.self_attn(h, causal=True))
        x = self.sub_cross(x, lambda h: self.cross_attn(h, mask=src_mask, memory=memory))
        return self.sub_ffn(x, self.ffn)

    def step(self, x, cache: KVCache, i: int, self_mask: torch.Tensor | None):
        """One new position (N, 1, d_model) against the cached keys/values of layer i."""
        def self_attn(h):
            a = self.self_attn
            q, k, v = map(a.split, a.qkv(h).chunk(3, dim=-1))
            return a.attend(q, *cache.write(i, k, v), self_mask, step=True)

        def cross_attn(h):  # a sentence's beams are the queries of one attention over its source
            a, n = self.cross_attn, cache.src_mask.shape[0]
            q = a.q(h).view(n, cache.beams, a.heads, a.head_dim).transpose(1, 2)  # (n, heads, beams, head_dim)
            return a.attend(q, cache.cross_k[i], cache.cross_v[i], cache.src_mask, step=True).reshape(h.shape)

        x = self.sub_self(x, self_attn)
        x = self.sub_cross(x, cross_attn)
        return self.sub_ffn(x, self.ffn)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, src_vocab: int, tgt_vocab: int, pad: int):
        super().__init__()
        self.cfg, self.pad = cfg, pad
        if cfg.share_embeddings and src_vocab != tgt_vocab:
            raise ValueError("share_embeddings needs one joint vocabulary")
        self.tgt_embed = nn.Embedding(tgt_vocab, cfg.d_model, padding_idx=pad)
        self.src_embed = self.tgt_embed if cfg.share_embeddings else nn.Embedding(src_vocab, cfg.d_model, padding_idx=pad)
        self.register_buffer("positions", sinusoids(cfg.max_positions, cfg.d_model), persistent=False)
        self.embed_drop = Dropout(cfg.dropout)
        self.encoder = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.encoder_layers))
        self.decoder = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.decoder_layers))
        # Pre-norm stacks need a last LayerNorm: nothing else normalises the final residual sum.
        self.encoder_norm = nn.LayerNorm(cfg.d_model) if cfg.pre_norm else nn.Identity()
        self.decoder_norm = nn.LayerNorm(cfg.d_model) if cfg.pre_norm else nn.Identity()
        self.output = nn.Linear(cfg.d_model, tgt_vocab, bias=False)
        self.reset_parameters()
        if cfg.share_embeddings:
            self.output.weight = self.tgt_embed.weight  # Press & Wolf 2017; the paper §3.4

    def reset_parameters(self):
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        # In a fixed order: a set's order follows the modules' addresses, and it gave one seed two
        # different models with separate vocabularies, run to run.
        for emb in dict.fromkeys([self.src_embed, self.tgt_embed]):
            # N(0, d^-1/2) so that embeddings scaled by sqrt(d) have unit variance (as fairseq)
            nn.init.normal_(emb.weight, mean=0.0, std=self.cfg.d_model ** -0.5)
            nn.init.zeros_(emb.weight[self.pad])
        if not self.cfg.share_embeddings:
            nn.init.normal_(self.output.weight, mean=0.0, std=self.cfg.d_model ** -0.5)

    def embed(self, tokens: torch.Tensor, table: nn.Embedding, start: int = 0,
              row_starts: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) ids -> (B, T, d_model) from position `start`, or from each row's own position in
        `row_starts` (rows that joined a running search later than others; `start` is then the
        largest)."""
        # §3.4: embeddings are multiplied by sqrt(d_model) before the positions are added
        T = tokens.shape[1]
        if start + T > self.cfg.max_positions:
            raise ValueError(f"sequence of {start + T} tokens exceeds model.max_positions={self.cfg.max_positions}")
        positions = (self.positions[start:start + T] if row_starts is None
                     else self.positions[row_starts[:, None] + torch.arange(T, device=tokens.device)])
        return self.embed_drop(table(tokens) * math.sqrt(self.cfg.d_model) + positions)

    @staticmethod
    def attention_mask(src_pad_mask: torch.Tensor) -> torch.Tensor:
        return ~src_pad_mask[:, None, None, :]  # (B, 1, 1, S), True = may attend

    def encode(self, src: torch.Tensor, src_pad_mask: torch.Tensor) -> torch.Tensor:
        """(B, S) ids -> memory (B, S, d_model)."""
        mask = self.attention_mask(src_pad_mask)
        x = self.embed(src, self.src_embed)
        for layer in self.encoder:
            x = layer(x, mask)
        return self.encoder_norm(x)

    def decode_hidden(self, tgt_in, memory, src_pad_mask) -> torch.Tensor:
        """Full (teacher-forced) decoder pass: (B, T) ids -> (B, T, d_model) before the output layer."""
        mask = self.attention_mask(src_pad_mask)
        x = self.embed(tgt_in, self.tgt_embed)
        for layer in self.decoder:
            x = layer(x, memory, mask)
        return self.decoder_norm(x)

    def decode(self, tgt_in, memory, src_pad_mask) -> torch.Tensor:
        """(B, T) ids -> logits (B, T, vocab), recomputing every position."""
        return self.output(self.decode_hidden(tgt_in, memory, src_pad_mask))

    def forward(self, src, src_pad_mask, tgt_in, select, project: bool = True) -> torch.Tensor:
        """Training pass: logits (N, vocab) at the N target positions `select` names: a (B, T) mask, or
        their flat indices into B x T (`Batch.tgt_index`), which a GPU selects without waiting; or
        with project=False the decoder's output there (N, d_model), for `loss.output_loss`, which applies
        the output layer itself chunk by chunk. Only real tokens reach the output layer: the
        (tokens x vocab) logits are the largest tensor here."""
        hidden = self.decode_hidden(tgt_in, self.encode(src, src_pad_mask), src_pad_mask)
        hidden = hidden[select] if select.dtype == torch.bool else hidden.flatten(0, 1).index_select(0, select)
        return self.output(hidden) if project else hidden

    def new_cache(self, memory: torch.Tensor, src_pad_mask: torch.Tensor, max_len: int, beams: int = 1) -> KVCache:
        """Cross-attention keys/values computed once per sentence; self-attention buffers for max_len
        positions of each of its `beams` hypotheses."""
        N, heads, hd = memory.shape[0] * beams, self.cfg.heads, self.cfg.d_model // self.cfg.heads
        shape = (N, heads, max_len, hd)
        cross = [layer.cross_attn.project_kv(memory) for layer in self.decoder]
        # The dtype the keys come out in (bf16 under bf16 autocast; `memory` leaves a LayerNorm in
        # fp32): half the memory, and no cast of the cached keys and values at every step.
        dtype = cross[0][0].dtype if cross else memory.dtype
        return KVCache(
            self_k=[memory.new_zeros(shape, dtype=dtype) for _ in self.decoder],
            self_v=[memory.new_zeros(shape, dtype=dtype) for _ in self.decoder],
            cross_k=[k for k, _ in cross], cross_v=[v for _, v in cross],
            src_mask=self.attention_mask(src_pad_mask),
            lengths=torch.zeros(N, dtype=torch.long, device=memory.device),
            limits=torch.full((N,), max_len, dtype=torch.long, device=memory.device), beams=beams)

    def decode_step(self, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Incremental decoding: (N,) last tokens -> logits (N, vocab); advances the cache a position."""
        x = self.embed(tokens[:, None], self.tgt_embed, start=cache.longest,
                       row_starts=cache.lengths if cache.ragged else None)
        mask = cache.self_mask()
        for i, layer in enumerate(self.decoder):
            x = layer.step(x, cache, i, mask)
        cache.advance()
        return self.output(self.decoder_norm(x))[:, 0]

    def start(self, src: torch.Tensor, src_pad_mask: torch.Tensor, max_len: int, repeat: int = 1) -> KVCache:
        """Decoding's start: the source encoded once, and a cache with `repeat` rows per sentence (beams)."""
        return self.new_cache(self.encode(src, src_pad_mask), src_pad_mask, max_len, beams=repeat)

    def log_probs(self, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One decoding step's log-probabilities (N, vocab), in fp32."""
        return self.decode_step(tokens, cache).float().log_softmax(-1)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, src_len: float, tgt_len: float) -> float:
        """Training FLOPs per target token (forward + backward = 3x forward), as in nanoGPT's MFU estimate."""
        c = self.cfg
        d, f, V = c.d_model, c.ffn_dim, self.output.out_features
        enc = c.encoder_layers * (2 * 4 * d * d + 2 * 2 * d * f + 2 * 2 * src_len * d)
        dec = c.decoder_layers * (2 * 4 * d * d + 2 * 4 * d * d + 2 * 2 * d * f + 2 * 2 * tgt_len * d
                                  + 2 * 2 * src_len * d)
        return 3 * (enc * src_len / tgt_len + dec + 2 * d * V)
