"""Decoding: one batched beam search (beam 1 is greedy) and ancestral sampling, both on the KV cache.

Both ask the model for two things only: `start` (encode the source, make the cache) and `log_probs`
(one step): a Transformer or an Ensemble of them."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mtrain.ensemble import Ensemble
from mtrain.model import Transformer


@dataclass
class Hypothesis:
    tokens: list[int]  # output ids without BOS and EOS
    score: float  # log-probability (EOS included) divided by the length penalty


def length_penalty(length, alpha: float, kind: str = "gnmt"):
    """GNMT's ((5 + len) / 6)^alpha (Wu et al. 2016, §7) or plain len^alpha; works on floats and tensors."""
    if kind == "gnmt":
        return ((5.0 + length) / 6.0) ** alpha
    return length ** alpha


def max_lengths(src_pad_mask: torch.Tensor, a: float, b: int, limit: int) -> torch.Tensor:
    """(B,) longest allowed output, EOS included: floor(a * |src| + b) pieces then EOS, where |src| counts
    the source pieces without its EOS (as fairseq's max_len_a/b); capped by the model's positions."""
    src_len = (~src_pad_mask).sum(1).float() - 1  # the source ends in EOS
    return (a * src_len + b).floor().long().add(1).clamp(min=1, max=limit)


def block_ngrams(logp: torch.Tensor, tokens: torch.Tensor, n: int) -> None:
    """Forbid any token that would repeat an n-gram already in its row's `tokens` (in place)."""
    if n < 1 or tokens.shape[1] < n:
        return
    grams = tokens.unfold(1, n, 1)  # (N, L-n+1, n)
    prefix = tokens[:, tokens.shape[1] - n + 1:] if n > 1 else tokens[:, :0]
    match = (grams[:, :, :n - 1] == prefix[:, None, :]).all(-1)  # (N, L-n+1)
    rows, where = match.nonzero(as_tuple=True)
    logp[rows, grams[rows, where, n - 1]] = float("-inf")


@torch.no_grad()
def beam_search(model: Transformer | Ensemble, src: torch.Tensor, src_pad_mask: torch.Tensor, *, beam: int = 5,
                lenpen: float = 0.6, lenpen_type: str = "gnmt", max_len_a: float = 1.5, max_len_b: int = 10,
                min_len: int = 1, nbest: int = 1, no_repeat_ngram: int = 0,
                bos: int, eos: int, pad: int, unk: int | None = None) -> list[list[Hypothesis]]:
    """Best `nbest` hypotheses per sentence, best first; `unk`, when given, is never emitted.

    Each row group of `beam` rows belongs to one live sentence; a sentence stops when it has `nbest`
    finished hypotheses that no live one can beat, and its rows are then dropped from the batch.
    """
    B, k = src.shape[0], beam
    device = src.device
    max_len = max_lengths(src_pad_mask, max_len_a, max_len_b, model.cfg.max_positions - 1)
    cache = model.start(src, src_pad_mask, int(max_len.max()) + 1, repeat=k)
    tokens = torch.full((B * k, 1), bos, dtype=torch.long, device=device)  # (N*k, t+1), BOS first
    scores = torch.zeros(B, k, device=device)  # summed log-probs of live hypotheses
    scores[:, 1:] = float("-inf")  # step 0 expands one hypothesis per sentence, not k copies
    alive = torch.arange(B, device=device)  # sentence id of each live row group
    finished: list[list[Hypothesis]] = [[] for _ in range(B)]
    nth_best = torch.full((B,), float("-inf"), device=device)  # nbest-th finished score per sentence
    n_finished = torch.zeros(B, dtype=torch.long, device=device)

    for t in range(int(max_len.max())):
        n = len(alive)
        logp = model.log_probs(tokens[:, -1], cache)  # (n*k, V)
        V = logp.shape[1]
        eos_logp = logp[:, eos].clone()
        logp[:, pad] = logp[:, bos] = float("-inf")
        if unk is not None:
            logp[:, unk] = float("-inf")
        if t < min_len:
            logp[:, eos] = float("-inf")
        if no_repeat_ngram:
            block_ngrams(logp, tokens[:, 1:], no_repeat_ngram)
        at_limit = (t + 1 >= max_len[alive]).repeat_interleave(k)  # this token must be EOS
        logp[at_limit] = float("-inf")
        logp[at_limit, eos] = eos_logp[at_limit]

        # 2k candidates, so that k live ones remain even if k of them end in EOS (as fairseq).
        cand = (scores[:, :, None] + logp.view(n, k, V)).view(n, k * V)
        top_scores, top_idx = cand.topk(min(2 * k, k * V), dim=1)
        src_beam, new_tok = top_idx // V, top_idx % V
        is_eos = new_tok == eos

        # EOS candidates among the best k finish their hypotheses.
        fin = is_eos[:, :k] & torch.isfinite(top_scores[:, :k])
        if fin.any():
            norm = top_scores[:, :k] / length_penalty(t + 1, lenpen, lenpen_type)
            for i, j in fin.nonzero().tolist():
                b = int(alive[i])
                row = i * k + int(src_beam[i, j])
                finished[b].append(Hypothesis(tokens[row, 1:].tolist(), float(norm[i, j])))
                n_finished[b] += 1
                if len(finished[b]) >= nbest:
                    nth_best[b] = sorted((h.score for h in finished[b]), reverse=True)[nbest - 1]

        # The best k candidates that do not end in EOS stay live.
        live_scores, pick = top_scores.masked_fill(is_eos, float("-inf")).topk(k, dim=1)
        rows = (torch.arange(n, device=device)[:, None] * k + src_beam.gather(1, pick)).view(-1)
        tokens = torch.cat([tokens[rows], new_tok.gather(1, pick).view(-1, 1)], dim=1)
        scores = live_scores
        cache.reorder(rows)

        # A sentence is done with k finished hypotheses (as fairseq; this makes beam 1 greedy), or
        # earlier when no live one can beat them: a live hypothesis ends with a length in
        # [t+2, max_len] and can only lose log-probability, so its best possible final score is
        # its score now under the most favourable length penalty.
        best_live = scores.max(dim=1).values
        bound = torch.maximum(best_live / length_penalty(t + 2, lenpen, lenpen_type),
                              best_live / length_penalty(max_len[alive].float(), lenpen, lenpen_type))
        done = ((n_finished[alive] >= k) | (nth_best[alive] >= bound) | torch.isinf(best_live)
                | (t + 1 >= max_len[alive]))
        if done.all():
            break
        if done.any():
            keep = (~done).nonzero().view(-1)
            keep_rows = (keep[:, None] * k + torch.arange(k, device=device)).view(-1)
            alive, scores, tokens = alive[keep], scores[keep], tokens[keep_rows]
            cache.keep(keep_rows)

    return [sorted(f, key=lambda h: -h.score)[:nbest] for f in finished]


