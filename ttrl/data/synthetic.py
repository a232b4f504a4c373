"""The built-in arithmetic task: sums of small numbers, worked step by step, answer in \\boxed{}.

A problem reads "37+48+12=" and its completion adds one number at a time,
then boxes the total: "37+48=85,85+12=97 \\boxed{97}". Only the boxed
answer is voted on and graded; the steps before it are the "reasoning path",
which is where two samples of the same problem differ.

The test split (what TTRL trains on, unlabeled) is drawn from a seed. The
easy split that warm-starts the demo model mixes shorter sums with sums of
the test's length but never contains a test problem; its worked solutions
come from a careless teacher who forgets a carry now and then, so the model
learns to slip the same way (see `scratchpad`). Answers are carried for
metrics (and, for the easy split only, for supervised warm-starting).

`choice_problems` asks the same test split as multiple choice, for
`label.extractor=choice`: "37+48+12= A) 97 B) 87 C) 98 D) 107", answer
"A". The wrong options are totals the careless teacher could have written
(its slips at one or more steps), so they look like the model's own mistakes;
the sums, and so the arithmetic task itself, are unchanged.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

from ttrl.data.choices import arrange, option_rng, render
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


# How a careless writer gets one step wrong: a dropped or an extra carry,
# or a units digit off by one. Four different mistakes matter: with a
# single kind of mistake (say, only dropped carries) a slip at the first and
# at the second step would give the same wrong total, and that total could
# outvote the right one.
SLIPS = (-10, 10, -1, 1)


def scratchpad(nums: tuple[int, ...], slip: float = 0.0, rng: random.Random | None = None) -> str:
    """The worked solution '37+48=85,85+12=97 \\boxed{97}', adding one number at a time.

    With `slip` > 0 the writer is careless: each step is wrong with
    probability `slip`, by one of `SLIPS` ("37+48=75"), and the solution goes
    on, consistently, from what was written. The boxed answer is the last
    running total, so a slip makes the whole solution wrong. With slip=0 the
    solution is always right.
    """
    total, steps = nums[0], []
    for x in nums[1:]:
        s = total + x
        if slip > 0 and rng is not None and rng.random() < slip:
            s = max(0, s + rng.choice(SLIPS))
        steps.append(f"{total}+{x}={s}")
        total = s
    return ",".join(steps) + " " + format_completion(str(total))


def easy_stream(terms: int, digits: int, short_share: float, seed: int, exclude: set[str],
                slip: float = 0.0) -> Iterator[tuple[str, str]]:
    """Endless (problem, worked solution) pairs for warm-starting; test problems never appear."""
    rng = random.Random(seed)
    lo, hi = _range(digits)
    while True:
        k = 2 if rng.random() < short_share else terms
        nums = tuple(rng.randint(lo, hi) for _ in range(k))
        problem = format_problem(nums)
        if problem in exclude:
            continue
        yield problem, scratchpad(nums, slip, rng)


def slipped_totals(total: int, count: int, steps: int, rng: random.Random) -> list[int]:
    """`count` distinct wrong totals the careless teacher could write for a sum with `total`.

    The teacher slips by one of SLIPS at each of the sum's `steps` additions,
    so the candidates are `total` moved by one up to `steps` slips (37+48+12:
    off by 1, 2, 9, 10, 11 or 20, either way), drawn uniformly: a right answer
    surrounded only by off-by-one-slip options would give itself away as the
    one in the middle. Totals below zero are left out; when too few remain
    (tiny sums, many letters), totals more slips away make up the rest.
    """
    out: list[int] = []
    reached, seen, slips = {0}, {0}, 0
    while len(out) < count:
        pool: list[int] = []
        # One tier: everything up to `steps` slips at first, then one slip more at a time.
        while True:
            slips += 1
            reached = {r + s for r in reached for s in SLIPS}
            pool += sorted(r for r in reached - seen if total + r >= 0)
            seen |= reached
            if slips >= steps:
                break
        rng.shuffle(pool)
        out += [total + r for r in pool[: count - len(out)]]
    return out


def choice_problems(num_problems: int, terms: int, digits: int, seed: int, letters: str = "ABCD",
                    choice_seed: int = 0, instruction: str = "") -> list[Prompt]:
    """The test split of `arithmetic_problems` as multiple choice: '37+48+12= A) 97 B) 87 C) 98 D) 107', answer 'A'.

    The same sums in the same order; each gets len(letters)-1 slipped totals
    as wrong options and a letter order, both from `option_rng(choice_seed, id)`.
    """
    out = []
    for i, p in enumerate(arithmetic_problems(num_problems, terms, digits, seed)):
        pid = f"arith-mc-{i}"
        rng = option_rng(choice_seed, pid)
        wrong = slipped_totals(int(p.answer), len(letters) - 1, max(1, terms - 1), rng)
        options, answer = arrange(p.answer, [str(w) for w in wrong], letters, rng)
        out.append(Prompt(id=pid, problem=render(p.problem, options, letters, instruction, one_line=True),
                          answer=answer))
    return out
