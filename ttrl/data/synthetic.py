"""The built-in arithmetic task: sums of small numbers with the answer in \\boxed{}.

Generated from a seed, so every machine gets the same problems. The answer
is carried for metrics only.
"""

from __future__ import annotations

import random

from ttrl.types import Prompt


def arithmetic_problems(num_problems: int, terms: int, digits: int, seed: int) -> list[Prompt]:
    """`num_problems` distinct problems like '37+48+12=' with answer '97'."""
    rng = random.Random(seed)
    lo, hi = 10 ** (digits - 1) if digits > 1 else 0, 10**digits - 1
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
        out.append(Prompt(id=f"arith-{len(out)}", problem="+".join(map(str, nums)) + "=", answer=str(sum(nums))))
    return out
