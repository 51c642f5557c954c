"""Benchmark mtrain on this machine and print a table: training, decoding and data pipeline speed.

    python scripts/bench.py --config configs/multi30k_en_de.yaml --precision bf16 \
        --checkpoint runs/multi30k_en_de/final.pt [--skip-data]
    python scripts/bench.py --config configs/transformer_base.yaml --synthetic-vocab 32000 \
        --set train.batch_tokens=25000 --precision bf16 --skip-data      # GPU: transformer-base

Each part runs in its own process so that its peak RSS is its own. Needs data/multi30k
(scripts/get_multi30k.sh) unless --synthetic-vocab makes random batches (lengths 10-60, the
model's shape and batch_tokens from the config) or --wmt-like stores a corpus of WMT-like lengths.
--loader premade against stream measures what the loader costs a step. Run it on an otherwise idle
machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# Dense (no sparsity) tensor-core peaks in TFLOP/s from the vendors' data sheets, bf16 and fp16 alike;
# the SXM parts (PCIe H100: 756). MFU on a GPU is relative to these; elsewhere to a measured matmul.
GPU_DENSE_PEAK_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.1, "L4": 121.0,
                         "A10G": 70.0, "V100": 125.0, "T4": 65.0}


def dense_peak_gflops(device, dtype) -> tuple[float, str]:
    """The peak MFU is relative to, and where it comes from."""
    import torch
    if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16):
        name = torch.cuda.get_device_name(device)
        for key, tflops in GPU_DENSE_PEAK_TFLOPS.items():
            if key in name:
                return tflops * 1000, f"{name} data sheet"
    n = 8192 if device.type == "cuda" else 2048
    return matmul_peak(device, dtype, n), f"measured {n}^3 matmul"


def matmul_peak(device, dtype, n=2048, reps=10) -> float:
    """Measured GFLOP/s of an n x n x n matmul: the 'peak' that MFU is relative to."""
    import torch
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - start) / 1e9


def sync(device):
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize()


class SyntheticCorpus:
    """Random token ids with a spread of lengths, shaped like an EncodedCorpus for Batches."""

    def __init__(self, vocab: int, pairs: int = 200_000, seed: int = 0):
        import numpy as np
        rng = np.random.default_rng(seed)
        src_n = rng.integers(10, 60, pairs)
        tgt_n = np.clip((src_n * rng.uniform(0.8, 1.25, pairs)).astype(np.int64), 5, 70)
        self.src_offsets = np.concatenate([[0], np.cumsum(src_n)])
        self.tgt_offsets = np.concatenate([[0], np.cumsum(tgt_n)])
        self.src = rng.integers(4, vocab, int(src_n.sum())).astype(np.int32)
        self.tgt = rng.integers(4, vocab, int(tgt_n.sum())).astype(np.int32)
        self.src_lengths, self.tgt_lengths = src_n + 1, tgt_n + 1

    def __len__(self):
        return len(self.src_offsets) - 1

    def pair(self, i):
        return (self.src[self.src_offsets[i]:self.src_offsets[i + 1]],
                self.tgt[self.tgt_offsets[i]:self.tgt_offsets[i + 1]])


def wmt_like(pairs: int, vocab: int):
    """A corpus with WMT-like lengths (scripts/bench_data.py's), stored as `mtrain prepare` stores one
    (uint16 ids, offsets) and memory-mapped: what the loader reads in a real run."""
    import numpy as np
    from bench_data import synthetic

    from mtrain.data import open_encoded
    folder = ROOT / "runs" / "bench" / f"wmt_like_{pairs}_{vocab}"
    if not (folder / "report.json").is_file():
        corpus = synthetic(pairs, vocab=vocab)
        folder.mkdir(parents=True, exist_ok=True)
        for side in ("src", "tgt"):
            (folder / f"{side}.bin").write_bytes(getattr(corpus, side).tobytes())
            np.save(folder / f"{side}_offsets.npy", getattr(corpus, f"{side}_offsets"))
        (folder / "report.json").write_text(json.dumps({"dtype": corpus.src.dtype.name, "summary": f"{pairs} pairs"}))
    return open_encoded(folder)


def config_tokenizers(cfg):
    """The config's tokenizer (trained from its training data when the model file is missing)."""
    from mtrain.tokenizer import get_tokenizers
    run = ROOT / "runs" / "bench"
    run.mkdir(parents=True, exist_ok=True)
    return get_tokenizers(cfg, run, log=lambda *_: None)


def part_train(args) -> dict:
    """Steady-state training throughput on real batches of the config's corpus (no validation)."""
    import torch

    from mtrain.config import load_config
    from mtrain.data import Batches, Corpora, UpdateStream, load_corpus
    from mtrain.device import pick_device
    from mtrain.model import Transformer
    from mtrain.tokenizer import BOS, EOS, PAD
    from mtrain.train import batch_loss, optimizer_update

    cfg = load_config(args.config, args.set)
    dev = pick_device(args.device, args.precision, cfg.train.threads)
    if args.wmt_like:
        vocab = args.synthetic_vocab or 32000
        corpus = wmt_like(args.wmt_like, vocab)
    elif args.synthetic_vocab:
        corpus, vocab = SyntheticCorpus(args.synthetic_vocab), args.synthetic_vocab
    else:
        toks = config_tokenizers(cfg)
        parts = [load_corpus(source, toks, cfg.data, log=lambda *_: None) for source in cfg.data.train]
        corpus = Corpora(parts, [s.weight for s in cfg.data.train], [s.label for s in cfg.data.train])
        vocab = toks.tgt.vocab_size
    stream = Batches(corpus, cfg.train.batch_tokens, cfg.train.seed, lookahead=args.loader == "stream")
    torch.manual_seed(0)
    model = Transformer(cfg.model, vocab, vocab, PAD).to(dev.device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.98), fused=True)  # as mtrain fit
    specials = (PAD, BOS, EOS)
    updates = None
    if args.loader == "premade":  # batches collated and on the device before the clock starts: no loader cost
        premade = [stream.next().collate(*specials).to(dev.device) for _ in range(20)]
        next_batch = lambda i: premade[i % len(premade)]
    elif args.loader == "stream":  # as fit: collated ahead by a thread (train.prefetch: 2)
        updates = UpdateStream(stream, 1, slice(0, 1), specials, dev.device, ahead=2)
        next_batch = lambda i: updates.next().batches[0]
    else:  # collated in the loop, then copied
        next_batch = lambda i: stream.next().collate(*specials).to(dev.device)
    tokens = 0
    src_tokens = torch.zeros((), dtype=torch.long, device=dev.device)  # counted on the device: no sync a step
    for i in range(args.warmup_steps + args.steps):
        if i == args.warmup_steps:
            sync(dev.device)
            start, tokens = time.perf_counter(), 0
            src_tokens.zero_()
        batch = next_batch(i)
        tokens += batch.n_tgt_tokens
        src_tokens += (~batch.src_pad_mask).sum()
        with dev.autocast():
            loss = batch_loss(model, batch, 0.1) / batch.n_tgt_tokens
        dev.scaler.scale(loss).backward()
        optimizer_update(opt, model.parameters(), dev.scaler, cfg.train.clip_norm)
    if updates is not None:
        updates.close()
    src_tokens = int(src_tokens)
    sync(dev.device)
    seconds = time.perf_counter() - start
    tok_s = tokens / seconds
    lengths = corpus.tgt_lengths.mean(), corpus.src_lengths.mean()
    flops = model.flops_per_token(src_len=float(lengths[1]), tgt_len=float(lengths[0]))
    flops *= src_tokens / tokens / (lengths[1] / lengths[0])  # the batches' own source/target ratio
    peak, peak_source = dense_peak_gflops(dev.device, dev.amp_dtype or torch.float32)
    gpu_mb = torch.cuda.max_memory_allocated(dev.device) / 2 ** 20 if dev.device.type == "cuda" else 0.0
    from mtrain.device import cpu_has_bf16
    name = (torch.cuda.get_device_name(dev.device) if dev.device.type == "cuda"
            else "native bf16" if cpu_has_bf16() else "no native bf16")
    return {"device": f"{dev.device} ({name})", "precision": dev.precision, "threads": torch.get_num_threads(),
            "params": model.num_parameters(), "train_tok_s": tok_s, "flops_per_tok": flops,
            "achieved_gflops": tok_s * flops / 1e9, "peak_gflops": peak, "peak_source": peak_source,
            "mfu": tok_s * flops / 1e9 / peak, "train_rss_mb": peak_rss_mb(), "gpu_peak_mb": gpu_mb,
            "batch_tokens": cfg.train.batch_tokens, "loader": args.loader}


