"""Does torch.compile speed up training of a config on this machine? Eager against compiled.

    python scripts/dev/probe_compile.py configs/multi30k_en_de.yaml eager 60
    python scripts/dev/probe_compile.py configs/multi30k_en_de.yaml default 100   # or: dynamic
    [--set train.batch_tokens=4096 ...]

Trains STEPS updates on real batches (fp32, AdamW, label smoothing 0.1) and prints the seconds the
first 20 took (compilation happens there) and the target tokens/s of the rest. Batches vary in
shape, so `default` recompiles on new shapes until torch marks them dynamic, and `dynamic` traces
symbolic shapes from the start. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from mtrain.config import load_config  # noqa: E402
from mtrain.data import Batches, load_corpus  # noqa: E402
from mtrain.model import Transformer  # noqa: E402
from mtrain.tokenizer import BOS, EOS, PAD, get_tokenizers  # noqa: E402
from mtrain.train import batch_loss, optimizer_update  # noqa: E402

FIRST = 20  # updates counted as warm-up (and compilation)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("config")
    ap.add_argument("mode", choices=["eager", "default", "dynamic"])
    ap.add_argument("steps", type=int)
    ap.add_argument("--set", nargs="*", default=[], help="config overrides, as mtrain fit --set takes them")
    args = ap.parse_args()
    cfg = load_config(args.config, args.set)
    run = ROOT / "runs" / "bench"
    run.mkdir(parents=True, exist_ok=True)
    toks = get_tokenizers(cfg, run, log=lambda *_: None)
    corpus = load_corpus(cfg.data.train[0], toks, cfg.data, log=lambda *_: None)
    stream = Batches(corpus, cfg.train.batch_tokens, 1)
    torch.manual_seed(0)
    V = toks.tgt.vocab_size
    model = Transformer(cfg.model, toks.src.vocab_size, V, PAD)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.98))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    forward = model if args.mode == "eager" else torch.compile(model, dynamic=True if args.mode == "dynamic" else None)
    start, tokens = time.perf_counter(), 0
    for i in range(args.steps):
        if i == FIRST:
            print(f"first {FIRST} updates: {time.perf_counter() - start:.1f} s", flush=True)
            start, tokens = time.perf_counter(), 0
        batch = stream.next().collate(PAD, BOS, EOS)
        tokens += batch.n_tgt_tokens
        (batch_loss(forward, batch, 0.1) / batch.n_tgt_tokens).backward()
        optimizer_update(opt, model.parameters(), scaler, cfg.train.clip_norm)
    print(f"{args.mode}: {tokens / (time.perf_counter() - start):,.0f} target tokens/s after the first {FIRST} updates")


if __name__ == "__main__":
    main()
