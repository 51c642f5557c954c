"""A battery of malformed inputs across every command: each ends with exit status != 0, exactly one
`mtrain:` line on stderr, no traceback, and no output file left behind. Then the odd inputs that are
valid and must simply work (CRLF, a byte-order mark, empty lines, a 10,000-token line, empty input).

The commands run in this process (as `mtrain.cli.main` with argv), which keeps 60 cases fast; a bug
would surface here as an exception instead of an exit, and fail the test just the same."""

from __future__ import annotations

import gzip
import io
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import SAMPLE_DE, SAMPLE_EN, tiny_raw

from mtrain import checkpoint, cli


@pytest.fixture(scope="module")
def world(tmp_path_factory, spm_model):
    """Files the cases point at: a trained tiny model, good and bad corpora, configs."""
    from mtrain.config import config_from_dict
    from mtrain.train import fit

    d = tmp_path_factory.mktemp("bad")
    fit(config_from_dict(tiny_raw(d, spm_model, max_steps=4, save_every=2)), d / "run", log=lambda *_: None)
    other = tiny_raw(d, spm_model, max_steps=2, save_every=2)
    other["model"]["d_model"] = 16
    fit(config_from_dict(other), d / "other", log=lambda *_: None)
    second_missing = tiny_raw(d, spm_model, max_steps=2)
    second_missing["data"]["train"] = [second_missing["data"]["train"], {"src": str(d / "gone.en"), "tgt": str(SAMPLE_DE)}]
    files = {
        "good.yaml": yaml.safe_dump(tiny_raw(d, spm_model, max_steps=2)),
        "second_missing.yaml": yaml.safe_dump(second_missing),
        "empty.txt": "",
        "blank.txt": "\n \n\n",
        "short.de": "".join(SAMPLE_DE.read_text().splitlines(True)[:5]),
        "hyp3.txt": "a\nb\nc\n",
        "three.tsv": "a\tb\tc\n",
        "list.yaml": "- 1\n- 2\n",
        "broken.yaml": "model: {d_model: [\n",
        "typo.yaml": "modle:\n  d_model: 64\n",
        "nodata.yaml": "model:\n  d_model: 32\n",
        "type.yaml": "model:\n  d_model: big\n",
        "heads.yaml": "model:\n  d_model: 100\n  heads: 8\n",
        "dropout.yaml": "model:\n  dropout: 1.5\n",
        "prec.yaml": "train:\n  precision: fp8\n",
        "dev.yaml": "train:\n  device: tpu\n",
        "time.yaml": "train:\n  max_time: ten minutes\n",
        "twice.yaml": "train:\n  lr: 1.0e-3\nmodel:\n  d_model: 32\ntrain:\n  seed: 3\n",  # the 2nd drops lr
        "junk.pt": "not a checkpoint",
        "notspm.model": "not a sentencepiece model",
    }
    for name, text in files.items():
        (d / name).write_text(text)
    (d / "bad.txt").write_bytes(b"fine\nstill fine\n\xc3\x28 broken\n")
    de = SAMPLE_DE.read_bytes().splitlines(True)
    (d / "bad20.de").write_bytes(b"".join(de[:2] + [b"\xc3\x28 broken\n"] + de[3:]))
    (d / "corrupt.gz").write_bytes(gzip.compress(SAMPLE_EN.read_bytes())[:60])
    data = (d / "run" / "last.pt").read_bytes()
    (d / "cut.pt").write_bytes(data[: len(data) // 3])
    torch.save({"state_dict": {}}, d / "foreign.pt")
    from mtrain.config import TokenizerConfig
    from mtrain.tokenizer import train_tokenizer
    other_spm = train_tokenizer([SAMPLE_DE], TokenizerConfig(vocab_size=60), d / "other_spm")
    state = checkpoint.load(d / "run" / "ckpt_2.pt")  # the same model, said to use another vocabulary
    state["tokenizer_src"] = state["tokenizer_tgt"] = other_spm.read_bytes()
    checkpoint.save(d / "other_tok.pt", state)

    class Evil:
        def __reduce__(self):
            return (eval, (f"open({str(d / 'pwned')!r}, 'w').close()",))

    torch.save({"format": "mtrain", "version": 2, "x": Evil()}, d / "evil.pt")

    def config(name, data_train=None, data_valid=None, **changes):
        raw = tiny_raw(d, spm_model, max_steps=2)
        if data_train is not None:
            raw["data"]["train"] = data_train
        if data_valid is not None:
            raw["data"]["valid"] = data_valid
        for dotted, value in changes.items():
            section, key = dotted.split("__")
            raw[section][key] = value
        (d / name).write_text(yaml.safe_dump(raw))

    config("missing_data.yaml", {"src": str(d / "nowhere.en"), "tgt": str(d / "nowhere.de")})
    config("mismatch.yaml", {"src": str(SAMPLE_EN), "tgt": str(d / "short.de")}, tokenizer__model="")
    config("bad_utf8.yaml", {"src": str(SAMPLE_EN), "tgt": str(d / "bad20.de")})
    config("tsv3.yaml", {"tsv": str(d / "three.tsv")})
    config("all_empty.yaml", {"src": str(d / "blank.txt"), "tgt": str(d / "blank.txt")})
    (d / "long.en").write_text("a dog runs " * 40 + "\n")
    config("valid_long.yaml", data_valid={"src": str(d / "long.en"), "tgt": str(d / "long.en")},
           model__max_positions=64, data__max_len=64)
    config("cache_file.yaml", data__cache_dir=str(d / "hyp3.txt" / "cache"))
    config("valid_empty.yaml", data_valid={"src": str(d / "blank.txt"), "tgt": str(d / "blank.txt")})
    config("bad_spm.yaml", tokenizer__model=str(d / "notspm.model"))
    (d / "foreign_dir").mkdir()
    (d / "foreign_dir" / "model.pt").write_bytes(b"theirs")
    return d


def run_main(args, monkeypatch, capfd, stdin: bytes = b""):
    monkeypatch.setattr(sys, "argv", ["mtrain", *map(str, args)])
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
    with pytest.raises(SystemExit) as e:
        cli.main()
    out, err = capfd.readouterr()
    return e.value.code, out, err


# (case id, argv with {d} for the world's folder and {out} for an output path, stdin, expected fragment)
CASES = [
    # tokenize
    ("tok-missing", "tokenize -i {d}/none.txt -o {out}", b"", "none.txt: file not found"),
    ("tok-dir", "tokenize -i {d} -o {out}", b"", "is a folder, not a file"),
    ("tok-utf8", "tokenize -i {d}/bad.txt -o {out}", b"", "bad.txt:3: invalid UTF-8"),
    ("tok-vocab-high", "tokenize -i " + str(SAMPLE_EN) + " --vocab-size 50000 -o {out}", b"", "is too large"),
    ("tok-vocab-low", "tokenize -i " + str(SAMPLE_EN) + " --vocab-size 4 -o {out}", b"", "vocab_size must be >= 8"),
    ("tok-model-type", "tokenize -i " + str(SAMPLE_EN) + " --model-type word -o {out}", b"", "model_type"),
    ("tok-coverage", "tokenize -i " + str(SAMPLE_EN) + " --character-coverage 1.5 -o {out}", b"",
     "character_coverage"),
    ("tok-symbols-twice", "tokenize -i " + str(SAMPLE_EN) + " --user-symbols a,a -o {out}", b"",
     "user_defined_symbols must be distinct"),
    ("tok-output-below-file", "tokenize -i " + str(SAMPLE_EN) + " --vocab-size 50 -o {d}/hyp3.txt/spm", b"",
     "hyp3.txt: is a file, not a folder (for the tokenizer model)"),
    ("tok-empty", "tokenize -i {d}/empty.txt -o {out}", b"", "no text to train a tokenizer on"),
    ("tok-language-twice", "tokenize -i " + str(SAMPLE_EN) + " -i " + str(SAMPLE_EN) + " --per-language -o {out}", b"",
     "would both write"),
    ("tok-no-input", "tokenize -o {out}", b"", "--input: give at least one"),
    ("tok-no-output", "tokenize -i " + str(SAMPLE_EN), b"", "--output: give the output prefix"),
    ("tok-corrupt-gz", "tokenize -i {d}/corrupt.gz -o {out}", b"", "corrupt.gz: cannot read"),
    ("tok-config-missing", "tokenize --config {d}/none.yaml -o {out}", b"", "none.yaml"),
    ("tok-set-without-config", "tokenize -i " + str(SAMPLE_EN) + " -o {out} --set tokenizer.vocab_size=50", b"",
     "--set tokenizer.vocab_size=50: --set overrides keys of a --config; without one, use the flags"),
    # fit
    ("fit-config-missing", "fit {d}/none.yaml -o {out}", b"", "none.yaml: config file not found"),
    ("fit-yaml-syntax", "fit {d}/broken.yaml -o {out}", b"", "broken.yaml"),
    ("fit-yaml-key-twice", "fit {d}/twice.yaml -o {out}", b"", "twice.yaml: line 5 not valid YAML (key 'train' given "
     "twice, first on line 1)"),
    ("fit-yaml-list", "fit {d}/list.yaml -o {out}", b"", "list.yaml"),
    ("fit-no-data", "fit {d}/nodata.yaml -o {out}", b"", "nodata.yaml: data.train: no training corpus given"),
    ("fit-second-corpus-missing", "fit {d}/second_missing.yaml -o {out}", b"", "gone.en"),
    ("fit-unknown-key", "fit {d}/typo.yaml -o {out}", b"", "modle"),
    ("fit-wrong-type", "fit {d}/type.yaml -o {out}", b"", "d_model"),
    ("fit-heads", "fit {d}/heads.yaml -o {out}", b"", "divisible by heads"),
    ("fit-dropout", "fit {d}/dropout.yaml -o {out}", b"", "dropout"),
    ("fit-precision", "fit {d}/prec.yaml -o {out}", b"", "precision"),
    ("fit-device", "fit {d}/dev.yaml -o {out}", b"", "device"),
    ("fit-max-time", "fit {d}/time.yaml -o {out}", b"", "cannot read duration 'ten minutes'"),
    ("fit-max-time-zero", "fit {d}/good.yaml -o {out} --set train.max_time=0", b"",
     "train: max_time '0' would stop before the first update; '' is no limit"),
    ("fit-patience-no-valid", "fit {d}/good.yaml -o {out} --set train.patience=2 --set data.valid={{}}", b"",
     "train.patience stops on validation BLEU, but data.valid gives no validation set"),
    ("fit-average-more-than-kept", "fit {d}/good.yaml -o {out} --set train.average_last=6 --set train.keep_last=5", b"",
     "train.average_last (6) exceeds train.keep_last (5)"),
    ("fit-tgt-model-joint", "fit {d}/good.yaml -o {out} --set tokenizer.tgt_model=x.model", b"",
     "tokenizer.tgt_model is the target side's model when tokenizer.joint is false"),
    ("fit-set-no-equals", "fit {d}/good.yaml --set train.lr -o {out}", b"", "train.lr"),
    ("fit-set-unknown", "fit {d}/good.yaml --set train.learning_rate=1 -o {out}", b"", "learning_rate"),
    ("fit-data-missing", "fit {d}/missing_data.yaml -o {out}", b"", "nowhere.en: file not found"),
    ("fit-line-counts", "fit {d}/mismatch.yaml -o {out}", b"", "line counts differ"),
    ("fit-data-utf8", "fit {d}/bad_utf8.yaml -o {out}", b"", "bad20.de:3: invalid UTF-8"),
    ("fit-tsv-fields", "fit {d}/tsv3.yaml -o {out}", b"", "three.tsv:1: expected 2 tab-separated fields"),
    ("fit-all-empty", "fit {d}/all_empty.yaml -o {out}", b"", "no training pairs"),
    ("fit-valid-empty", "fit {d}/valid_empty.yaml -o {out}", b"", "blank.txt: no validation pairs"),
    ("fit-valid-long", "fit {d}/valid_long.yaml -o {out}", b"", "long.en: a validation pair has"),
    ("fit-run-dir-file", "fit {d}/good.yaml -o {d}/hyp3.txt", b"", "hyp3.txt: is a file, not a folder (for the run"),
    ("fit-run-dir-below-file", "fit {d}/good.yaml -o {d}/hyp3.txt/run", b"", "run: cannot be created (for the run "
     "directory): "),
    ("fit-cache-below-file", "fit {d}/cache_file.yaml -o {out}", b"", "(for the data.cache_dir): "),
    ("fit-not-spm", "fit {d}/bad_spm.yaml -o {out}", b"", "notspm.model: not a SentencePiece model"),
    ("fit-resume-nothing", "fit {d}/good.yaml -o {out} --resume", b"", "nothing to resume"),
    ("fit-run-exists", "fit {d}/good.yaml -o {d}/run", b"", "already holds a run"),
    ("fit-resume-overwrite", "fit {d}/good.yaml -o {d}/run --resume --overwrite", b"", "give one of them"),
    ("fit-foreign-dir", "fit {d}/good.yaml -o {d}/foreign_dir --overwrite", b"", "holds files mtrain did not write"),
    ("fit-bad-flag", "fit {d}/good.yaml --bogus", b"", "No such option"),
    # translate
    ("tr-ckpt-missing", "translate -c {d}/none.pt -o {out}", b"a\n", "none.pt: checkpoint not found"),
    ("tr-ckpt-junk", "translate -c {d}/junk.pt -o {out}", b"a\n", "junk.pt: not a readable checkpoint"),
    ("tr-ckpt-cut", "translate -c {d}/cut.pt -o {out}", b"a\n", "cut.pt: not a readable checkpoint"),
    ("tr-ckpt-foreign", "translate -c {d}/foreign.pt -o {out}", b"a\n", "foreign.pt: not an mtrain checkpoint"),
    ("tr-ckpt-evil", "translate -c {d}/evil.pt -o {out}", b"a\n", "--trust-checkpoint"),
    ("tr-input-missing", "translate -c {d}/run/last.pt -i {d}/none.en -o {out}", b"", "none.en: file not found"),
    ("tr-input-utf8", "translate -c {d}/run/last.pt -i {d}/bad.txt -o {out}", b"", "bad.txt:3: invalid UTF-8"),
    ("tr-stdin-utf8", "translate -c {d}/run/last.pt -o {out}", b"ok\n\xff\n", "stdin:2: invalid UTF-8"),
    ("tr-output-dir", "translate -c {d}/run/last.pt -o {d}/no/such/dir/out.de", b"a\n", "does not exist"),
    ("tr-buffer-zero", "translate -c {d}/run/last.pt --buffer-lines 0 -o {out}", b"a\n", "--buffer-lines: must be >= 1"),
    ("tr-beam-zero", "translate -c {d}/run/last.pt --beam 0 -o {out}", b"a\n", "beam and nbest must be >= 1"),
    ("tr-nbest", "translate -c {d}/run/last.pt --beam 2 --nbest 3 -o {out}", b"a\n", "nbest (3) cannot exceed"),
    ("tr-temperature", "translate -c {d}/run/last.pt --sample --temperature 0 -o {out}", b"a\n", "--temperature"),
    ("tr-top-k", "translate -c {d}/run/last.pt --sample --top-k -1 -o {out}", b"a\n", "--top-k"),
    ("tr-top-p", "translate -c {d}/run/last.pt --sample --top-p 2 -o {out}", b"a\n", "--top-p"),
    ("tr-cuda", "translate -c {d}/run/last.pt --device cuda -o {out}", b"a\n", "CUDA is not available"),
    ("tr-device", "translate -c {d}/run/last.pt --device tpu -o {out}", b"a\n", "--device: must be auto"),
    ("tr-fp16-cpu", "translate -c {d}/run/last.pt --device cpu --precision fp16 -o {out}", b"a\n", "fp16"),
    ("tr-precision", "translate -c {d}/run/last.pt --precision fp8 -o {out}", b"a\n", "--precision: must be"),
    ("tr-attention-file", "translate -c {d}/run/last.pt --attention {d}/hyp3.txt -o {out}", b"a\n",
     "hyp3.txt: is a file, not a folder (for the --attention heatmaps)"),
    ("tr-lenpen-nan", "translate -c {d}/run/last.pt --lenpen nan -o {out}", b"a\n", "lenpen and max_len_a must be finite"),
    ("tr-sample-beam", "translate -c {d}/run/last.pt --sample --nbest 3 -o {out}", b"a\n",
     "--sample draws one translation per line; --nbest set beam search"),
    ("tr-sampling-without-sample", "translate -c {d}/run/last.pt --temperature 0.7 -o {out}", b"a\n",
     "--temperature sets sampling, which needs --sample (without it, translate runs beam search)"),
    ("tr-attention-limit", "translate -c {d}/run/last.pt --attention {d}/att --attention-limit -1 -o {out}", b"a\n",
     "--attention-limit: must be >= 0"),
    ("tr-attention-limit-alone", "translate -c {d}/run/last.pt --attention-limit 3 -o {out}", b"a\n",
     "--attention-limit counts the heatmaps of --attention DIR, which is not given"),
    ("tr-input-folder", "translate -c {d}/run/last.pt -i {d}/run -o {out}", b"", "run: is a folder, not a file"),
    ("tr-output-folder", "translate -c {d}/run/last.pt -o {d}/run", b"a\n", "run: is a folder; the output is a file"),
    ("tr-bad-flag", "translate -c {d}/run/last.pt --bogus", b"a\n", "No such option"),
    # score
    ("score-ref-missing", "score --ref {d}/none.de {d}/hyp3.txt", b"", "none.de: file not found"),
    ("score-lines", "score --ref " + str(SAMPLE_DE) + " {d}/hyp3.txt", b"", "has 3 lines"),
    ("score-metric", "score --ref {d}/hyp3.txt --metrics bleurt {d}/hyp3.txt", b"", "unknown metric"),
    ("score-no-metric", "score --ref {d}/hyp3.txt --metrics , {d}/hyp3.txt", b"", "--metrics: no metric given"),
    ("score-tokenizer", "score --ref {d}/hyp3.txt --tokenize moses {d}/hyp3.txt", b"", "--tokenize: unknown tokenizer"),
    ("score-empty", "score --ref {d}/empty.txt {d}/empty.txt", b"", "empty.txt: no lines to score"),
    ("score-empty-stdin", "score --ref {d}/empty.txt", b"", "stdin: no lines to score"),
    ("score-utf8", "score --ref {d}/hyp3.txt {d}/bad.txt", b"", "bad.txt:3: invalid UTF-8"),
    ("score-tokenize-no-bleu", "score --ref {d}/hyp3.txt {d}/hyp3.txt --metrics chrf --tokenize intl", b"",
     "--tokenize sets BLEU's tokenizer, and --metrics chrf has no BLEU"),
    ("score-lowercase-ter", "score --ref {d}/hyp3.txt {d}/hyp3.txt --metrics ter -lc", b"",
     "--lowercase applies to BLEU and chrF; TER ignores case already"),
    ("score-alignment-output", "score --ref {d}/hyp3.txt", b"a ||| 0-0\n ||| \nc ||| 0-0\n",
     "stdin: every line holds ' ||| ' (translate's --alignment or --nbest output?)"),
    ("score-compare-same", "score --ref {d}/hyp3.txt {d}/hyp3.txt --compare {d}/hyp3.txt", b"", "identical line for line"),
    ("score-compare-missing", "score --ref {d}/hyp3.txt {d}/hyp3.txt --compare {d}/none.txt", b"", "none.txt"),
    # average
    ("avg-missing", "average {d}/run/ckpt_2.pt {d}/none.pt -o {out}", b"", "none.pt: checkpoint not found"),
    ("avg-mismatch", "average {d}/run/ckpt_2.pt {d}/other/ckpt_2.pt -o {out}", b"", "does not match"),
    ("avg-output-dir", "average {d}/run/ckpt_2.pt {d}/run/ckpt_4.pt -o {d}/no/dir/avg.pt", b"", "does not exist"),
    ("avg-onto-input", "average {d}/run/ckpt_2.pt {d}/run/ckpt_4.pt -o {d}/run/ckpt_4.pt", b"",
     "is one of the checkpoints being averaged"),
    ("avg-twice", "average {d}/run/ckpt_2.pt {d}/run/../run/ckpt_2.pt -o {out}", b"", "ckpt_2.pt: given twice"),
    ("avg-onto-last", "average {d}/run/ckpt_2.pt -o {d}/run/last.pt", b"", "a training checkpoint that fit --resume needs"),
    ("avg-other-tokenizer", "average {d}/run/ckpt_2.pt {d}/other_tok.pt -o {out}", b"", "other_tok.pt: its tokenizer "
     "differs from that of"),
    ("avg-output-folder", "average {d}/run/ckpt_2.pt -o {d}/run", b"", "run: is a folder; the averaged checkpoint"),
    ("avg-evil", "average {d}/evil.pt -o {out}", b"", "--trust-checkpoint"),
]


@pytest.mark.parametrize("name, argv, stdin, expected", CASES, ids=[c[0] for c in CASES])
def test_malformed_input_is_one_line(world, tmp_path, monkeypatch, capfd, name, argv, stdin, expected):
    out = tmp_path / "out"
    args = argv.format(d=world, out=out).split()
    def written():  # the encoded-data cache may grow (an empty corpus is a valid cache entry); no more
        return sorted(str(p) for p in world.rglob("*") if "cache" not in p.parts or ".tmp" in p.name)

    before = written()
    code, _, err = run_main(args, monkeypatch, capfd, stdin)
    assert code not in (0, None), err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("mtrain: "), err
    assert expected in lines[0], lines[0]
    assert "Traceback" not in err
    assert not out.exists() and not list(tmp_path.glob("out*")) and not list(tmp_path.glob(".out*"))
    assert written() == before  # nothing written beside the inputs, no temporary file left
    assert not (world / "pwned").exists()


def test_there_are_at_least_forty_cases():
    assert len(CASES) >= 40
    assert {c[1].split()[0] for c in CASES} == {"tokenize", "fit", "translate", "score", "average"}


def test_a_read_only_folder_is_named_before_any_work(world, tmp_path, monkeypatch, capfd):
    import os
    real = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: real(path, mode) and Path(path) != tmp_path)
    code, _, err = run_main(["fit", world / "good.yaml", "-o", tmp_path / "runs" / "a"], monkeypatch, capfd)
    assert code == 1 and err.strip() == (f"mtrain: {tmp_path / 'runs' / 'a'}: cannot be created (for the run "
                                         f"directory): {tmp_path} is not writable")
    assert list(tmp_path.iterdir()) == []


def test_average_replaces_an_ordinary_file_but_never_a_training_checkpoint(world, tmp_path, monkeypatch, capfd):
    last = (world / "run" / "last.pt").read_bytes()
    for target in (world / "run" / "last.pt", world / "run" / "ckpt_4.pt"):
        before = target.read_bytes()
        code, _, err = run_main(["average", world / "run" / "ckpt_2.pt", world / "run" / "ckpt_4.pt", "-o", target],
                                monkeypatch, capfd)
        assert code == 1 and "another file" in err and target.read_bytes() == before
    assert (world / "run" / "last.pt").read_bytes() == last
    out = tmp_path / "avg.pt"
    out.write_text("an old file that is not a checkpoint")
    code, stdout, _ = run_main(["average", world / "run" / "ckpt_2.pt", "-o", out], monkeypatch, capfd)
    assert code in (0, None) and "averaged 1 checkpoint into" in stdout
    assert set(checkpoint.load(out)) >= {"model", "config"} and "optimizer" not in checkpoint.load(out)
    code, stdout, _ = run_main(["average", world / "run" / "ckpt_2.pt", world / "run" / "ckpt_4.pt", "-o", out],
                               monkeypatch, capfd)  # an earlier average is not a training checkpoint
    assert code in (0, None) and "averaged 2 checkpoints" in stdout


def translate(world, monkeypatch, capfd, data: bytes, *extra) -> tuple[int, list[str], str]:
    code, out, err = run_main(["translate", "-c", world / "run" / "last.pt", "--beam", "2", "--max-len-b", "5",
                               *extra], monkeypatch, capfd, data)
    return code, out.split("\n")[:-1], err


def test_odd_but_valid_inputs_work(world, tmp_path, monkeypatch, capfd):
    plain = b"a man is walking .\n\na dog runs .\n"
    code, expected, err = translate(world, monkeypatch, capfd, plain)
    assert code == 0 and len(expected) == 3 and expected[1] == "" and expected[0] != "", err
    crlf = plain.replace(b"\n", b"\r\n")
    assert translate(world, monkeypatch, capfd, crlf)[1] == expected
    bom = b"\xef\xbb\xbf" + plain
    assert translate(world, monkeypatch, capfd, bom)[1] == expected
    code, lines, err = translate(world, monkeypatch, capfd, b"")
    assert code == 0 and lines == []
    long = ("word " * 10_000).encode() + b"\n" + plain
    code, lines, err = translate(world, monkeypatch, capfd, long)
    assert code == 0 and len(lines) == 4 and lines[1:] == expected
    assert "truncated" in err and "Traceback" not in err
    empty_out = tmp_path / "empty.de"
    code, _, err = run_main(["translate", "-c", world / "run" / "last.pt", "-i", world / "empty.txt",
                             "-o", empty_out], monkeypatch, capfd)
    assert code == 0 and empty_out.read_text() == ""


def test_odd_but_valid_text_for_score_and_tokenize(world, tmp_path, monkeypatch, capfd):
    ref = tmp_path / "ref.txt"
    text = "ein Mann geht über die Straße .\nzwei Hunde spielen im Schnee .\n"
    ref.write_bytes(b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode())
    code, out, err = run_main(["score", "--ref", ref, "--metrics", "bleu"], monkeypatch, capfd, text.encode())
    assert code == 0 and "BLEU = 100.00" in out, err
    text = tmp_path / "crlf.txt"
    text.write_bytes(b"\xef\xbb\xbf" + SAMPLE_EN.read_bytes().replace(b"\n", b"\r\n"))
    code, out, err = run_main(["tokenize", "-i", text, "--vocab-size", 60, "-o", tmp_path / "spm"],
                              monkeypatch, capfd)
    assert code == 0, err
    from mtrain.tokenizer import Tokenizer
    vocab = Tokenizer.load(tmp_path / "spm.model").sp
    pieces = [vocab.id_to_piece(i) for i in range(vocab.get_piece_size())]
    assert not any("\ufeff" in p or "\r" in p for p in pieces)
