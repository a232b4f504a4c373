"""How two answers of one answer type compare, for the vote and for grading.

`matching(extractor)` is the `Matching` of the answers an extractor reads,
or None for those that grade.py compares by math-verify: "boxed", a custom
extractor, and any extractor registered without a matching. grade.py's
`is_equivalent` and `equivalence_classes` take the run's extractor and come
here for typed answers, so a vote and a grade of the same run agree.

- choice: letters compare exactly. Both sides are read by the choice
  extractor first, so a reference written "(C)" or "C) 42 m/s" matches "C".
- number: both sides are read by the number extractor (a reference "1,234"
  or "\\frac{3}{4}" is fine), then compared exactly as fractions, else
  within a relative tolerance of 1e-6 (|a - b| <= 1e-6 * max(|a|, |b|),
  computed exactly): float noise such as 0.30000000000000004 vs 0.3 and a
  1/3 written to 7 digits match; rounding to fewer digits (0.33 vs 1/3)
  does not. "45%" reads as 45 (extract.py), so "45%" matches "45", not 0.45.

An answer that does not read as its type (a reference "none" under
`number`) matches only the same text, stripped. Nothing here raises on any
input or sees a ground-truth answer except as the `ref` a caller passes; no
comparison is slower than linear in its answers' length (a number of more
than 1000 characters compares as text).
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction

from ttrl.labeling.extract import choice, number

__all__ = ["MATCHINGS", "NUMBER_REL_TOL", "Matching", "matching"]

NUMBER_REL_TOL = Fraction(1, 10**6)


@dataclass(frozen=True)
class Matching:
    """How one answer type reads and compares answers."""

    # An answer's canonical form, or None when it does not read as this type.
    read: Callable[[str], str | None]
    # Whether two canonical forms are the same answer.
    same: Callable[[str, str], bool]
    # True when `same` is plain equality: the vote then needs no pairwise checks.
    exact: bool = False

    def key(self, answer: object) -> tuple[bool, str] | None:
        """(read as the type?, canonical form or stripped text); None for no answer."""
        if not isinstance(answer, str):
            return None
        canonical = self.read(answer)
        if canonical is not None:
            return True, canonical
        text = answer.strip()
        return (False, text) if text else None

    def equivalent(self, pred: object, ref: object) -> bool:
        a, b = self.key(pred), self.key(ref)
        if a is None or b is None or a[0] != b[0]:
            return False
        return self.same(a[1], b[1]) if a[0] else a[1] == b[1]

    def classes(self, answers: Sequence[str | None]) -> tuple[list[str], list[int | None]]:
        """grade.equivalence_classes for this type: first-seen representatives, each answer's class."""
        representatives: list[str] = []
        keys: list[tuple[bool, str]] = []
        class_of_key: dict[tuple[bool, str], int] = {}
        assignment: list[int | None] = []
        for answer in answers:
            key = self.key(answer)
            if key is None:
                assignment.append(None)
                continue
            if key not in class_of_key:
                match = None
                if key[0] and not self.exact:
                    match = next((i for i, k in enumerate(keys) if k[0] and self.same(k[1], key[1])), None)
                if match is None:
                    match = len(representatives)
                    representatives.append(answer)  # type: ignore[arg-type]  # key() checked it is a str
                    keys.append(key)
                class_of_key[key] = match
            assignment.append(class_of_key[key])
        return representatives, assignment


@functools.lru_cache(maxsize=1 << 14)
def _as_fraction(canonical: str) -> Fraction | None:
    if len(canonical) > 1000:
        return None  # compared as text (see extract.py's _MAX_NUMBER_CHARS)
    try:
        return Fraction(canonical)
    except (ValueError, ZeroDivisionError):
        return None


def _same_number(a: str, b: str) -> bool:
    if a == b:
        return True
    x, y = _as_fraction(a), _as_fraction(b)
    if x is None or y is None:
        return False
    # Exact arithmetic: no overflow, and tiny numbers do not all round to 0.0.
    return abs(x - y) <= NUMBER_REL_TOL * max(abs(x), abs(y))


# Extractor name -> how its answers compare. Register a new extractor's here
# to give it one; without, its answers go to math-verify.
MATCHINGS: dict[str, Matching] = {
    "choice": Matching(read=choice, same=operator.eq, exact=True),
    "number": Matching(read=number, same=_same_number),
}


def matching(extractor: str) -> Matching | None:
    """The `Matching` of answers read by `extractor`; None where math-verify compares them."""
    return MATCHINGS.get(extractor) if isinstance(extractor, str) else None
