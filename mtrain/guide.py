"""What a sentence's output must hold: target phrases that must appear in it (lexical constraints) and
a prefix it must begin with; and the dynamic beam allocation that keeps hypotheses meeting the
constraints in the beam (Post & Vilar 2018, "Fast lexically constrained decoding with dynamic beam
allocation").

A hypothesis's progress through its constraints is a `Progress`: which phrases it holds whole, the
phrase it is in the middle of (and how far), and what it still has to spell out of a prefix's last
word. Beam search asks three things of it: which tokens would move it forward (candidates besides
the model's best), how many constraint tokens it has met (its bank), and whether it may end (only
with every phrase met and the word spelled out).
"""

from __future__ import annotations

import bisect
import functools
from dataclasses import dataclass, field

from mtrain.errors import MtrainError


class Completions:
    """The target pieces that can continue a text: those that begin with it (and go on), and those it
    begins with (which leave a rest to match). How an output completes a word its prefix ends in,
    whatever pieces it takes: "▁ma" by "▁mann", or by "▁m" then "ann"."""

    def __init__(self, pieces: list[str], skip: set[int]):
        self.pieces = pieces
        self.ids = {p: i for i, p in enumerate(pieces) if i not in skip}
        self.sorted = sorted(self.ids)

    def allowed(self, rest: str) -> list[int]:
        start = bisect.bisect_left(self.sorted, rest)
        end = bisect.bisect_left(self.sorted, rest + "\U0010ffff")
        longer = [self.ids[p] for p in self.sorted[start:end]]
        shorter = [self.ids[rest[:n]] for n in range(1, len(rest)) if rest[:n] in self.ids]
        return longer + shorter

    def after(self, rest: str, token: int) -> str:
        piece = self.pieces[token]
        return "" if piece.startswith(rest) else rest[len(piece):]


@functools.lru_cache(maxsize=8)
def completions_of(tok) -> Completions:
    sp = tok.sp
    return Completions([sp.id_to_piece(i) for i in range(tok.vocab_size)],
                       {i for i in range(tok.vocab_size) if sp.is_control(i) or sp.is_unknown(i)})


@dataclass(frozen=True)
class Guide:
    """One sentence's constraints (token sequences, each non-empty) and prefix: tokens forced first,
    then, when the prefix ends without a space, `rest` (its last word's pieces' text), which the next
    tokens must spell out, in whatever pieces, before the word may go on (`completions` says which
    tokens can)."""

    constraints: tuple[tuple[int, ...], ...] = ()
    prefix: tuple[int, ...] = ()
    rest: str = ""
    completions: Completions | None = field(default=None, compare=False)

    @property
    def tokens(self) -> int:
        """Constraint tokens in all: the highest bank."""
        return sum(map(len, self.constraints))

    @functools.cached_property
    def starts(self) -> frozenset:
        """The first tokens of the phrases: any other token leaves a hypothesis that is in no phrase
        where it was."""
        return frozenset(c[0] for c in self.constraints)


@dataclass(frozen=True)
class Progress:
    met: frozenset = field(default_factory=frozenset)  # indices of the phrases held whole
    phrase: int = -1  # the phrase being matched, -1 when none
    matched: int = 0  # its tokens matched so far
    rest: str = ""  # of the prefix's last word, what is still to be spelled out
    tokens: int = 0  # constraint tokens met: the whole phrases', and the part of the one in progress

    def complete(self, guide: Guide) -> bool:
        """Whether the hypothesis may end: every phrase met, the prefix's last word spelled out."""
        return len(self.met) == len(guide.constraints) and not self.rest

    def wanted(self, guide: Guide) -> set[int]:
        """The tokens that would move this hypothesis forward: the next of the phrase in progress,
        and the first of every phrase not yet met (a phrase in progress may be given up for another)."""
        out = {guide.constraints[c][0] for c in range(len(guide.constraints)) if c not in self.met}
        if self.phrase >= 0:
            out.add(guide.constraints[self.phrase][self.matched])
        return out

    def after(self, token: int, guide: Guide, spelling: bool = True) -> Progress:
        """The progress once `token` is emitted. A phrase in progress that the token does not continue
        is given up (its tokens stay in the output, but count no more). `spelling` False: a token of
        the prefix, before the word to spell out."""
        if self.phrase < 0 and not self.rest and token not in guide.starts:
            return self  # the common case, on every candidate of every step: nothing changes
        rest = guide.completions.after(self.rest, token) if self.rest and spelling else self.rest
        if self.phrase >= 0 and guide.constraints[self.phrase][self.matched] == token:
            if self.matched + 1 == len(guide.constraints[self.phrase]):
                return Progress(self.met | {self.phrase}, rest=rest, tokens=self.tokens + 1)
            return Progress(self.met, self.phrase, self.matched + 1, rest, self.tokens + 1)
        whole = self.tokens - self.matched  # a phrase in progress given up counts no more
        for c, phrase in enumerate(guide.constraints):
            if c not in self.met and phrase[0] == token:
                if len(phrase) == 1:
                    return Progress(self.met | {c}, rest=rest, tokens=whole + 1)
                return Progress(self.met, c, 1, rest, whole + 1)
        if whole == self.tokens and rest == self.rest:
            return self  # nothing changed: no new object
        return Progress(self.met, rest=rest, tokens=whole)


