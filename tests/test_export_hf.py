"""`mtrain export --format hf`: Transformers itself loads the export and computes what mtrain computes
(logits, tokenizer ids, greedy and beam outputs), for each layout that maps; what does not map is
refused in one line with nothing written."""

import re
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, SAMPLE_DE, SAMPLE_EN, tagged_raw

from mtrain import checkpoint
from mtrain.config import config_from_dict, config_to_dict
from mtrain.device import pick_device
from mtrain.errors import MtrainError
from mtrain.export_hf import export_hf
from mtrain.model import sinusoids
from mtrain.train import fit
from mtrain.translate import translate_texts, with_overrides

transformers = pytest.importorskip("transformers")

SOURCES = SAMPLE_EN.read_text().splitlines()
TARGETS = SAMPLE_DE.read_text().splitlines()
# Tags first (as `--tag` puts them), characters the tokenizer never saw, odd spacing, an empty line
ODD = ["A man 😀 walks ☃ on the street.", "  two   dogs play\tin the snow . ", "", "ⅷ"]


def layout_model(tmp_path_factory, spm_model, name, **model):
    """A tagged model that knows the sample lines by heart, in another layout."""
    d = tmp_path_factory.mktemp(name)
    raw = tagged_raw(d, spm_model)
    raw["model"].update(model)
    if not model.get("share_embeddings", True):
        raw["tokenizer"].update(joint=False, vocab_size=80)
    return fit(config_from_dict(raw), d / "run", log=lambda *_: None)


@pytest.fixture(scope="module")
def post_norm(tmp_path_factory, spm_model):
    return layout_model(tmp_path_factory, spm_model, "post", pre_norm=False, activation="gelu")


@pytest.fixture(scope="module")
def separate(tmp_path_factory, spm_model):
    return layout_model(tmp_path_factory, spm_model, "separate", pre_norm=False, share_embeddings=False)


@pytest.fixture(params=["pre_norm", "post_norm", "separate"])
def exported(request, tagged_model, tmp_path):
    ckpt = tagged_model if request.param == "pre_norm" else request.getfixturevalue(request.param)
    out = tmp_path / "hf"
    summary = export_hf(ckpt, out)
    assert ("PegasusForConditionalGeneration" if request.param == "pre_norm" else "MarianMTModel") in summary
    return ckpt, out


def load(out):
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer
    model = AutoModelForSeq2SeqLM.from_pretrained(out).eval()
    source = AutoTokenizer.from_pretrained(out)
    target = AutoTokenizer.from_pretrained(out, subfolder="target") if (out / "target").is_dir() else source
    return model, source, target


def test_transformers_computes_mtrains_logits_from_mtrains_positions(exported):
    ckpt, out = exported
    ours, toks, cfg = checkpoint.load_for_inference([ckpt])
    theirs, source, _ = load(out)
    assert "trust_remote_code" not in (out / "config.json").read_text()
    table = sinusoids(cfg.model.max_positions, cfg.model.d_model)
    assert torch.equal(theirs.model.encoder.embed_positions.weight, table)  # mtrain's, not Transformers' own
    assert torch.equal(theirs.model.decoder.embed_positions.weight, table)
    lines = [f"<2de> {x}" for x in SOURCES]
    batch = source(lines, return_tensors="pt", padding=True)
    tgt = [[toks.tgt.bos] + toks.tgt.sp.encode(t) for t in TARGETS]
    width = max(map(len, tgt))
    tgt_in = torch.tensor([t + [toks.tgt.pad] * (width - len(t)) for t in tgt])
    src, pad = batch["input_ids"], batch["input_ids"] == toks.src.pad
    with torch.no_grad():
        want = ours.decode(tgt_in, ours.encode(src, pad), pad)
        got = theirs(**batch, decoder_input_ids=tgt_in).logits
    real = tgt_in != toks.tgt.pad  # positions after a target's end differ in what padding attends to
    assert len(lines) == 20 and (want[real] - got[real]).abs().max() <= 1e-4


def test_the_tokenizer_gives_the_ids_mtrain_feeds_and_reads_back_its_text(exported):
    ckpt, out = exported
    model, toks, cfg = checkpoint.load_for_inference([ckpt])
    _, source, target = load(out)
    tag = toks.src.sp.piece_to_id("<2de>")
    for line in SOURCES + ODD:
        text = line.strip()  # mtrain reads a line without its surrounding whitespace
        mine = [tag] + toks.src.sp.encode(text) + [toks.src.eos]  # --tag '<2de>' --keep-unknown
        assert source(f"<2de> {text}")["input_ids"] == mine, line
        assert source(text)["input_ids"] == mine[1:], line
    results = translate_texts(SOURCES, model, toks, with_overrides(cfg.decode, beam=1), pick_device("cpu", "fp32"),
                              tag=tag)
    ids = [[toks.tgt.bos] + r.hyps[0].tokens + [toks.tgt.eos] for r in results]
    assert target.batch_decode(ids, skip_special_tokens=True) == [r.texts[0] for r in results]


