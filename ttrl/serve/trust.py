"""Which user feedback the learner may believe, and which prompts count as one.

A rating is evidence about an answer, but one client's word is not enough
to teach the model: anyone with a key could rate a wrong answer up on every
prompt and repeat it. So ratings are *earned* before they touch a label:

- each identity counts once per answer: its newest rating of that answer
  (of any response to the prompt) is its verdict, however often it repeats;
- an answer's thumbs-up is earned when `quorum` distinct identities give it
  (and more identities say up than down), or when a trusted rater does;
  a thumbs-down (a veto) likewise;
- a trusted rater's verdict outranks any number of untrusted ones.

Prompts are compared by `prompt_key`: case, whitespace, fullwidth and
invisible-character variants of a prompt are the same prompt, so a client
cannot split one prompt into many to dodge a count (or train on a held-out
one); variants that say something else (2³ and 23) are not, so a label
earned on one never moves to the other. Answers compare as the run's extractor reads them.

Pure Python (math-verify for equivalence); no ground truth, no store.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

from ttrl.labeling.grade import is_equivalent

# Bump when `prompt_key` changes: a store recomputes its rows' keys once on opening (ttrl.serve.store).
PROMPT_KEY_VERSION = 2

# Compatibility forms whose plain form says something else: 2³ is not 23, x₁ is not x1, ½ is not 12.
_MEANING = ("<super>", "<sub>", "<fraction>")


def _fold(ch: str) -> str:
    if unicodedata.category(ch) == "Cf":
        return ""  # invisible: zero-width spaces and joiners, BOM, soft hyphen, bidi controls
    if unicodedata.decomposition(ch).startswith(_MEANING):
        return ch
    return unicodedata.normalize("NFKC", ch)


def prompt_key(text: str) -> str:
    """The identity of a prompt: compatibility forms folded (fullwidth, ligatures) except those that change
    what it says (superscripts, subscripts, fractions), invisible format characters dropped, case-folded,
    whitespace collapsed. Two prompts with one key must mean the same: ratings and labels move between them."""
    if not text.isascii():
        text = unicodedata.normalize("NFC", "".join(map(_fold, text)))
    return " ".join(text.casefold().split())


@dataclass(frozen=True)
class Rating:
    answer: str | None  # the extracted answer of the rated response (None: nothing to learn from it)
    score: float  # 1 = thumbs up, 0 = thumbs down (>= 0.5 counts as up)
    client: str = "anonymous"
    trusted: bool = False


@dataclass(frozen=True)
class Verdict:
    """The earned verdicts on one prompt's answers."""

    ups: list[tuple[str, str]] = field(default_factory=list)  # (answer, why: "trusted" | "quorum of N")
    downs: list[tuple[str, str]] = field(default_factory=list)

    @property
    def label(self) -> str | None:
        """The earned thumbs-up answer that wins: a trusted one first, then the largest quorum."""
        return self.ups[0][0] if self.ups else None


@dataclass
class _Answer:
    rep: str
    up: dict[str, int] = field(default_factory=dict)  # client -> position of its newest up
    down: dict[str, int] = field(default_factory=dict)
    trusted: list[tuple[int, bool]] = field(default_factory=list)  # (position, is_up) of trusted verdicts


def earned(ratings: Sequence[Rating], quorum: int, extractor: str = "boxed") -> Verdict:
    """The verdicts `ratings` (oldest first) earn under a quorum of distinct identities."""
    answers: list[_Answer] = []
    newest: dict[tuple[str, int], tuple[int, bool]] = {}  # (client, answer) -> (position, is_up)
    for pos, r in enumerate(ratings):
        if r.answer is None:
            continue
        slot = next((i for i, a in enumerate(answers) if is_equivalent(a.rep, r.answer, extractor)), None)
        if slot is None:
            answers.append(_Answer(r.answer))
            slot = len(answers) - 1
        newest[(r.client, slot)] = (pos, r.score >= 0.5)
        if r.trusted:
            answers[slot].trusted.append((pos, r.score >= 0.5))
    for (client, slot), (pos, up) in newest.items():
        (answers[slot].up if up else answers[slot].down)[client] = pos
    ups, downs = [], []
    for a in answers:
        if a.trusted:
            # The newest trusted verdict decides; untrusted ones do not outvote it.
            pos, up = max(a.trusted)
            (ups if up else downs).append((a.rep, "trusted", pos, len(a.up)))
            continue
        if len(a.up) >= quorum and len(a.up) > len(a.down):
            ups.append((a.rep, f"quorum of {len(a.up)}", max(a.up.values()), len(a.up)))
        elif len(a.down) >= quorum and len(a.down) > len(a.up):
            downs.append((a.rep, f"quorum of {len(a.down)}", max(a.down.values()), len(a.down)))
    # Trusted first, then the most identities, then the newest.
    ups.sort(key=lambda u: (u[1] == "trusted", u[3], u[2]), reverse=True)
    return Verdict(ups=[(rep, why) for rep, why, _, _ in ups], downs=[(rep, why) for rep, why, _, _ in downs])


def askers_needed(min_askers: int, single_user: bool) -> int:
    return 1 if single_user else min_askers


def share_cap(counts: dict[str, int], share: float, shared: int = 0) -> int:
    """The most prompts of its own any one identity may supply: the largest k with
    max(min(n, k)) <= share * (shared + sum(min(n, k))); 0 when none works (one identity alone)."""
    if not counts or max(counts.values()) == 0:
        return 0
    if share >= 1:
        return max(counts.values())
    for k in range(max(counts.values()), 0, -1):
        taken = [min(n, k) for n in counts.values()]
        if max(taken) <= share * (shared + sum(taken)) + 1e-9:
            return k
    return 0


def capped(rows: Sequence[dict], share: float) -> tuple[list[dict], dict[str, int]]:
    """The rows (oldest first) whose prompts fit under one identity's share of the round.

    A prompt asked by two or more identities is corroborated and always kept.
    A prompt only one identity asked is that identity's own; each identity
    keeps its oldest own prompts up to the cap (`share_cap`), and the rows of
    the others wait for a later round. Returns (kept rows, own prompts kept
    per identity, "shared" for the corroborated ones).
    """
    askers: dict[str, set[str]] = {}
    for q in rows:
        askers.setdefault(q["prompt_key"], set()).add(q["client"])
    shared = {k for k, who in askers.items() if len(who) > 1}
    own: dict[str, list[str]] = {}
    for k, who in askers.items():  # insertion order: first appearance, oldest first
        if len(who) == 1:
            own.setdefault(next(iter(who)), []).append(k)
    cap = share_cap({c: len(keys) for c, keys in own.items()}, share, len(shared))
    allowed = shared | {k for keys in own.values() for k in keys[:cap]}
    kept = [q for q in rows if q["prompt_key"] in allowed]
    per = {c: min(len(keys), cap) for c, keys in own.items()}
    return kept, {**per, "shared": len(shared)}


def trusted_names(trusted_raters: Collection[str], single_user: bool, anonymous: str = "anonymous") -> set[str]:
    """Identities whose verdict alone counts (the operator is trusted on a single-user server)."""
    return {anonymous} if single_user else set(trusted_raters)


__all__ = ["Rating", "Verdict", "askers_needed", "capped", "earned", "prompt_key", "share_cap", "trusted_names"]
