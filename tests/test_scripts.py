"""The scripts users run: the GPU check, run the way a CPU can (every step with tiny sizes, its table
complete), and the README's two set-up commands, quickstart.sh and test.sh."""

import os
import re
import subprocess
import sys

import pytest
from conftest import ROOT


def test_the_gpu_check_dry_run_measures_every_row(tmp_path):
    run = subprocess.run([sys.executable, "scripts/gpu_check.py", "--cpu-dry-run", "--runs", str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert re.search(r"target tokens/s \(2,000-token batches\) +\| [\d,]+ \|", run.stdout)
    # two processes (gloo on the CPU) with a resume train as one process accumulating two batches
    assert re.search(r"DDP, 2 processes with a resume = 1 process x update_freq 2 +\| yes \(largest loss "
                     r"difference [\d.]+%\) \|", run.stdout), run.stdout
    cost = re.search(r"the loader's cost \(tokens/s with it / premade\) +\| (-?[\d.]+)% \(([\d,]+) / ([\d,]+)\)",
                     run.stdout)
    assert cost, run.stdout
    with_it, premade = (float(x.replace(",", "")) for x in cost.groups()[1:])
    # the printed speeds are whole tokens/s and the share has one decimal: allow for both roundings
    slack = 100 * (0.5 / premade + 0.5 * with_it / premade ** 2) + 0.05 + 1e-9
    assert with_it > 0 and premade > 0 and abs(float(cost[1]) - 100 * (1 - with_it / premade)) <= slack


def test_the_gpu_check_picks_what_the_gpu_supports():
    """bf16 only where the GPU has it natively (a V100 or T4 would report a false failure, where
    precision auto trains in fp16), and a batch that fits the card: 25k tokens from 40 GB, fewer in
    proportion below."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import gpu_check
    finally:
        sys.path.pop(0)
    assert gpu_check.precisions_for(True) == ["bf16", "fp16"] and gpu_check.precisions_for(False) == ["fp16"]
    gib = 2 ** 30
    assert [gpu_check.batch_tokens_for(g * gib) for g in (80, 40, 32, 16, 1)] == [25000, 25000, 20000, 10000, 1000]


# ---------------------------------------------------------------- the two README commands


def fake_multi30k(folder, pairs=3000, small=40, seed=1):
    """Multi30k's file names over made-up sentences: enough distinct words for the recipe's 6k BPE."""
    import gzip
    import random
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = {lang: ["".join(rng.choice(letters) for _ in range(rng.randint(3, 10))) for _ in range(4000)]
             for lang in ("en", "de")}
    folder.mkdir(parents=True)
    for split, n in (("train", pairs), ("val", small), ("test_2016_flickr", small)):
        lines = {"en": [], "de": []}
        for _ in range(n):
            picks = [rng.randrange(4000) for _ in range(rng.randint(4, 12))]
            for lang in lines:  # the same word positions: a learnable word-for-word "language"
                lines[lang].append(" ".join(words[lang][i] for i in picks).capitalize() + ".")
        for lang, text in lines.items():
            with gzip.open(folder / f"{split}.{lang}.gz", "wt", encoding="utf-8") as f:
                f.write("\n".join(text) + "\n")
    return folder


def checkout_copy(dst):
    """The project's files as a fresh clone has them, with this test run's virtual environment as .venv
    (quickstart.sh then finds mtrain installed and installs nothing)."""
    import shutil
    shutil.copytree(ROOT, dst, ignore=shutil.ignore_patterns(".git", ".venv", "runs", "data", "__pycache__", "*.egg-info",
                                                             ".pytest_cache", ".ruff_cache"))
    (dst / "data").mkdir()
    (dst / ".venv").symlink_to(sys.prefix, target_is_directory=True)
    return dst


@pytest.mark.skipif(sys.prefix == sys.base_prefix, reason="quickstart.sh uses a virtual environment (.venv)")
def test_quickstart_runs_end_to_end_and_again(tmp_path):
    data = fake_multi30k(tmp_path / "multi30k")
    repo = checkout_copy(tmp_path / "repo")
    command = ["bash", "scripts/quickstart.sh", "--data", str(data), "--minutes", "1"]
    first = subprocess.run(command, cwd=repo, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    bleu = re.search(r"^BLEU = [\d.]+ .*$", first.stdout, re.MULTILINE)
    assert bleu, first.stdout[-3000:]
    assert "model: runs/quickstart-1min/final.pt" in first.stdout
    hyp = repo / "runs" / "quickstart-1min" / "test_2016_flickr.hyp.de"
    assert len(hyp.read_text().splitlines()) == 40
    assert (repo / "data" / "multi30k" / "train.en.gz").resolve() == data / "train.en.gz"  # linked, not copied
    assert "1.0 min" in (repo / "runs" / "quickstart-1min" / "train.log").read_text()  # the budget it was given
    again = subprocess.run(command, cwd=repo, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "already trained: runs/quickstart-1min/final.pt" in again.stdout and "== 1/4 install" in again.stdout
    assert bleu[0] in again.stdout  # the same model, the same translations


def test_get_multi30k_offline_is_one_line_and_keeps_what_is_there(tmp_path):
    repo = checkout_copy(tmp_path / "repo")
    offline = subprocess.run(["bash", "scripts/get_multi30k.sh"], cwd=repo, capture_output=True, text=True, timeout=120,
                             env={**os.environ, "MULTI30K_URL": "http://127.0.0.1:9/"})
    assert offline.returncode == 1 and len(offline.stderr.strip().splitlines()) == 1, offline.stderr
    assert "could not download http://127.0.0.1:9/train.en.gz" in offline.stderr
    assert "give a local copy: scripts/get_multi30k.sh DIR" in offline.stderr
    assert not list((repo / "data" / "multi30k").iterdir())  # no partial file left behind
    data = fake_multi30k(tmp_path / "m", pairs=5, small=5)
    mine = repo / "data" / "multi30k" / "val.de.gz"
    mine.write_bytes(b"a user's own file")
    linked = subprocess.run(["bash", "scripts/get_multi30k.sh", str(data)], cwd=repo, capture_output=True, text=True)
    assert linked.returncode == 0, linked.stderr
    assert (repo / "data" / "multi30k" / "train.en.gz").is_symlink() and mine.read_bytes() == b"a user's own file"
    quick = subprocess.run(["bash", "scripts/quickstart.sh", "--minutes", "soon"], cwd=repo, capture_output=True, text=True)
    assert quick.returncode == 2 and "--minutes soon: expected a number" in quick.stderr


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    assert "scripts/test.sh" in readme and "scripts/quickstart.sh" in readme
    assert "scripts/test.sh" in (ROOT / ".ci" / "run").read_text()
    test_sh = (ROOT / "scripts" / "test.sh").read_text()
    assert "ruff check ." in test_sh and "python -m pytest" in test_sh and "scripts/install.sh" in test_sh
