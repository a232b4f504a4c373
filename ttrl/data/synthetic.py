"""The built-in arithmetic task: sums of small numbers with the answer in \\boxed{}.

A problem reads "37+48+12=" and its completion "\\boxed{97}". The test split
(what TTRL trains on, unlabeled) is drawn from a seed; the easy split that
warm-starts the demo model mixes shorter sums with sums of the test's
length but never contains a test problem. Answers are carried for metrics
(and, for the easy split only, for supervised warm-starting).
"""

from __future__ import annotations

import random
from collections.abc import Iterator

from ttrl.types import Prompt


def _range(digits: int) -> tuple[int, int]:
    return (10 ** (digits - 1) if digits > 1 else 0), 10**digits - 1


def arithmetic_problems(num_problems: int, terms: int, digits: int, seed: int) -> list[Prompt]:
    """`num_problems` distinct problems like '37+48+12=' with answer '97' (the test split)."""
    rng = random.Random(seed)
    lo, hi = _range(digits)
    space = (hi - lo + 1) ** terms
    if num_problems > space:
        raise ValueError(f"data.synthetic: only {space} distinct problems exist, {num_problems} asked for")
    seen: set[tuple[int, ...]] = set()
    out = []
    while len(out) < num_problems:
        nums = tuple(rng.randint(lo, hi) for _ in range(terms))
        if nums in seen:
            continue
        seen.add(nums)
        out.append(Prompt(id=f"arith-{len(out)}", problem=format_problem(nums), answer=str(sum(nums))))
    return out


def format_problem(nums: tuple[int, ...]) -> str:
    return "+".join(map(str, nums)) + "="


def format_completion(answer: str) -> str:
    return "\\boxed{" + answer + "}"


def easy_stream(terms: int, digits: int, short_share: float, seed: int,
                exclude: set[str]) -> Iterator[tuple[str, str]]:
    """Endless (problem, completion) pairs for warm-starting; test problems never appear."""
    rng = random.Random(seed)
    lo, hi = _range(digits)
    while True:
        k = 2 if rng.random() < short_share else terms
        nums = tuple(rng.randint(lo, hi) for _ in range(k))
        problem = format_problem(nums)
        if problem in exclude:
            continue
        yield problem, format_completion(str(sum(nums)))
