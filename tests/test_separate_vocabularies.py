"""Separate source and target vocabularies (tokenizer.joint: false, model.share_embeddings: false)
through every command, end to end: one naming rule for the models (spm.src.model + spm.tgt.model,
never a spm.model that is one side only) from tokenize to export."""

import json
import subprocess
import sys

import pytest
from conftest import ROOT, SAMPLE_DE, SAMPLE_EN, assert_same_or_better, tiny_raw

from mtrain import checkpoint
from mtrain.config import config_from_dict
from mtrain.device import pick_device
from mtrain.prepare import prepare
from mtrain.train import fit
from mtrain.translate import translate_lines, with_overrides

LINES = SAMPLE_EN.read_text().splitlines()


def separate(tmp_path, spm_model, **train) -> dict:
    raw = tiny_raw(tmp_path, spm_model, **train)
    raw["tokenizer"] = {"joint": False, "vocab_size": 60}  # trained into the run, one model a side
    raw["model"].update(share_embeddings=False, encoder_layers=2, decoder_layers=2, d_model=64, heads=4,
                        ffn_dim=128, dropout=0.0)
    raw["train"].update(lr=3e-3, warmup=30, batch_tokens=600, label_smoothing=0.0, valid_every=1000)
    return raw


def sides(folder):
    return sorted(p.name for p in folder.glob("spm*.model"))