def allocate(candidates: list[tuple[float, int, int, Progress]], k: int, guide: Guide, steps_left: int
             ) -> list[tuple[float, int, int, Progress]]:
    """Dynamic beam allocation: the k live hypotheses to keep, from candidates (score, beam, token,
    progress), best first. The beam is split evenly among the banks 0..T (constraint tokens met; the
    highest banks take the remainder), each bank takes its best candidates, and slots a bank cannot
    fill go to the best candidates left, so that hypotheses which have met more constraints are not
    crowded out by better-scored ones which have met fewer. A candidate that could no longer meet
    every constraint within the `steps_left` tokens it may still take (one for each constraint token
    it lacks) is dropped while another can."""
    top = guide.tokens
    ranked = sorted(candidates, key=lambda c: -c[0])  # once: every list below keeps this order
    feasible = [c for c in ranked if top - c[3].tokens <= steps_left]
    ranked = feasible or ranked
    if top == 0 or len(ranked) <= k:  # one bank, or room for all: the best k
        return ranked[:k]
    quota = [k // (top + 1)] * (top + 1)
    for b in range(k % (top + 1)):
        quota[top - b] += 1
    chosen, rest = [], []
    for c in ranked:
        bank = c[3].tokens
        if quota[bank]:
            quota[bank] -= 1
            chosen.append(c)
        else:
            rest.append(c)
    chosen += rest[:k - len(chosen)]
    return sorted(chosen, key=lambda c: -c[0])


def met(guide: Guide | None, tokens: list[int]) -> bool:
    """Whether an output holds every phrase of its guide (one cut by its length limit may not)."""
    return guide is None or all(holds(tokens, c) for c in guide.constraints)


def holds(tokens: list[int], phrase: tuple[int, ...]) -> bool:
    """Whether `phrase` appears in `tokens`, contiguous."""
    n = len(phrase)
    return any(tuple(tokens[i:i + n]) == phrase for i in range(len(tokens) - n + 1))


@dataclass(frozen=True)
class Wish:
    """What a user asks of one line's output, as text: phrases it must hold, and its beginning."""

    constraints: tuple[str, ...] = ()
    prefix: str = ""


def encode_phrase(text: str, tok, where: str) -> tuple[int, ...]:
    """A constraint phrase as target pieces (as the phrase would be written in a sentence: its first
    word starts a word); one line for an empty phrase or one the target model can only write with <unk>."""
    if not text.strip():
        raise MtrainError(f"{where}: an empty constraint phrase")
    ids = tuple(tok.sp.encode(text.strip()))
    if tok.unk in ids:
        raise MtrainError(f"{where}: constraint {text.strip()!r} holds characters the target tokenizer does not "
                          f"know ({tok.unknown_chars(text)!r}), so no output can hold it")
    return ids


def make_guide(wish: Wish | None, tok, limit: int, where: str) -> tuple[Guide | None, str]:
    """The Guide of one line (None when it asks nothing), and a warning ('' when none). `limit`: the
    line's longest output, EOS included. A prefix that leaves no room for the EOS is an error; a
    prefix that ends mid-word has its last word spelled out by whatever pieces the model prefers
    (`Guide.rest`), so that the model completes the word. Constraints that cannot fit in
    the limit are dropped, with a warning."""
    if wish is None or not (wish.constraints or wish.prefix):
        return None, ""
    constraints = tuple(encode_phrase(c, tok, where) for c in wish.constraints)
    prefix: tuple[int, ...] = ()
    rest = ""
    if wish.prefix.strip():
        text = wish.prefix.lstrip()
        prefix = tuple(tok.sp.encode(text))
        if tok.unk in prefix:
            raise MtrainError(f"{where}: the prefix holds characters the target tokenizer does not know "
                              f"({tok.unknown_chars(text)!r})")
        if len(prefix) >= limit:
            raise MtrainError(f"{where}: the prefix has {len(prefix)} pieces; this line's output may have at most "
                              f"{limit - 1} (decode.max_len_a, max_len_b)")
        if not text[-1].isspace():  # mid-word, or at a word's end without a space: the word may go on
            # the whole last word is spelled out, by whatever pieces: "ein ma" is "▁ein", "▁m", "a"
            # where "ein mann" is "▁ein", "▁man", "n"
            pieces = [tok.sp.id_to_piece(i) for i in prefix]
            start = max((n for n, p in enumerate(pieces) if p.startswith("▁")), default=0)
            rest, prefix = "".join(pieces[start:]), prefix[:start]
    warning = ""
    need = len(prefix) + (1 if rest else 0) + sum(map(len, constraints))
    if constraints and need >= limit:
        warning = (f"{where}: the constraints and prefix need {need} pieces, more than this line's output may "
                   f"have ({limit - 1}; decode.max_len_a, max_len_b): translated without the constraints")
        constraints = ()
    if not (constraints or prefix or rest):
        return None, warning
    return Guide(constraints, prefix, rest, completions_of(tok) if rest else None), warning
