"""Progress of long work: a bar on a terminal, periodic plain lines elsewhere, nothing when quiet; and
the commands that do long work (tokenize, prepare, translate) report it on stderr, never on stdout."""

import io
import os
import re
import subprocess
import sys

import yaml
from conftest import ROOT, SAMPLE_DE, SAMPLE_EN, tiny_raw

from mtrain import progress
from mtrain.progress import Progress


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_plain_lines_count_rate_share_and_time_left(monkeypatch):
    out = io.StringIO()
    clock = iter([0.0, 10.0, 20.0, 40.0])  # the start, each update, the summary
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
    with Progress("encoding x", total=4000, unit="pairs", every_s=5, stream=out) as shown:
        shown.update(1000)  # 10 s in, over every_s: a line
        shown.update(1000)
    lines = out.getvalue().splitlines()
    assert lines[0] == "encoding x: 1,000 of 4,000 pairs (25.0%), 100 pairs/s, 30 s left", lines
    assert lines[1] == "encoding x: 2,000 of 4,000 pairs (50.0%), 100 pairs/s, 20 s left", lines
    assert lines[2] == "encoding x: 2,000 of 4,000 pairs in 40 s (50 pairs/s)", lines


def test_lines_come_only_every_period_and_a_resume_counts_from_where_it_was(monkeypatch):
    out = io.StringIO()
    with Progress("translate", total=None, every_s=3600, stream=out) as shown:
        shown.update(3)
    assert out.getvalue() == ""  # short work: nothing (a short command's stderr stays for errors)
    clock = iter([0.0, 1.0, 5.0, 6.0, 8.0])
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
    with Progress("translate", total=None, every_s=4, stream=out, initial=500) as shown:
        for _ in range(3):
            shown.update(100)
    lines = out.getvalue().splitlines()  # one line, at 5 s; the summary at 8 s counts from 500
    assert lines == ["translate: 700 lines, 40 lines/s", "translate: 800 lines in 8 s (38 lines/s)"], lines


def test_a_terminal_gets_a_bar_and_quiet_gets_nothing(monkeypatch):
    tty = Terminal()
    with Progress("translate", total=10, stream=tty) as shown:
        shown.update(10)
    assert "translate" in tty.getvalue() and "10/10" in tty.getvalue() and "\r" in tty.getvalue()
    monkeypatch.setattr(progress, "quiet", True)
    for stream in (io.StringIO(), Terminal()):
        with Progress("translate", total=10, stream=stream, every_s=0) as shown:
            shown.update(10)
        assert stream.getvalue() == ""


def test_an_error_leaves_no_summary():
    out = io.StringIO()
    try:
        with Progress("encoding x", total=10, stream=out, every_s=3600) as shown:
            shown.update(4)
            raise ValueError("bad line")
    except ValueError:
        pass
    assert out.getvalue() == ""


def mtrain(*args, every="0"):
    """`every`: MTRAIN_PROGRESS_EVERY (0: a line at every update and a summary), None: the default."""
    env = {k: v for k, v in os.environ.items() if k != "MTRAIN_PROGRESS_EVERY"}
    return subprocess.run([sys.executable, "-m", "mtrain", *map(str, args)], capture_output=True, text=True, cwd=ROOT,
                          env=env if every is None else {**env, "MTRAIN_PROGRESS_EVERY": every})


def test_tokenize_prepare_and_translate_report_progress_on_stderr(tmp_path, spm_model, tagged_model):
    n = len(SAMPLE_EN.read_text().splitlines())
    r = mtrain("tokenize", "-i", SAMPLE_EN, "-i", SAMPLE_DE, "--vocab-size", 90, "-o", tmp_path / "spm")
    assert r.returncode == 0, r.stderr
    assert f"tokenizer: reading: {2 * n:,} lines in" in r.stderr and "wrote" in r.stdout and "reading" not in r.stdout
    quiet = mtrain("tokenize", "-i", SAMPLE_EN, "--vocab-size", 60, "-o", tmp_path / "q", "--quiet")
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr
    default = mtrain("tokenize", "-i", SAMPLE_EN, "--vocab-size", 60, "-o", tmp_path / "d", every=None)
    assert default.returncode == 0 and default.stderr == "", default.stderr  # seconds of work: nothing

    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(tiny_raw(tmp_path, spm_model)))
    r = mtrain("prepare", config, "-o", tmp_path / "prepared", "--workers", 1)
    assert r.returncode == 0, r.stderr
    assert re.search(rf"encoding {re.escape(str(SAMPLE_EN))} \+ .*: {n:,} of {n:,} pairs in", r.stderr), r.stderr
    assert "is ready" in r.stdout and "encoding" not in r.stdout

    out = tmp_path / "out.de"
    r = mtrain("translate", "-c", tagged_model, "-i", SAMPLE_EN, "-o", out, "--beam", 1)
    assert r.returncode == 0, r.stderr
    assert re.search(rf"translate: {n} of {n} lines in \d+ s \([\d,]+ lines/s\)", r.stderr), r.stderr
    piped = mtrain("translate", "-c", tagged_model, "-i", SAMPLE_EN, "--beam", 1, "-q")
    assert piped.returncode == 0 and piped.stderr == "" and piped.stdout == out.read_text()
