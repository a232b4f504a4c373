"""The calculator `tool_verified` checks worked steps with: integer arithmetic, nothing else.

A worked step is "<integers joined by + - *> = <integer>" ("37+48=85"); a
completion's steps are every such equation before its last `\\boxed{`, in
order ("37+48=85,85+12=97 \\boxed{97}" has two). `check_steps(text)` says
how many checks the text offers and how many hold: one per step (the
calculator's value of its left side equals its right side) and, when there
are steps, one for the answer (the boxed answer equals the calculator's
value of the last step's left side, as T3RL's verifier compares the executed
trace's result with the rollout's answer).

The calculator is a tokenizer and two loops: no `eval`, no `ast`, no
imports beyond `re` and `json`; numbers longer than MAX_DIGITS and steps
with more than MAX_TERMS terms are not checked (they count as neither
holding nor failing), so no input can make it slow or large.
`check_many` is the entry a sandbox worker runs (ttrl/labeling/sandbox.py):
a list of texts in, a JSON list of [checks, held] pairs out.

Must never read a ground-truth answer (it sees completions only), execute
anything it parses, or import torch, ray, vllm or deepspeed.
"""

from __future__ import annotations

import json
import re

__all__ = ["MAX_DIGITS", "MAX_TERMS", "check_many", "check_steps", "evaluate", "steps"]

# Bounds that keep every check microseconds long and its numbers small.
MAX_DIGITS = 30
MAX_TERMS = 16

# Integers joined by + - * (spaces allowed), "=", an optionally signed integer.
_STEP = re.compile(r"(\d+(?:\s*[-+*]\s*\d+)+)\s*=\s*(-?\d+)")
_TOKEN = re.compile(r"\d+|[-+*]")
_BOXED = re.compile(r"\\(?:boxed|fbox)\{\s*(-?\d+)\s*\}")


def evaluate(expr: str) -> int | None:
    """The value of integers joined by + - * (products first), or None when it is out of bounds or malformed."""
    tokens = _TOKEN.findall(expr)
    numbers, ops = tokens[0::2], tokens[1::2]
    if (not numbers or len(numbers) != len(ops) + 1 or len(numbers) > MAX_TERMS
            or any(not t.isdigit() or len(t) > MAX_DIGITS for t in numbers) or any(o not in "+-*" for o in ops)):
        return None
    total, term, sign = 0, int(numbers[0]), 1
    for op, num in zip(ops, numbers[1:]):
        if op == "*":
            term *= int(num)
        else:
            total += sign * term
            term, sign = int(num), (1 if op == "+" else -1)
    return total + sign * term


def steps(text: str) -> tuple[list[tuple[str, str]], str | None]:
    """The worked steps before the last boxed answer as (left side, stated result), and that answer."""
    boxes = list(_BOXED.finditer(text))
    body = text[:boxes[-1].start()] if boxes else text
    return [(m.group(1), m.group(2)) for m in _STEP.finditer(body)], (boxes[-1].group(1) if boxes else None)


def check_steps(text: str) -> tuple[int, int]:
    """(checks, held): each worked step, plus the boxed answer against the last step, when there are steps."""
    found, answer = steps(text)
    checks = held = 0
    last = None
    for left, stated in found:
        value = evaluate(left)
        if value is None:
            continue
        checks += 1
        held += int(value == int(stated))
        last = value
    if last is not None:
        checks += 1
        held += int(answer is not None and int(answer) == last)
    return checks, held


def check_many(texts: list[str], budget: float = 0.0) -> str:
    """`check_steps` of every text, as the JSON a sandbox worker sends back (`budget` is unused: bounded by design)."""
    return json.dumps([list(check_steps(t)) for t in texts])
