"""Run config variants one after another under one budget and print a table to compare them.

    python scripts/sweep.py configs/multi30k_en_de.yaml docs/sweeps/short.yaml --budget 8m \
        [--table docs/sweeps/results.md]
    python scripts/sweep.py configs/multi30k_en_de.yaml docs/sweeps/short.yaml --steps 17800

The variants file is YAML: a name per variant and its overrides, as `mtrain fit --set` takes them:

    base: []
    linear: [train.schedule=linear, train.lr=2e-3]

Each variant trains with `mtrain fit CONFIG --set train.max_time=BUDGET --set ...` into
runs/sweep/NAME (one at a time: on a small machine, parallel runs would measure each other). With
`--steps N` the budget is N updates instead (`train.max_steps=N`, no time limit): the budget-aware
schedule is then a function of the step alone, so the result does not depend on this machine's
speed or load, and another machine's hour can be ranked here by giving the updates it makes in
an hour (the AVX512 CPU of docs/sweeps: ~17,800 for the Multi30k recipe). The
table has, per variant: updates, epochs, target tokens/s (median over log intervals), the best
validation BLEU seen during training (greedy), and the validation BLEU of final.pt (the checkpoint
`fit` picks). Choose on validation only: the test set is for the final recipe.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def summarize(run_dir: Path) -> dict:
    from mtrain import checkpoint
    from mtrain.report import read_metrics

    records = read_metrics(run_dir / "metrics.jsonl")
    speeds = sorted(r["tokens_per_s"] for r in records if "tokens_per_s" in r)
    valid = [r["valid_bleu"] for r in records if "valid_bleu" in r]
    final = checkpoint.load(run_dir / "final.pt") if (run_dir / "final.pt").is_file() else {}
    last = checkpoint.load(run_dir / "last.pt") if (run_dir / "last.pt").is_file() else {}
    return {"updates": max((r["step"] for r in records), default=0),
            "epochs": last.get("data", {}).get("epoch", 0),
            "tok_s": speeds[len(speeds) // 2] if speeds else 0.0,
            "best_valid": max(valid, default=float("nan")),
            "final_valid": final.get("valid_bleu", float("nan")), "final": final.get("chosen", "-")}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config")
    p.add_argument("variants", help="YAML file: name -> list of KEY=VALUE overrides")
    limits = p.add_mutually_exclusive_group()
    limits.add_argument("--budget", default="10m", help="train.max_time of every variant [10m]")
    limits.add_argument("--steps", type=int, help="a budget of this many updates instead (train.max_steps, no time limit)")
    p.add_argument("--only", action="append", default=[], help="run only these variants (repeatable)")
    p.add_argument("--table", help="append the table (markdown) to this file")
    p.add_argument("--output", default="runs/sweep", help="parent of the run directories")
    args = p.parse_args()
    if args.steps is not None:
        if args.steps < 1:
            p.error("--steps must be at least 1")
        limit, budget_flag = ['train.max_time=""', f"train.max_steps={args.steps}"], f"--steps {args.steps}"
    else:
        limit, budget_flag = [f"train.max_time={args.budget}"], f"--budget {args.budget}"
    variants = yaml.safe_load(Path(args.variants).read_text())
    out = ROOT / args.output
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, overrides in variants.items():
        if args.only and name not in args.only:
            continue
        run_dir = Path(args.output) / name
        cmd = [sys.executable, "-m", "mtrain", "fit", args.config, "--output", str(run_dir), "--overwrite"]
        for item in limit + (overrides or []):
            cmd += ["--set", item]
        start = time.time()
        with open(out / f"{name}.log", "w") as log:
            code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT).returncode
        row = {"name": name, "settings": " ".join(overrides or []) or "(config as is)",
               "wall_min": (time.time() - start) / 60, "code": code}
        if code == 0:
            row.update(summarize(ROOT / run_dir))
        rows.append(row)
        print(f"{name}: {row}", file=sys.stderr, flush=True)

    lines = ["| variant | overrides | updates | epochs | tok/s | best valid BLEU | final valid BLEU | wall min |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["code"]:
            lines.append(f"| {r['name']} | {r['settings']} | failed (exit {r['code']}) | | | | | {r['wall_min']:.1f} |")
        else:
            lines.append(f"| {r['name']} | {r['settings']} | {r['updates']:,} | {r['epochs']} | {r['tok_s']:,.0f} "
                         f"| {r['best_valid']:.2f} | {r['final_valid']:.2f} ({r['final']}) | {r['wall_min']:.1f} |")
    table = "\n".join(lines)
    print(table)
    if args.table:
        with open(args.table, "a", encoding="utf-8") as f:
            f.write(f"\n`python scripts/sweep.py {args.config} {args.variants} {budget_flag}`\n\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
