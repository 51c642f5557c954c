"""Lexically constrained decoding measured as Post & Vilar (2018) do: for each test line, 1 and then 2
words of the reference that the unconstrained output misses (chosen with a fixed seed) become
constraints; constrained beam search against unconstrained: share of constraints met, BLEU, and
decoding time (the fastest of --rounds runs of each, taken in turn). Prints a Markdown table.

    python scripts/bench_terminology.py -c runs/multi30k_en_de/final.pt \
        -i data/multi30k/test_2016_flickr.en.gz -r data/multi30k/test_2016_flickr.de.gz [--beam 5]
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mtrain.checkpoint import load_for_inference  # noqa: E402
from mtrain.corpus import open_text  # noqa: E402
from mtrain.device import pick_device  # noqa: E402
from mtrain.guide import Wish, holds  # noqa: E402
from mtrain.score import score  # noqa: E402
from mtrain.translate import translate_texts  # noqa: E402


def missed_words(reference: str, output: str, n: int, rng: random.Random) -> tuple[str, ...]:
    """Up to n words of the reference (letters in them, not already in the output), in the order
    they have in the reference."""
    have = set(output.split())
    words = [w for w in dict.fromkeys(reference.split()) if w not in have and any(c.isalpha() for c in w)]
    picked = set(rng.sample(words, min(n, len(words))))
    return tuple(w for w in words if w in picked)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-c", "--checkpoint", required=True)
    p.add_argument("-i", "--input", required=True)
    p.add_argument("-r", "--ref", required=True)
    p.add_argument("--beam", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3, help="time each setting this many times, in turn; the fastest counts "
                                                        "(a shared machine's speed drifts)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    lines = [x.strip() for x in open_text(args.input)]
    refs = list(open_text(args.ref))
    model, toks, cfg = load_for_inference([args.checkpoint])
    decode = dataclasses.replace(cfg.decode, beam=args.beam)
    dev = pick_device("cpu", "fp32")

    def run(wishes):
        start = time.perf_counter()
        results = translate_texts(lines, model, toks, decode, dev, wishes=wishes)
        return results, time.perf_counter() - start

    plain, _ = run(None)
    plain_text = [r.texts[0] if r.texts else "" for r in plain]
    plain_bleu = score(plain_text, [refs], ["bleu"], False, "13a")[0].value
    asked = {0: None}
    for n in (1, 2):
        rng = random.Random(args.seed)
        asked[n] = [missed_words(ref, out, n, rng) for ref, out in zip(refs, plain_text)]
    fastest = {n: float("inf") for n in asked}
    outputs = {}
    for _ in range(args.rounds):
        for n, wanted in asked.items():
            outputs[n], seconds = run(None if wanted is None else [Wish(w) for w in wanted])
            fastest[n] = min(fastest[n], seconds)
    plain_s = fastest[0]
    rows = [("unconstrained", 0, "", plain_bleu, plain_s)]
    for n in (1, 2):
        wanted, results, seconds = asked[n], outputs[n], fastest[n]
        texts = [r.texts[0] if r.texts else "" for r in results]
        total = sum(map(len, wanted))
        met = sum(holds(r.hyps[0].tokens, tuple(toks.tgt.sp.encode(w))) for r, ws in zip(results, wanted) for w in ws
                  if r.hyps)
        bleu = score(texts, [refs], ["bleu"], False, "13a")[0].value
        rows.append((f"{n} constraint{'s' * (n > 1)} a line", total, f"{met:,} of {total:,} ({100 * met / total:.1f}%)",
                     bleu, seconds))
    print(f"| beam {args.beam} | constraints | met | BLEU | decode s | time against unconstrained |")
    print("|---|---|---|---|---|---|")
    for name, total, met, bleu, seconds in rows:
        print(f"| {name} | {total:,} | {met} | {bleu:.2f} | {seconds:.1f} | {seconds / plain_s:.2f}× |")


if __name__ == "__main__":
    main()
