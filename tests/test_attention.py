import sys

import pytest
import torch

from mtrain import checkpoint
from mtrain.attention import align, cross_attention, word_index
from mtrain.errors import MtrainError
from mtrain.train import fit
from mtrain.translate import Inspect


@pytest.fixture(scope="module")
def trained(tmp_path_factory, spm_model):
    from conftest import tiny_raw

    from mtrain.config import config_from_dict
    d = tmp_path_factory.mktemp("attn")
    raw = tiny_raw(d, spm_model, max_steps=10)
    raw["model"].update(decoder_layers=2)
    return fit(config_from_dict(raw), d / "run", log=lambda *_: None)


def test_weights_are_distributions_and_padding_gets_none(trained):
    model, toks, _ = checkpoint.load_for_inference([trained])
    src = [toks.src.encode_batch(["a man is walking down the street ."])[0], toks.src.encode_batch(["a dog ."])[0]]
    out = [[10, 11, 12, 13, 14, 15], [20, 21]]
    w = cross_attention(model, src, out, toks.tgt.bos, toks.tgt.eos, toks.tgt.pad)
    B, L, H, T, S = w.shape
    assert (B, L, H) == (2, 2, model.cfg.heads) and T == 7 and S == len(src[0]) + 1
    real = w[0].sum(-1)  # every row of the longer pair is a distribution
    assert torch.allclose(real, torch.ones_like(real), atol=1e-5)
    short = w[1, :, :, :3, :len(src[1]) + 1].sum(-1)
    assert torch.allclose(short, torch.ones_like(short), atol=1e-5)
    assert (w[1, :, :, :, len(src[1]) + 1:] == 0).all()  # padded source columns
    assert (w[1, :, :, 3:] == 0).all()  # rows past the second sentence's EOS
    alone = cross_attention(model, src[1:], out[1:], toks.tgt.bos, toks.tgt.eos, toks.tgt.pad)
    assert torch.allclose(alone[0], w[1, :, :, :3, :len(src[1]) + 1], atol=1e-5)  # padding changes nothing


def test_alignment_from_weights_pieces_and_words():
    w = torch.zeros(2, 1, 4, 4)  # 2 layers, 1 head, 3 target pieces + EOS, 3 source pieces + EOS
    w[0, 0, 0, 2] = w[0, 0, 1, 0] = w[0, 0, 2, 1] = w[0, 0, 3, 3] = 1.0  # the penultimate (first) layer
    w[1, 0, :, 0] = 1.0  # the last layer would say otherwise
    assert align(w) == "2-0 0-1 1-2"
    assert word_index(["\u2581a", "b", "\u2581c"]) == [0, 0, 1]
    assert align(w, ["\u2581ab", "c", "\u2581d"], ["\u2581x", "\u2581y", "z"], words=True) == "1-0 0-1"


def test_translate_writes_alignments_and_heatmaps(trained, tmp_path, monkeypatch, capfd):
    from mtrain import cli
    src = tmp_path / "in.en"
    src.write_text("a man is walking .\n\na dog runs .\n")
    monkeypatch.setattr(sys, "argv", ["mtrain", "translate", "-c", str(trained), "-i", str(src), "--beam", "2",
                                      "--max-len-b", "6", "--alignment", "--attention", str(tmp_path / "attn"),
                                      "--attention-limit", "2"])
    with pytest.raises(SystemExit) as e:
        cli.main()
    out, err = capfd.readouterr()
    assert e.value.code == 0, err
    lines = out.splitlines()
    assert len(lines) == 3 and all(" ||| " in line or line.endswith(" |||") for line in lines)
    assert lines[1].strip() == "|||"  # the empty line stays empty, with an empty alignment
    for line in (lines[0], lines[2]):
        text, pairs = line.split(" ||| ")
        assert all(p.count("-") == 1 for p in pairs.split())
    assert sorted(p.name for p in (tmp_path / "attn").iterdir()) == ["line1.png"]  # line 3 is past the limit
    assert (tmp_path / "attn" / "line1.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_heatmaps_without_matplotlib_say_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails
    with pytest.raises(MtrainError, match=r'pip install -e "\.\[plot\]"'):
        Inspect(attention_dir=tmp_path / "attn")
    assert not (tmp_path / "attn").exists()
