"""docs/backtranslation.md: every command of the recipe, run on a tiny corpus (paths changed, budgets cut)."""

import gzip
import os
import re
import shlex
import subprocess
import sys

import yaml
from conftest import ROOT, SAMPLE_DE, SAMPLE_EN

DOC = ROOT / "docs" / "backtranslation.md"


def commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", DOC.read_text(), re.S)
    return [line for block in blocks for line in block.splitlines() if line.startswith("mtrain ")]


def test_every_command_of_the_back_translation_recipe_runs(tmp_path):
    data = tmp_path / "data" / "multi30k"
    data.mkdir(parents=True)
    en, de = SAMPLE_EN.read_text(), SAMPLE_DE.read_text()
    for name, text in (("train.en", en), ("train.de", de), ("val.en", en), ("val.de", de),
                       ("test_2016_flickr.en", en), ("test_2016_flickr.de", de)):
        with gzip.open(data / f"{name}.gz", "wt") as f:
            f.write(text)
    (tmp_path / "mono.de").write_text("\n".join(de.splitlines()[:8]) + "\n")
    config = tmp_path / "configs" / "multi30k_en_de.yaml"
    config.parent.mkdir()
    config.write_text(yaml.safe_dump({
        "data": {"train": {"src": "data/multi30k/train.en.gz", "tgt": "data/multi30k/train.de.gz"},
                 "valid": {"src": "data/multi30k/val.en.gz", "tgt": "data/multi30k/val.de.gz"},
                 "cache_dir": "cache"},
        "tokenizer": {"model": "data/multi30k/bpe6k.model", "vocab_size": 100},
        "model": {"encoder_layers": 1, "decoder_layers": 1, "d_model": 32, "heads": 2, "ffn_dim": 64},
        "train": {"device": "cpu", "threads": 1, "batch_tokens": 200, "max_steps": 6, "valid_every": 6,
                  "save_every": 6, "log_every": 3},
        "decode": {"beam": 2, "max_len_b": 8}}))
    run = commands()
    assert [c.split()[1] for c in run] == ["fit", "translate", "fit", "translate", "score"]
    for command in run:
        result = subprocess.run([sys.executable, "-m", *shlex.split(command)], cwd=tmp_path, capture_output=True,
                                text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert result.returncode == 0, f"{command}\n{result.stderr[-2000:]}"
    synthetic = (tmp_path / "mono.bt.en").read_text().splitlines()
    assert len(synthetic) == 8 and all(synthetic)
    assert len((tmp_path / "test.hyp.de").read_text().splitlines()) == len(en.splitlines())
    from mtrain import checkpoint
    assert checkpoint.describe(tmp_path / "runs" / "en_de_bt" / "final.pt")["tags"] == ["<bt>"]
    metrics = (tmp_path / "runs" / "en_de_bt" / "metrics.jsonl").read_text()
    assert '"epoch_pairs": {"real": 20, "bt": 8}' in metrics