def part_decode(args) -> dict:
    """Sentences/s and target tokens/s translating Multi30k's val.en with beam 1 and beam 5, and
    BLEU; with --ctranslate2, the same with CTranslate2 (fp32 and int8) on the same weights and threads."""
    import torch

    from mtrain.checkpoint import load_for_inference
    from mtrain.corpus import open_text
    from mtrain.device import pick_device
    from mtrain.score import bleu
    from mtrain.translate import translate_lines, with_overrides

    model, toks, cfg = load_for_inference([args.checkpoint])
    dev = pick_device(args.device, args.decode_precision, cfg.train.threads)
    model.to(dev.device)
    # The validation set, never the test set: a benchmark is rerun at will, and each test read counts.
    lines = list(open_text(ROOT / "data/multi30k/val.en.gz"))
    refs = list(open_text(ROOT / "data/multi30k/val.de.gz"))
    out = {}
    for beam in (1, 5):
        decode = with_overrides(cfg.decode, beam=beam, lenpen=args.lenpen)
        start = time.perf_counter()
        hyps = list(translate_lines(lines, model, toks, decode, dev))
        seconds = time.perf_counter() - start
        pieces = sum(len(x) + 1 for x in toks.tgt.encode_batch(hyps))
        out[f"beam{beam}_sent_s"] = len(lines) / seconds
        out[f"beam{beam}_tok_s"] = pieces / seconds
        out[f"beam{beam}_bleu"] = bleu(hyps, refs)
    if args.ctranslate2:
        import ctranslate2

        from mtrain.export import ctranslate2_options
        decode = with_overrides(cfg.decode, beam=5, lenpen=args.lenpen)
        sources = [toks.src.sp.encode(line, out_type=str) for line in lines]
        options = ctranslate2_options(decode, max(len(s) for s in sources), model.cfg.max_positions)  # one length limit for all
        options.pop("return_scores")
        for compute_type in ("float32", "int8"):
            translator = ctranslate2.Translator(args.ctranslate2, device="cpu", compute_type=compute_type,
                                                inter_threads=1, intra_threads=torch.get_num_threads())
            start = time.perf_counter()
            results = translator.translate_batch(sources, max_batch_size=decode.batch_tokens // decode.beam,
                                                 batch_type="tokens", **options)
            seconds = time.perf_counter() - start
            hyps = [toks.tgt.sp.decode(r.hypotheses[0]) for r in results]
            out[f"ct2_{compute_type}_sent_s"] = len(lines) / seconds
            out[f"ct2_{compute_type}_bleu"] = bleu(hyps, refs)
    out["decode_rss_mb"] = peak_rss_mb()
    return out


