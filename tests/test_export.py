import sys

import pytest
from conftest import SAMPLE_EN, assert_same_or_better, tiny_raw

from mtrain import checkpoint
from mtrain.config import DecodeConfig, config_from_dict
from mtrain.device import pick_device
from mtrain.errors import MtrainError
from mtrain.train import fit
from mtrain.translate import translate_lines

ctranslate2 = pytest.importorskip("ctranslate2")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, spm_model):
    """A small model trained until its outputs end on their own, well inside the length limit."""
    d = tmp_path_factory.mktemp("export")
    raw = tiny_raw(d, spm_model, max_steps=150, lr=3e-3, warmup=30, batch_tokens=600, valid_every=150,
                   save_every=150, label_smoothing=0.0)
    raw["model"].update(encoder_layers=2, decoder_layers=2, d_model=64, heads=4, ffn_dim=128, dropout=0.0)
    return fit(config_from_dict(raw), d / "run", log=lambda *_: None)


def test_ctranslate2_gives_mtrains_tokens(trained, tmp_path):
    from mtrain.export import ctranslate2_options, export_ctranslate2
    out = tmp_path / "ct2"
    assert "wrote" in export_ctranslate2(trained, out)
    assert {"model.bin", "shared_vocabulary.json", "config.json", "source.spm", "target.spm"} <= \
        {p.name for p in out.iterdir()}
    model, toks, _ = checkpoint.load_for_inference([trained])
    lines = SAMPLE_EN.read_text().splitlines()[:12]
    translator = ctranslate2.Translator(str(out), device="cpu", compute_type="float32", intra_threads=1)
    for beam in (1, 4):
        decode = DecodeConfig(beam=beam, lenpen=0.6, lenpen_type="plain")
        ours = [toks.tgt.sp.encode(x, out_type=str)
                for x in translate_lines(lines, model, toks, decode, pick_device("cpu", "fp32"))]
        theirs = []
        for line in lines:
            pieces = toks.src.sp.encode(line, out_type=str)
            options = ctranslate2_options(decode, len(pieces), model.cfg.max_positions)
            theirs.append(translator.translate_batch([pieces], **options)[0].hypotheses[0])
        if beam == 1:  # greedy: no stopping rule to differ on
            assert theirs == ours
        else:
            assert_same_or_better(model, toks, lines, ours, theirs, decode.lenpen, "plain")


def test_export_replaces_only_an_earlier_export(trained, tmp_path):
    """The folder is replaced whole, so one holding anything else (a run directory) is refused, intact."""
    from mtrain.export import export_ctranslate2
    run = trained.parent
    before = sorted(p.name for p in run.iterdir())
    with pytest.raises(MtrainError, match=r"holds files export did not write \(best\.pt, ckpt_"):
        export_ctranslate2(trained, run)
    assert sorted(p.name for p in run.iterdir()) == before
    with pytest.raises(MtrainError, match=r"final\.pt: is a file, not a folder \(for the CTranslate2 model\)"):
        export_ctranslate2(trained, trained)
    assert checkpoint.load(trained)["model"]
    out = tmp_path / "ct2"
    export_ctranslate2(trained, out)
    first = (out / "model.bin").stat().st_mtime_ns
    export_ctranslate2(trained, out, quantization="int8")  # an earlier export is replaced
    assert (out / "model.bin").stat().st_mtime_ns >= first and not list(tmp_path.glob(".ct2*"))
    (out / "notes.txt").write_text("mine")
    with pytest.raises(MtrainError, match=r"\(notes\.txt\)"):
        export_ctranslate2(trained, out)
    assert (out / "notes.txt").read_text() == "mine"
    with pytest.raises(MtrainError, match=r"--quantization: unknown weight type 'int3' \(CTranslate2 takes int8, "):
        export_ctranslate2(trained, tmp_path / "ct2_int3", quantization="int3")
    assert not (tmp_path / "ct2_int3").exists()


def test_export_command_takes_the_checkpoint_as_argument_or_c(trained, tmp_path):
    import subprocess

    from conftest import ROOT
    for n, where in enumerate(([str(trained)], ["-c", str(trained)])):
        r = subprocess.run([sys.executable, "-m", "mtrain", "export", *where, "--ctranslate2", str(tmp_path / f"ct{n}")],
                           capture_output=True, text=True, cwd=ROOT)
        assert r.returncode == 0, r.stderr
        assert (tmp_path / f"ct{n}" / "model.bin").stat().st_size > 0
    assert (tmp_path / "ct0" / "model.bin").read_bytes() == (tmp_path / "ct1" / "model.bin").read_bytes()


