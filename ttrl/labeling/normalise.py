"""Light normalisation of final answers, and the cases settled without math-verify.

`normalize_answer` is the clean-up used for identity checks and cache keys:
math delimiters, sizing commands (`\\left`, `\\bigr`), thin and wide spaces,
`\\dfrac`/`\\tfrac` and spaces next to symbols go; nothing that can change
an answer's meaning does ("1 2" stays "1 2", not "12"). `fast_verdict`
settles a normalised pair when that is safe: identical strings, and plain
numbers compared exactly ("0.5" vs "1/2", "142.0" vs "142"); everything
else is left to math-verify (mathverify.py).

Pure string work: must never call math-verify or sympy, start a process,
read a ground-truth answer of its own accord, or import torch, ray, vllm or
deepspeed.
"""

from __future__ import annotations

import re
from fractions import Fraction

__all__ = ["MAX_ANSWER_CHARS", "as_number", "fast_verdict", "normalize_answer"]

# No real final answer is this long; parsing one costs seconds and never
# finds a match, so such answers are compared as strings only.
MAX_ANSWER_CHARS = 2000

_SIZING = re.compile(r"\\(?:left|right|bigl|bigr|Bigl|Bigr|big|Big)(?![A-Za-z])")
# Thin spaces are deleted rather than turned into spaces: "1\,000" is 1000.
_THIN_SPACE = re.compile(r"\\[!,;:]|\\displaystyle(?![A-Za-z])")
_WIDE_SPACE = re.compile(r"\\ |\\q?quad(?![A-Za-z])|~")
_FRAC_VARIANT = re.compile(r"\\[dt]frac(?![A-Za-z])")
_WHITESPACE = re.compile(r"\s+")
# Spaces next to a symbol carry no meaning ("x = 3", "(1, 2]"); spaces
# between two word characters can ("1 2" is not "12"), so those stay.
_SPACE_BY_SYMBOL = re.compile(r" ?([^\w ]) ?")

_DECIMAL = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)")
_SLASH_FRACTION = re.compile(r"([+-]?\d+)/(\d+)")
_LATEX_FRACTION = re.compile(r"([+-]?)\\frac ?(?:\{(\d+)\}\{(\d+)\}|(\d)(\d))")
_MAX_NUMBER_CHARS = 64  # also keeps int() far from Python's 4300-digit limit


def normalize_answer(answer: str) -> str:
    """Light, meaning-preserving clean-up used for identity checks and cache keys."""
    text = _strip_math_delimiters(answer.strip())
    text = _SIZING.sub("", text)
    text = _THIN_SPACE.sub("", text)
    text = _WIDE_SPACE.sub(" ", text)
    text = _FRAC_VARIANT.sub(r"\\frac", text)
    text = _WHITESPACE.sub(" ", text).strip()
    return _SPACE_BY_SYMBOL.sub(r"\1", text)


def _strip_math_delimiters(text: str) -> str:
    """`$x$`, `$$x$$`, `\\(x\\)`, `\\[x\\]` -> `x`; an escaped `\\$` is a dollar sign, kept."""
    while True:
        if len(text) >= 2 and text[0] == "$" and text[-1] == "$" and not text.endswith("\\$"):
            text = text[1:-1].strip()
        elif len(text) >= 4 and text[:2] in ("\\(", "\\[") and text[-2:] in ("\\)", "\\]"):
            text = text[2:-2].strip()
        else:
            return text


def as_number(text: str) -> Fraction | None:
    """The exact value of a plain decimal or integer fraction, else None."""
    if len(text) > _MAX_NUMBER_CHARS:
        return None
    if _DECIMAL.fullmatch(text):
        return Fraction(text)
    if match := _SLASH_FRACTION.fullmatch(text):
        numerator, denominator = match.groups()
    elif match := _LATEX_FRACTION.fullmatch(text):
        sign, braced_num, braced_den, digit_num, digit_den = match.groups()
        numerator = sign + (braced_num or digit_num)
        denominator = braced_den or digit_den
    else:
        return None
    if int(denominator) == 0:
        return None
    return Fraction(int(numerator), int(denominator))


def fast_verdict(pred: str, ref: str) -> bool | None:
    """Settle a normalised pair without math-verify when that is safe, else None."""
    if pred == ref:
        return True
    if max(len(pred), len(ref)) > MAX_ANSWER_CHARS:
        return False
    a, b = as_number(pred), as_number(ref)
    if a is None or b is None:
        return None
    if a == b:
        return True
    # Two different integers are never equivalent. Anything else goes to
    # math-verify, which rounds floats ("0.333333" ≡ "1/3"): agreeing with
    # it matters more than the milliseconds saved.
    if a.denominator == 1 and b.denominator == 1:
        return False
    return None
