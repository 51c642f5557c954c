"""Where beam search spends its time: translate a file and split the wall time into parts.

    python scripts/dev/profile_decode.py --checkpoint runs/multi30k_en_de/final.pt \
        [--input data/multi30k/test_2016_flickr.en.gz] [--beam 5]

Parts are timed by wrapping the functions that do them (the wrappers cost a few microseconds per call):
the encoder, the decoder layers of each step, the output projection and log-softmax, the cache
reorders and shrinks, and everything else in `beam_search` (candidate selection, finished
hypotheses, Python bookkeeping and the host syncs it implies).
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--input", default=str(ROOT / "data/multi30k/test_2016_flickr.en.gz"))
    p.add_argument("--beam", type=int, default=5)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--batch-tokens", type=int, default=0, help="source pieces per batch (default: the checkpoint's)")
    p.add_argument("--in-flight", type=int, default=0,
                   help="instead of sorted batches, keep this many sentences in one running search, "
                        "each joining as another leaves (as `mtrain serve` with as many one-line clients)")
    p.add_argument("--sentences", type=int, default=0,
                   help="translate the lines sorted by length, this many at a time (the file's batching at "
                        "the batch size of as many one-line clients)")
    p.add_argument("--tag", default=None, help="a tag put before every source line, as translate --tag")
    args = p.parse_args()

    import torch

    from mtrain import model as model_module
    from mtrain.checkpoint import load_for_inference
    from mtrain.corpus import open_text
    from mtrain.device import pick_device
    from mtrain.translate import decode_ids, read_sources, tag_piece, translate_lines, with_overrides

    model, toks, cfg = load_for_inference([args.checkpoint])
    dev = pick_device("cpu", "fp32", args.threads)
    lines = list(open_text(args.input))
    spent = defaultdict(float)
    calls = defaultdict(int)

    def timed(name, fn):
        def wrapper(*a, **k):
            start = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[name] += time.perf_counter() - start
                calls[name] += 1
        return wrapper

    model.encode = timed("encoder", model.encode)
    model.output.forward = timed("output projection", model.output.forward)
    for layer in model.decoder:
        layer.step = timed("decoder layers (attention, FFN, cache writes)", layer.step)
    model_module.KVCache.reorder = timed("cache reorder (beam)", model_module.KVCache.reorder)
    model_module.KVCache.keep = timed("cache shrink (finished sentences)", model_module.KVCache.keep)
    real_log_softmax = torch.Tensor.log_softmax
    torch.Tensor.log_softmax = timed("log-softmax over the vocabulary", real_log_softmax)
    decode_step = model.decode_step
    model.decode_step = timed("decode_step (all of one step's model work)", decode_step)

    tag = tag_piece(args.tag, toks, list(cfg.data.tags), option="--tag") if args.tag else None
    decode = with_overrides(cfg.decode, beam=args.beam, batch_tokens=args.batch_tokens or cfg.decode.batch_tokens)
    start = time.perf_counter()
    if args.in_flight:
        in_flight(lines, model, toks, decode, args.in_flight, tag)
    elif args.sentences:
        ids = read_sources(lines, toks, model.cfg.max_positions, tag=tag).ids
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        for at in range(0, len(order), args.sentences):
            decode_ids(model, [ids[i] for i in order[at:at + args.sentences]], decode, toks, dev)
    else:
        list(translate_lines(lines, model, toks, decode, dev, tag=tag))
    total = time.perf_counter() - start
    torch.Tensor.log_softmax = real_log_softmax

    step = spent.pop("decode_step (all of one step's model work)")
    parts = {name: spent[name] for name in ("encoder", "decoder layers (attention, FFN, cache writes)",
                                            "output projection", "log-softmax over the vocabulary",
                                            "cache reorder (beam)", "cache shrink (finished sentences)")}
    parts["rest of decode_step (embedding, final LayerNorm)"] = (
        step - parts["decoder layers (attention, FFN, cache writes)"] - parts["output projection"])
    parts["search bookkeeping (top-k, finished hypotheses, host syncs, Python)"] = (
        total - step - parts["encoder"] - parts["log-softmax over the vocabulary"] - parts["cache reorder (beam)"]
        - parts["cache shrink (finished sentences)"])
    print(f"{len(lines)} sentences, beam {args.beam}, {torch.get_num_threads()} threads: {total:.2f} s, "
          f"{len(lines) / total:.1f} sentences/s, {calls['output projection']} decoder steps")
    width = max(map(len, parts))
    print(f"| {'part':<{width}} | seconds | share |\n|{'-' * (width + 2)}|---|---|")
    for name, seconds in sorted(parts.items(), key=lambda kv: -kv[1]):
        print(f"| {name:<{width}} | {seconds:.2f} | {100 * seconds / total:.0f}% |")


def in_flight(lines, model, toks, decode, n: int, tag: int | None) -> None:
    """Translate `lines` in one running BeamSearch holding n sentences: they join as others leave."""
    import torch

    from mtrain.search import BeamSearch
    from mtrain.translate import beam_options, read_sources, source_batch

    ids = read_sources(lines, toks, model.cfg.max_positions, tag=tag).ids
    search, todo, done = BeamSearch(model, **beam_options(decode, toks)), iter(ids), 0
    with torch.inference_mode():
        while done < len(ids):
            joining = list(itertools.islice(todo, n - len(search)))
            if joining:  # those that join at one step start together, as in the server
                src = source_batch(joining, toks, torch.device("cpu"))
                search.add(src, src == toks.src.pad)
            done += len(search.step())


if __name__ == "__main__":
    main()
