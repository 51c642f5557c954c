import json
import subprocess
import sys

import pytest

from mtrain.errors import MtrainError
from mtrain.score import score

HYP = ["Ein Mann geht auf der Straße.", "Zwei Hunde spielen im Schnee!", "Eine Frau liest."]
REF = ["Ein Mann läuft auf der Straße.", "Zwei Hunde spielen im Schnee.", "Eine Frau liest ein Buch."]


def test_same_numbers_as_the_sacrebleu_command(tmp_path):
    (tmp_path / "hyp").write_text("\n".join(HYP) + "\n")
    (tmp_path / "ref").write_text("\n".join(REF) + "\n")
    out = subprocess.run([sys.executable, "-m", "sacrebleu", str(tmp_path / "ref"), "-i", str(tmp_path / "hyp"),
                          "-m", "bleu", "chrf", "ter", "-b", "-f", "text"], capture_output=True, text=True, check=True)
    expected = [float(x) for x in out.stdout.split()]
    # The command prints one decimal: ours may differ from it by the rounding, not more.
    assert [s.value for s in score(HYP, [REF])] == pytest.approx(expected, abs=0.05 + 1e-6)
    mine = subprocess.run([sys.executable, "-m", "mtrain", "score", "--ref", str(tmp_path / "ref"),
                           str(tmp_path / "hyp"), "--json"], capture_output=True, text=True, check=True)
    data = json.loads(mine.stdout)
    assert [data[m]["score"] for m in ("bleu", "chrf", "ter")] == pytest.approx(expected, abs=0.05 + 1e-6)
    assert data["bleu"]["signature"].startswith("nrefs:1|case:mixed|eff:no|tok:13a")


def test_lowercase_tokenize_and_chrf_plus_plus_as_the_sacrebleu_command(tmp_path):
    hyps = [h.upper() for h in HYP]  # case now matters, and so does how BLEU splits the words
    (tmp_path / "hyp").write_text("\n".join(hyps) + "\n")
    (tmp_path / "ref").write_text("\n".join(REF) + "\n")
    out = subprocess.run([sys.executable, "-m", "sacrebleu", str(tmp_path / "ref"), "-i", str(tmp_path / "hyp"),
                          "-m", "bleu", "chrf", "ter", "-lc", "--chrf-lowercase", "-tok", "char",
                          "--chrf-word-order", "2", "-b", "-f", "text"], capture_output=True, text=True, check=True)
    expected = [float(x) for x in out.stdout.split()]
    mine = subprocess.run([sys.executable, "-m", "mtrain", "score", "--ref", str(tmp_path / "ref"), str(tmp_path / "hyp"),
                           "--metrics", "bleu,chrf++,ter", "-lc", "--tokenize", "char", "--json"],
                          capture_output=True, text=True, check=True)
    data = json.loads(mine.stdout)
    assert [data[m]["score"] for m in ("bleu", "chrf++", "ter")] == pytest.approx(expected, abs=0.05 + 1e-6)
    assert data["bleu"]["signature"].startswith("nrefs:1|case:lc|eff:no|tok:char")
    assert "|nw:2|" in data["chrf++"]["signature"] and data["chrf++"]["signature"].startswith("nrefs:1|case:lc")
    # Each setting changes its number: none is silently dropped.
    assert score(hyps, [REF], ["bleu"])[0].value < score(hyps, [REF], ["bleu"], lowercase=True)[0].value - 10
    assert abs(score(HYP, [REF], ["bleu"], tokenize="char")[0].value - score(HYP, [REF], ["bleu"])[0].value) > 1
    assert score(HYP, [REF], ["chrf++"])[0].value != pytest.approx(score(HYP, [REF], ["chrf"])[0].value, abs=0.1)
    # TER ignores case by sacreBLEU's default, with or without --lowercase.
    # (Compared with the lowercased text, not HYP: "ß".upper() is "SS".)
    assert score(hyps, [REF], ["ter"])[0].value == pytest.approx(score([h.lower() for h in hyps], [REF], ["ter"])[0].value)
    assert score(hyps, [REF], ["ter"])[0].value == pytest.approx(expected[2], abs=0.05 + 1e-6)


def test_an_unknown_tokenizer_is_refused_whatever_the_metrics():
    for metrics in (["bleu"], ["chrf"]):
        with pytest.raises(MtrainError, match="--tokenize: unknown tokenizer 'moses'"):
            score(HYP, [REF], metrics, tokenize="moses")


def test_several_references_and_line_counts():
    assert score(HYP, [REF, HYP], ["bleu"])[0].value == pytest.approx(100.0)
    with pytest.raises(MtrainError, match="hypotheses has 3 lines, reference 1 has 2"):
        score(HYP, [REF[:2]])
    with pytest.raises(MtrainError, match="unknown metric 'bleurt'"):
        score(HYP, [REF], ["bleurt"])
