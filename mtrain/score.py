"""Scoring with sacreBLEU's metric objects: BLEU, chrF and TER with their signatures, and paired tests."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from sacrebleu.metrics import BLEU, CHRF, TER

from mtrain.errors import MtrainError

METRICS = ("bleu", "chrf", "chrf++", "ter")
TOKENIZERS = tuple(BLEU.TOKENIZERS)  # BLEU's tokenizers: 13a (sacreBLEU's default), intl, char, zh, ...


@dataclass
class Score:
    name: str
    value: float
    text: str  # sacreBLEU's own formatting, e.g. "BLEU = 35.21 66.1/41.9/..."
    signature: str


def _metric(name: str, lowercase: bool = False, tokenize: str = "13a"):
    """sacreBLEU's metric object with sacreBLEU's defaults. lowercase applies to BLEU and chrF; TER is
    case-insensitive already by sacreBLEU's default. tokenize applies to BLEU (chrF and TER have their
    own fixed tokenization). chrF++ is chrF with word bigrams (Popović 2017)."""
    if name not in METRICS:
        raise MtrainError(f"--metrics: unknown metric '{name}' (known: {', '.join(METRICS)})")
    if tokenize not in TOKENIZERS:  # checked whichever metrics are asked for: a typo is never ignored
        raise MtrainError(f"--tokenize: unknown tokenizer '{tokenize}' (known: {', '.join(TOKENIZERS)})")
    if name == "ter":
        return TER()
    if name != "bleu":
        return CHRF(word_order=2 if name == "chrf++" else 0, lowercase=lowercase)
    try:
        return BLEU(lowercase=lowercase, tokenize=tokenize)
    except Exception as e:  # ja-mecab / ko-mecab need extra packages, flores* download a model
        reason = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
        raise MtrainError(f"--tokenize {tokenize}: {reason or type(e).__name__}") from None


def build_metrics(names: Sequence[str], lowercase: bool = False, tokenize: str = "13a") -> dict:
    """sacreBLEU's metric objects by name, all checked before any is run: a typo is never ignored."""
    if not names:
        raise MtrainError(f"--metrics: no metric given (known: {', '.join(METRICS)})")
    return {name: _metric(name, lowercase, tokenize) for name in names}


def check_options(names: Sequence[str], lowercase: bool, tokenize: str | None) -> None:
    """Options that none of the chosen metrics reads are refused, not ignored."""
    if tokenize is not None and "bleu" not in names:
        raise MtrainError(f"--tokenize sets BLEU's tokenizer, and --metrics {','.join(names)} has no BLEU "
                          f"(chrF and TER tokenize their own way)")
    if lowercase and set(names) <= {"ter"}:
        raise MtrainError("--lowercase applies to BLEU and chrF; TER ignores case already")


def check_lengths(hyps: Sequence[str], refs_list: Sequence[Sequence[str]], hyp_name: str = "hypotheses",
                  ref_names: Sequence[str] = ()) -> None:
    if not hyps:  # sacreBLEU fails on an empty corpus with an IndexError
        raise MtrainError(f"{hyp_name}: no lines to score")
    if all(" ||| " in h for h in hyps) and not any(" ||| " in r for refs in refs_list for r in refs):
        # translate --alignment or --nbest output: scored as it is, BLEU would count the fields too
        raise MtrainError(f"{hyp_name}: every line holds ' ||| ' (translate's --alignment or --nbest output?); "
                          f"score the translations alone")
    for i, refs in enumerate(refs_list):
        if len(refs) != len(hyps):
            name = ref_names[i] if i < len(ref_names) else f"reference {i + 1}"
            raise MtrainError(f"line counts differ: {hyp_name} has {len(hyps)} lines, {name} has {len(refs)}")


def score(hyps: Sequence[str], refs_list: Sequence[Sequence[str]], metrics: Sequence[str] = ("bleu", "chrf", "ter"),
          lowercase: bool = False, tokenize: str = "13a") -> list[Score]:
    check_lengths(hyps, refs_list)
    out = []
    for name, metric in build_metrics(metrics, lowercase, tokenize).items():
        result = metric.corpus_score(list(hyps), [list(r) for r in refs_list])
        out.append(Score(name, float(result.score), str(result), str(metric.get_signature())))
    return out


def bleu(hyps: Sequence[str], refs: Sequence[str]) -> float:
    return score(hyps, [refs], ("bleu",))[0].value


def compare(baseline: Sequence[str], other: Sequence[str], refs_list: Sequence[Sequence[str]],
            metrics: Sequence[str] = ("bleu", "chrf", "ter"), lowercase: bool = False, tokenize: str = "13a") -> dict:
    """sacreBLEU's paired bootstrap resampling test (Koehn 2004) between two systems: for each metric
    its signature, each system's score, bootstrap mean and 95% half-interval, and the other's p-value."""
    from sacrebleu.significance import PairedTest

    check_lengths(baseline, refs_list, "baseline")
    check_lengths(other, refs_list, "--compare")
    if list(baseline) == list(other):  # sacreBLEU would call them different at p = 1/1001
        raise MtrainError("--compare: the two systems' translations are identical line for line; nothing to test")
    named = build_metrics(metrics, lowercase, tokenize)
    test = PairedTest([("baseline", list(baseline)), ("other", list(other))], named,
                      references=[list(r) for r in refs_list], test_type="bs", n_samples=1000)
    signatures, results = test()
    out = {}
    for name, (base, oth) in ((n, r) for n, r in results.items() if n != "System"):
        out[name] = {"signature": str(signatures[name]), "p": round(float(oth.p_value), 4),
                     **{side: {"score": round(float(r.score), 4), "mean": round(float(r.mean), 4),
                               "ci": round(float(r.ci), 4)} for side, r in (("baseline", base), ("other", oth))}}
    return out


def comparison_text(results: dict) -> str:
    """compare's results as sacreBLEU prints them: signatures, then a line per metric."""
    lines = [f"{name}: {r['signature']}" for name, r in results.items()]
    for name, r in results.items():
        b, o = r["baseline"], r["other"]
        lines.append(f"{name}: baseline {b['score']:.2f} (mean {b['mean']:.2f} ± {b['ci']:.2f})  "
                     f"other {o['score']:.2f} (mean {o['mean']:.2f} ± {o['ci']:.2f})  p = {r['p']:.4f}")
    return "\n".join(lines)
