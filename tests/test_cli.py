"""The commands as a user runs them: one line on stderr for every user error, never a traceback."""

import gzip
import json
import re
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT, SAMPLE_DE, SAMPLE_EN


def mtrain(*args, input=None):
    return subprocess.run([sys.executable, "-m", "mtrain", *map(str, args)], capture_output=True, text=True,
                          input=input, cwd=ROOT)


def assert_one_line_error(result, *fragments):
    assert result.returncode != 0
    lines = [x for x in result.stderr.splitlines() if x.strip() and "Warning" not in x]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


def test_tokenize_reports_and_writes(tmp_path):
    gz = tmp_path / "de.gz"
    with gzip.open(gz, "wt") as f:
        f.write(SAMPLE_DE.read_text())
    r = mtrain("tokenize", "--input", SAMPLE_EN, "--input", gz, "--vocab-size", 90, "--model-type", "bpe",
               "--output", tmp_path / "spm")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "spm.model").is_file() and (tmp_path / "spm.vocab").is_file()
    assert "pieces/sentence" in r.stdout and "unknown rate" in r.stdout
    r = mtrain("tokenize", "--input", SAMPLE_EN, "--vocab-size", 60, "--user-symbols", ",<x>,,<y>,",
               "--output", tmp_path / "sym")  # empty fields of a stray comma are not symbols
    assert r.returncode == 0, r.stderr
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "sym.model"))
    assert {"<x>", "<y>"} <= set(sp.encode("a<x>b<y>", out_type=str))  # each kept as one piece
    assert [sp.id_to_piece(i) for i in (4, 5)] == ["<x>", "<y>"]  # the two symbols, no empty one
    r = mtrain("tokenize", "--input", SAMPLE_EN, "--input", SAMPLE_DE, "--vocab-size", 60, "--per-language",
               "--output", tmp_path / "lang")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "lang.en.model").is_file() and (tmp_path / "lang.de.model").is_file()
    r = mtrain("tokenize", "--input", SAMPLE_EN, "--vocab-size", 60, "--output", tmp_path / "named.model")
    assert r.returncode == 0, r.stderr  # the model's file name given, not a prefix: no named.model.model
    assert (tmp_path / "named.model").is_file() and (tmp_path / "named.vocab").is_file()
    assert not list(tmp_path.glob("named.model.*"))


def test_user_errors_are_one_line(tmp_path):
    assert_one_line_error(mtrain("tokenize", "--input", tmp_path / "none.txt", "--output", tmp_path / "x"),
                          "none.txt: file not found")
    assert_one_line_error(mtrain("tokenize", "--input", SAMPLE_EN, "--vocab-size", 5000, "--output", tmp_path / "x"),
                          "vocabulary size 5000 is too large", "at most ")
    assert_one_line_error(mtrain("fit", tmp_path / "none.yaml"), "none.yaml: config file not found")
    (tmp_path / "bad.yaml").write_text("model:\n  heads: 7\n")
    assert_one_line_error(mtrain("fit", tmp_path / "bad.yaml"), "bad.yaml: model: d_model (512)")
    (tmp_path / "nodata.yaml").write_text("data:\n  train: {src: nowhere.en, tgt: nowhere.de}\n")
    assert_one_line_error(mtrain("fit", tmp_path / "nodata.yaml", "--output", tmp_path / "run"),
                          "nowhere.en: file not found")
    assert_one_line_error(mtrain("fit", "--bogus"), "No such option")
    assert_one_line_error(mtrain("translate", "--checkpoint", tmp_path / "none.pt"), "none.pt: checkpoint not found")
    (tmp_path / "junk.pt").write_text("junk")
    assert_one_line_error(mtrain("translate", "--checkpoint", tmp_path / "junk.pt"), "junk.pt: not a readable")
    assert_one_line_error(mtrain("score", "--ref", SAMPLE_DE, input="one line\n"),
                          "stdin has 1 lines", "train.de has 20")
    assert_one_line_error(mtrain("average", tmp_path / "none.pt", "-o", tmp_path / "o.pt"), "none.pt")


def test_score_reads_stdin_and_compares():
    r = mtrain("score", "--ref", SAMPLE_DE, input=SAMPLE_DE.read_text())
    assert r.returncode == 0 and "BLEU = 100.00" in r.stdout and "signature: nrefs:1" in r.stdout
    r = mtrain("score", "--ref", SAMPLE_DE, SAMPLE_DE, "--compare", SAMPLE_EN, "--metrics", "bleu")
    assert r.returncode == 0, r.stderr
    assert "baseline 100.00" in r.stdout and "p = " in r.stdout
    r = mtrain("score", "--ref", SAMPLE_DE, SAMPLE_DE, "--compare", SAMPLE_EN, "--metrics", "bleu,chrf", "--json")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)  # --json was ignored with --compare
    assert list(got) == ["BLEU", "chrF2"] and got["BLEU"]["baseline"]["score"] == 100.0
    assert got["BLEU"]["other"]["score"] < 10 and 0 < got["BLEU"]["p"] <= 0.01
    assert got["BLEU"]["signature"].startswith("nrefs:1|bs:1000")


