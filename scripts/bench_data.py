"""Benchmark the training data path on synthetic WMT-sized corpora and print two tables.

    python scripts/bench_data.py                       # 1M and 4.5M pairs
    python scripts/bench_data.py --pairs 200000        # a quick look
    python scripts/bench_data.py --skip-prepare        # the loader only

The loader (no model), on corpora made in memory: sentence lengths like WMT's (about 30 pieces on
average, with a long tail), uint16 ids of a 32k vocabulary as `mtrain prepare` stores them, one
thread (torch and numpy):
- collation: target tokens/s of batches gathered from the flat arrays (`collate_corpus`), against
  collating them row by row (`collate` of each pair's ids, as mtrain did before), for 25,000-token
  and 2,048-token batches;
- an epoch boundary: seconds to sort and cut the whole corpus into batches (`Batches.make_epoch`),
  and the loop's longest wait for a batch across the boundary when the next epoch is made ahead
  (`train.prefetch`), from 80 updates before it;
- the loop's wait for a batch with `UpdateStream(ahead=2)` while a stand-in step of a given length
  runs, as a share of that step.

Preparation (`mtrain prepare`) and `fit`'s start-up, on raw text written to --work: made-up words
(a Zipf-distributed vocabulary of ~50k, sentences of ~25 words with a long tail), each target word
a fixed stand-in for its source word, with a word now and then inserted or dropped; a 32k joint
SentencePiece model trained once on a sample:
- prepare: pairs/s with 1 and 2 worker processes, against SentencePiece's own encode rate on the
  same cores (both sides of the first 200,000 pairs, in memory, `encode(..., num_threads=N)`,
  measured just before and after each prepare: this shared machine's speed drifts); peak RSS of
  the main process and of the largest worker; bytes on disk per piece;
- fit: seconds from the start of `fit` on the prepared data to the end of its first update (a tiny
  model), and the peak RSS of the process then.
Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import itertools
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from mtrain.data import Batches, EncodedCorpus, UpdateStream, collate, collate_corpus


def synthetic(pairs: int, seed: int = 0, vocab: int = 32000) -> EncodedCorpus:
    rng = np.random.default_rng(seed)
    src_n = np.clip(rng.lognormal(3.2, 0.55, pairs), 1, 250).astype(np.int64)  # mean ~29, a long tail
    tgt_n = np.clip(src_n * rng.normal(1.05, 0.15, pairs), 1, 250).astype(np.int64)

    def flat(n):
        return (rng.integers(4, vocab, int(n.sum()), dtype=np.int32).astype(np.uint16 if vocab <= 1 << 16 else np.int32),
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
    stream.make_epoch(1)
    out["epoch_s"] = time.perf_counter() - start
    out["boundary_s"] = boundary_wait(corpus, step_ms)
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


def boundary_wait(corpus: EncodedCorpus, step_ms: float, before: int = 80) -> float:
    """The loop's longest wait for an update from `before` updates before the end of epoch 1 to a few
    after, with prefetch and the next epoch made ahead, while a stand-in step sleeps step_ms."""
    batches = Batches(corpus, 25000, seed=1, lookahead=True)
    state = batches.state_dict()
    batches.load_state_dict({**state, "index": len(batches.make_epoch(1)[0]) - before})
    updates = UpdateStream(batches, 1, slice(0, 1), (0, 2, 3), torch.device("cpu"), ahead=2)
    longest = 0.0
    try:
        updates.next()
        while updates.epoch == 1 or updates.state_dict()["index"] < 5:
            time.sleep(step_ms / 1000)
            start = time.perf_counter()
            updates.next()
            longest = max(longest, time.perf_counter() - start)
    finally:
        updates.close()
    return longest


def write_corpus(folder: Path, pairs: int, seed: int = 0) -> tuple[Path, Path]:
    """Raw parallel text of made-up words (see the module's text), written once and kept."""
    src, tgt = folder / f"synthetic{pairs}.src", folder / f"synthetic{pairs}.tgt"
    if src.is_file() and tgt.is_file():
        return src, tgt
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))

    def vocabulary(n):
        return np.array(["".join(rng.choice(letters, int(k))) for k in rng.integers(2, 12, n)], dtype=object)

    words_src, words_tgt = vocabulary(50_000), vocabulary(50_000)
    weights = 1.0 / np.arange(1, 50_001) ** 1.1
    weights /= weights.sum()
    folder.mkdir(parents=True, exist_ok=True)
    with open(src, "w") as fs, open(tgt, "w") as ft:
        for start in range(0, pairs, 100_000):
            n = min(100_000, pairs - start)
            lengths = np.clip(rng.lognormal(3.05, 0.55, n), 1, 200).astype(np.int64)  # mean ~25 words
            ids = rng.choice(50_000, int(lengths.sum()), p=weights)
            cuts = np.cumsum(lengths)[:-1]
            for row in np.split(ids, cuts):
                fs.write(" ".join(words_src[row]) + "\n")
                if len(row) > 3 and rng.random() < 0.3:  # a word dropped or inserted now and then
                    row = np.delete(row, 1) if rng.random() < 0.5 else np.insert(row, 2, 0)
                ft.write(" ".join(words_tgt[row]) + "\n")
    return src, tgt