def test_export_without_ctranslate2_says_how_to_install(trained, tmp_path, monkeypatch):
    from mtrain.export import export_ctranslate2
    monkeypatch.setitem(sys.modules, "ctranslate2", None)
    with pytest.raises(MtrainError, match=r'pip install -e "\.\[ctranslate2\]"'):
        export_ctranslate2(trained, tmp_path / "ct2")
    assert not (tmp_path / "ct2").exists()


@pytest.mark.parametrize("pre_norm", [True, False], ids=["pre-norm", "post-norm"])
@pytest.mark.parametrize("share", [True, False], ids=["shared", "separate"])
def test_ctranslate2_scores_equal_mtrains(tmp_path, spm_model, pre_norm, share):
    """Log-probabilities of given translations, token by token, for both layer-norm placements."""
    import torch

    from mtrain.export import build_spec
    from mtrain.model import Transformer
    from mtrain.tokenizer import Tokenizer, Tokenizers
    raw = tiny_raw(tmp_path, spm_model)
    raw["model"].update(pre_norm=pre_norm, share_embeddings=share, d_model=32, heads=4, ffn_dim=48,
                        activation="gelu" if share else "relu")
    cfg = config_from_dict(raw)
    tok = Tokenizer.load(spm_model)
    toks = Tokenizers(tok, tok)
    torch.manual_seed(0)
    model = Transformer(cfg.model, tok.vocab_size, tok.vocab_size, tok.pad).eval()
    spec = build_spec(model, toks)
    spec.validate()
    spec.optimize()
    (tmp_path / "ct2").mkdir()
    spec.save(str(tmp_path / "ct2"))
    translator = ctranslate2.Translator(str(tmp_path / "ct2"), device="cpu", compute_type="float32")
    lines = SAMPLE_EN.read_text().splitlines()[:4]
    targets = ["ein Mann geht .", "zwei Hunde spielen im Schnee .", "eine Frau", "Kinder"]
    for src, tgt in zip(lines, targets):
        sp, tp = tok.sp.encode(src, out_type=str), tok.sp.encode(tgt, out_type=str)
        theirs = translator.score_batch([sp], [tp])[0].log_probs
        s = torch.tensor([tok.sp.encode(src) + [tok.eos]])
        t = tok.sp.encode(tgt)
        with torch.no_grad():
            logp = model.decode(torch.tensor([[tok.bos] + t]), model.encode(s, s == tok.pad), s == tok.pad)
            logp = logp[0].log_softmax(-1)
        ours = [float(logp[i, x]) for i, x in enumerate(t + [tok.eos])]
        assert theirs == pytest.approx(ours, abs=1e-3)


def test_a_source_past_max_positions_translates_as_mtrain_cuts_it(tmp_path, spm_model):
    """A source of max_positions pieces or more: mtrain cuts it; CTranslate2, given the exported
    limits, cuts it the same way, and with its own defaults still translates instead of failing the
    batch ("No position encodings are defined for positions >= N")."""
    from mtrain.export import ctranslate2_options, export_ctranslate2
    raw = tiny_raw(tmp_path, spm_model, max_steps=3)
    raw["model"]["max_positions"] = 24
    raw["data"]["max_len"] = 24
    final = fit(config_from_dict(raw), tmp_path / "run", log=lambda *_: None)
    out = tmp_path / "ct2"
    assert "max_input_length=23, max_decoding_length <= 22" in export_ctranslate2(final, out)
    model, toks, _ = checkpoint.load_for_inference([final])
    line = " ".join(SAMPLE_EN.read_text().splitlines()[:4])
    pieces = toks.src.sp.encode(line, out_type=str)
    assert len(pieces) > 30
    translator = ctranslate2.Translator(str(out), device="cpu", compute_type="float32", intra_threads=1)
    decode = DecodeConfig(beam=2, lenpen=0.6, lenpen_type="plain", max_len_a=3.0)  # the limit is max_positions
    ours = toks.tgt.sp.encode(next(translate_lines([line], model, toks, decode, pick_device("cpu", "fp32"))),
                              out_type=str)
    theirs = translator.translate_batch([pieces], **ctranslate2_options(decode, len(pieces), 24))[0].hypotheses[0]
    assert theirs == ours and 0 < len(ours) <= 22
    assert translator.translate_batch([pieces, pieces[:5]], beam_size=2)[0].hypotheses[0]  # defaults: no failure
