"""fit --init: a new run from a trained model's weights (fine-tuning), with its own optimizer and data."""

import pytest
import torch
from conftest import SAMPLE_DE, SAMPLE_EN, tiny_raw

from mtrain import checkpoint
from mtrain.config import config_from_dict
from mtrain.data import Batches, Corpora, load_corpus
from mtrain.errors import MtrainError
from mtrain.report import read_metrics
from mtrain.train import batch_loss, fit, lr_at


@pytest.fixture(scope="module")
def parent(tmp_path_factory, spm_model):
    tmp = tmp_path_factory.mktemp("parent")
    raw = tiny_raw(tmp, spm_model, max_steps=40)
    raw["tokenizer"] = {"vocab_size": 100}  # trained into the run: the child must take it from the checkpoint
    return fit(config_from_dict(raw), tmp / "run", log=lambda *_: None)


def child_raw(tmp_path, spm_model, **train):
    """New data (the second half of the sample), the same model, no tokenizer named."""
    en, de = SAMPLE_EN.read_text().splitlines(), SAMPLE_DE.read_text().splitlines()
    (tmp_path / "new.en").write_text("\n".join(en[10:]) + "\n")
    (tmp_path / "new.de").write_text("\n".join(de[10:]) + "\n")
    raw = tiny_raw(tmp_path, spm_model, **train)
    raw["data"]["train"] = {"src": str(tmp_path / "new.en"), "tgt": str(tmp_path / "new.de")}
    raw["tokenizer"] = {}
    raw["model"]["dropout"] = 0.0  # dropouts may differ from the parent's; none makes the first loss exact
    return raw


def test_a_run_from_a_models_weights_starts_at_its_loss_with_a_fresh_optimizer(tmp_path, spm_model, parent):
    raw = child_raw(tmp_path, spm_model, max_steps=3, warmup=5, label_smoothing=0.1)
    cfg = config_from_dict(raw)
    lines = []
    fit(cfg, tmp_path / "child", init=parent, log=lines.append)
    assert f"model: weights from {parent}; optimizer, schedule and data order start afresh" in lines
    records = read_metrics(tmp_path / "child" / "metrics.jsonl")
    assert records[0] == {"step": 0, "init_from": str(parent), "wall_s": records[0]["wall_s"]}
    first = next(r for r in records if "loss" in r)
    assert first["step"] == 1 and first["lr"] == pytest.approx(lr_at(1, 5, cfg.train.lr))  # warm-up from 0
    # The loss the new run logged first is the parent's loss on the new run's first batch.
    model, toks, _ = checkpoint.load_for_inference([parent])
    assert (tmp_path / "child" / "spm.model").read_bytes() == toks.src.proto  # the parent's tokenizer
    corpus = load_corpus(cfg.data.train[0], toks, cfg.data, log=lambda *_: None)
    batch = Batches(Corpora([corpus]), cfg.train.batch_tokens, cfg.train.seed).next().collate(
        toks.tgt.pad, toks.tgt.bos, toks.tgt.eos)
    with torch.no_grad():
        expected = float(batch_loss(model.eval(), batch, 0.1)) / batch.n_tgt_tokens  # the child has no dropout
    assert first["loss"] == pytest.approx(expected, rel=1e-5)
    child = checkpoint.load(tmp_path / "child" / "last.pt")
    assert child["step"] == 3 and child["init_from"] == str(parent)
    assert checkpoint.describe(tmp_path / "child" / "last.pt")["init_from"] == str(parent)
    # a run from random weights starts elsewhere
    fit(config_from_dict({**raw, "tokenizer": {"model": str(parent.parent / "spm.model")}}), tmp_path / "scratch",
        log=lambda *_: None)
    scratch = next(r for r in read_metrics(tmp_path / "scratch" / "metrics.jsonl") if "loss" in r)
    assert scratch["loss"] > first["loss"] + 0.5


def another_tokenizer(tmp):
    """A SentencePiece model unlike the parent's (a copy of the same model under another name is the
    same tokenizer)."""
    from mtrain.config import TokenizerConfig
    from mtrain.tokenizer import train_tokenizer
    return train_tokenizer([SAMPLE_DE], TokenizerConfig(vocab_size=60), tmp / "other")


@pytest.mark.parametrize("change, message", [
    (lambda raw, tmp: raw["model"].update(d_model=64, heads=2),
     r"--init .*final.pt: model.d_model is 64 in the config and 32 in the checkpoint"),
    (lambda raw, tmp: raw.__setitem__("tokenizer", {"model": str(another_tokenizer(tmp))}),
     r"tokenizer.model: .*other.model is not the tokenizer of .*final.pt; a run that starts from its weights uses "
     r"the checkpoint's"),
    (lambda raw, tmp: raw["data"]["train"].update(tag="<2fr>"),
     r"--init .*final.pt: its tokenizer lacks the tag <2fr> of the data"),
])
def test_what_init_refuses_is_one_line_and_creates_nothing(tmp_path, spm_model, parent, change, message):
    raw = child_raw(tmp_path, spm_model, max_steps=2)
    change(raw, tmp_path)
    with pytest.raises(MtrainError, match=message):
        fit(config_from_dict(raw), tmp_path / "child", init=parent, log=lambda *_: None)
    assert not (tmp_path / "child").exists()


def test_init_with_resume_is_refused(tmp_path, spm_model, parent):
    with pytest.raises(MtrainError, match="--init starts a new run from a checkpoint's weights and --resume "
                                          "continues this run: give one of them"):
        fit(config_from_dict(child_raw(tmp_path, spm_model)), tmp_path / "child", init=parent, resume=True)
    assert not (tmp_path / "child").exists()