@pytest.mark.parametrize("beam", [1, 4])
def test_generate_gives_mtrains_translations(exported, beam):
    """Greedy: mtrain's output line for line. Beam search with the length penalty both define the same
    way (lenpen_type plain: score / length^alpha; generation_config.json carries it) too."""
    ckpt, out = exported
    model, toks, cfg = checkpoint.load_for_inference([ckpt])
    theirs, source, target = load(out)
    decode = with_overrides(cfg.decode, beam=beam, lenpen=1.0, lenpen_type="plain")
    for tag in ("<2de>", "<2en>"):
        ours = [r.texts[0] for r in translate_texts(SOURCES, model, toks, decode, pick_device("cpu", "fp32"),
                                                    tag=toks.src.sp.piece_to_id(tag))]
        batch = source([f"{tag} {x}" for x in SOURCES], return_tensors="pt", padding=True)
        with torch.no_grad():
            generated = theirs.generate(**batch, num_beams=beam, length_penalty=1.0, max_new_tokens=40)
        assert target.batch_decode(generated, skip_special_tokens=True) == ours
        assert ours == (TARGETS if tag == "<2de>" else SOURCES)  # the model knows the lines: a real check


def test_generation_config_and_model_card_say_what_mtrain_decodes_with(tagged_model, tmp_path):
    import json
    out = tmp_path / "hf"
    export_hf(tagged_model, out)
    _, toks, cfg = checkpoint.load_for_inference([tagged_model])
    settings = json.loads((out / "generation_config.json").read_text())
    assert settings["num_beams"] == cfg.decode.beam and settings["decoder_start_token_id"] == toks.tgt.bos
    assert set(settings["suppress_tokens"]) == {toks.tgt.pad, toks.tgt.bos, toks.tgt.unk}
    assert settings["length_penalty"] == 1.0 and cfg.decode.lenpen_type == "gnmt"  # GNMT has no equivalent
    card = (out / "README.md").read_text()
    assert "pipeline_tag: translation" in card and "MarianMTModel" not in card and "PegasusForConditionalGeneration" in card
    assert "tag `<2de>`" in card and "no equivalent" in card and "data/sample/train.en" in card
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))


def test_the_documented_snippet_runs(tagged_model, tmp_path):
    """docs/export.md's Python block, on an export: the translation of a sample line."""
    out = tmp_path / "hf"
    export_hf(tagged_model, out)
    block = re.search(r"```python\n(.*?)```", (ROOT / "docs" / "export.md").read_text(), re.S)[1]
    code = block.replace("exported/", str(out) + "/").replace("A man is riding a bike.", "<2de> " + SOURCES[0])
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    assert TARGETS[0] in run.stdout


def test_what_transformers_cannot_compute_is_refused_and_nothing_written(tmp_path, spm_model, tagged_model):
    raw = config_to_dict(config_from_dict(tagged_raw(tmp_path, spm_model)))
    state = checkpoint.load(tagged_model)
    from mtrain.model import Transformer
    raw["model"]["share_embeddings"] = False
    cfg = config_from_dict(raw)
    _, toks, _ = checkpoint.load_for_inference([tagged_model])
    model = Transformer(cfg.model, toks.src.vocab_size, toks.tgt.vocab_size, toks.src.pad)
    checkpoint.save(tmp_path / "unshared.pt", {**state, "config": raw, "model": model.state_dict(), "ema": None})
    out = tmp_path / "hf"
    with pytest.raises(MtrainError, match="pre-norm model with separate embedding tables has no exact Transformers"):
        export_hf(tmp_path / "unshared.pt", out)
    assert not out.exists() and not list(tmp_path.glob(".hf*"))
    r = subprocess.run([sys.executable, "-m", "mtrain", "export", str(tmp_path / "unshared.pt"), "--format", "hf",
                        "-o", str(out)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("mtrain: ")
    assert not out.exists()
    for args, message in ((["--format", "onnx", "-o", str(out)], "--format onnx: expected ctranslate2 or hf"),
                          (["--format", "hf", "--ctranslate2", str(out)], "give one of them"),
                          (["--format", "hf", "-o", str(out), "--quantization", "int8"], "CTranslate2's")):
        r = subprocess.run([sys.executable, "-m", "mtrain", "export", str(tagged_model), *args], capture_output=True,
                           text=True, cwd=ROOT)
        assert r.returncode == 1 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not out.exists()
