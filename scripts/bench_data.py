"""Benchmark the training data path on synthetic WMT-sized corpora and print one table.

    python scripts/bench_data.py                       # 1M and 4.5M pairs
    python scripts/bench_data.py --pairs 200000        # a quick look

The corpora are made in memory, offline: sentence lengths like WMT's (about 30 pieces on average,
with a long tail), random ids of a 32k vocabulary. Measured on one core (torch and numpy threads 1):
- collation: target tokens/s of batches gathered from the flat arrays (`collate_corpus`), against
  collating them row by row (`collate` of each pair's ids, as mtrain did before), for 25,000-token
  and 2,048-token batches;
- an epoch boundary: seconds to sort and cut the whole corpus into batches (`Batches.epoch_batches`),
  which the loop waits for at the start of each epoch unless `train.prefetch` collates ahead;
- the loop's wait for a batch with `UpdateStream(ahead=2)` while a stand-in step of a given length
  runs, as a share of that step.
Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np
import torch

from mtrain.data import Batches, EncodedCorpus, UpdateStream, collate, collate_corpus


def synthetic(pairs: int, seed: int = 0) -> EncodedCorpus:
    rng = np.random.default_rng(seed)
    src_n = np.clip(rng.lognormal(3.2, 0.55, pairs), 1, 250).astype(np.int64)  # mean ~29, a long tail
    tgt_n = np.clip(src_n * rng.normal(1.05, 0.15, pairs), 1, 250).astype(np.int64)

    def flat(n):
        return (rng.integers(4, 32000, int(n.sum()), dtype=np.int32),
                np.concatenate([[0], np.cumsum(n)]).astype(np.int64))

    return EncodedCorpus(*flat(src_n), *flat(tgt_n), report={})


def tokens_per_s(fn, batches, tokens) -> float:
    start = time.perf_counter()
    for b in batches:
        fn(b)
    return tokens / (time.perf_counter() - start)


def measure(pairs: int, step_ms: float) -> dict:
    corpus = synthetic(pairs)
    out = {"pairs": pairs}
    for budget in (25000, 2048):
        stream = Batches(corpus, budget, seed=1)
        batches = stream.epoch_batches()[:200]
        tokens = sum(int(corpus.tgt_lengths[b].sum()) for b in batches)

        def rows(b):
            pairs_ = [corpus.pair(int(i)) for i in b]
            collate([s for s, _ in pairs_], [t for _, t in pairs_], 0, 2, 3)

        out[f"gather_{budget}"] = tokens_per_s(lambda b: collate_corpus(corpus, b, 0, 2, 3), batches, tokens)
        out[f"rows_{budget}"] = tokens_per_s(rows, batches, tokens)
    stream = Batches(corpus, 25000, seed=1)
    start = time.perf_counter()
    stream.epoch_batches()
    out["epoch_s"] = time.perf_counter() - start
    # The loop's wait with the next updates collated ahead, while a stand-in step sleeps step_ms.
    updates = UpdateStream(Batches(corpus, 25000, seed=1), 1, slice(0, 1), (0, 2, 3), torch.device("cpu"), ahead=2)
    waited = 0.0
    try:
        updates.next()
        for _ in range(50):
            time.sleep(step_ms / 1000)
            start = time.perf_counter()
            updates.next()
            waited += time.perf_counter() - start
    finally:
        updates.close()
    out["wait_share"] = waited / (50 * step_ms / 1000)
    out["rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, action="append", help="corpus sizes [1000000, 4500000]")
    p.add_argument("--step-ms", type=float, default=50.0, help="the stand-in training step [50: a GPU step]")
    args = p.parse_args()
    torch.set_num_threads(1)
    rows = [measure(n, args.step_ms) for n in (args.pairs or [1_000_000, 4_500_000])]
    print("| pairs | collate 25k-token batches: gathered / row by row, M target tokens/s | 2,048-token batches "
          "| epoch boundary, s | loop's wait with prefetch, share of a "
          f"{args.step_ms:.0f} ms step | peak RSS, MB |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['pairs']:,} | {r['gather_25000'] / 1e6:.1f} / {r['rows_25000'] / 1e6:.1f} "
              f"| {r['gather_2048'] / 1e6:.1f} / {r['rows_2048'] / 1e6:.1f} | {r['epoch_s']:.2f} "
              f"| {100 * r['wait_share']:.2f}% | {r['rss_mb']:,.0f} |")


if __name__ == "__main__":
    main()
