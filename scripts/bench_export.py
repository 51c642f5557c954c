"""mtrain against its exports on the same lines: Hugging Face Transformers (`generate`) and CTranslate2,
greedy and beam search: lines identical to `mtrain translate`'s, BLEU of each, sentences/s with the
same threads. Prints a Markdown table.

    python scripts/bench_export.py -c runs/multi30k_en_de/final.pt \
        -i data/multi30k/test_2016_flickr.en.gz -r data/multi30k/test_2016_flickr.de.gz [--threads 2]

The outputs compared come from batches of up to --batch sentences of one source length, so that an
export's one output bound per batch is mtrain's bound for each sentence (a * source length + b,
the EOS included); the speeds from a second pass in batches of --batch sentences sorted by length
(bound: the batch's longest). mtrain batches as `mtrain translate` does. Rows: beam 1; beam 5 with the
checkpoint's length penalty (mtrain's GNMT penalty, which generate cannot express: it runs with its
generation_config.json); beam 5 with the penalty both define the same way (lenpen_type plain, alpha 1).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mtrain.checkpoint import load_for_inference  # noqa: E402
from mtrain.corpus import open_text  # noqa: E402
from mtrain.device import pick_device  # noqa: E402
from mtrain.score import score  # noqa: E402
from mtrain.search import output_limits  # noqa: E402
from mtrain.translate import translate_texts  # noqa: E402


def bleu(hyps: list[str], refs: list[str]) -> float:
    return score(hyps, [refs], ["bleu"], False, "13a")[0].value


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def by_length(lines: list[str], batch: int, length, same: bool) -> list[list[int]]:
    """Batches of at most `batch` sentences sorted by length; with `same`, of one source length each:
    generate and CTranslate2 take one output bound per batch, which is then mtrain's bound for each
    of its sentences."""
    out: list[list[int]] = []
    for i in sorted(range(len(lines)), key=length):
        if out and len(out[-1]) < batch and (not same or length(out[-1][0]) == length(i)):
            out[-1].append(i)
        else:
            out.append([i])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-c", "--checkpoint", required=True)
    p.add_argument("-i", "--input", required=True)
    p.add_argument("-r", "--ref", required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=32, help="sentences per batch for generate and CTranslate2")
    p.add_argument("--lines", type=int, default=0, help="the first N lines only (0: all)")
    p.add_argument("--show", action="store_true", help="print the lines where Transformers' output differs (stderr)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    import ctranslate2
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from mtrain.export import ctranslate2_options, export_ctranslate2
    from mtrain.export_hf import export_hf

    lines = [x.strip() for x in open_text(args.input)]
    refs = list(open_text(args.ref))
    if args.lines:
        lines, refs = lines[:args.lines], refs[:args.lines]
    model, toks, cfg = load_for_inference([args.checkpoint])
    dev = pick_device("cpu", "fp32")
    tmp = Path(tempfile.mkdtemp(prefix="bench_export"))
    export_hf(Path(args.checkpoint), tmp / "hf")
    export_ctranslate2(Path(args.checkpoint), tmp / "ct2")
    hf = AutoModelForSeq2SeqLM.from_pretrained(tmp / "hf").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp / "hf")
    target = AutoTokenizer.from_pretrained(tmp / "hf", subfolder="target") if (tmp / "hf" / "target").is_dir() \
        else tokenizer
    ct2 = ctranslate2.Translator(str(tmp / "ct2"), device="cpu", compute_type="float32", intra_threads=args.threads)
    src_ids = toks.src.encode_batch(lines)
    pieces = [toks.src.sp.id_to_piece(s) for s in src_ids]
    exact = by_length(lines, args.batch, lambda i: len(src_ids[i]), same=True)
    fast = by_length(lines, args.batch, lambda i: len(src_ids[i]), same=False)

    def generate(decode, penalty, batches) -> list[str]:
        out = [""] * len(lines)
        for batch in batches:
            limit = int(output_limits(torch.tensor([len(src_ids[i]) for i in batch]), decode.max_len_a,
                                      decode.max_len_b, cfg.model.max_positions - 1).max())
            enc = tokenizer([lines[i] for i in batch], return_tensors="pt", padding=True)
            extra = {} if penalty is None else {"length_penalty": penalty}
            with torch.no_grad():
                # mtrain's bound counts the EOS it ends an output with at the limit
                gen = hf.generate(**enc, num_beams=decode.beam, max_new_tokens=limit - 1, **extra)
            for i, text in zip(batch, target.batch_decode(gen, skip_special_tokens=True)):
                out[i] = text
        return out

    def ctranslate(decode, batches) -> list[str]:
        out = [""] * len(lines)
        for batch in batches:
            options = ctranslate2_options(decode, max(len(src_ids[i]) for i in batch), cfg.model.max_positions)
            if decode.lenpen_type != "plain":
                options["length_penalty"] = 1.0  # as generate: CTranslate2 has no GNMT penalty either
            for i, r in zip(batch, ct2.translate_batch([pieces[i] for i in batch], **options)):
                out[i] = toks.tgt.sp.decode(r.hypotheses[0])
        return out

    rows = []
    settings = [("beam 1", dataclasses.replace(cfg.decode, beam=1), None),
                (f"beam 5, mtrain's penalty ({cfg.decode.lenpen_type} α {cfg.decode.lenpen}); the exports: "
                 "length^1", dataclasses.replace(cfg.decode, beam=5), None),
                ("beam 5, length^1 for all", dataclasses.replace(cfg.decode, beam=5, lenpen=1.0, lenpen_type="plain"), 1.0)]
    for name, decode, penalty in settings:
        ours, t_ours = timed(lambda: [r.texts[0] if r.texts else "" for r in
                                      translate_texts(lines, model, toks, decode, dev)])  # noqa: B023 (called now)
        theirs, ct = generate(decode, penalty, exact), ctranslate(decode, exact)
        _, t_hf = timed(lambda: generate(decode, penalty, fast))  # noqa: B023
        _, t_ct = timed(lambda: ctranslate(decode, fast))  # noqa: B023
        if args.show:
            for a, b in zip(ours, theirs):
                if a != b:
                    print(f"{name}\n  mtrain:       {a}\n  Transformers: {b}", file=sys.stderr)
        rows.append((name, len(lines), sum(a == b for a, b in zip(ours, theirs)), sum(a == b for a, b in zip(ours, ct)),
                     bleu(ours, refs), bleu(theirs, refs), bleu(ct, refs),
                     len(lines) / t_ours, len(lines) / t_hf, len(lines) / t_ct))
    print(f"| decoding | lines | identical: Transformers / CTranslate2 | BLEU: mtrain / Transformers / CTranslate2 "
          f"| sentences/s ({args.threads} threads): mtrain / Transformers / CTranslate2 |")
    print("|---|---|---|---|---|")
    for name, n, same_hf, same_ct, b1, b2, b3, s1, s2, s3 in rows:
        print(f"| {name} | {n} | {same_hf} / {same_ct} | {b1:.2f} / {b2:.2f} / {b3:.2f} | {s1:.1f} / {s2:.1f} / {s3:.1f} |")


if __name__ == "__main__":
    main()
