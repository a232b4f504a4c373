"""Pull a sample's final answer out of its text, by answer type.

Extractors are registered by name in `EXTRACTORS`; `label.extractor` names
one and config validation checks the name against this registry. A run
hands the name to every place that reads answers through its options
(StepOptions.extractor for the vote, rewards and metrics of a step; eval's
and ttrl-serve's `extractor` arguments), never through a module global, so
votes, grades and served answers all read the same answer. How two answers
of a type compare (letters exactly, numbers numerically, the rest by
math-verify) is match.py's and grade.py's job, keyed by the same name.

- "boxed" (the default): the content of the last `\\boxed{...}` or
  `\\fbox{...}` (a space before the brace is fine, nested braces are fine),
  stripped. The bare form `\\boxed 5` is read as one token. No box, an empty
  box, or a last box whose braces never close (a truncated completion)
  gives None.
- "choice": the upper-case letter (A-J) of a multiple-choice answer. The
  last explicit statement wins: "The answer is (C)", "**Answer:** c",
  "answer is option C", "I'll go with (C)", or a last `\\boxed{}` holding a
  letter ("\\boxed{(C)}", "\\boxed{C) 42}"). Only when there is none, the
  last line may give it on its own: "C) 42 m/s", "(C) 42 m/s", "**C**", "C".
  A statement with no single letter ("A or B", "either A or B", "none of the
  above") gives None. "A" and "I" are English words, so they count only
  when marked ("(A)", "A)", "**A**", "A." or at a line's end), never from
  "The answer is a ball" or a last line "A ball falls ...".
- "number": the last number of the last `\\boxed{}`'s content, or of the
  whole text when no box closes; None for a box without a number. It comes
  back canonical: thousands separators dropped ("1,234" and "1{,}234" ->
  "1234"), "+" and trailing zeros dropped, "\\frac{3}{4}" and "3/4" ->
  "0.75", fractions without a finite decimal kept as "p/q" ("2/6" ->
  "1/3"), "1.5e3" -> "1500". Units and currency around it are ignored
  ("12 cm" -> "12", "$5" -> "5"). A percent sign is dropped: "45%" is the
  answer 45, the number of percent, which is how benchmarks with percent
  questions write their answers; "0.45" is a different answer.
- "custom": a user's function `text -> str | None`, named by
  `label.custom_extractor` ("package.module:function"). A run threads it as
  the value `configured_extractor(cfg.label)` returns,
  "custom:package.module:function", so that the path travels with the name
  into every process that reads answers; the bare name "custom" reads
  nothing and raises ValueError. `configured_extractor` imports the function
  and checks that it takes one argument, so a bad path fails at start-up
  with a ValueError naming it. When the function raises, or returns
  something that is not a str or None, `extract_answer` raises
  `CustomExtractorError`, naming the function and, where the caller passed
  it, the prompt. A caller never turns that into a reward of zero: the
  training step skips itself and logs the error as its reason. Its answers
  compare like boxed ones (math-verify); its run time is its own.

This runs on every completion of every step and on arbitrary model output,
so the built-in extractors must never raise and must stay linear in the
length of the text: every repeat in the patterns below is bounded or cannot
backtrack, and nothing rescans. Extractors never grade.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import re
from collections.abc import Callable
from fractions import Fraction
from typing import Any, NamedTuple

from ttrl.registry import Registry

__all__ = ["CUSTOM_PREFIX", "EXTRACTORS", "CustomExtractorError", "configured_extractor", "extract_answer",
           "load_custom_extractor"]

Extractor = Callable[[str], str | None]
EXTRACTORS: Registry[Extractor] = Registry("answer extractor")

# What `configured_extractor` puts before a custom extractor's dotted path.
CUSTOM_PREFIX = "custom:"


class CustomExtractorError(RuntimeError):
    """A custom extractor raised, or returned something other than a str or None."""

    def __init__(self, function: str, problem: str, prompt: str | None = None):
        self.function, self.problem, self.prompt = function, problem, prompt
        where = f" (prompt {prompt!r})" if prompt is not None else ""
        super().__init__(f"custom answer extractor {function!r} {problem}{where}")

    def __reduce__(self) -> tuple[Any, ...]:
        # Rebuilt from its fields, not its message, when it crosses a process (Ray).
        return type(self), (self.function, self.problem, self.prompt)


def extract_answer(text: str, extractor: str = "boxed", *, prompt: str | None = None) -> str | None:
    """The answer in `text` by the registered `extractor`, else None.

    Never raises on any `text`, except `CustomExtractorError` from a custom
    extractor (`prompt`, the prompt's id, only goes into that error). An
    unknown `extractor` name raises KeyError (a config mistake, which
    `validate` reports before a run starts).
    """
    if extractor.startswith(CUSTOM_PREFIX):
        return _run_custom(extractor[len(CUSTOM_PREFIX):], text, prompt)
    return EXTRACTORS.get(extractor)(text)


# ── boxed ──────────────────────────────────────────────────────────────────
# `\boxed` / `\fbox` as whole commands: `\boxedfoo` is some other macro.
_BOX_COMMAND = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
# Inside braces only escapes and braces matter. Matching `\\.` first makes
# `\{` / `\}` literal characters and keeps `\\` (a line break) from
# escaping the brace after it. The regex jumps over plain text at C speed.
_BRACE_EVENT = re.compile(r"\\.|[{}]", re.DOTALL)
# The bare form: one token, ended by whitespace, `$` or a brace.
_BARE_TOKEN = re.compile(r"[^\s${}]+")


@EXTRACTORS.register("boxed")
def boxed(text: str) -> str | None:
    """The stripped content of the last `\\boxed{}`/`\\fbox{}` in `text`, else None."""
    if not isinstance(text, str):
        return None
    box = _last_box(text)
    return box[1] if box is not None else None


def _last_box(text: str) -> tuple[int, str | None] | None:
    """(where the last box command starts, its stripped content or None); None without a box."""
    last = None
    for match in _BOX_COMMAND.finditer(text):
        last = match
    if last is None:
        return None

    start = last.end()
    pos = start
    # Skipping whitespace by hand (not with a regex on a slice) keeps this
    # linear without copying the tail of a long text.
    while pos < len(text) and text[pos].isspace():
        pos += 1
    if pos < len(text) and text[pos] == "{":
        content = _braced_content(text, pos)
    else:
        token = _BARE_TOKEN.match(text, pos)
        # A sentence may end right after the token: "... is \boxed 5."
        content = token.group().rstrip(".,;") if token else None
    if content is not None:
        content = content.strip() or None
    return last.start(), content


def _braced_content(text: str, open_pos: int) -> str | None:
    """Text between the `{` at `open_pos` and its matching `}`; None if it never closes."""
    depth = 0
    for event in _BRACE_EVENT.finditer(text, open_pos):
        char = event.group()
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[open_pos + 1 : event.start()]
    return None


# ── choice ─────────────────────────────────────────────────────────────────
# An answer statement: a keyword, then a link ("is", ":", "would be"), with
# markdown around it ("**Answer:** C").
_STATEMENT = re.compile(
    r"\b(?:answer|(?:correct|right|best) (?:option|choice))\b"
    r"(?:[ \t*_]{0,8}(?:[:：=]|is\b|would be\b|should be\b|must be\b|will be\b)){1,2}[\s*_]{0,8}",
    re.IGNORECASE)
# "I'll go with (C)": a choice without the word "answer". Weaker evidence, so
# its letter must be marked (see _Token).
_CHOOSE = re.compile(r"\b(?:i|we)(?:'ll| will| would)?[ \t]{1,8}(?:choose|pick|select|go with)[ \t]{1,8}",
                     re.IGNORECASE)
# Words between the link and the letter; "either"/"both" make any letter after them "no single letter".
_LEAD = re.compile(r"(?P<either>(?:either|both)[ \t]{1,8})?(?:(?:the[ \t]{1,8})?(?:option|choice|letter)[ \t]{0,8})?",
                   re.IGNORECASE)
_NONE_OF = re.compile(r"none of (?:the )?(?:above|these|them|the options)\b", re.IGNORECASE)
# A letter with what may mark it: "(C)", "[C]", "**C**", "$C$", "\text{C}", "C)".
_TOKEN = re.compile(
    r"(?P<open>(?:(?:[(\[{*$]|\\text(?:bf|rm|it)?\{|\\math(?:rm|bf)\{)[ \t]?){0,4})"
    r"(?P<letter>[A-Ja-j])"
    r"(?P<close>[)\]}*$]{0,5})")
# A second letter right after the first makes the statement ambiguous: "A or B", "B, C", "C/D".
_ALSO = re.compile(r"[ \t]{0,8}(?:,|/|&|\bor\b|\band\b)[ \t]{0,8}(?:(?:option|choice)[ \t]{0,8})?", re.IGNORECASE)
# An unmarked "A"/"I" is a word unless the sentence carries on like an answer's would.
_CONNECTOR = re.compile(r"[ \t]{1,8}(?:because|since|as|which|given)\b", re.IGNORECASE)
# Glued to these, a letter is part of a word or formula ("a^2", "b'", "c\cdot d").
_ATTACHED = frozenset("_'’\\^=+-/<>|")
_WORDS = frozenset("AaIi")
_AMBIGUOUS = "ambiguous"  # a statement that gives no single letter


class _Token(NamedTuple):
    letter: str
    end: int
    marked: bool  # "(C)", "C)", "[C]", "**C**", "\text{C}", "$C$"
    only_math: bool  # marked by "$...$" alone ("$a$ is a side": a variable, not a choice)
    stop: str  # what follows: "eol" (end of text or line), "dot" (. or :), "mark" (, ; ! ?), "other"


def _token(text: str, pos: int) -> _Token | None:
    """The letter at `pos` with its marks, or None where there is no standalone letter."""
    m = _TOKEN.match(text, pos)
    if m is None:
        return None
    opened, closed, end = m["open"], m["close"], m.end()
    nxt, after = text[end : end + 1], text[end + 1 : end + 2]
    if not closed and (nxt.isalnum() or nxt in _ATTACHED):
        return None
    if nxt == "." and after.isalnum():
        return None  # "e.g.", "a.m."
    brackets = any(c in opened for c in "([{\\") and any(c in closed for c in ")]}")
    plain_marks = brackets or ")" in closed or "]" in closed or ("*" in opened and "*" in closed)
    math = "$" in opened and "$" in closed
    stop = ("eol" if nxt in ("", "\n", "\r") else "dot" if nxt in ".:" else "mark" if nxt in ",;!?"
            else "other")
    return _Token(m["letter"], end, plain_marks or math, math and not plain_marks, stop)


def _stated(text: str, tok: _Token) -> bool:
    """Whether a letter after "answer is" reads as the answer."""
    if tok.marked or tok.stop != "other" or tok.letter not in _WORDS:
        return True
    return _CONNECTOR.match(text, tok.end) is not None


def _chosen(text: str, tok: _Token) -> bool:
    """Whether a letter after "I choose" reads as the answer: only when marked or ending a clause."""
    return tok.marked or tok.stop != "other"


def _on_last_line(text: str, tok: _Token) -> bool:
    """Whether a letter opening the last line is an option: "C) ...", "(C) ...", "C. ...", "**C**", "C"."""
    return (tok.marked and not tok.only_math) or tok.stop in ("eol", "dot")


def _letter_at(text: str, pos: int, accept: Callable[[str, _Token], bool], either: bool = False) -> str | None:
    """The upper-case letter stated at `pos`, `_AMBIGUOUS`, or None when no letter is stated there."""
    tok = _token(text, pos)
    if tok is None:
        return None
    if either:
        return _AMBIGUOUS
    if not accept(text, tok):
        return None
    also = _ALSO.match(text, tok.end)
    if also is not None:
        other = _token(text, also.end())
        if other is not None and accept(text, other):
            return _AMBIGUOUS
    return tok.letter.upper()


@EXTRACTORS.register("choice")
def choice(text: str) -> str | None:
    """The letter (A-J, upper case) of the last explicit multiple-choice answer in `text`, else None."""
    if not isinstance(text, str):
        return None
    last_pos, found = -1, None
    for m in _STATEMENT.finditer(text):
        if _NONE_OF.match(text, m.end()):
            last_pos, found = m.start(), _AMBIGUOUS
            continue
        lead = _LEAD.match(text, m.end())
        stated = _letter_at(text, lead.end(), _stated, either=bool(lead["either"]))
        if stated is not None:
            last_pos, found = m.start(), stated
    for m in _CHOOSE.finditer(text):
        if m.start() > last_pos:
            lead = _LEAD.match(text, m.end())
            stated = _letter_at(text, lead.end(), _chosen, either=bool(lead["either"]))
            if stated is not None:
                last_pos, found = m.start(), stated
    box = _last_box(text)
    if box is not None and box[0] > last_pos and box[1] is not None:
        # A box holding a letter is an explicit statement; one holding "42" says nothing about letters.
        lead = _LEAD.match(box[1])
        stated = _letter_at(box[1], lead.end(), _stated, either=bool(lead["either"]))
        if stated is not None:
            found = stated
    if found is None:
        found = _last_line_letter(text)
    return None if found in (None, _AMBIGUOUS) else found


def _last_line_letter(text: str) -> str | None:
    """The option letter opening the last non-empty line, when it is written as an option."""
    end = len(text)
    while end > 0 and text[end - 1].isspace():
        end -= 1
    start = text.rfind("\n", 0, end) + 1
    while start < end and text[start] in " \t>#-•":  # quote, heading and list markers
        start += 1
    return _letter_at(text[start:end], 0, _on_last_line)


# ── number ─────────────────────────────────────────────────────────────────
# A minus sign belongs to the number unless it follows something it could
# subtract from ("3-5" is 3 minus 5; its last number is 5).
_SIGN = r"(?:(?<![\w)\]}])(?P<NAME>[-+−]))?"
_NUMBER = re.compile(
    _SIGN.replace("NAME", "fsign")
    + r"\\[dt]?frac\s{0,8}\{\s{0,8}(?P<fnum>[-+−]?\d+(?:\.\d+)?)\s{0,8}\}\s{0,8}\{\s{0,8}(?P<fden>[-+−]?\d+(?:\.\d+)?)\s{0,8}\}"
    + "|" + _SIGN.replace("NAME", "sign")
    # Thousands separators only in groups of three ("1,234"; "1,2" is a list).
    + r"(?:(?P<int>\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.(?P<dec>\d+))?|\.(?P<bare_dec>\d+))"
    + r"(?:[ \t]{0,8}/[ \t]{0,8}(?P<den>\d+(?:\.\d+)?))?"
    + r"(?:[eE](?P<exp>[-+]?\d{1,3})(?!\d))?")
# LaTeX thousands separators between digits: "1{,}234", "1\,234".
_LATEX_THOUSANDS = re.compile(r"(?<=\d)(?:\{,\}|\\,)(?=\d)")
# Longer number tokens are compared as text: Python refuses to turn more than
# 4300 digits into an int, and nobody's answer has that many.
_MAX_NUMBER_CHARS = 1000


@EXTRACTORS.register("number")
def number(text: str) -> str | None:
    """The last number in the last `\\boxed{}` (or in `text` without one), canonical, else None."""
    if not isinstance(text, str):
        return None
    box = _last_box(text)
    # A box that never closes (truncated) or is empty reads as no box.
    scope = box[1] if box is not None and box[1] is not None else text
    last = None
    for m in _NUMBER.finditer(_LATEX_THOUSANDS.sub(",", scope)):
        last = m
    return _canonical(last) if last is not None else None


def _canonical(m: re.Match[str]) -> str | None:
    if len(m.group()) > _MAX_NUMBER_CHARS:
        return re.sub(r"\s", "", m.group()).replace(",", "").replace("−", "-").lstrip("+")
    try:
        if m["fnum"] is not None:
            value = _fraction(m["fnum"]) / _fraction(m["fden"])
            negative = m["fsign"] in ("-", "−")
        else:
            mantissa = (m["int"] or "0").replace(",", "") + "." + (m["dec"] or m["bare_dec"] or "0")
            value = _fraction(mantissa + ("e" + m["exp"] if m["exp"] else ""))
            if m["den"] is not None:
                value /= _fraction(m["den"])
            negative = m["sign"] in ("-", "−")
    except ZeroDivisionError:
        return None  # "1/0" is no number
    return _format_number(-value if negative else value)


def _fraction(literal: str) -> Fraction:
    return Fraction(literal.replace("−", "-"))


def _format_number(value: Fraction) -> str:
    """A number's canonical text: an integer, a finite decimal without trailing zeros, else "p/q"."""
    if value.denominator == 1:
        return str(value.numerator)
    rest, places = value.denominator, 0
    for prime in (2, 5):
        count = 0
        while rest % prime == 0:
            rest //= prime
            count += 1
        places = max(places, count)
    if rest != 1:
        return f"{value.numerator}/{value.denominator}"  # no finite decimal: 1/3
    digits = str(abs(value.numerator) * 10**places // value.denominator).rjust(places + 1, "0")
    sign = "-" if value < 0 else ""
    # `places` is the fewest that hold the value exactly, so the last digit is not 0.
    return f"{sign}{digits[:-places]}.{digits[-places:]}"


# ── custom ─────────────────────────────────────────────────────────────────
# "package.module:function" or "package.module.function" (reward.fn's shape).
_FUNCTION_PATH = re.compile(r"[A-Za-z_][\w.]*[:.][A-Za-z_][\w.]*")


@EXTRACTORS.register("custom")
def custom(text: str) -> str | None:
    """The registry's entry for label.extractor=custom; the function itself travels as "custom:<path>"."""
    raise ValueError("label.extractor=custom reads answers with the function named by label.custom_extractor: "
                     "pass configured_extractor(cfg.label) ('custom:<path>') as the extractor, not 'custom'")


def configured_extractor(label: Any) -> str:
    """The extractor value a run threads, from its `label` config section.

    A registered name as it is; for `custom`, "custom:<label.custom_extractor>",
    after importing and checking the function (ValueError naming the path).
    """
    name = label.extractor
    if name != "custom":
        return name
    path = getattr(label, "custom_extractor", None)
    if not path:
        raise ValueError("label.custom_extractor must name a function ('package.module:function') "
                         "when label.extractor=custom")
    load_custom_extractor(path)
    return CUSTOM_PREFIX + path


@functools.cache
def load_custom_extractor(path: str) -> Extractor:
    """Import the function at `path`; every failure is a ValueError naming the path."""
    where = f"label.custom_extractor={path!r}"
    if not isinstance(path, str) or not _FUNCTION_PATH.fullmatch(path):
        raise ValueError(f"{where} must name a function as 'package.module:function'")
    module_name, _, attr_path = path.partition(":") if ":" in path else path.rpartition(".")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as err:  # the user's module may fail any way while it imports
        raise ValueError(f"{where}: cannot import module {module_name!r} ({type(err).__name__}: {err})") from err
    for attr in attr_path.split("."):
        if not hasattr(obj, attr):
            raise ValueError(f"{where}: module {module_name!r} has no attribute {attr_path!r}")
        obj = getattr(obj, attr)
    if not callable(obj):
        raise ValueError(f"{where} is a {type(obj).__name__}, not a function")
    try:
        inspect.signature(obj).bind("")
    except TypeError as err:
        raise ValueError(f"{where} cannot be called as fn(text) -> str | None: {err}") from None
    except ValueError:
        pass  # some builtins have no signature to check
    return obj


def _run_custom(path: str, text: str, prompt: str | None) -> str | None:
    if not isinstance(text, str):
        return None  # as the built-in extractors: a non-text has no answer
    fn = load_custom_extractor(path)
    try:
        out = fn(text)
    except Exception as err:
        raise CustomExtractorError(path, f"raised {type(err).__name__}: {err}", prompt) from err
    if out is None:
        return None
    if not isinstance(out, str):
        shown = repr(out)
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        raise CustomExtractorError(path, f"returned {type(out).__name__} {shown}, not a str or None", prompt)
    return out if out.strip() else None
