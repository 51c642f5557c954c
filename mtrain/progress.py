"""Progress of long work (prepare, translate, tokenize) on stderr: a tqdm bar on a terminal, a plain line
every `every_s` seconds otherwise (a log file, CI, a pipe; MTRAIN_PROGRESS_EVERY=SECONDS changes the
default of 30), and nothing at all when quiet. Work done before its first line is due reports
nothing when not on a terminal: a short command's stderr stays free for what went wrong."""

from __future__ import annotations

import os
import sys
import time

from tqdm import tqdm

quiet = False  # the command line's --quiet: no progress from any Progress


def duration(seconds: float) -> str:
    """'42 s', '3.5 min', '2.1 h'."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def default_every() -> float:
    """Seconds between two plain progress lines: MTRAIN_PROGRESS_EVERY, else 30."""
    try:
        return max(0.0, float(os.environ.get("MTRAIN_PROGRESS_EVERY", "30")))
    except ValueError:
        return 30.0


def note(text: str) -> None:
    """A line about long work on stderr (as Progress's), unless quiet."""
    if not quiet:
        print(text, file=sys.stderr, flush=True)


class Progress:
    """Counts units of work done towards `total` (None: unknown, as for a stream or a gzip file): shows the
    count, the rate and, with a total, the share done and the time left. A context manager; `close`
    ends a plain-line report that printed any line with a summary line."""

    def __init__(self, what: str, total: int | None = None, unit: str = "lines", every_s: float | None = None,
                 stream=None, initial: int = 0):
        self.what, self.total, self.unit = what, total, unit
        self.every_s = every_s if every_s is not None else default_every()
        self.reported = False
        self.stream = stream if stream is not None else sys.stderr
        self.done, self.initial, self.start = initial, initial, time.monotonic()  # initial: done before (a resume)
        self.last_line = self.start
        on_terminal = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.bar = tqdm(total=total, initial=initial, desc=what, unit=f" {unit}", file=self.stream,
                        dynamic_ncols=True) if on_terminal and not quiet else None
        self.lines = not on_terminal and not quiet

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.lines:
            now = time.monotonic()
            if now - self.last_line >= self.every_s:
                self.last_line, self.reported = now, True
                self._line(now)

    def _line(self, now: float, final: bool = False) -> None:
        elapsed = now - self.start
        rate = (self.done - self.initial) / max(elapsed, 1e-9)
        count = f"{self.done:,}" + (f" of {self.total:,}" if self.total else "") + f" {self.unit}"
        if final:
            text = f"{count} in {duration(elapsed)} ({rate:,.0f} {self.unit}/s)"
        else:
            share = f" ({100 * self.done / self.total:.1f}%)" if self.total else ""
            left = (f", {duration((self.total - self.done) / rate)} left"
                    if self.total and rate > 0 and self.done < self.total else "")
            text = f"{count}{share}, {rate:,.0f} {self.unit}/s{left}"
        print(f"{self.what}: {text}", file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self.lines:
            if self.reported:
                self._line(time.monotonic(), final=True)
            self.lines = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self.close()
            return
        self.lines = False  # an error: no summary of work that did not finish
        if self.bar is not None:
            self.bar.close()
            self.bar = None
