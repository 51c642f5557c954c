"""Lexically constrained beam search (dynamic beam allocation) and forced prefixes, on the tests' model
that knows the sample lines by heart: every constraint appears, lines without constraints decode as
they would alone, a prefix begins its output, and bad input is one line."""

import subprocess
import sys

import pytest
from conftest import ROOT, SAMPLE_DE, SAMPLE_EN
from test_precision import device

from mtrain.checkpoint import load_for_inference, load_models
from mtrain.errors import MtrainError
from mtrain.guide import Guide, Progress, Wish, allocate, holds
from mtrain.translate import translate_texts, with_overrides

SOURCES = SAMPLE_EN.read_text().splitlines()
TARGETS = SAMPLE_DE.read_text().splitlines()
# For each line, words of other lines' German that its own translation lacks: one word, a word of
# several pieces, and two phrases at once.
ONE = [next(w for w in TARGETS[(i + 3) % 20].split() if w not in TARGETS[i].split() and w != ".") for i in range(20)]
TWO = [(ONE[i], next(w for w in TARGETS[(i + 7) % 20].split()[1:] if w not in TARGETS[i].split() + [ONE[i], "."]))
       for i in range(20)]


@pytest.fixture(scope="module")
def loaded(tagged_model):
    return load_for_inference([tagged_model])


def run(loaded, wishes, beam=5, nbest=1, precision="fp32", lines=SOURCES, model=None):
    net, toks, cfg = loaded
    decode = with_overrides(cfg.decode, beam=beam, nbest=nbest)
    # CPU autocast in bf16 or fp16 as on a GPU (pick_device refuses them on CPUs that lack native bf16)
    dev = device(precision)
    return translate_texts(lines, model or net, toks, decode, dev, tag=toks.src.sp.piece_to_id("<2de>"), wishes=wishes)


def pieces(toks, text):
    return tuple(toks.tgt.sp.encode(text))


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("beam", [1, 5])
def test_every_constraint_appears(loaded, beam, precision):
    _, toks, _ = loaded
    for phrases in ([(w,) for w in ONE], TWO, [(f"{TARGETS[(i + 5) % 20].split()[-2]} .",) for i in range(20)]):
        results = run(loaded, [Wish(p) for p in phrases], beam=beam, precision=precision)
        for result, wanted in zip(results, phrases):
            for phrase in wanted:
                assert holds(result.hyps[0].tokens, pieces(toks, phrase)), (phrase, result.texts[0])
                assert phrase in result.texts[0]


def test_every_nbest_hypothesis_holds_the_constraints(loaded):
    _, toks, _ = loaded
    results = run(loaded, [Wish(p) for p in TWO], beam=5, nbest=3)
    for result, wanted in zip(results, TWO):
        assert len(result.hyps) == 3
        assert [h.score for h in result.hyps] == sorted((h.score for h in result.hyps), reverse=True)
        for hyp in result.hyps:
            assert all(holds(hyp.tokens, pieces(toks, p)) for p in wanted)


def test_lines_without_constraints_decode_as_alone_in_a_mixed_batch(loaded):
    alone = [r.texts[0] for r in run(loaded, None)]
    assert alone == TARGETS  # the model knows them: a real check
    mixed = run(loaded, [Wish((ONE[i],)) if i % 2 else None for i in range(20)])
    assert [r.texts[0] for r in mixed][::2] == alone[::2]
    assert all(ONE[i] in mixed[i].texts[0] for i in range(1, 20, 2))


def test_an_ensemble_takes_constraints_unchanged(loaded, tagged_model):
    ensemble, toks, _ = load_models([tagged_model, tagged_model])
    results = run(loaded, [Wish(p) for p in TWO], model=ensemble)
    for result, wanted in zip(results, TWO):
        assert all(holds(result.hyps[0].tokens, pieces(toks, p)) for p in wanted)
    single = run(loaded, [Wish(p) for p in TWO])
    assert [r.texts for r in results] == [r.texts for r in single]  # two equal members: one model's search


def test_a_prefix_begins_the_output_and_counts_in_no_score(loaded):
    plain = run(loaded, None)
    empty = run(loaded, [Wish(prefix="") for _ in SOURCES])
    assert [r.texts for r in empty] == [r.texts for r in plain] and [r.scores for r in empty] == [r.scores for r in plain]
    words = [t.split() for t in TARGETS]
    # the line's own first words: the model goes on with the rest of its line, and the prefix costs nothing
    same = run(loaded, [Wish(prefix=" ".join(w[:2]) + " ") for w in words])
    assert [r.texts[0] for r in same] == TARGETS
    assert all(a.scores[0] >= b.scores[0] - 1e-4 for a, b in zip(same, plain))
    # another line's beginning, and a word cut in the middle: the output starts with it, the word completed
    other = [" ".join(words[(i + 1) % 20][:2]) + " " for i in range(20)]
    cut = [t[:t.index(" ") + 3] for t in TARGETS]  # "ein ma" of "ein mann ..."
    for prefixes in (other, cut):
        for result, prefix in zip(run(loaded, [Wish(prefix=p) for p in prefixes]), prefixes):
            assert result.texts[0].startswith(prefix.strip()), (prefix, result.texts[0])
    completed = run(loaded, [Wish(prefix=p) for p in cut], beam=1)
    assert [r.texts[0] for r in completed] == TARGETS  # "ein ma" + "nn": the word goes on