def part_data(args) -> dict:
    """Encoding and batching a ~3M-pair corpus made by repeating Multi30k; a second load maps the cache."""
    from mtrain.config import DataConfig, DataSource, load_config
    from mtrain.data import Batches, load_corpus

    folder = ROOT / "data" / "bench"
    folder.mkdir(parents=True, exist_ok=True)
    src, tgt = folder / f"big{args.repeat}.en", folder / f"big{args.repeat}.de"  # one pair of files per --repeat
    if not (src.exists() and tgt.exists()):
        from mtrain.corpus import open_text
        en = list(open_text(ROOT / "data/multi30k/train.en.gz"))
        de = list(open_text(ROOT / "data/multi30k/train.de.gz"))
        src.write_text("\n".join(en * args.repeat) + "\n")
        tgt.write_text("\n".join(de * args.repeat) + "\n")
    toks = config_tokenizers(load_config(args.config, args.set))
    cfg = DataConfig(cache_dir=str(folder / "cache"))
    source = DataSource(src=str(src), tgt=str(tgt))
    import shutil
    shutil.rmtree(folder / "cache", ignore_errors=True)
    start = time.perf_counter()
    corpus = load_corpus(source, toks, cfg, log=lambda *_: None)
    encode_s = time.perf_counter() - start
    start = time.perf_counter()
    corpus = load_corpus(source, toks, cfg, log=lambda *_: None)
    stream = Batches(corpus, 4096, 1)
    first = stream.next().indices
    ready_s = time.perf_counter() - start
    return {"pairs": len(corpus), "encode_pairs_s": len(corpus) / encode_s, "encode_s": encode_s,
            "warm_start_s": ready_s, "batches_per_epoch": len(stream.epoch_batches()), "first_batch": len(first),
            "data_rss_mb": peak_rss_mb()}


