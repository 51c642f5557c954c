"""Time the training output layer + loss (`mtrain.loss.output_loss`, forward + backward) at several
chunk sizes, alternated so that a shared machine's drift hits every size alike, and print a table.

    python scripts/dev/bench_output_loss.py                      # the Multi30k recipe's shape
    python scripts/dev/bench_output_loss.py --vocab 8000 --chunks-kb 3072,12288 --rounds 10
    python scripts/dev/bench_output_loss.py --precision bf16     # under bf16 autocast, as training on a bf16 CPU

`CHUNK_BYTES` in mtrain/loss.py was chosen on a Xeon (2 MB L2); run this on each kind of CPU before
changing it. The row "whole" is the output layer then the loss on the full (tokens x vocab) logits.
Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import mtrain.loss as loss_module
from mtrain.loss import chunk_rows, label_smoothed_loss, output_loss


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=1900, help="real target tokens per update [1900: 2,048-token batches]")
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=6000)
    ap.add_argument("--chunks-kb", default="768,1536,3072,6144,12288,24576", help="comma-separated chunk sizes in KiB")
    ap.add_argument("--rounds", type=int, default=5, help="alternations over all sizes")
    ap.add_argument("--iters", type=int, default=10, help="timed forward + backward passes per size and round")
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                    help="fp32, or the matmuls under bf16 autocast as `precision: bf16` trains on a CPU")
    ap.add_argument("--threads", type=int, default=0, help="torch threads [0: as torch chooses]")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    hidden = torch.randn(args.tokens, args.d_model, requires_grad=True)
    weight = (torch.randn(args.vocab, args.d_model) * args.d_model ** -0.5).requires_grad_()
    target = torch.randint(0, args.vocab, (args.tokens,))

    def whole(h, w, t):
        return label_smoothed_loss(h @ w.t(), t, 0.1)

    def chunked(h, w, t):
        return output_loss(h, w, t, 0.1)

    def one_pass(fn) -> float:
        # autocast reaches the matmuls inside output_loss as it does in training; the loss stays fp32
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            value = fn(hidden, weight, target)
        value.backward()
        hidden.grad = weight.grad = None
        return float(value.detach())

    shipped = loss_module.CHUNK_BYTES
    variants = [(f"{kb} KiB", kb << 10, chunked) for kb in map(int, args.chunks_kb.split(","))]
    variants.append(("whole", shipped, whole))  # the chunk size does not matter to it
    times: dict[str, list[float]] = {name: [] for name, _, _ in variants}
    values: dict[str, float] = {}
    rows: dict[str, int] = {}
    for _ in range(args.rounds):
        for name, chunk_bytes, fn in variants:
            loss_module.CHUNK_BYTES = chunk_bytes
            rows[name] = min(chunk_rows(args.vocab), args.tokens) if fn is chunked else args.tokens
            values[name] = one_pass(fn)  # warm-up: allocations of this size
            start = time.perf_counter()
            for _ in range(args.iters):
                one_pass(fn)
            times[name].append((time.perf_counter() - start) / args.iters * 1000)
    loss_module.CHUNK_BYTES = shipped

    ref = values["whole"]
    print(f"output layer + label-smoothed loss, forward + backward: {args.tokens} tokens, d_model {args.d_model}, "
          f"vocabulary {args.vocab}, {args.precision}, {torch.get_num_threads()} threads, {args.rounds} rounds x {args.iters}")
    print(f"shipped CHUNK_BYTES: {shipped >> 10} KiB\n")
    print("| chunk | rows | ms: median | ms: min - max | loss vs whole (relative) |")
    print("|---|---|---|---|---|")
    for name, _, _ in variants:
        t = times[name]
        print(f"| {name} | {rows[name]} | {statistics.median(t):.1f} | {min(t):.1f} - {max(t):.1f} | "
              f"{abs(values[name] - ref) / abs(ref):.1e} |")


if __name__ == "__main__":
    main()
