"""Peak memory of the training loss and of decoding, on this CPU, and print a table.

    python scripts/bench_memory.py                       # the loss on 8,192 x 32,000 bf16 logits
    python scripts/bench_memory.py --rows 2048 --vocab 8000 --dtype fp32
    python scripts/bench_memory.py --code /path/to/another/checkout   # the same figures for other code

Each figure comes from a fresh Python process: the peak resident memory (ru_maxrss) it reaches in
the loss's forward and backward pass over logits it made first, less the peak before, in MB and as a
multiple of the logits' bytes. The gradient of the logits is 1x of that; what the loss adds beyond
it is its own working memory. GPU memory follows the same tensors (on a GPU every byte of it is
taken from the activations' room at the step's peak).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

PROBE = """
import json, resource, torch
from mtrain.loss import label_smoothed_loss
torch.manual_seed(0)
rows, vocab, dtype = {rows}, {vocab}, getattr(torch, {dtype!r})
logits = torch.empty(rows, vocab, dtype=dtype).normal_().requires_grad_()  # in place: no fp32 copy
target = torch.randint(0, vocab, (rows,))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
loss = label_smoothed_loss(logits, target, 0.1)
loss.backward()
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{"added_mb": (after - before) / 1024, "logits_mb": logits.numel() * logits.element_size() / 2**20}}))
"""


def probe(code: Path, rows: int, vocab: int, dtype: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE.format(rows=rows, vocab=vocab, dtype=dtype)], cwd=code,
                         env={**os.environ, "PYTHONPATH": str(code)}, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=8192, help="target tokens (logits rows) [8192]")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--dtype", default="bfloat16", help="the logits' dtype: bfloat16, float16 or float32")
    p.add_argument("--code", type=Path, action="append", help="a checkout to measure (repeatable) [this one]")
    args = p.parse_args()
    print(f"\nlabel-smoothed loss, forward + backward, on {args.rows:,} x {args.vocab:,} {args.dtype} logits\n")
    print("| code | logits MB | peak added MB | × the logits |")
    print("|---|---|---|---|")
    for code in args.code or [ROOT]:
        r = probe(code.resolve(), args.rows, args.vocab, args.dtype)
        print(f"| {code} | {r['logits_mb']:.0f} | {r['added_mb']:.0f} | {r['added_mb'] / r['logits_mb']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