def run_part(name: str, argv: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, "--part", name, *argv], capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"bench part {name} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/multi30k_en_de.yaml")
    p.add_argument("--set", action="append", default=[], help="config override, as for mtrain fit")
    p.add_argument("--precision", default="auto", help="training precision: auto picks the fast path here")
    p.add_argument("--decode-precision", default="fp32")
    p.add_argument("--lenpen", type=float, help="length penalty for the decoding part [the checkpoint's]")
    p.add_argument("--device", default="auto")
    p.add_argument("--checkpoint", help="trained checkpoint for the decoding part (skipped without)")
    p.add_argument("--ctranslate2", help="the checkpoint exported by `mtrain export --ctranslate2 DIR`: adds "
                                         "CTranslate2 rows to the decoding part")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup-steps", type=int, default=5)
    p.add_argument("--repeat", type=int, default=100, help="copies of Multi30k in the data part (100 = 2.9M pairs)")
    p.add_argument("--skip-data", action="store_true")
    p.add_argument("--synthetic-vocab", type=int, default=0,
                   help="train on random batches with this vocabulary instead of the config's corpus")
    p.add_argument("--wmt-like", type=int, default=0, metavar="PAIRS",
                   help="train on a stored corpus of PAIRS pairs with WMT-like lengths and random ids "
                        "(--synthetic-vocab, default 32000) instead of the config's corpus")
    p.add_argument("--loader", choices=["stream", "inline", "premade"], default="stream",
                   help="stream: batches collated ahead by a thread, as fit does; inline: collated in the loop; "
                        "premade: 20 batches collated before the clock starts (no loader cost)")
    p.add_argument("--json", action="store_true", help="print the train part's figures as one JSON line")
    p.add_argument("--part", help=argparse.SUPPRESS)
    args = p.parse_args()
    os.chdir(ROOT)
    if args.part:
        print(json.dumps({"train": part_train, "decode": part_decode, "data": part_data}[args.part](args)))
        return
    argv = sys.argv[1:]
    import torch
    rows = [("torch", torch.__version__), ("python", platform.python_version()), ("cpu cores", os.cpu_count())]
    r = run_part("train", argv)
    if args.json:
        print(json.dumps(r))
        return
    rows += [("device", r["device"]), ("threads", r["threads"]), ("precision (train)", r["precision"]),
             ("config", args.config + (" " + " ".join(args.set) if args.set else "")
              + (f" (random batches, vocabulary {args.synthetic_vocab})" if args.synthetic_vocab else "")),
             ("loader", r["loader"]),
             ("parameters", f"{r['params']:,}"),
             ("train target tokens/s", f"{r['train_tok_s']:,.0f}"),
             ("model FLOPs per target token", f"{r['flops_per_tok'] / 1e6:.1f} M"),
             ("achieved GFLOP/s", f"{r['achieved_gflops']:.1f}"),
             (f"peak GFLOP/s ({r['precision']}, {r['peak_source']})", f"{r['peak_gflops']:.1f}"),
             ("MFU", f"{100 * r['mfu']:.1f}%"), ("train peak RSS", f"{r['train_rss_mb']:,.0f} MB")]
    if r["gpu_peak_mb"]:
        rows.append(("train peak GPU memory", f"{r['gpu_peak_mb']:,.0f} MB"))
    if args.checkpoint:
        r = run_part("decode", argv)
        rows += [("precision (decode)", args.decode_precision),
                 ("decode beam 1: sentences/s, BLEU", f"{r['beam1_sent_s']:.1f}, {r['beam1_bleu']:.2f}"),
                 ("decode beam 1: target tokens/s", f"{r['beam1_tok_s']:,.0f}"),
                 ("decode beam 5: sentences/s, BLEU", f"{r['beam5_sent_s']:.1f}, {r['beam5_bleu']:.2f}"),
                 ("decode beam 5: target tokens/s", f"{r['beam5_tok_s']:,.0f}"),
                 ("decode peak RSS", f"{r['decode_rss_mb']:,.0f} MB")]
        if args.ctranslate2:
            rows += [(f"CTranslate2 {kind} beam 5: sentences/s, BLEU",
                      f"{r[f'ct2_{kind}_sent_s']:.1f}, {r[f'ct2_{kind}_bleu']:.2f}") for kind in ("float32", "int8")]
            rows.append(("mtrain beam 5 / CTranslate2 float32 speed", f"{r['beam5_sent_s'] / r['ct2_float32_sent_s']:.2f}"))
    if not args.skip_data:
        r = run_part("data", argv)
        rows += [("data: pairs (Multi30k repeated)", f"{r['pairs']:,}"),
                 ("data: encode + cache, pairs/s", f"{r['encode_pairs_s']:,.0f}"),
                 ("data: warm cache to first batch", f"{r['warm_start_s']:.1f} s"),
                 ("data: peak RSS", f"{r['data_rss_mb']:,.0f} MB")]
    width = max(len(k) for k, _ in rows)
    print(f"| {'measure':<{width}} | value |\n|{'-' * (width + 2)}|-------|")
    for k, v in rows:
        print(f"| {k:<{width}} | {v} |")


if __name__ == "__main__":
    main()
