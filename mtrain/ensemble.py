"""Several models decoding as one: each keeps its own KV cache, and each step's log-probabilities are
the mean of theirs (a log-linear ensemble with equal weights, as Marian's; fairseq averages the
probabilities instead). The models must share both vocabularies; they may differ in size."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

import torch

from mtrain.model import KVCache, Transformer


@dataclass
class EnsembleCache:
    """One KV cache per model, reordered and pruned together with the beam."""

    caches: list[KVCache]

    def reorder(self, rows: torch.Tensor) -> None:
        for cache in self.caches:
            cache.reorder(rows)

    def keep(self, rows: torch.Tensor, more: "EnsembleCache | None" = None) -> None:
        for n, cache in enumerate(self.caches):
            cache.keep(rows, more.caches[n] if more else None)

    def append(self, other: "EnsembleCache") -> None:
        for cache, more in zip(self.caches, other.caches):
            cache.append(more)


class Ensemble:
    """What beam search and sampling need of a model (`start`, `log_probs`, `cfg.max_positions`), for
    several models at once."""

    def __init__(self, models: Sequence[Transformer]):
        self.models = list(models)
        # the longest input and output every member can take
        self.cfg = dataclasses.replace(self.models[0].cfg, max_positions=min(m.cfg.max_positions for m in self.models))

    def start(self, src: torch.Tensor, src_pad_mask: torch.Tensor, max_len: int, repeat: int = 1) -> EnsembleCache:
        return EnsembleCache([m.start(src, src_pad_mask, max_len, repeat) for m in self.models])

    def log_probs(self, tokens: torch.Tensor, cache: EnsembleCache) -> torch.Tensor:
        return torch.stack([m.log_probs(tokens, c) for m, c in zip(self.models, cache.caches)]).mean(0)

    def to(self, device) -> "Ensemble":
        for m in self.models:
            m.to(device)
        return self

    def eval(self) -> "Ensemble":
        for m in self.models:
            m.eval()
        return self
