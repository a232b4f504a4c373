"""One math-verify equivalence check in this process, bounded in time by SIGALRM.

`verify_here(pred, ref, budget)` parses both (normalised) answers with
math-verify and compares them, returning a verdict: EQUAL, DIFFERENT or
TIMED_OUT. It is what a grading worker runs (sandbox.py) and what the
"inline" backend of grade.py runs. Each answer is parsed once per process
(math-verify's parse is the slow part, and a vote compares a new answer with
every class representative); an answer whose parse ran out of time fails at
once when it comes back with no more time than it had.

The bound is SIGALRM, so it holds only in the main thread: elsewhere a
check runs unbounded, which is why grade.py runs checks in worker processes
by default. Must never raise out of `verify_here` (a failure is DIFFERENT),
touch signal handlers outside a check, or import torch, ray, vllm or
deepspeed; math-verify and sympy are imported on the first check only.
"""

from __future__ import annotations

import functools
import logging
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["DIFFERENT", "EQUAL", "TIMED_OUT", "forget_parses", "signals_usable", "verify_here"]

log = logging.getLogger(__name__)

# Verdicts, as a grading worker writes them on its protocol line.
EQUAL, DIFFERENT, TIMED_OUT = "1", "0", "t"


class _Deadline(BaseException):
    """Raised by our SIGALRM handler. A BaseException so that the
    `except Exception` blocks in math-verify and sympy cannot swallow it."""


def signals_usable() -> bool:
    """Whether SIGALRM can bound a check here (POSIX, main thread)."""
    return hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()


@contextmanager
def _alarm(seconds: float | None) -> Iterator[None]:
    """Raise _Deadline in the main thread after `seconds`; no-op when None or unusable."""
    if seconds is None or not signals_usable():
        yield
        return

    def on_alarm(signum: int, frame: object) -> None:
        raise _Deadline

    previous_handler = signal.signal(signal.SIGALRM, on_alarm)
    previous_delay, _ = signal.setitimer(signal.ITIMER_REAL, max(seconds, 1e-3))
    started = time.monotonic()
    try:
        yield
    finally:
        # Nested so that the handler is restored even if the alarm fires
        # just as the body finishes.
        try:
            signal.setitimer(signal.ITIMER_REAL, 0)
        finally:
            signal.signal(signal.SIGALRM, previous_handler)
            if previous_delay:  # give a caller's own timer back what it has left
                left = previous_delay - (time.monotonic() - started)
                signal.setitimer(signal.ITIMER_REAL, max(left, 1e-3))


# answer -> math-verify's parse ([] when unparseable): an answer is parsed
# once, however many class representatives it is compared with.
_parsed: dict[str, list] = {}
# answer -> the largest parse budget it has run out of: comparing it with the
# next representative fails at once instead of paying that time again.
_parse_timeouts: dict[str, float] = {}
_PARSE_MEMORY_MAX = 1 << 14


def forget_parses() -> None:
    """Drop this process's parse memory (benchmarks measure cold checks)."""
    _parsed.clear()
    _parse_timeouts.clear()


def _parse_once(answer: str, seconds: float | None) -> list:
    if answer in _parsed:
        return _parsed[answer]
    if seconds is not None and seconds <= _parse_timeouts.get(answer, 0.0):
        raise _Deadline
    from math_verify import parse

    if len(_parsed) + len(_parse_timeouts) >= _PARSE_MEMORY_MAX:
        forget_parses()
    try:
        with _alarm(seconds):
            # `$...$` makes math-verify read the answer as LaTeX (it only
            # looks for LaTeX inside math delimiters). Its own signal-based
            # timeout is off: it would fight with ours over SIGALRM.
            result = parse(f"${answer}$", parsing_timeout=None)
    except _Deadline:
        if seconds is not None:
            _parse_timeouts[answer] = max(seconds, _parse_timeouts.get(answer, 0.0))
        raise
    _parsed[answer] = result
    return result


def verify_here(pred: str, ref: str, budget: float | None) -> str:
    """One math-verify check in this process within `budget` seconds (None: unbounded)."""
    from math_verify import verify

    _quiet_math_verify()
    started = time.monotonic()
    try:
        # A third of the budget per parse, so that a slow parse is blamed
        # (and remembered) on the answer that caused it.
        share = None if budget is None else budget / 3
        gold = _parse_once(ref, share)
        target = _parse_once(pred, share)
        if not gold or not target:
            return DIFFERENT
        left = None if budget is None else budget - (time.monotonic() - started)
        if left is not None and left <= 0:
            return TIMED_OUT
        with _alarm(left):
            # math-verify's `verify(gold, target)` is not symmetric: the
            # reference is the gold.
            return EQUAL if verify(gold, target, timeout_seconds=None) else DIFFERENT
    except _Deadline:
        return TIMED_OUT
    except Exception:
        log.debug("math-verify failed", exc_info=True)
        return DIFFERENT


@functools.cache
def _quiet_math_verify() -> None:
    # math-verify warns once that its own timeout is off (we bound time
    # ourselves) and logs whole inputs on failures, which can be 100k chars.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