# Peak RSS from /proc (VmHWM): ru_maxrss survives exec, so a child would report its parent's peak.
PEAK = """
import os, threading, time
def peak_mb(pid="self"):
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024
    except (OSError, StopIteration):
        return 0.0
workers_peak = [0.0]
def watch():  # the worker processes' peaks, read while they live
    while True:
        for pid in os.listdir("/proc"):
            try:
                with open(f"/proc/{pid}/stat") as f:
                    parent = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if parent == os.getpid():
                workers_peak[0] = max(workers_peak[0], peak_mb(pid))
        time.sleep(0.2)
threading.Thread(target=watch, daemon=True).start()
"""

PREPARE = PEAK + """
import json, sys
from mtrain.config import config_from_dict
from mtrain.prepare import prepare
cfg = config_from_dict(json.loads(sys.argv[1]))
start = time.perf_counter()
prepare(cfg, sys.argv[2], log=lambda *_: None, workers=int(sys.argv[3]))
print(json.dumps({"s": time.perf_counter() - start, "rss": peak_mb(), "worker_rss": workers_peak[0]}))
"""

FIRST_UPDATE = """
import time
start = time.perf_counter()
""" + PEAK + """
import json, sys
from mtrain import train
from mtrain.config import config_from_dict
update = train.Trainer.update
def first(self, lr):
    out = update(self, lr)
    print(json.dumps({"s": time.perf_counter() - start, "rss": peak_mb()}))
    sys.stdout.flush()
    os._exit(0)  # the start-up is what is measured
train.Trainer.update = first
train.fit(config_from_dict(json.loads(sys.argv[1])), sys.argv[2], overwrite=True, log=lambda *_: None)
"""


def run_json(script: str, *args: str) -> dict:
    run = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True)
    if run.returncode != 0:
        raise SystemExit(run.stderr)
    return json.loads(run.stdout.strip().splitlines()[-1])


def spm_rate(model: Path, src: Path, tgt: Path, threads: int, n: int = 200_000) -> float:
    """SentencePiece's own pairs/s on the first `n` pairs, both sides, from memory."""
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(model))
    with open(src) as fs, open(tgt) as ft:
        sides = [line.strip() for line in itertools.islice(fs, n)], [line.strip() for line in itertools.islice(ft, n)]
    start = time.perf_counter()
    for side in sides:
        sp.encode(side, out_type=int, num_threads=threads)
    return len(sides[0]) / (time.perf_counter() - start)