def test_every_command_with_separate_vocabularies(tmp_path, spm_model):
    quiet = {"log": lambda *_: None}
    raw = separate(tmp_path, spm_model, max_steps=150, save_every=150)
    first = fit(config_from_dict(raw), tmp_path / "run", **quiet)
    assert sides(tmp_path / "run") == ["spm.src.model", "spm.tgt.model"]
    model, toks, cfg = checkpoint.load_for_inference([first])
    assert not toks.joint and toks.src.identity != toks.tgt.identity and model.src_embed is not model.tgt_embed

    # prepare, then fit on the prepared directory (refused before: "prepared with another tokenizer"),
    # then resume that run
    prepared = prepare(config_from_dict(raw), tmp_path / "prepared", workers=1, **quiet)
    assert sides(prepared) == ["spm.src.model", "spm.tgt.model"]
    on_prepared = {**raw, "data": {**raw["data"], "prepared": str(prepared)},
                   "train": {**raw["train"], "max_steps": 2, "save_every": 2}}
    fit(config_from_dict(on_prepared), tmp_path / "prepared_run", **quiet)
    on_prepared["train"]["max_steps"] = 4
    fit(config_from_dict(on_prepared), tmp_path / "prepared_run", resume=True, **quiet)
    assert checkpoint.load(tmp_path / "prepared_run" / "last.pt")["step"] == 4

    # --init from the first run, then resume that run: it trained a joint tokenizer over the run's
    # spm.tgt.model on resume before, and then refused
    child = {**raw, "train": {**raw["train"], "max_steps": 2, "save_every": 2}}
    fit(config_from_dict(child), tmp_path / "child", init=first, **quiet)
    tgt_before = (tmp_path / "child" / "spm.tgt.model").read_bytes()
    child["train"]["max_steps"] = 4
    fit(config_from_dict(child), tmp_path / "child", resume=True, **quiet)
    assert (tmp_path / "child" / "spm.tgt.model").read_bytes() == tgt_before
    assert sides(tmp_path / "child") == ["spm.src.model", "spm.tgt.model"]
    assert checkpoint.load(tmp_path / "child" / "last.pt")["step"] == 4

    # translate: the command (a subprocess) and the function agree, and the model learnt the pairs
    decode = with_overrides(cfg.decode, beam=2)
    ours = list(translate_lines(LINES, model, toks, decode, pick_device("cpu", "fp32")))
    assert sum(a == b for a, b in zip(ours, SAMPLE_DE.read_text().splitlines())) >= len(LINES) // 2, ours
    cli = subprocess.run([sys.executable, "-m", "mtrain", "translate", "-c", str(first), "--beam", "2"],
                         input="\n".join(LINES) + "\n", capture_output=True, text=True, cwd=ROOT)
    assert cli.returncode == 0, cli.stderr
    assert cli.stdout.splitlines() == ours

    # constraints and a prefix are the target tokenizer's pieces (its vocabulary is not the source's)
    from mtrain.guide import Wish, holds
    from mtrain.translate import translate_texts
    wanted = [SAMPLE_DE.read_text().splitlines()[(i + 3) % 20].split()[1] for i in range(6)]
    guided = translate_texts(LINES[:6], model, toks, decode, pick_device("cpu", "fp32"),
                             wishes=[Wish((w,), "zwei ") for w in wanted])
    for result, word in zip(guided, wanted):
        assert holds(result.hyps[0].tokens, tuple(toks.tgt.sp.encode(word))) and word in result.texts[0]
        assert result.texts[0].startswith("zwei ")

    # serve: the server's engine answers as translate does
    pytest.importorskip("fastapi")
    from mtrain.serve import Limits, Translator
    translator = Translator([first], "cpu", "fp32", False, 2)
    job = translator.job({"text": LINES[:6]}, Limits())
    translator.admit(job)
    answers = []
    while not answers:
        answers = translator.step()
    assert [t["text"] for t in answers[0][1]["translations"]] == ours[:6]

    # export: CTranslate2 gives mtrain's tokens, with the two vocabularies
    ctranslate2 = pytest.importorskip("ctranslate2")
    from mtrain.export import ctranslate2_options, export_ctranslate2
    export_ctranslate2(first, tmp_path / "ct2")
    config = json.loads((tmp_path / "ct2" / "config.json").read_text())
    assert config.get("unk_token") and (tmp_path / "ct2" / "source_vocabulary.json").is_file()
    assert (tmp_path / "ct2" / "source.spm").read_bytes() != (tmp_path / "ct2" / "target.spm").read_bytes()
    ct = ctranslate2.Translator(str(tmp_path / "ct2"), device="cpu", compute_type="float32", intra_threads=1)
    plain = with_overrides(decode, lenpen_type="plain")  # CTranslate2's length penalty
    lines, ours, theirs = [], [], []
    for line, mine in zip(LINES[:8], translate_lines(LINES[:8], model, toks, plain, pick_device("cpu", "fp32"))):
        pieces, out = toks.src.sp.encode(line, out_type=str), toks.tgt.sp.encode(mine, out_type=str)
        options = ctranslate2_options(plain, len(pieces), model.cfg.max_positions)
        if len(out) >= options["max_decoding_length"]:  # at the limit the two end otherwise (export.py)
            continue
        lines.append(line)
        ours.append(out)
        theirs.append(ct.translate_batch([pieces], **options)[0].hypotheses[0])
    assert len(lines) >= 6
    assert_same_or_better(model, toks, lines, ours, theirs, plain.lenpen, "plain")


def test_tokenize_writes_the_models_where_fit_reads_them(tmp_path, spm_model):
    """`mtrain tokenize --config` with separate vocabularies wrote X.src.model and X.tgt.model for
    tokenizer.model X.model, where fit looked for X.model and X.tgt.model."""
    import yaml

    from mtrain.tokenizer import get_tokenizers, run_tokenize
    for model in ("spm/sides.model", "spm/pair.src.model"):
        raw = separate(tmp_path, spm_model)
        raw["tokenizer"]["model"] = str(tmp_path / model)
        (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
        list(run_tokenize([], None, tmp_path / "c.yaml", [], False))
        toks = get_tokenizers(config_from_dict(raw), tmp_path / "unused", write=False)  # reads, never trains
        assert not toks.joint and toks.src.vocab_size == toks.tgt.vocab_size == 60
    assert sorted(p.name for p in (tmp_path / "spm").glob("*.model")) == [
        "pair.src.model", "pair.tgt.model", "sides.model", "sides.tgt.model"]
