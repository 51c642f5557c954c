"""How a training run reports: lines for the user (above tqdm's bar, which they do not break) and in
RUN/train.log, the progress bar on a terminal, and metrics.jsonl with TensorBoard events; and reading
metrics back."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

from tqdm import tqdm


def progress(elapsed_s: float, budget_s: float) -> str:
    """Training time so far, against train.max_time when there is one: '12.5 of 60.0 min'."""
    return f"{elapsed_s / 60:.1f}" + (f" of {budget_s / 60:.1f}" if math.isfinite(budget_s) else "") + " min"


def write_line(text: str) -> None:
    """The default report channel: a line above tqdm's bar (the bar is redrawn below it)."""
    tqdm.write(text)
    sys.stdout.flush()  # a log file sees each line as it happens


def open_appending(path: Path):
    """`path` opened to append lines; a last line a kill -9 cut short is ended first, so that the next
    record starts on a line of its own."""
    torn = path.is_file() and path.stat().st_size and not path.read_bytes().endswith(b"\n")
    f = open(path, "a", encoding="utf-8")
    if torn:
        f.write("\n")
    return f


class MetricsLog:
    """metrics.jsonl (always) and TensorBoard events (when tensorboard is installed)."""

    def __init__(self, run_dir: Path):
        self.file = open_appending(run_dir / "metrics.jsonl")
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(run_dir / "tensorboard"))
        except ImportError:
            self.tb = None

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, record["step"])

    def close(self):
        self.file.close()
        if self.tb:
            self.tb.close()


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl; a line cut by a kill (or being written now) is skipped."""
    records = []
    for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


class Report:
    """The one way a run reports, on rank 0 only: lines through `log` (by default above tqdm's bar, which
    they do not break) and into RUN/train.log, the progress bar on a terminal, and metrics.jsonl with
    TensorBoard."""

    def __init__(self, log, main: bool):
        self.log, self.main = log, main
        self.bar: tqdm | None = None
        self.metrics: MetricsLog | None = None
        self.file = None
        self.early: list[str] = []  # lines reported before the run directory exists, for train.log

    def line(self, text: str) -> None:
        if self.main:
            self.log(text)
            self.to_file(text)

    def to_file(self, text: str) -> None:
        """A line for train.log alone (e.g. the error the command line prints itself)."""
        if not self.main:
            return
        stamped = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {text}"
        if self.file is None:
            self.early.append(stamped)
        else:
            self.file.write(stamped + "\n")
            self.file.flush()

    def open_log(self, run_dir: Path, resumed_at: int | None) -> None:
        """RUN/train.log, appended to: a line marking the new start or the resume, then the lines so far."""
        if not self.main or self.file is not None:
            return
        self.file = open_appending(run_dir / "train.log")
        early, self.early = self.early, []
        command = (f"mtrain {' '.join(sys.argv[1:])}" if Path(sys.argv[0]).name in ("mtrain", "__main__.py")
                   else "fit() called from Python")
        self.to_file(f"---- mtrain fit: {'resumed at step ' + str(resumed_at) if resumed_at is not None else 'new run'}"
                     f" in {run_dir} ({command})")
        for stamped in early:
            self.file.write(stamped + "\n")
        self.file.flush()

    def start(self, run_dir: Path, step: int, total: int) -> None:
        if self.main:
            self.metrics = MetricsLog(run_dir)
        # disable=None: a bar on a terminal only; in a log file, lines say how far the run is
        self.bar = tqdm(total=total or None, initial=step, unit="step", dynamic_ncols=True,
                        disable=None if self.main else True)

    @property
    def on_terminal(self) -> bool:
        return self.bar is not None and not self.bar.disable

    def record(self, record: dict, session_s: float) -> None:
        if record and self.metrics is not None:
            self.metrics.write({**record, "wall_s": round(session_s, 2)})

    def end_training(self) -> None:
        """The bar and the metrics are done; lines (the choice of final.pt) still come."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None

    def close(self) -> None:
        self.end_training()
        if self.file is not None:
            self.file.close()
            self.file = None
