"""Shared fixtures: the committed sample corpus, a tokenizer trained on it, and a tiny config."""

from pathlib import Path

import pytest
import torch

from mtrain.config import TokenizerConfig, config_from_dict
from mtrain.tokenizer import Tokenizer, Tokenizers, train_tokenizer

ROOT = Path(__file__).resolve().parent.parent
SAMPLE_EN = ROOT / "data" / "sample" / "train.en"
SAMPLE_DE = ROOT / "data" / "sample" / "train.de"

torch.set_num_threads(1)  # tiny models: more threads only add overhead


@pytest.fixture(scope="session")
def spm_model(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("spm") / "spm"
    return train_tokenizer([SAMPLE_EN, SAMPLE_DE], TokenizerConfig(vocab_size=100), out)


@pytest.fixture(scope="session")
def toks(spm_model) -> Tokenizers:
    tok = Tokenizer.load(spm_model)
    return Tokenizers(tok, tok)


def tiny_raw(tmp_path: Path, spm_model: Path, **train) -> dict:
    """A config dict for a tiny model on the sample corpus, writing caches under tmp_path."""
    return {
        "data": {"train": {"src": str(SAMPLE_EN), "tgt": str(SAMPLE_DE)},
                 "valid": {"src": str(SAMPLE_EN), "tgt": str(SAMPLE_DE)},
                 "cache_dir": str(tmp_path / "cache")},
        "tokenizer": {"model": str(spm_model), "vocab_size": 100},
        "model": {"encoder_layers": 1, "decoder_layers": 1, "d_model": 32, "heads": 2, "ffn_dim": 64,
                  "dropout": 0.1},
        "train": {"device": "cpu", "precision": "fp32", "threads": 1, "batch_tokens": 200, "lr": 3e-3,
                  "warmup": 10, "max_steps": 20, "valid_every": 1000, "save_every": 5, "log_every": 1,
                  **train},
        "decode": {"beam": 2},
    }


def tagged_raw(tmp_path: Path, spm_model: Path) -> dict:
    """A tiny model that learns two tagged corpora with the same sources: <2de> the German, <2en> the
    English copied; big and long enough to translate every sample line back exactly, greedy."""
    raw = tiny_raw(tmp_path, spm_model, max_steps=600, lr=3e-3, warmup=40, batch_tokens=600, valid_every=600,
                   save_every=600, log_every=100, label_smoothing=0.0)
    raw["model"].update(encoder_layers=2, decoder_layers=2, d_model=64, heads=4, ffn_dim=128, dropout=0.0)
    raw["data"]["train"] = [{"name": "de", "src": str(SAMPLE_EN), "tgt": str(SAMPLE_DE), "tag": "<2de>"},
                            {"name": "en", "src": str(SAMPLE_EN), "tgt": str(SAMPLE_EN), "tag": "<2en>"}]
    raw["data"]["valid"]["tag"] = "<2de>"
    raw["tokenizer"] = {"vocab_size": 100}  # trained into the run directory, with the tags
    return raw


@torch.no_grad()
def forced_score(model, toks, src_ids: list[int], tokens: list[int], lenpen: float = 0.0,
                 lenpen_type: str = "gnmt") -> float:
    """The score beam search gives `tokens` (output ids without BOS and EOS) for the source `src_ids`
    (without EOS), forced and in fp32: their log-probability, EOS included, over the length penalty."""
    from mtrain.search import length_penalty
    from mtrain.translate import source_batch
    src = source_batch([src_ids], toks, torch.device("cpu"))
    out = [*tokens, toks.tgt.eos]
    logp = model.decode(torch.tensor([[toks.tgt.bos, *tokens]]), model.encode(src, src == toks.src.pad),
                        src == toks.src.pad)[0].float().log_softmax(-1)
    return float(logp[torch.arange(len(out)), torch.tensor(out)].sum()) / length_penalty(len(out), lenpen, lenpen_type)


def assert_same_or_better(model, toks, lines, ours, theirs, lenpen, lenpen_type="gnmt", most_differ=2):
    """Another decoder's outputs (`theirs`, target pieces) against mtrain's (`ours`) for the same lines:
    equal, or where they differ mtrain's search found an output at least as good under the model's own
    scores (mtrain does not stop a sentence while a live hypothesis is better than those finished,
    where CTranslate2, as fairseq, may)."""
    differ = 0
    for line, mine, other in zip(lines, ours, theirs, strict=True):
        if mine == other:
            continue
        differ += 1
        src = toks.src.encode_batch([line])[0]
        ids = [[toks.tgt.sp.piece_to_id(p) for p in pieces] for pieces in (mine, other)]
        scores = [forced_score(model, toks, src, x, lenpen, lenpen_type) for x in ids]
        assert scores[0] >= scores[1] - 1e-4, (line, mine, other, scores)
    assert differ <= most_differ, f"{differ} lines differ"


@pytest.fixture(scope="session")
def tagged_model(tmp_path_factory, spm_model) -> Path:
    """The checkpoint of `tagged_raw`, trained once for every test that needs a model that knows
    the sample lines by heart."""
    from mtrain.train import fit
    tmp = tmp_path_factory.mktemp("tagged")
    return fit(config_from_dict(tagged_raw(tmp, spm_model)), tmp / "run", log=lambda *_: None)


@pytest.fixture
def tiny_cfg(tmp_path, spm_model):
    return lambda **train: config_from_dict(tiny_raw(tmp_path, spm_model, **train))