def test_bad_utf8_on_stdin_names_the_line():
    r = subprocess.run([sys.executable, "-m", "mtrain", "score", "--ref", str(SAMPLE_DE)], input=b"ok\n\xff\n",
                       capture_output=True, cwd=ROOT)
    assert r.returncode == 1 and b"mtrain: stdin:2: invalid UTF-8" in r.stderr and b"Traceback" not in r.stderr


def test_no_arguments_prints_help_and_version_prints_versions():
    import torch
    r = mtrain()
    assert r.returncode == 0 and r.stdout.startswith("Usage:") and "Commands" in r.stdout
    assert "mtrain:" not in r.stderr + r.stdout
    r = mtrain("--version")
    assert r.returncode == 0
    assert r.stdout.strip().startswith(f"mtrain 0.1.0, torch {torch.__version__}, CUDA ")


def test_info_and_plot_of_a_run(tmp_path, spm_model):
    import json

    import yaml
    from conftest import tiny_raw
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(tiny_raw(tmp_path, spm_model, max_steps=4, save_every=2, average_last=2)))
    r = mtrain("fit", cfg, "--output", tmp_path / "run")
    assert r.returncode == 0, r.stderr
    r = mtrain("info", tmp_path / "run" / "final.pt")
    assert r.returncode == 0, r.stderr
    assert "1+1 layers, d_model 32, 2 heads, FFN 64" in r.stdout and "step:         4" in r.stdout
    assert "vocabulary:   joint, 100 pieces" in r.stdout
    assert re.search(r"^valid BLEU:   \d+\.\d\d( \(|$)", r.stdout, re.M), r.stdout  # two decimals, as fit prints
    final, last = tmp_path / "run" / "final.pt", tmp_path / "run" / "last.pt"
    r2 = mtrain("info", "-c", final)  # -c as `translate` takes it
    assert r2.returncode == 0 and r2.stdout == r.stdout
    assert mtrain("info", final, "--checkpoint", final).stdout == r.stdout
    assert_one_line_error(mtrain("info"), "Missing argument 'CHECKPOINT'", "-c/--checkpoint")
    assert_one_line_error(mtrain("info", final, "-c", last), "2 checkpoints given", "info takes one")
    assert_one_line_error(mtrain("export", "-c", final, "-c", last, "--ctranslate2", tmp_path / "ct2"),
                          "2 checkpoints given", "export takes one (an ensemble is for translate")
    assert "tags:         none" in r.stdout
    info = json.loads(mtrain("info", tmp_path / "run" / "last.pt", "--json").stdout)
    assert info["step"] == 4 and info["resumable"] and info["data_position"]["batch_tokens"] == 200
    assert info["vocabulary"] == {"joint": True, "source_size": 100, "target_size": 100}
    assert info["parameters"] > 0 and info["config"]["train"]["max_steps"] == 4
    with open(tmp_path / "run" / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "lo')  # a run in progress, cut mid-line
    r = mtrain("plot", tmp_path / "run", tmp_path / "run", "-o", tmp_path / "curves.png")
    assert r.returncode == 0, r.stderr
    assert "run (4 updates)" in r.stdout
    (tmp_path / "other").mkdir()  # another run of the same folder name: two lines, told apart by path
    shutil.copytree(tmp_path / "run", tmp_path / "other" / "run")
    r = mtrain("plot", tmp_path / "run", tmp_path / "other" / "run", "-o", tmp_path / "curves.png")
    assert r.returncode == 0, r.stderr
    assert f"{tmp_path / 'run'} (4 updates)" in r.stdout and f"{tmp_path / 'other' / 'run'} (4 updates)" in r.stdout
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert_one_line_error(mtrain("plot", tmp_path, "-o", tmp_path / "c.png"), "no metrics.jsonl")
    for name in ("curves.txt", "curves"):  # matplotlib would fail after the work, with a traceback
        assert_one_line_error(mtrain("plot", tmp_path / "run", "-o", tmp_path / name), "give a picture file")
        assert not (tmp_path / name).exists()
    r = mtrain("plot", tmp_path / "run", "-o", tmp_path / "curves.svg")
    assert r.returncode == 0 and (tmp_path / "curves.svg").read_text().lstrip().startswith("<?xml")


def test_the_cuda_allocator_gets_expandable_segments_unless_the_user_chose(monkeypatch):
    """Set before any command, so that CUDA's first allocation reads it; a user's own setting stays."""
    import os

    from mtrain import cli
    monkeypatch.setattr(sys, "argv", ["mtrain", "--version"])
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    with pytest.raises(SystemExit):
        cli.main()
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:128")
    with pytest.raises(SystemExit):
        cli.main()
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:128"
