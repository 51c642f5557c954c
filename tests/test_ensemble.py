"""Ensembles: several models decoding as one, with a KV cache each and their log-probabilities averaged."""

import pytest
import torch
from conftest import SAMPLE_EN

from mtrain import checkpoint
from mtrain.config import DecodeConfig
from mtrain.device import pick_device
from mtrain.ensemble import Ensemble
from mtrain.errors import MtrainError
from mtrain.train import fit
from mtrain.translate import decode_ids, translate_lines

CPU = pick_device("cpu", "fp32")


@pytest.fixture(scope="module")
def two_models(tmp_path_factory, spm_model):
    """Two checkpoints of one tiny run, at steps 6 and 12: different weights, the same vocabularies."""
    from conftest import tiny_raw

    from mtrain.config import config_from_dict
    tmp = tmp_path_factory.mktemp("ensemble")
    fit(config_from_dict(tiny_raw(tmp, spm_model, max_steps=12, save_every=6)), tmp / "run",
        log=lambda *_: None)
    return sorted((tmp / "run").glob("ckpt_*.pt"))


@pytest.fixture(scope="module")
def wider(tmp_path_factory, spm_model):
    """A model of another size (2+2 layers, width 48) with the same tokenizer."""
    from conftest import tiny_raw

    from mtrain.config import config_from_dict
    tmp = tmp_path_factory.mktemp("wider")
    raw = tiny_raw(tmp, spm_model, max_steps=6)
    raw["model"].update(encoder_layers=2, decoder_layers=2, d_model=48, heads=4, ffn_dim=96, max_positions=256)
    return fit(config_from_dict(raw), tmp / "run", log=lambda *_: None)


def test_a_model_ensembled_with_itself_translates_and_scores_as_it_does(two_models):
    model, toks, _ = checkpoint.load_for_inference([two_models[0]])
    lines = SAMPLE_EN.read_text().splitlines()[:8]
    for cfg in (DecodeConfig(beam=3, nbest=2, max_len_b=8), DecodeConfig(beam=1, max_len_b=8)):
        alone = list(translate_lines(lines, model, toks, cfg, CPU))
        assert list(translate_lines(lines, Ensemble([model, model]), toks, cfg, CPU)) == alone


def test_an_ensemble_samples_as_its_one_model_does(two_models):
    from mtrain.translate import Sampling
    model, toks, _ = checkpoint.load_for_inference([two_models[0]])
    lines = SAMPLE_EN.read_text().splitlines()[:6]
    cfg = DecodeConfig(max_len_b=8)
    alone = list(translate_lines(lines, model, toks, cfg, CPU, Sampling(temperature=2.0, seed=3)))
    twice = list(translate_lines(lines, Ensemble([model, model]), toks, cfg, CPU, Sampling(temperature=2.0, seed=3)))
    assert twice == alone


@pytest.mark.parametrize("pair", ["one run", "two sizes"])
def test_an_ensemble_scores_the_mean_of_its_models_log_probabilities(two_models, wider, pair):
    (a, toks, _), (b, _, _) = (checkpoint.load_for_inference([p])
                               for p in (two_models if pair == "one run" else [two_models[0], wider]))
    ensemble = Ensemble([a, b])
    assert ensemble.cfg.max_positions == min(a.cfg.max_positions, b.cfg.max_positions)
    ids = toks.src.encode_batch(SAMPLE_EN.read_text().splitlines()[:5])
    cfg = DecodeConfig(beam=1, lenpen=0.0, max_len_b=8, allow_unk=True)
    hyps = decode_ids(ensemble, ids, cfg, toks, CPU)
    for src, (hyp,) in zip(ids, hyps):
        out = [*hyp.tokens, toks.tgt.eos]
        src_t = torch.tensor([[*src, toks.src.eos]])
        tgt_in = torch.tensor([[toks.tgt.bos, *out[:-1]]])
        by_hand = []
        for model in (a, b):
            with torch.no_grad():
                logits = model(src_t, src_t == toks.src.pad, tgt_in, torch.ones_like(tgt_in, dtype=torch.bool))
            by_hand.append(float(logits.float().log_softmax(-1).gather(1, torch.tensor(out)[:, None]).sum()))
        assert hyp.score == pytest.approx(sum(by_hand) / 2, rel=1e-5, abs=1e-4)
        assert by_hand[0] != pytest.approx(by_hand[1], abs=1e-3)  # two different models
    # batched as one equals each line alone
    for line, (hyp,) in zip(ids, hyps):
        (alone,), = decode_ids(ensemble, [line], cfg, toks, CPU)
        assert alone.tokens == hyp.tokens and alone.score == pytest.approx(hyp.score, rel=1e-5, abs=1e-5)


def test_ensembles_need_one_vocabulary_and_show_no_attention(two_models, tmp_path, spm_model):
    from conftest import SAMPLE_DE, tiny_raw

    from mtrain.config import TokenizerConfig, config_from_dict
    from mtrain.tokenizer import train_tokenizer
    spm = train_tokenizer([SAMPLE_EN, SAMPLE_DE], TokenizerConfig(vocab_size=70), tmp_path / "spm")
    raw = tiny_raw(tmp_path, spm_model, max_steps=2)
    raw["tokenizer"] = {"model": str(spm)}
    other = fit(config_from_dict(raw), tmp_path / "other", log=lambda *_: None)
    with pytest.raises(MtrainError, match=r"other/final.pt: another source vocabulary than .*ckpt_\d+.pt; the models "
                                          r"of an ensemble must share both"):
        checkpoint.load_models([two_models[0], other])
    model, toks, _ = checkpoint.load_models(two_models)
    assert isinstance(model, Ensemble) and len(model.models) == 2
    from mtrain.translate import Inspect
    with pytest.raises(MtrainError, match="--alignment and --attention show one model's attention"):
        list(translate_lines(["a dog ."], model, toks, DecodeConfig(), CPU, inspect=Inspect("pieces")))
