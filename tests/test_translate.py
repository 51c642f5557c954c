import gzip
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, SAMPLE_EN

from mtrain import checkpoint
from mtrain.config import DecodeConfig
from mtrain.device import pick_device
from mtrain.train import fit
from mtrain.translate import Inspect, Sampling, decode_ids, length_batches, translate_lines


@pytest.fixture
def trained(tmp_path, tiny_cfg):
    run = tmp_path / "run"
    fit(tiny_cfg(max_steps=10, save_every=5, average_last=2), run, log=lambda *_: None)
    return run


def test_length_batches_respect_budget():
    lengths = [5, 50, 3, 20, 20, 7, 1]
    batches = length_batches(lengths, 40)
    assert sorted(i for b in batches for i in b) == list(range(7))
    assert all(len(b) * max(lengths[i] for i in b) <= 40 or len(b) == 1 for b in batches)


def test_empty_and_long_lines_keep_line_counts(trained):
    model, toks, cfg = checkpoint.load_for_inference([trained / "final.pt"])
    lines = ["a man is walking .", "", "   ", "word " * 2000, "a dog ."]
    out = list(translate_lines(lines, model, toks, DecodeConfig(beam=2, max_len_b=5, max_len_a=0),
                               pick_device("cpu", "fp32")))
    assert len(out) == 5 and out[1] == "" and out[2] == ""
    assert out[0] != ""


def test_nbest_format(trained):
    model, toks, cfg = checkpoint.load_for_inference([trained / "final.pt"])
    out = list(translate_lines(["a boy .", "", "a girl ."], model, toks, DecodeConfig(beam=3, nbest=3, max_len_b=6),
                               pick_device("cpu", "fp32")))
    assert len(out) == 9
    fields = [line.split(" ||| ") for line in out]
    assert [f[0] for f in fields] == ["0"] * 3 + ["1"] * 3 + ["2"] * 3
    scores = [float(f[2]) for f in fields[:3]]
    assert scores == sorted(scores, reverse=True)


def test_pipe_average_and_score(trained):
    ckpts = sorted(trained.glob("ckpt_*.pt"))
    assert len(ckpts) == 2
    args = [sys.executable, "-m", "mtrain", "translate", "--beam", "2", "--max-len-b", "6"]
    for c in ckpts:
        args += ["--checkpoint", str(c)]
    text = SAMPLE_EN.read_text()
    out = subprocess.run(args, input=text, capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert len(out.stdout.splitlines()) == len(text.splitlines())
    averaged, _, _ = checkpoint.load_for_inference(ckpts)
    first, second = (checkpoint.load(c)["model"] for c in ckpts)
    for name, value in averaged.state_dict().items():
        assert torch.allclose(value, (first[name] + second[name]) / 2, atol=1e-6), name


def test_sampling_continues_its_stream_across_blocks(trained):
    model, toks, cfg = checkpoint.load_for_inference([trained / "final.pt"])
    lines = ["a man is walking ."] * 4
    dev = pick_device("cpu", "fp32")
    sampling = dict(temperature=3.0, seed=5)
    twice = list(translate_lines(lines * 2, model, toks, DecodeConfig(max_len_b=8), dev, Sampling(**sampling),
                                 block=4))
    assert twice[:4] == list(translate_lines(lines, model, toks, DecodeConfig(max_len_b=8), dev, Sampling(**sampling),
                                             block=4))
    assert twice[4:] != twice[:4]  # the second block draws new samples, not the first block's again


def test_blocks_of_one_answer_each_line_before_reading_the_next(trained):
    model, toks, cfg = checkpoint.load_for_inference([trained / "final.pt"])
    read = []

    def lines():
        for i, line in enumerate(["a man .", "", "a dog .", "a boy ."]):
            read.append(i)
            yield line

    out = translate_lines(lines(), model, toks, DecodeConfig(beam=2, max_len_b=5), pick_device("cpu", "fp32"), block=1)
    seen = []
    for line in out:
        seen.append((line, len(read)))
    assert [n for _, n in seen] == [1, 2, 3, 4]  # line i's output came before line i+1 was read
    assert seen[1][0] == ""  # the empty line stays empty, in its place
    read.clear()
    assert len(list(translate_lines(lines(), model, toks, DecodeConfig(beam=2, max_len_b=5),
                                    pick_device("cpu", "fp32")))) == 4 and read == [0, 1, 2, 3]


def test_a_terminal_gets_each_line_translated_as_it_is_typed(trained):
    """With stdin a terminal, a typed line is answered while stdin is still open (no 2,000-line wait)."""
    import os
    import pty
    import select
    primary, terminal = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "mtrain", "translate", "-c", str(trained / "final.pt"),
                             "--beam", "2", "--max-len-b", "5"], stdin=terminal, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=ROOT)
    os.close(terminal)
    try:
        os.write(primary, b"a man .\n")
        ready, _, _ = select.select([proc.stdout], [], [], 120)
        assert ready, "no translation while stdin stayed open"
        assert proc.stdout.readline().endswith(b"\n")  # one whole line (a tiny model may translate to "")
        os.write(primary, b"\x04")  # end of input: Ctrl-D
        assert proc.wait(120) == 0, proc.stderr.read()
    finally:
        proc.kill()
        os.close(primary)


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=0.0), "--temperature: must be > 0"),
    (dict(temperature=-1.0), "--temperature: must be > 0"),
    (dict(top_k=-1), "--top-k: must be >= 0"),
    (dict(top_p=0.0), r"--top-p: must be in \(0, 1\]"),
    (dict(top_p=1.5), r"--top-p: must be in \(0, 1\]"),
])
def test_bad_sampling_settings(kwargs, message):
    from mtrain.errors import MtrainError
    from mtrain.translate import Sampling
    with pytest.raises(MtrainError, match=message):
        Sampling(**kwargs)


