"""Pull a sample's final answer out of its text: the last `\\boxed{...}`.

Extractors are registered by name in `EXTRACTORS`; `label.extractor` names
one and config validation checks the name against this registry. A run
hands the name to every place that reads answers through its options
(StepOptions.extractor for the vote, rewards and metrics of a step; eval's
and ttrl-serve's `extractor` arguments), never through a module global, so
votes, grades and served answers all read the same answer. "boxed", the
default, works as follows.

The answer is the content of the last `\\boxed{...}` or `\\fbox{...}` (a space
before the brace is fine, nested braces are fine), stripped. The bare form
`\\boxed 5` is read as one token. No box, an empty box, or a last box whose
braces never close (a truncated completion) gives None.

This runs on every completion of every step and on arbitrary model output,
so it must never raise and must stay linear in the length of the text: no
backtracking regex, no rescanning. It never grades or normalises answers;
that is grade.py's job.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from ttrl.registry import Registry

__all__ = ["EXTRACTORS", "extract_answer"]

Extractor = Callable[[str], str | None]
EXTRACTORS: Registry[Extractor] = Registry("answer extractor")

# `\boxed` / `\fbox` as whole commands: `\boxedfoo` is some other macro.
_BOX_COMMAND = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
# Inside braces only escapes and braces matter. Matching `\\.` first makes
# `\{` / `\}` literal characters and keeps `\\` (a line break) from
# escaping the brace after it. The regex jumps over plain text at C speed.
_BRACE_EVENT = re.compile(r"\\.|[{}]", re.DOTALL)
# The bare form: one token, ended by whitespace, `$` or a brace.
_BARE_TOKEN = re.compile(r"[^\s${}]+")


def extract_answer(text: str, extractor: str = "boxed") -> str | None:
    """The answer in `text` by the registered `extractor`, else None.

    Never raises on any `text`; an unknown `extractor` name raises KeyError
    (a config mistake, which `validate` reports before a run starts).
    """
    return EXTRACTORS.get(extractor)(text)


@EXTRACTORS.register("boxed")
def boxed(text: str) -> str | None:
    """The stripped content of the last `\\boxed{}`/`\\fbox{}` in `text`, else None."""
    if not isinstance(text, str):
        return None
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
    if content is None:
        return None
    content = content.strip()
    return content or None


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
