"""The GPU check behind scripts/gpu_check.sh: each step in its own process, then one table.

    bash scripts/gpu_check.sh                 # on a machine with CUDA: about 6-8 minutes
    bash scripts/gpu_check.sh --cpu-dry-run   # the same steps on the CPU with tiny sizes (tests the script)

Steps: the GPU tests (pytest -m gpu); scripts/bench.py on the transformer-base shape (6+6 layers,
d_model 512, FFN 2048, 8 heads, 32k vocabulary, random 25k-token batches) in bf16 and fp16; the
loader's cost: the same in bf16 on a stored corpus of WMT-like lengths, batches collated ahead as in
`fit` against batches made before the clock starts; and, when
data/multi30k holds the corpus (scripts/get_multi30k.sh, or a copy), `mtrain fit` of
configs/multi30k_en_de.yaml for 3 minutes, beam-5 translation of test_2016_flickr and its BLEU.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable


def run(cmd: list[str], timeout: float) -> tuple[int, str, float]:
    start = time.time()
    try:
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        code, text = out.returncode, out.stdout + out.stderr
    except subprocess.TimeoutExpired as e:
        code, text = 124, f"timed out after {timeout:.0f} s\n{(e.stdout or b'')[-2000:]!r}"
    return code, text, time.time() - start


def tail(text: str, n: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-n:])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu-dry-run", action="store_true", help="run every step on the CPU with tiny sizes")
    p.add_argument("--fit-time", default="3m", help="train.max_time of the Multi30k fit")
    p.add_argument("--runs", type=Path, default=ROOT / "runs", help="where the fit and its outputs go [runs/]")
    args = p.parse_args()
    import torch

    from mtrain.report import read_metrics

    dry = args.cpu_dry_run
    if not dry and not torch.cuda.is_available():
        print("gpu_check: CUDA is not available on this machine (torch "
              f"{torch.__version__}); nothing was run", file=sys.stderr)
        return 1
    device = "cpu" if dry else "cuda"
    rows: list[tuple[str, str]] = []
    failures: list[str] = []
    gpu = "CPU (dry run)" if dry else torch.cuda.get_device_name(0)
    rows += [("device", gpu), ("torch / CUDA", f"{torch.__version__} / {torch.version.cuda}")]

    # 1. The GPU tests.
    if not dry:
        code, out, secs = run([PY, "-m", "pytest", "-q", "-m", "gpu", "tests/test_gpu.py"], 420)
        summary = next((line for line in reversed(out.splitlines()) if re.search(r"passed|failed|error", line)),
                       out.strip()[-200:])
        rows.append(("GPU tests (pytest -m gpu)", f"{summary.strip('= ')} in {secs:.0f} s"))
        if code:
            failures.append(f"GPU tests:\n{tail(out, 40)}")

    # 2. transformer-base training speed, bf16 and fp16.
    shape = ["--config", "configs/transformer_base.yaml", "--synthetic-vocab", "32000", "--skip-data", "--json",
             "--device", device]
    if dry:
        shape += ["--set", "model.encoder_layers=1", "--set", "model.decoder_layers=1",
                  "--set", "train.batch_tokens=2000", "--steps", "2", "--warmup-steps", "1"]
        precisions = ["fp32"]
    else:
        shape += ["--set", "train.batch_tokens=25000", "--steps", "30", "--warmup-steps", "5"]
        precisions = ["bf16", "fp16"]
    for precision in precisions:
        code, out, secs = run([PY, "scripts/bench.py", *shape, "--precision", precision], 300)
        try:
            r = json.loads(out.strip().splitlines()[-1])
        except (ValueError, IndexError):
            failures.append(f"bench {precision}:\n{tail(out, 30)}")
            rows.append((f"transformer-base {precision}", "FAILED"))
            continue
        rows += [(f"transformer-base {precision}: target tokens/s ({r['batch_tokens']:,}-token batches)",
                  f"{r['train_tok_s']:,.0f}"),
                 (f"transformer-base {precision}: MFU (of {r['peak_gflops'] / 1000:,.1f} TFLOP/s, "
                  f"{r['peak_source']})", f"{100 * r['mfu']:.1f}%"),
                 (f"transformer-base {precision}: peak GPU memory", f"{r['gpu_peak_mb'] / 1024:,.1f} GiB")]

    # 3. What the loader costs a step: transformer-base on a stored corpus of WMT-like lengths, batches
    # collated ahead by a thread as in fit, against the same kind of batches made before the clock starts.
    loader_speed = {}
    for loader in ("premade", "stream"):
        code, out, secs = run([PY, "scripts/bench.py", *shape, "--precision", precisions[0], "--loader", loader,
                               "--wmt-like", "20000" if dry else "300000"], 300)
        try:
            loader_speed[loader] = json.loads(out.strip().splitlines()[-1])["train_tok_s"]
        except (ValueError, IndexError, KeyError):
            failures.append(f"bench --loader {loader}:\n{tail(out, 30)}")
    if len(loader_speed) == 2:
        cost = 1 - loader_speed["stream"] / loader_speed["premade"]
        rows.append((f"transformer-base {precisions[0]}, WMT-like batches: the loader's cost (tokens/s with it / premade)",
                     f"{100 * cost:.1f}% ({loader_speed['stream']:,.0f} / {loader_speed['premade']:,.0f})"))
    else:
        rows.append(("transformer-base, WMT-like batches: the loader's cost", "FAILED"))

    # 4. Multi30k: fit, translate with beam 5, score.
    data = ROOT / "data" / "multi30k"
    if not (data / "train.en.gz").is_file():
        rows.append(("Multi30k fit", f"skipped: no {data}/train.en.gz (run scripts/get_multi30k.sh)"))
    else:
        run_dir = args.runs / "gpu_check"
        outputs = args.runs / "gpu_check_outputs"  # beside the run: fit --overwrite refuses a folder with others' files
        outputs.mkdir(parents=True, exist_ok=True)
        fit = [PY, "-m", "mtrain", "fit", "configs/multi30k_en_de.yaml", "--output", str(run_dir), "--overwrite",
               "--set", f"train.device={device}", "--set", f"train.max_time={'20s' if dry else args.fit_time}"]
        code, out, secs = run(fit, 600)
        if code:
            failures.append(f"fit:\n{tail(out, 30)}")
            rows.append(("Multi30k fit", "FAILED"))
        else:
            metrics = read_metrics(run_dir / "metrics.jsonl")
            speeds = [m["tokens_per_s"] for m in metrics if "tokens_per_s" in m]
            steps = max((m["step"] for m in metrics), default=0)
            valid = [m["valid_bleu"] for m in metrics if "valid_bleu" in m]
            precision = re.search(r"precision (\w+)", out)
            rows += [("Multi30k fit: updates in " + ("20 s" if dry else args.fit_time),
                      f"{steps:,} ({precision[1] if precision else '?'}, whole command {secs:.0f} s)"),
                     ("Multi30k fit: median target tokens/s", f"{sorted(speeds)[len(speeds) // 2]:,.0f}"
                      if speeds else "-"),
                     ("Multi30k fit: best valid BLEU (greedy)", f"{max(valid):.2f}" if valid else "-")]
            hyp = outputs / "test.hyp.de"
            src = data / "test_2016_flickr.en.gz"
            code, out, secs = run([PY, "-m", "mtrain", "translate", "-c", str(run_dir / "final.pt"), "-i", str(src),
                                   "-o", str(hyp), "--beam", "5", "--device", device], 300)
            if code:
                failures.append(f"translate:\n{tail(out, 30)}")
                rows.append(("Multi30k translate", "FAILED"))
            else:
                n = len(hyp.read_text().splitlines())
                rows.append(("Multi30k beam 5: sentences/s (whole command, load included)", f"{n / secs:.1f}"))
                ref = outputs / "test.ref.de"
                subprocess.run(f"gzip -cd {data / 'test_2016_flickr.de.gz'} > {ref}", shell=True, check=True)
                code, out, _ = run([PY, "-m", "mtrain", "score", "--ref", str(ref), str(hyp), "--json"], 120)
                if code:
                    failures.append(f"score:\n{tail(out)}")
                else:
                    scores = json.loads(out.strip().splitlines()[-1])
                    rows.append(("Multi30k test_2016_flickr sacreBLEU", f"{scores['bleu']['score']:.2f} "
                                 f"({scores['bleu']['signature']})"))

    width = max(len(k) for k, _ in rows)
    print(f"| {'gpu_check':<{width}} | value |\n|{'-' * (width + 2)}|-------|")
    for k, v in rows:
        print(f"| {k:<{width}} | {v} |")
    for f in failures:
        print(f"\n--- FAILED: {f}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