def test_output_file_appears_only_when_complete(trained, tmp_path):
    out = tmp_path / "out.de"
    out.write_text("an older translation\n")
    bad = tmp_path / "bad.en"
    bad.write_bytes(b"a man .\n\xff\xfe broken\n")
    args = [sys.executable, "-m", "mtrain", "translate", "-c", str(trained / "final.pt"), "--beam", "1"]
    r = subprocess.run(args + ["-i", str(bad), "-o", str(out)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 1 and "bad.en:2: invalid UTF-8" in r.stderr and "Traceback" not in r.stderr
    assert out.read_text() == "an older translation\n"
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left
    r = subprocess.run(args + ["-i", str(SAMPLE_EN), "-o", str(tmp_path / "missing" / "out.de")],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 1 and r.stderr.strip() == \
        f"mtrain: {tmp_path / 'missing'}: directory for the output out.de does not exist"
    r = subprocess.run(args + ["-i", str(SAMPLE_EN), "-o", str(out)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert len(out.read_text().splitlines()) == len(SAMPLE_EN.read_text().splitlines())
    # a .gz name gets gzip, as a .gz input is read: the same lines
    r = subprocess.run(args + ["-i", str(SAMPLE_EN), "-o", str(out) + ".gz"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert gzip.decompress((tmp_path / "out.de.gz").read_bytes()).decode() == out.read_text()


def test_unknown_source_characters_are_left_out(trained, capsys):
    """A character the tokenizer never saw becomes <unk>, which the model never saw either (the
    tokenizer covers all of its training text): it is left out of the source, and said so."""
    from mtrain.translate import drop_unknown
    model, toks, _ = checkpoint.load_for_inference([trained / "final.pt"])
    dev, dec = pick_device("cpu", "fp32"), DecodeConfig(beam=2, max_len_b=6)
    clean, unknown = "a dog is running .", "a dog\U0001F415 is running ."
    ids = toks.src.encode_batch([clean, unknown])
    assert toks.src.unk not in ids[0] and toks.src.unk in ids[1]
    unk_at = ids[1].index(toks.src.unk)
    dropped, kept = drop_unknown(ids, toks.src.unk)
    assert dropped == [ids[0], ids[0]] and kept[1] == [p for p in range(len(ids[1])) if p != unk_at]

    out = list(translate_lines(["", clean, unknown], model, toks, dec, dev))
    assert out[2] == out[1]
    assert "1 input line held characters the source tokenizer does not know (line 3: '\U0001F415'); " \
           "translated without them" in capsys.readouterr().err

    # --alignment on pieces: positions in the source as SentencePiece encodes it, <unk> included
    aligned = [line.split(" ||| ")[1].split() for line in
               translate_lines([clean, unknown], model, toks, dec, dev, inspect=Inspect(alignment="pieces"))]
    shifted = [f"{int(a) + (int(a) >= unk_at)}-{b}" for a, b in (pair.split("-") for pair in aligned[0])]
    assert aligned[0] and aligned[1] == shifted

    list(translate_lines([unknown], model, toks, dec, dev, keep_unknown=True))
    assert "kept as <unk>" in capsys.readouterr().err


def test_unk_stays_out_of_the_output_unless_allowed(trained, monkeypatch):
    """A tokenizer with character_coverage below 1 teaches the model to emit <unk> (printed ' ⁇ ');
    as in Marian, it is kept out of translations unless decode.allow_unk (translate --allow-unk)."""
    model, toks, _ = checkpoint.load_for_inference([trained / "final.pt"])
    step = model.decode_step

    def unk_first(tokens, cache):  # a model that would rather say <unk> than anything else
        logits = step(tokens, cache).clone()
        logits[:, toks.tgt.unk] += 100.0
        return logits

    monkeypatch.setattr(model, "decode_step", unk_first)
    dev, lines = pick_device("cpu", "fp32"), ["a man is walking .", "a dog ."]
    ids = toks.src.encode_batch(lines)
    for allow in (False, True):
        tokens = [h[0].tokens for h in decode_ids(model, ids, DecodeConfig(beam=2, max_len_b=5, allow_unk=allow),
                                                  toks, dev)]
        assert all(t and (toks.tgt.unk in t) == allow for t in tokens), (allow, tokens)
    for sampling in (None, Sampling(seed=3)):
        held = list(translate_lines(lines, model, toks, DecodeConfig(beam=2, max_len_b=5), dev, sampling))
        free = list(translate_lines(lines, model, toks, DecodeConfig(beam=2, max_len_b=5, allow_unk=True), dev,
                                    sampling))
        assert all(line and "⁇" not in line for line in held), held
        assert all("⁇" in line for line in free), free


def test_allow_unk_flag_reaches_the_decode_settings(monkeypatch):
    from typer.testing import CliRunner

    from mtrain import cli, translate
    seen = []
    monkeypatch.setattr(translate, "run_translate", lambda decode_flags, **rest: seen.append(decode_flags))
    for extra in ([], ["--allow-unk"]):
        result = CliRunner().invoke(cli.app, ["translate", "-c", "x.pt", *extra])
        assert result.exit_code == 0, result.output
    assert [flags["allow_unk"] for flags in seen] == [None, True]  # None: the checkpoint's decode section


def test_a_line_of_unknown_characters_alone_is_copied_through(trained, capsys):
    """Without its unknown characters the line holds nothing to translate (a lone '▁'), from which the
    model would make a sentence up: it comes out as it went in, in every output format."""
    model, toks, _ = checkpoint.load_for_inference([trained / "final.pt"])
    dev, dec = pick_device("cpu", "fp32"), DecodeConfig(beam=2, max_len_b=6)
    lines = ["\U0001F415\U0001F415", "a dog is running .", " \U0001F600 ", ""]
    assert all(set(x) <= {toks.src.unk, toks.src.sp.piece_to_id("▁")} for x in toks.src.encode_batch(lines[::2]))
    out = list(translate_lines(lines, model, toks, dec, dev))
    assert out[0] == "\U0001F415\U0001F415" and out[2] == "\U0001F600" and out[3] == ""
    assert out[1] == list(translate_lines(lines[1:2], model, toks, dec, dev))[0] != ""
    assert "2 copied through for holding nothing else" in capsys.readouterr().err
    aligned = list(translate_lines(lines, model, toks, dec, dev, inspect=Inspect(alignment="pieces")))
    assert aligned[0] == "\U0001F415\U0001F415 ||| " and aligned[1].split(" ||| ")[1]
    nbest = list(translate_lines(lines[:2], model, toks, DecodeConfig(beam=2, nbest=2, max_len_b=6), dev))
    assert nbest[:2] == ["0 ||| \U0001F415\U0001F415 ||| 0.0000", "0 |||  ||| -inf"]
    assert nbest[2].startswith("1 ||| ") and float(nbest[2].split(" ||| ")[2]) < 0
    kept = list(translate_lines(lines[:1], model, toks, dec, dev, keep_unknown=True))
    assert kept[0] != lines[0]  # --keep-unknown translates the <unk> pieces as before


def test_a_tag_chooses_the_target_a_model_learned_for_it(tmp_path, tagged_model):
    """Two tagged corpora with the same sources and two targets (German, and the English itself): a
    tiny model learns both, and --tag picks which it writes; an unknown tag is one line naming those
    it knows."""
    from conftest import SAMPLE_DE

    from mtrain.errors import MtrainError
    from mtrain.translate import tag_piece
    final = tagged_model
    model, toks, cfg = checkpoint.load_for_inference([final])
    assert cfg.data.tags == ["<2de>", "<2en>"]
    sources = SAMPLE_EN.read_text().splitlines()
    for tag, targets in (("<2de>", SAMPLE_DE.read_text().splitlines()), ("<2en>", sources)):
        out = list(translate_lines(sources, model, toks, DecodeConfig(beam=1), pick_device("cpu", "fp32"),
                                   tag=tag_piece(tag, toks, cfg.data.tags)))
        assert out == targets, tag
    # Alignments number the line's own pieces (the tag left out); heatmaps show the tag too.
    tag = tag_piece("<2de>", toks, cfg.data.tags)
    shown = list(translate_lines(sources[:3], model, toks, DecodeConfig(beam=1), pick_device("cpu", "fp32"),
                                 inspect=Inspect("pieces", tmp_path / "maps", 2), tag=tag))
    for line, out in zip(sources, shown):
        text, pairs = out.split(" ||| ")
        links = [tuple(map(int, x.split("-"))) for x in pairs.split()]
        assert len(links) == len(toks.tgt.encode_batch([text])[0])  # one link per output piece
        assert all(0 <= i < len(toks.src.encode_batch([line])[0]) for i, _ in links)
    assert sorted(x.name for x in (tmp_path / "maps").iterdir()) == ["line1.png", "line2.png"]
    with pytest.raises(MtrainError, match=r"--tag <2fr>: not a tag this model was trained with \(its tags: <2de>, "
                                          r"<2en>\)"):
        tag_piece("<2fr>", toks, cfg.data.tags)
    r = subprocess.run([sys.executable, "-m", "mtrain", "translate", "-c", str(final), "--tag", "<2en>", "--beam", "1"],
                       input=sources[0] + "\n", capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and r.stdout == sources[0] + "\n", r.stderr
    info = subprocess.run([sys.executable, "-m", "mtrain", "info", str(final)], capture_output=True, text=True, cwd=ROOT)
    assert "tags:         <2de>, <2en>" in info.stdout


def test_a_wider_beam_keeps_the_memorised_translation(tagged_model):
    """A model that knows the sample lines by heart translates each of them so with every beam and
    length penalty. The search used to stop once k hypotheses had finished, even when they were far
    worse than one still live: beam 3-5 lost 3-4 of the 20 lines ('ein hund rennt am dach .' at
    -4.6 for 'am strand .' at -0.005)."""
    from conftest import SAMPLE_DE

    from mtrain.translate import tag_piece, translate_texts
    model, toks, cfg = checkpoint.load_for_inference([tagged_model])
    tag = tag_piece("<2de>", toks, cfg.data.tags)
    sources, targets = SAMPLE_EN.read_text().splitlines(), SAMPLE_DE.read_text().splitlines()
    for beam in (2, 3, 5, 8):
        for lenpen in (0.0, 1.4):
            done = translate_texts(sources, model, toks, DecodeConfig(beam=beam, lenpen=lenpen),
                                   pick_device("cpu", "fp32"), tag=tag)
            assert [d.texts[0] for d in done] == targets, (beam, lenpen)
