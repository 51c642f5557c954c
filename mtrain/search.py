"""Decoding: one batched beam search (beam 1 is greedy) and ancestral sampling, both on the KV cache.

Both ask the model for two things only: `start` (encode the source, make the cache) and `log_probs`
(one step): a Transformer or an Ensemble of them. The cache is reordered with the beams, shrunk when
sentences leave and, in beam search, appended to when sentences join."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mtrain.ensemble import Ensemble
from mtrain.guide import Guide, Progress, allocate
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


def output_limits(src_len: torch.Tensor, a: float, b: int, limit: int) -> torch.Tensor:
    """Longest allowed outputs, EOS included: floor(a * |src| + b) pieces then EOS for sources of
    `src_len` pieces without their EOS (as fairseq's max_len_a/b); capped by the model's positions
    (before the cast to integers, so that a huge b cannot overflow)."""
    return (a * src_len.float() + b).floor().add(1).clamp(min=1, max=limit).long()


def max_lengths(src_pad_mask: torch.Tensor, a: float, b: int, limit: int) -> torch.Tensor:
    """(B,) output_limits of a batch of sources, each ending in EOS."""
    return output_limits((~src_pad_mask).sum(1) - 1, a, b, limit)


def block_ngrams(logp: torch.Tensor, tokens: torch.Tensor, n: int, pad: int) -> None:
    """Forbid any token that would repeat an n-gram already in its row's `tokens` (in place). The
    tokens that do not complete an n-gram are sent to the `pad` column, which is -inf already: no
    list of matches, so nothing waits for the device."""
    if n < 1 or tokens.shape[1] < n:
        return
    grams = tokens.unfold(1, n, 1)  # (N, L-n+1, n)
    prefix = tokens[:, tokens.shape[1] - n + 1:] if n > 1 else tokens[:, :0]
    match = (grams[:, :, :n - 1] == prefix[:, None, :]).all(-1)  # (N, L-n+1)
    logp.scatter_(1, torch.where(match, grams[:, :, n - 1], pad), float("-inf"))


class BeamSearch:
    """A batched beam search that sentences may join between steps (`add`) and that hands each one
    back as soon as it is done (`step`): `mtrain translate` adds one sorted batch and steps until it
    is empty; `mtrain serve` adds requests as they come, so the batch stays full (continuous
    batching). Each row group of `beam` rows belongs to one live sentence, whose steps are counted
    apart from the others'; `unk`, when given, is never emitted.

    A step waits for the device at most twice, whatever the batch and beam: once for what the host
    needs to know of every sentence (which candidates finished, the best live score), and once more
    for the tokens of the hypotheses that finished, when any did. The finished hypotheses and the
    stopping rule live on the host."""

    def __init__(self, model: Transformer | Ensemble, *, beam: int = 5, lenpen: float = 0.6,
                 lenpen_type: str = "gnmt", max_len_a: float = 1.5, max_len_b: int = 10, min_len: int = 1,
                 nbest: int = 1, no_repeat_ngram: int = 0, bos: int, eos: int, pad: int, unk: int | None = None):
        self.model, self.k, self.nbest = model, beam, nbest
        self.lenpen, self.lenpen_type, self.max_len_a, self.max_len_b = lenpen, lenpen_type, max_len_a, max_len_b
        self.min_len, self.no_repeat_ngram = min_len, no_repeat_ngram
        self.bos, self.eos, self.pad, self.unk = bos, eos, pad, unk
        self.added = 0  # sentences added so far: the next one's id
        self._empty()

    def _empty(self) -> None:
        self.cache = None
        # What the cache is owed: the last step's rows (its beams' reorder, and a shrink when
        # sentences left) and the sentences added since, given to it in one copy before the next step.
        self.owed: torch.Tensor | None = None
        self.shrink = False
        self.joining = None
        # Per live sentence, in row-group order, on the host:
        self.ids: list[int] = []  # its id
        self.finished: list[list[Hypothesis]] = []
        self.taken: list[int] = []  # tokens it has taken
        self.limit: list[int] = []  # longest output allowed, EOS included
        self.nth_best: list[float] = []  # the nbest-th finished score, -inf until there is one
        self.guides: list[Guide | None] = []  # its constraints and prefix, if any
        self.progress: list[list[Progress] | None] = []  # its hypotheses' progress through its constraints
        self.forced_n: list[int] = []  # prefix tokens: forced, so they count in neither score nor length
        # On the device:
        self.tokens = torch.zeros(0, 1, dtype=torch.long)  # (n*k, W) right-aligned: BOS, outputs; pads before
        self.scores = torch.zeros(0, self.k)  # summed log-probs of live hypotheses
        self.steps = torch.zeros(0, dtype=torch.long)  # = taken
        self.max_len = torch.zeros(0, dtype=torch.long)  # = limit
        self.forced = torch.zeros(0, 0, dtype=torch.long)  # (n, P) prefix tokens, padded
        self.forced_len = torch.zeros(0, dtype=torch.long)  # = forced_n

    def __len__(self) -> int:
        """Sentences still being searched."""
        return len(self.ids)

    @torch.no_grad()
    def add(self, src: torch.Tensor, src_pad_mask: torch.Tensor, guides: list[Guide | None] | None = None) -> list[int]:
        """Start searching these sentences at the next step; their ids, as `step` will name them.
        `guides`: each sentence's constraints and prefix (None: none), whose prefix must leave room
        for at least the EOS within the sentence's output limit (the caller checks it)."""
        B, k, device = src.shape[0], self.k, src.device
        max_len = max_lengths(src_pad_mask, self.max_len_a, self.max_len_b, self.model.cfg.max_positions - 1)
        limits = max_len.tolist()
        cache = self.model.start(src, src_pad_mask, max(limits) + 1, repeat=k)
        if self.cache is None:
            self.cache = cache
            self.tokens, self.scores, self.steps, self.max_len = (
                x.to(device) for x in (self.tokens, self.scores, self.steps, self.max_len))
        elif self.joining is None:
            self.joining = cache
        else:
            self.joining.append(cache)
        tokens = torch.full((B * k, self.tokens.shape[1]), self.pad, dtype=torch.long, device=device)
        tokens[:, -1] = self.bos
        scores = torch.zeros(B, k, device=device)
        scores[:, 1:] = float("-inf")  # step 0 expands one hypothesis per sentence, not k copies
        self.tokens = torch.cat([self.tokens, tokens])
        self.scores = torch.cat([self.scores, scores])
        self.steps = torch.cat([self.steps, torch.zeros(B, dtype=torch.long, device=device)])
        self.max_len = torch.cat([self.max_len, max_len])
        guides = list(guides) if guides is not None else [None] * B
        prefixes = [list(g.prefix) if g else [] for g in guides]
        width = max([self.forced.shape[1], *map(len, prefixes)])
        forced = torch.tensor([p + [self.pad] * (width - len(p)) for p in prefixes], dtype=torch.long).view(B, width)
        self.forced = torch.cat([F.pad(self.forced.to(device), (0, width - self.forced.shape[1]), value=self.pad),
                                 forced.to(device)])
        self.forced_len = torch.cat([self.forced_len.to(device), torch.tensor(list(map(len, prefixes)), device=device)])
        self.guides += [g if g and (g.constraints or g.prefix or g.rest) else None for g in guides]
        self.progress += [[Progress(rest=g.rest)] * k if g and (g.constraints or g.rest) else None for g in guides]
        self.forced_n += list(map(len, prefixes))
        ids = list(range(self.added, self.added + B))
        self.added += B
        self.ids += ids
        self.finished += [[] for _ in range(B)]
        self.taken += [0] * B
        self.limit += limits
        self.nth_best += [float("-inf")] * B
        return ids

    @torch.no_grad()
    def step(self) -> list[tuple[int, list[Hypothesis]]]:
        """One token for every live hypothesis; the sentences done now, with their best `nbest`
        hypotheses (best first), leave the search."""
        n, k, eos = len(self.ids), self.k, self.eos
        if not n:
            return []
        self._settle()
        t = self.steps  # (n,) tokens taken before this one
        logp = self.model.log_probs(self.tokens[:, -1], self.cache)  # (n*k, V)
        V = logp.shape[1]
        eos_logp = logp[:, eos].clone()
        logp[:, self.pad] = logp[:, self.bos] = float("-inf")
        if self.unk is not None:
            logp[:, self.unk] = float("-inf")
        logp[:, eos].masked_fill_((t < self.min_len + self.forced_len).repeat_interleave(k), float("-inf"))
        if self.no_repeat_ngram:  # pads and BOS before a row's outputs never complete an n-gram of it
            block_ngrams(logp, self.tokens, self.no_repeat_ngram, self.pad)
        guided = [i for i in range(n) if self.guides[i] is not None]
        if guided:
            logp = self._guide(logp, guided)

        # 2k candidates, so that k live ones remain even if k of them end in EOS (as fairseq).
        cand = (self.scores[:, :, None] + logp.view(n, k, V)).view(n, k * V)
        top_scores, top_idx = cand.topk(min(2 * k, k * V), dim=1)
        # A sentence at its length limit has one candidate per hypothesis: that hypothesis ended by EOS
        # (its log-probability unmasked). Chosen by `where`, not by indexing the rows, which would wait.
        ended, beams = (self.scores + eos_logp.view(n, k)).topk(k, dim=1)
        at_limit = (t + 1 >= self.max_len)[:, None]
        top_scores = torch.where(at_limit, F.pad(ended, (0, top_scores.shape[1] - k), value=float("-inf")),
                                 top_scores)
        top_idx = torch.where(at_limit, F.pad(beams * V + eos, (0, top_idx.shape[1] - k), value=eos), top_idx)
        src_beam, new_tok = top_idx // V, top_idx % V
        is_eos = new_tok == eos
        # EOS candidates among the best k finish their hypotheses; the best k others stay live.
        is_finished = is_eos[:, :k] & torch.isfinite(top_scores[:, :k])
        # the prefix counts in neither score nor length (no hypothesis ends within it)
        generated = (t - self.forced_len).clamp(min=0)[:, None] + 1.0
        norm = top_scores[:, :k] / length_penalty(generated, self.lenpen, self.lenpen_type)
        live_scores, pick = top_scores.masked_fill(is_eos, float("-inf")).topk(k, dim=1)
        live_beam, live_tok = src_beam.gather(1, pick), new_tok.gather(1, pick)
        # (a sentence at its length limit ends now, with the EOS candidates above)
        constrained = [i for i in guided if self.progress[i] is not None and self.taken[i] + 1 < self.limit[i]]
        if constrained:  # dynamic beam allocation, on the host, for the sentences with constraints
            choice = self._allocate(constrained, logp, top_scores, top_idx, V)
            at = torch.tensor(constrained, device=logp.device)
            live_scores[at], live_beam[at], live_tok[at] = (x.to(logp.device) for x in choice)
        rows = (torch.arange(n, device=logp.device)[:, None] * k + live_beam).view(-1)
        before = self.tokens
        self.tokens = torch.cat([before[rows], live_tok.view(-1, 1)], dim=1)
        self.scores = live_scores
        self.steps = t + 1
        self.owed = rows

        # What the host needs, in one transfer.
        summary = torch.cat([is_finished.view(-1).double(), src_beam[:, :k].reshape(-1).double(), norm.view(-1).double(),
                             live_scores[:, 0].double()]).tolist()
        nk = n * k
        fin_at, beam_of, norm_of, best_live = summary[:nk], summary[nk:2 * nk], summary[2 * nk:3 * nk], summary[3 * nk:]
        ending = [c for c in range(nk) if fin_at[c]]
        if ending:  # their tokens, in a second transfer
            width = before.shape[1]
            ending_rows = torch.tensor([c // k * k + int(beam_of[c]) for c in ending], device=before.device)
            for c, seq in zip(ending, before.index_select(0, ending_rows).tolist()):
                i = c // k
                self.finished[i].append(Hypothesis(seq[width - self.taken[i]:], norm_of[c]))
                if len(self.finished[i]) >= self.nbest:
                    self.nth_best[i] = sorted((h.score for h in self.finished[i]), reverse=True)[self.nbest - 1]
        self.taken = [x + 1 for x in self.taken]
        done = [self._done(i, best_live[i]) for i in range(n)]
        if not any(done):
            return []
        out = [(self.ids[i], sorted(self.finished[i], key=lambda h: -h.score)[:self.nbest])
               for i in range(n) if done[i]]
        if all(done):
            self._empty()
            return out
        kept = [i for i in range(n) if not done[i]]
        keep = torch.tensor(kept, device=logp.device)
        keep_rows = (keep[:, None] * k + torch.arange(k, device=keep.device)).view(-1)
        self.ids, self.finished, self.taken, self.limit, self.nth_best, self.guides, self.progress, self.forced_n = (
            [x[i] for i in kept] for x in (self.ids, self.finished, self.taken, self.limit, self.nth_best, self.guides,
                                           self.progress, self.forced_n))
        self.scores, self.steps, self.max_len = self.scores[keep], self.steps[keep], self.max_len[keep]
        self.forced, self.forced_len = self.forced[keep], self.forced_len[keep]
        # Columns before the longest live output are pads in every row: drop them.
        self.tokens = self.tokens[keep_rows, self.tokens.shape[1] - max(self.taken) - 1:]
        self.owed, self.shrink = rows[keep_rows], True  # the beams' reorder and the shrink in one copy
        return out

    def _guide(self, logp: torch.Tensor, guided: list[int]) -> torch.Tensor:
        """The guided sentences' rules on this step's log-probabilities: a prefix's token forced (at no
        cost: the score counts what the model generated), the word it ends in spelled out, and EOS
        refused to a hypothesis that has not met all its constraints."""
        k, V = self.k, logp.shape[1]
        if any(self.taken[i] < self.forced_n[i] for i in guided):
            t, P = self.steps, self.forced.shape[1]
            in_prefix = (t < self.forced_len).repeat_interleave(k)[:, None]
            token = self.forced.gather(1, t.clamp(max=P - 1)[:, None]).repeat_interleave(k, 0)
            logp = torch.where(in_prefix, torch.full_like(logp, float("-inf")).scatter_(1, token, 0.0), logp)
        for i in guided:
            if self.progress[i] is None or self.taken[i] < self.forced_n[i]:
                continue
            for b, p in enumerate(self.progress[i]):
                if p.rest:  # the prefix's last word, still being spelled out
                    allowed = torch.full((V,), float("-inf"), device=logp.device)
                    allowed[self.guides[i].completions.allowed(p.rest)] = 0.0
                    logp[i * k + b] += allowed
        unmet = [i * k + b for i in guided if self.progress[i] is not None
                 for b, p in enumerate(self.progress[i]) if not p.complete(self.guides[i])]
        if unmet:
            logp[torch.tensor(unmet, device=logp.device), self.eos] = float("-inf")
        return logp

    def _allocate(self, constrained: list[int], logp: torch.Tensor, top_scores: torch.Tensor, top_idx: torch.Tensor,
                  V: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The k live hypotheses of each sentence with constraints, by dynamic beam allocation over
        the candidates: the sentence's best k of the step, each hypothesis's best token, and every
        token that moves a hypothesis through its constraints. Their progress is updated; (scores, beams,
        tokens) come back, each (len(constrained), k)."""
        k, device = self.k, logp.device
        previous = self.scores.view(-1).tolist()  # (hypotheses that are -inf have no candidates)
        wanted = {i * k + b: sorted(p.wanted(self.guides[i])) for i in constrained
                  for b, p in enumerate(self.progress[i]) if previous[i * k + b] != float("-inf")}
        pairs = [(r, token) for r, tokens in wanted.items() for token in tokens]
        at = torch.tensor(constrained, device=device)
        # each hypothesis's best token, over the constrained sentences' rows only
        best_logp, best_tok = logp.view(-1, k, logp.shape[1]).index_select(0, at).max(-1)
        pair_rows = torch.tensor([r for r, _ in pairs], dtype=torch.long, device=device)
        pair_toks = torch.tensor([t for _, t in pairs], dtype=torch.long, device=device)
        # One transfer for all of them.
        # the step's best k candidates of each sentence (of its 2k), with each hypothesis's best token and
        # every token that moves it forward: Post and Vilar's candidate set
        width, m = k, len(constrained)
        flat = torch.cat([top_scores[at, :k].flatten().double(), top_idx[at, :k].flatten().double(),
                          best_logp.flatten().double(), best_tok.flatten().double(),
                          logp[pair_rows, pair_toks].double()]).tolist()
        tops, idxs = flat[:m * width], flat[m * width:2 * m * width]
        bests, best_toks = flat[2 * m * width:2 * m * width + m * k], flat[2 * m * width + m * k:2 * m * width + 2 * m * k]
        pair_logp = flat[2 * m * width + 2 * m * k:]
        out_scores, out_beams, out_toks = [], [], []
        at_pair = 0
        for j, i in enumerate(constrained):
            guide, progress = self.guides[i], self.progress[i]
            found: dict[tuple[int, int], float] = {}
            for c in range(j * width, (j + 1) * width):
                beam, token = divmod(int(idxs[c]), V)
                found[beam, token] = tops[c]
            for b in range(k):
                r = i * k + b
                if r not in wanted:
                    continue
                found[b, int(best_toks[j * k + b])] = bests[j * k + b] + previous[r]
                for token in wanted[r]:
                    found[b, token] = pair_logp[at_pair] + previous[r]
                    at_pair += 1
            spelling = self.taken[i] >= self.forced_n[i]  # past the prefix's forced tokens
            candidates = [(score, beam, token, progress[beam].after(token, guide, spelling))
                          for (beam, token), score in found.items()
                          if token != self.eos and score != float("-inf")]
            chosen = allocate(candidates, k, guide, self.limit[i] - self.taken[i] - 2)
            chosen += [(float("-inf"), 0, self.pad, Progress())] * (k - len(chosen))
            self.progress[i] = [c[3] for c in chosen]
            if all(c[3].complete(guide) or c[0] == float("-inf") for c in chosen):
                self.progress[i] = None  # every live hypothesis holds every phrase: a plain search from here
            out_scores.append([c[0] for c in chosen])
            out_beams.append([c[1] for c in chosen])
            out_toks.append([c[2] for c in chosen])
        return (torch.tensor(out_scores, dtype=logp.dtype), torch.tensor(out_beams, dtype=torch.long),
                torch.tensor(out_toks, dtype=torch.long))

    def _done(self, i: int, best_live: float) -> bool:
        """Sentence i (which has taken its token of this step) is done when no live hypothesis can
        enter its n-best list any more: a live one ends with a length in [taken + 1, limit] and can
        only lose log-probability, so its best possible final score is its score now under the most
        favourable length penalty. Once k hypotheses have finished, it is done as soon as none live
        is better now than its n-th best finished one, scored as if it ended here (fairseq and
        Marian stop at k finished whatever the live ones score: junk hypotheses end early, and beam
        3 returned 'am dach' at -4.6 while 'am strand', at -0.005, was live; waiting for the bound
        instead took 19% more steps on Multi30k's test set for no BLEU). Beam 1 is done at its
        first finished hypothesis (greedy)."""
        taken, limit, lp = self.taken[i], self.limit[i], self.lenpen
        if taken >= limit or best_live == float("-inf") or (self.k == 1 and self.finished[i]):
            return True
        forced = self.forced_n[i]  # lengths count the generated tokens only
        if taken < forced:  # within its prefix: nothing has finished
            return False
        if len(self.finished[i]) >= self.k:
            return self.nth_best[i] >= best_live / length_penalty(taken + 1.0 - forced, lp, self.lenpen_type)
        bound = max(best_live / length_penalty(taken + 1.0 - forced, lp, self.lenpen_type),
                    best_live / length_penalty(float(limit - forced), lp, self.lenpen_type))
        return self.nth_best[i] >= bound

    def _settle(self) -> None:
        """Give the cache what it is owed (see _empty)."""
        if self.joining is not None:
            if self.owed is None:
                self.cache.append(self.joining)
            else:
                self.cache.keep(self.owed, self.joining)
        elif self.shrink:
            self.cache.keep(self.owed)
        elif self.owed is not None:
            self.cache.reorder(self.owed)  # in place, the columns in use only
        self.owed, self.shrink, self.joining = None, False, None


@torch.no_grad()
def beam_search(model: Transformer | Ensemble, src: torch.Tensor, src_pad_mask: torch.Tensor,
                guides: list[Guide | None] | None = None, **options) -> list[list[Hypothesis]]:
    """Best `nbest` hypotheses per sentence of one batch, best first (BeamSearch's options; `guides`:
    each sentence's constraints and prefix)."""
    search = BeamSearch(model, **options)
    ids = search.add(src, src_pad_mask, guides)
    results: dict[int, list[Hypothesis]] = {}
    while len(search):
        results.update(search.step())
    return [results[i] for i in ids]


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
