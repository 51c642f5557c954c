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


@dataclass
class KVCache:
    """Per-layer key/value buffers for incremental decoding; passed in, never stored on modules.

    Each row holds its own number of target positions, left-aligned: rows that joined a running
    search (`append`) are shorter than the others, attend to their own positions only and take
    their own position embeddings. While every row holds the same number (one batch decoded from
    its start), the cheaper path runs: one column written for all rows, no self-attention mask.

    Rows come in groups of `beams`, one group per sentence: the self-attention buffers have a row
    per hypothesis, the cross-attention ones a row per sentence, whose beams are its queries (all
    beams of a sentence read the same source).

    The buffers are views of the first rows (and source columns) of `store`, which `keep` rewrites
    in place: sentences that leave free their rows and those that join take them, with no new
    tensors while the storage has room and no copy of the columns no row uses yet (a running server
    has sentences leaving and joining at almost every step)."""

    self_k: list[torch.Tensor]  # per decoder layer (N, heads, capacity, head_dim), preallocated
    self_v: list[torch.Tensor]
    cross_k: list[torch.Tensor]  # per decoder layer (N / beams, heads, S, head_dim), computed once
    cross_v: list[torch.Tensor]
    src_mask: torch.Tensor  # (N / beams, 1, 1, S) True where the source is a real token
    lengths: torch.Tensor  # (N,) target positions written in each row
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
        """Keep only `rows`, in that order (drop finished sentences, and reorder beams at the same
        time), then `more`'s rows after them (sentences joining a running search); each group of
        `beams` rows must come from one sentence. Source columns that only the sentences which left
        needed are dropped."""
        sentences = rows[::self.beams] // self.beams
        mask = self.src_mask[sentences]
        if more is not None:
            mask = torch.cat([F.pad(mask, (0, max(0, more.src_mask.shape[-1] - mask.shape[-1]))),
                              F.pad(more.src_mask, (0, max(0, mask.shape[-1] - more.src_mask.shape[-1])))])
        real = mask.flatten(1).any(0).nonzero()
        S = int(real[-1]) + 1 if len(real) else mask.shape[-1]
        n, used = len(rows), min(S, self.src_mask.shape[-1])  # kept rows; source columns they may read
        extra, extra_sentences = (len(more.lengths), len(more.src_mask)) if more is not None else (0, 0)
        store = self.store
        capacity = max(store[0][0].shape[2], more.self_k[0].shape[2] if more is not None else 0)
        if (store[0][0].shape[0] < n + extra or store[0][0].shape[2] < capacity
                or store[2][0].shape[0] < len(sentences) + extra_sentences or store[2][0].shape[2] < S):
            # Too small: new storage, with room to spare for the sentences that join next (zeros, so
            # that columns no row has written hold finite values: masked out, they must weigh 0 exactly).
            had = [*store[0][0].shape[::2], *store[2][0].shape[::2]]  # rows, columns, sentences, source columns
            grown = [max(n + extra, 2 * had[0]), max(capacity, had[1] * 3 // 2) if capacity > had[1] else had[1],
                     max(len(sentences) + extra_sentences, 2 * had[2]), max(S, had[3] * 3 // 2) if S > had[3] else had[3]]
            new = [[buf.new_zeros((grown[2 * (kind // 2)], buf.shape[1], grown[2 * (kind // 2) + 1], buf.shape[3]))
                    for buf in bufs] for kind, bufs in enumerate(store)]
        else:
            new = store  # rows copied within their own buffers
        for kind, (old, bufs) in enumerate(zip(store, new)):
            index, columns = (rows, self.longest) if kind < 2 else (sentences, used)
            for a, b in zip(old, bufs):
                _copy_rows(b, a, index, columns)
        if more is not None:
            for kind, (bufs, joining) in enumerate(zip(new, [more.self_k, more.self_v, more.cross_k, more.cross_v])):
                at = n if kind < 2 else len(sentences)
                columns = more.longest if kind < 2 else joining[0].shape[2]
                for b, j in zip(bufs, joining):
                    b[at:at + len(j), :, :columns] = j[:, :, :columns]
        self.store = new
        self.self_k, self.self_v = ([buf[:n + extra] for buf in bufs] for bufs in new[:2])
        self.cross_k, self.cross_v = ([buf[:len(sentences) + extra_sentences, :, :S] for buf in bufs]
                                      for bufs in new[2:])
        self.src_mask = mask[..., :S]
        self.lengths = self.lengths[rows] if more is None else torch.cat([self.lengths[rows], more.lengths])
        if (self.ragged or more is not None) and len(self.lengths):
            self.longest = int(self.lengths.max())
            self.ragged = bool((self.lengths != self.longest).any())

    def append(self, other: "KVCache") -> None:
        """Add `other`'s rows after these."""
        self.keep(torch.arange(len(self.lengths), device=self.lengths.device), other)

    def write(self, i: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store one new position's keys and values (N, heads, 1, head_dim) in layer i; the keys and
        values to attend to."""
        if self.ragged:
            rows = torch.arange(len(self.lengths), device=k.device)
            self.self_k[i][rows, :, self.lengths] = k[:, :, 0]
            self.self_v[i][rows, :, self.lengths] = v[:, :, 0]
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
        for emb in {self.src_embed, self.tgt_embed}:
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
        return KVCache(
            self_k=[memory.new_zeros(shape) for _ in self.decoder],
            self_v=[memory.new_zeros(shape) for _ in self.decoder],
            cross_k=[k for k, _ in cross], cross_v=[v for _, v in cross],
            src_mask=self.attention_mask(src_pad_mask),
            lengths=torch.zeros(N, dtype=torch.long, device=memory.device), beams=beams)

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