def measure_prepare(pairs: int, work: Path) -> dict:
    from mtrain.config import TokenizerConfig
    from mtrain.tokenizer import train_tokenizer
    src, tgt = write_corpus(work, pairs)
    model = work / "spm32k.model"
    if not model.is_file():  # one tokenizer for every size: what is measured is the encoding
        train_tokenizer([src, tgt], TokenizerConfig(vocab_size=32000, input_sentence_size=300_000), work / "spm32k")
    valid = work / "valid.src", work / "valid.tgt"
    for path, side in zip(valid, (src, tgt)):
        with open(side) as f:
            path.write_text("".join(next(f) for _ in range(1000)))
    raw = {"data": {"train": {"src": str(src), "tgt": str(tgt)}, "valid": {"src": str(valid[0]), "tgt": str(valid[1])},
                    "max_len": 256, "cache_dir": str(work / "cache")},
           "tokenizer": {"model": str(model)},
           "model": {"d_model": 32, "heads": 2, "ffn_dim": 64, "encoder_layers": 1, "decoder_layers": 1,
                     "max_positions": 512},
           "train": {"batch_tokens": 4096, "max_steps": 5, "threads": 1, "valid_every": 1000, "save_every": 1000}}
    out = {}
    for workers in (1, 2):
        folder = work / f"prepared{pairs}_{workers}"
        subprocess.run(["rm", "-rf", str(folder)], check=True)
        spm_before = spm_rate(model, src, tgt, workers)
        got = run_json(PREPARE, json.dumps(raw), str(folder), str(workers))
        out[f"spm_{workers}"] = (spm_before + spm_rate(model, src, tgt, workers)) / 2
        out[f"prepare_{workers}"] = pairs / got["s"]
        out[f"prepare_rss_{workers}"] = got["rss"], got["worker_rss"]
    report = json.loads((folder / "train0" / "report.json").read_text())
    pieces = sum(int(np.load(folder / "train0" / f"{side}_offsets.npy")[-1]) for side in ("src", "tgt"))
    out["bytes_per_piece"] = sum((folder / "train0" / f"{side}.bin").stat().st_size for side in ("src", "tgt")) / pieces
    out["kept"] = report["kept"]
    got = run_json(FIRST_UPDATE, json.dumps({**raw, "data": {**raw["data"], "prepared": str(folder)}}),
                   str(work / f"run{pairs}"))
    out["first_update_s"], out["fit_rss"] = got["s"], got["rss"]
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, action="append", help="corpus sizes [1000000, 4500000]")
    p.add_argument("--step-ms", type=float, default=50.0, help="the stand-in training step [50: a GPU step]")
    p.add_argument("--work", type=Path, default=Path("/tmp/mtrain-bench-data"),
                   help="where the raw text, prepared data and runs go [/tmp/mtrain-bench-data]")
    p.add_argument("--skip-prepare", action="store_true", help="the loader only")
    p.add_argument("--skip-loader", action="store_true", help="preparation and fit's start-up only")
    args = p.parse_args()
    sizes = args.pairs or [1_000_000, 4_500_000]
    torch.set_num_threads(1)
    rows = [] if args.skip_loader else [measure(n, args.step_ms) for n in sizes]
    print("| pairs | collate 25k-token batches: gathered / row by row, M target tokens/s | 2,048-token batches "
          "| epoch made, s | longest wait across an epoch boundary, s | loop's wait with prefetch, share of a "
          f"{args.step_ms:.0f} ms step | peak RSS, MB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['pairs']:,} | {r['gather_25000'] / 1e6:.1f} / {r['rows_25000'] / 1e6:.1f} "
              f"| {r['gather_2048'] / 1e6:.1f} / {r['rows_2048'] / 1e6:.1f} | {r['epoch_s']:.2f} "
              f"| {r['boundary_s']:.3f} | {100 * r['wait_share']:.2f}% | {r['rss_mb']:,.0f} |")
    if args.skip_prepare:
        return
    rows = [(n, measure_prepare(n, args.work)) for n in sizes]
    print("\n| pairs | prepare, pairs/s: 1 / 2 workers | share of SentencePiece's own rate: 1 / 2 "
          "| peak RSS, MB: main, largest worker (2 workers) | bytes a piece | fit: first update after, s | fit peak RSS, MB |")
    print("|---|---|---|---|---|---|---|")
    for n, r in rows:
        print(f"| {n:,} | {r['prepare_1']:,.0f} / {r['prepare_2']:,.0f} | {r['prepare_1'] / r['spm_1']:.2f} / "
              f"{r['prepare_2'] / r['spm_2']:.2f} | {r['prepare_rss_2'][0]:,.0f}, {r['prepare_rss_2'][1]:,.0f} "
              f"| {r['bytes_per_piece']:.2f} | {r['first_update_s']:.1f} | {r['fit_rss']:,.0f} |")


if __name__ == "__main__":
    main()