def test_constraints_that_cannot_fit_are_dropped_with_a_warning(loaded, capfd):
    long = " ".join(TARGETS)  # far more pieces than a short line's output limit
    results = run(loaded, [Wish((long,))] + [None] * 19)
    assert results[0].texts[0] == TARGETS[0]
    assert "line 1: the constraints and prefix need" in capfd.readouterr().err


def test_dynamic_beam_allocation_keeps_every_bank():
    guide = Guide(constraints=((7, 8),))
    p0, p1, p2 = Progress(), Progress(frozenset(), 0, 1, tokens=1), Progress(frozenset({0}), tokens=2)
    candidates = [(-0.1, 0, 1, p0), (-0.2, 0, 2, p0), (-0.3, 1, 3, p0), (-5.0, 0, 7, p1), (-9.0, 1, 8, p2)]
    chosen = allocate(candidates, 3, guide, steps_left=10)
    assert [c[2] for c in chosen] == [1, 7, 8]  # one per bank, though tokens 2 and 3 score higher
    assert [c[2] for c in allocate(candidates[:3], 3, guide, steps_left=10)] == [1, 2, 3]  # empty banks' slots: the best
    assert [c[2] for c in allocate(candidates, 2, guide, steps_left=0)] == [8]  # only a complete one can still end
    assert p0.after(7, guide) == p1 and p1.after(8, guide) == p2 and p1.after(5, guide) == Progress()
    assert p1.wanted(guide) == {7, 8} and p2.complete(guide) and not p1.complete(guide)


def mtrain(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "mtrain", *map(str, args)], capture_output=True, text=True, cwd=cwd)


def test_the_command_takes_constraint_and_prefix_files_and_refuses_bad_ones_in_one_line(tagged_model, tmp_path):
    src = tmp_path / "src.en"
    src.write_text("\n".join(SOURCES[:4]) + "\n")
    good = tmp_path / "c.tsv"
    good.write_text(f"{TWO[0][0]}\t{TWO[0][1]}\n\n{ONE[2]}\n\n")
    out = tmp_path / "out.de"
    r = mtrain("translate", "-c", tagged_model, "-i", src, "-o", out, "--tag", "<2de>", "--constraints", good)
    assert r.returncode == 0, r.stderr
    lines = out.read_text().splitlines()
    assert TWO[0][0] in lines[0] and TWO[0][1] in lines[0] and lines[1] == TARGETS[1] and ONE[2] in lines[2]
    prefix = tmp_path / "p.txt"
    prefix.write_text("zwei frauen\n\n\nein ma\n")
    r = mtrain("translate", "-c", tagged_model, "-i", src, "-o", out, "--tag", "<2de>", "--prefix", prefix)
    assert r.returncode == 0, r.stderr
    lines = out.read_text().splitlines()
    assert lines[0].startswith("zwei frauen") and lines[1:3] == TARGETS[1:3] and lines[3].startswith("ein ma")
    out.unlink()
    bad = {"short.tsv": ("hund\n", "short.tsv: 1 lines, fewer than the input"),
           "long.tsv": ("\n" * 6, "more lines than the input"),
           "empty.tsv": ("hund\t\n\n\n\n", "line 1: an empty constraint phrase"),
           "unknown.tsv": ("\n☃\n\n\n", "line 2: constraint '☃' holds characters the target tokenizer does not know")}
    for name, (text, message) in bad.items():
        (tmp_path / name).write_text(text)
        r = mtrain("translate", "-c", tagged_model, "-i", src, "-o", out, "--constraints", tmp_path / name)
        assert r.returncode == 1 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, (name, r.stderr)
        assert not out.exists()
    (tmp_path / "long_prefix.txt").write_text(" ".join(TARGETS) + "\n\n\n\n")
    r = mtrain("translate", "-c", tagged_model, "-i", src, "-o", out, "--prefix", tmp_path / "long_prefix.txt")
    assert r.returncode == 1 and "line 1: the prefix has" in r.stderr and "may have at most" in r.stderr
    r = mtrain("translate", "-c", tagged_model, "-i", src, "-o", out, "--constraints", good, "--sample")
    assert r.returncode == 1 and "guide beam search" in r.stderr and not out.exists()
    with pytest.raises(MtrainError, match="line 1: an empty constraint phrase"):
        from mtrain.guide import encode_phrase
        _, toks, _ = load_for_inference([tagged_model])
        encode_phrase("  ", toks.tgt, "line 1")
