"""`mtrain plot`: training curves of one or more runs, read from their metrics.jsonl (runs in progress too)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from mtrain.errors import MtrainError

PANELS = (("loss", "training loss"), ("valid_loss", "validation loss"), ("valid_bleu", "validation BLEU"),
          ("lr", "learning rate"))


def plot_runs(run_dirs: Sequence[Path], output: Path) -> str:
    """One PNG: each metric against updates (top row) and against wall-clock minutes (bottom row),
    one line per run, labelled with the run directory's name. Returns a one-line summary."""
    from mtrain.attention import require_matplotlib
    from mtrain.files import check_parent
    from mtrain.report import read_metrics

    if not run_dirs:
        raise MtrainError("plot: give at least one run directory")
    check_parent(output, "plot")
    # Each line is labelled with its run's folder name, or with the path as given where two runs share
    # a name (runs/avx2/multi30k and runs/avx512/multi30k): the second would have replaced the first.
    run_dirs = list({Path(run).resolve(): Path(run) for run in run_dirs}.values())  # each run once
    names = [run.name or str(run) for run in run_dirs]
    runs = {}
    for run, name in zip(run_dirs, names):
        path = run / "metrics.jsonl"
        if not path.is_file():
            raise MtrainError(f"{run}: no metrics.jsonl (not an mtrain run directory, or not started yet)")
        runs[name if names.count(name) == 1 else str(run)] = read_metrics(path)
    plt = require_matplotlib()
    formats = plt.figure().canvas.get_supported_filetypes()
    plt.close("all")
    if output.suffix.lstrip(".").lower() not in formats:  # before the work, not as savefig's traceback
        raise MtrainError(f"-o {output}: give a picture file ending in .png, .svg or .pdf "
                          f"(matplotlib writes {', '.join(sorted(formats))})")
    fig, axes = plt.subplots(2, len(PANELS), figsize=(4 * len(PANELS), 6.5), squeeze=False)
    for name, records in runs.items():
        for col, (key, title) in enumerate(PANELS):
            points = [r for r in records if key in r and "step" in r]
            for row, (x_key, x_label) in enumerate((("step", "updates"), ("wall_s", "wall-clock minutes"))):
                xs = [r[x_key] / (60 if x_key == "wall_s" else 1) for r in points if x_key in r]
                ys = [r[key] for r in points if x_key in r]
                ax = axes[row, col]
                ax.plot(xs, ys, marker="." if key.startswith("valid") else None, label=name)
                ax.set_title(title, fontsize=9)
                ax.set_xlabel(x_label, fontsize=8)
                ax.tick_params(labelsize=7)
                ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(output, dpi=80)
    plt.close(fig)
    steps = {name: max((r.get("step", 0) for r in records), default=0) for name, records in runs.items()}
    return f"wrote {output}: " + ", ".join(f"{name} ({n} updates)" for name, n in steps.items())