@torch.no_grad()
def sample(model: Transformer | Ensemble, src: torch.Tensor, src_pad_mask: torch.Tensor, *, temperature: float = 1.0,
           top_k: int = 0, top_p: float = 1.0, max_len_a: float = 1.5, max_len_b: int = 10, min_len: int = 1,
           bos: int, eos: int, pad: int, unk: int | None = None,
           generator: torch.Generator | None = None) -> list[Hypothesis]:
    """One sampled translation per sentence (for back-translation), with top-k / nucleus filtering;
    `unk`, when given, is never drawn.
    temperature > 0, top_k >= 0 (0 = all) and 0 < top_p <= 1 are the caller's to check."""
    B, device = src.shape[0], src.device
    max_len = max_lengths(src_pad_mask, max_len_a, max_len_b, model.cfg.max_positions - 1)
    cache = model.start(src, src_pad_mask, int(max_len.max()) + 1)
    last = torch.full((B,), bos, dtype=torch.long, device=device)
    out = torch.full((B, int(max_len.max())), pad, dtype=torch.long, device=device)
    total = torch.zeros(B, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    for t in range(int(max_len.max())):
        logits = model.log_probs(last, cache)  # logits up to a constant a row: the same distribution
        logits[:, pad] = logits[:, bos] = float("-inf")
        if unk is not None:
            logits[:, unk] = float("-inf")
        if t < min_len:
            logits[:, eos] = float("-inf")
        logits[t + 1 >= max_len, :] = float("-inf")
        logits[t + 1 >= max_len, eos] = 0.0
        logp = (logits / temperature).log_softmax(-1)
        filtered = logp.clone()
        if top_k:
            kth = logp.topk(min(top_k, logp.shape[1]), dim=1).values[:, -1:]
            filtered[logp < kth] = float("-inf")
        if top_p < 1.0:
            sorted_p, order = filtered.softmax(-1).sort(dim=1, descending=True)
            drop = sorted_p.cumsum(1) - sorted_p > top_p  # keep the smallest set reaching top_p
            filtered.scatter_(1, order, sorted_p.masked_fill(drop, 0.0).log())
        tok = torch.multinomial(filtered.softmax(-1), 1, generator=generator).view(-1)
        tok = torch.where(done, torch.full_like(tok, pad), tok)
        total += torch.where(done, 0.0, logp.gather(1, tok.clamp(min=0)[:, None]).view(-1))
        out[:, t] = tok
        done |= tok == eos
        last = tok
        if done.all():
            break
    hyps = []
    for b in range(B):
        seq = out[b].tolist()
        seq = seq[:seq.index(eos)] if eos in seq else [x for x in seq if x != pad]
        hyps.append(Hypothesis(seq, float(total[b])))
    return hyps
