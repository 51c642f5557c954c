"""The GPU check behind scripts/gpu_check.sh: each step in its own process, then one table.

    bash scripts/gpu_check.sh                 # on a machine with CUDA (each step has a time limit)
    bash scripts/gpu_check.sh --cpu-dry-run   # the same steps on the CPU with tiny sizes (tests the script)

Steps: the GPU tests (pytest -m gpu); scripts/bench.py on the transformer-base shape (6+6 layers,
d_model 512, FFN 2048, 8 heads, 32k vocabulary, random batches of 25k tokens on a 40 GB GPU, fewer
in proportion on a smaller one) in bf16 where the GPU has it natively and in fp16; on a machine with
two GPUs or more, a 2-process NCCL fit with a resume against one process accumulating two batches
(the dry run does it with gloo on the CPU); the
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


def run_cmd(cmd: list[str], timeout: float) -> tuple[int, str, float]:
    start = time.time()
    try:
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        code, text = out.returncode, out.stdout + out.stderr
    except subprocess.TimeoutExpired as e:
        code, text = 124, f"timed out after {timeout:.0f} s\n{(e.stdout or b'')[-2000:]!r}"
    return code, text, time.time() - start


def tail(text: str, n: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-n:])


def precisions_for(bf16_native: bool) -> list[str]:
    """The precisions to benchmark: those `precision: auto` may train in on this GPU (bf16 where it
    is native, else fp16), and fp16 besides. Emulated bf16 (V100, T4) would be a false failure."""
    return ["bf16", "fp16"] if bf16_native else ["fp16"]


def batch_tokens_for(memory_bytes: int) -> int:
    """The benchmark's batch: transformer-base's 25k tokens on a GPU of 40 GB or more, and as many
    thousands fewer in proportion below (16 GB: 10,000), so that it fits a smaller card."""
    return max(1000, min(25000, int(25000 * memory_bytes / (40 * 2 ** 30)) // 1000 * 1000))


def ddp_check(device: str, runs: Path) -> tuple[list[tuple[str, str]], list[str]]:
    """Two processes (NCCL on GPUs, gloo on the CPU) to step 4, resumed to step 8, against one
    process accumulating two batches: DDP, no_sync, the collectives and barriers, as a one-GPU run
    never exercises them. Rows and failures."""
    import torch
    import yaml

    from mtrain.report import read_metrics
    sample = ROOT / "data" / "sample"
    work = runs / "gpu_check_ddp"
    work.mkdir(parents=True, exist_ok=True)

    def config(name: str, **train) -> Path:
        raw = {"data": {"train": {"src": str(sample / "train.en"), "tgt": str(sample / "train.de")},
                        "cache_dir": str(work / "cache")},
               "tokenizer": {"model": str(work / "spm.model"), "vocab_size": 100},
               "model": {"encoder_layers": 1, "decoder_layers": 1, "d_model": 32, "heads": 2, "ffn_dim": 64,
                         "dropout": 0.0},  # processes would draw other dropout masks than one process
               "train": {"device": device, "precision": "fp32", "threads": 1, "batch_tokens": 120, "lr": 3e-3,
                         "warmup": 10, "max_steps": 8, "save_every": 4, "log_every": 1, **train}}
        path = work / f"{name}.yaml"
        path.write_text(yaml.safe_dump(raw))
        return path

    def fit(cfg: Path, run: str, procs: int, *extra: str) -> str | None:
        cmd = [PY, "-m", "mtrain", "fit", str(cfg), "--output", str(work / run), *(extra or ["--overwrite"])]
        if procs > 1:
            cmd = [PY, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}", *cmd[1:]]
        code, out, _ = run_cmd(cmd, 300)
        return None if code == 0 else tail(out, 30)

    if device == "cuda" and torch.cuda.device_count() < 2:
        return [("DDP, 2 processes", "skipped: one GPU (DDP, no_sync and NCCL need two)")], []
    errors = [e for e in (fit(config("one", update_freq=2), "one", 1),
                          fit(config("two", max_steps=4), "two", 2),
                          fit(config("two8"), "two", 2, "--resume")) if e]
    if errors:
        return [("DDP, 2 processes", "FAILED")], [f"DDP fit:\n{errors[0]}"]
    a, b = ({m["step"]: m["loss"] for m in read_metrics(work / run / "metrics.jsonl") if "loss" in m}
            for run in ("one", "two"))
    worst = max(abs(a[s] - b[s]) / abs(a[s]) for s in a) if sorted(a) == sorted(b) == list(range(1, 9)) else None
    # GPU kernels may sum in another order from run to run: equal to float rounding, not bit for bit
    if worst is None or worst > 1e-3:
        return [("DDP, 2 processes", "FAILED")], [f"DDP: 2 processes differ from 1 x update_freq 2: {a} {b}"]
    return [("DDP, 2 processes with a resume = 1 process x update_freq 2", f"yes (largest loss difference "
                                                                         f"{100 * worst:.4f}%)")], []


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
        code, out, secs = run_cmd([PY, "-m", "pytest", "-q", "-m", "gpu", "tests/test_gpu.py"], 420)
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
        tokens = batch_tokens_for(torch.cuda.get_device_properties(0).total_memory)
        shape += ["--set", f"train.batch_tokens={tokens}", "--steps", "30", "--warmup-steps", "5"]
        bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
        precisions = precisions_for(bf16)
        if not bf16:
            rows.append(("bf16", "not native on this GPU: precision auto trains in fp16, benchmarked below"))
    for precision in precisions:
        code, out, secs = run_cmd([PY, "scripts/bench.py", *shape, "--precision", precision], 300)
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

    # 2b. Several processes: DDP, NCCL and the resume, where the machine has two GPUs.
    more, failed = ddp_check(device, args.runs)
    rows += more
    failures += failed

    # 3. What the loader costs a step: transformer-base on a stored corpus of WMT-like lengths, batches
    # collated ahead by a thread as in fit, against the same kind of batches made before the clock starts.
    loader_speed = {}
    for loader in ("premade", "stream"):
        code, out, secs = run_cmd([PY, "scripts/bench.py", *shape, "--precision", precisions[0], "--loader", loader,
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
        code, out, secs = run_cmd(fit, 600)
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
            code, out, secs = run_cmd([PY, "-m", "mtrain", "translate", "-c", str(run_dir / "final.pt"), "-i", str(src),
                                   "-o", str(hyp), "--beam", "5", "--device", device], 300)
            if code:
                failures.append(f"translate:\n{tail(out, 30)}")
                rows.append(("Multi30k translate", "FAILED"))
            else:
                n = len(hyp.read_text().splitlines())
                rows.append(("Multi30k beam 5: sentences/s (whole command, load included)", f"{n / secs:.1f}"))
                ref = outputs / "test.ref.de"
                subprocess.run(f"gzip -cd {data / 'test_2016_flickr.de.gz'} > {ref}", shell=True, check=True)
                code, out, _ = run_cmd([PY, "-m", "mtrain", "score", "--ref", str(ref), str(hyp), "--json"], 120)
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
