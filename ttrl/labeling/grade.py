"""Decide whether two final answers are mathematically equivalent.

`is_equivalent(pred, ref)` answers "is `pred` the same answer as `ref`?" for
the strings that `extract_answer` returns: "1/2" ≡ "0.5" ≡ "\\frac{1}{2}",
"(1, 2]" ≡ "\\left(1,2\\right]", "\\{1,2\\}" ≡ "\\{2,1\\}", "x = 3" ≡ "3",
"5\\text{ cm}" ≡ "5". `equivalence_classes` groups a list of answers with it
(the vote in vote.py is built on it).

How a check runs, cheapest first:
  1. light normalisation (`normalize_answer`); identical strings are equal;
  2. a numeric compare of plain numbers ("0.5" vs "1/2", "142.0" vs "142");
  3. math-verify (parse to sympy, then compare), cached per normalised pair.

Step 3 can take unbounded time and memory on model output (`9^{9^{9^9}}`,
10k nested braces), so it runs in helper processes ("process" backend, the
default): a pool of long-lived workers that grade one pair at a time under
their own SIGALRM budget, and that the caller kills (and replaces) when a
hard deadline passes. That keeps every check within the bound from any
thread (thread pools, Ray actor threads), leaves the caller's signal
handlers alone, and keeps a memory blow-up out of the caller's process.
The "inline" backend grades in this process instead: bounded by SIGALRM in
the main thread, unbounded elsewhere; it is the fallback when no helper
process can be started.

Must never: raise (a failed or timed-out check is "not equivalent"), block
past its time bound (aside from a worker's one-off start-up, and from waiting
up to one more bound for a free worker when more threads grade at once than
there are workers), see a ground-truth
answer except as the `ref` argument a caller chose to pass, or import torch,
ray, vllm or deepspeed.
"""

from __future__ import annotations

import atexit
import functools
import json
import logging
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

__all__ = [
    "GradeStats",
    "clear_cache",
    "configure",
    "equivalence_classes",
    "grade_stats",
    "is_equivalent",
    "normalize_answer",
    "parallel_checks",
    "reset_stats",
    "shutdown",
    "warm_up",
]

log = logging.getLogger(__name__)

# No real final answer is this long; parsing one costs seconds and never
# finds a match, so such answers are compared as strings only.
MAX_ANSWER_CHARS = 2000
# A worker imports sympy and math-verify (about a second) before its first
# check; that one-off start is not charged to the check's time bound.
_WORKER_STARTUP_TIMEOUT_S = 60.0
# Share of the hard deadline a worker may spend before it gives up by
# itself: giving up is cheap, being killed costs a restart.
_WORKER_BUDGET_SHARE = 0.8
# Address-space cap of a worker, so that a runaway sympy computation fails
# with MemoryError instead of eating the node's memory.
_WORKER_MEMORY_LIMIT_BYTES = 4 << 30


# ── settings ───────────────────────────────────────────────────────────────
def _default_workers() -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cores))


@dataclass
class _Settings:
    timeout_s: float = 5.0
    backend: str = "process"  # "process" | "inline"
    # Each worker holds sympy (~100 MB); more than 8 rarely pays off.
    max_workers: int = field(default_factory=_default_workers)


_settings = _Settings()
_BACKENDS = ("process", "inline")


def configure(
    *, timeout_s: float | None = None, backend: str | None = None, max_workers: int | None = None
) -> None:
    """Set the time bound of one check (seconds), the backend and the worker count.

    Settings are per process: call this in every process (e.g. Ray actor) that
    grades. Clears the result cache, since cached timeouts depend on the bound.
    """
    if timeout_s is not None:
        if not timeout_s > 0:
            raise ValueError(f"grade timeout_s must be > 0 seconds, got {timeout_s!r}")
        _settings.timeout_s = float(timeout_s)
    if backend is not None:
        if backend not in _BACKENDS:
            raise ValueError(f"grade backend must be one of {', '.join(_BACKENDS)}, got {backend!r}")
        _settings.backend = backend
    if max_workers is not None:
        if max_workers < 1:
            raise ValueError(f"grade max_workers must be >= 1, got {max_workers!r}")
        _settings.max_workers = int(max_workers)
        shutdown()  # the next check starts a pool of the new size
    clear_cache()


def parallel_checks() -> int:
    """How many checks can usefully run at once from different threads.

    1 unless grading runs in worker processes: in-process checks outside the
    main thread have no time bound, so callers should not spread them.
    """
    return _settings.max_workers if _process_backend_active() else 1


# ── statistics (tests and benchmarks count math-verify calls with these) ──
@dataclass(frozen=True)
class GradeStats:
    calls: int = 0  # is_equivalent calls
    fast_path: int = 0  # settled without math-verify (normalisation, numbers, length cap)
    verify_calls: int = 0  # pairs sent to math-verify (result-cache misses)
    timeouts: int = 0  # of those, how many ran out of time (graded "not equivalent")


_counts = {name: 0 for name in GradeStats.__dataclass_fields__}
_counts_lock = threading.Lock()


def _count(name: str) -> None:
    with _counts_lock:
        _counts[name] += 1


def grade_stats() -> GradeStats:
    """A snapshot of the counters since the last `reset_stats()`."""
    with _counts_lock:
        return GradeStats(**_counts)


def reset_stats() -> None:
    with _counts_lock:
        for name in _counts:
            _counts[name] = 0


# ── normalisation and the numeric fast path ───────────────────────────────
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


def _as_number(text: str) -> Fraction | None:
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


def _fast_verdict(pred: str, ref: str) -> bool | None:
    """Settle a normalised pair without math-verify when that is safe, else None."""
    if pred == ref:
        return True
    a, b = _as_number(pred), _as_number(ref)
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


# ── the public checks ──────────────────────────────────────────────────────
def is_equivalent(pred: str, ref: str) -> bool:
    """True when answer `pred` is mathematically equivalent to the reference `ref`.

    Never raises; a check that fails or runs out of time is False. Bounded by
    the configured `timeout_s` from any thread (see the module docstring for
    the two exceptions: a worker's start-up and queueing for a free worker).
    """
    _count("calls")
    try:
        if not isinstance(pred, str) or not isinstance(ref, str):
            return False
        pred_key, ref_key = normalize_answer(pred), normalize_answer(ref)
        if not pred_key or not ref_key:
            return False
        verdict = _fast_verdict(pred_key, ref_key)
        if verdict is None and max(len(pred_key), len(ref_key)) > MAX_ANSWER_CHARS:
            verdict = False
        if verdict is not None:
            _count("fast_path")
            return verdict
        return _verify_cached(pred_key, ref_key)
    except _NoWorkerInTime:
        # Every worker stayed busy for the whole bound. Not cached: it says
        # nothing about the answers.
        log.warning(
            "no grading worker became free within %.1fs; counted as not equivalent", _settings.timeout_s
        )
        return False
    except Exception:
        log.debug("equivalence check failed; counted as not equivalent", exc_info=True)
        return False


def equivalence_classes(answers: Sequence[str | None]) -> tuple[list[str], list[int | None]]:
    """Group answers into classes of equivalent ones.

    Returns (representatives, assignment): a class's representative is its
    first-seen member, classes are in first-seen order, and `assignment[i]`
    is the class of `answers[i]` (None for a missing or empty answer).

    A new answer is compared only with the representatives, and answers that
    normalise to the same string share one lookup, so U distinct answers in C
    classes cost at most U * C checks, however many samples there are.
    """
    representatives: list[str] = []
    class_of_key: dict[str, int] = {}
    assignment: list[int | None] = []
    for answer in answers:
        key = normalize_answer(answer) if isinstance(answer, str) else ""
        if not key:
            assignment.append(None)
            continue
        if key not in class_of_key:
            match = next((i for i, rep in enumerate(representatives) if is_equivalent(answer, rep)), None)
            if match is None:
                match = len(representatives)
                representatives.append(answer)
            class_of_key[key] = match
        assignment.append(class_of_key[key])
    return representatives, assignment


@functools.lru_cache(maxsize=1 << 16)
def _verify_cached(pred: str, ref: str) -> bool:
    _count("verify_calls")
    verdict = _verify_with_backend(pred, ref)
    if verdict == _TIMED_OUT:
        _count("timeouts")
    return verdict == _EQUAL


def clear_cache() -> None:
    """Forget cached verdicts (this process's; workers keep their parse memory)."""
    _verify_cached.cache_clear()
    _parsed.clear()
    _parse_timeouts.clear()


# Verdicts, as the worker writes them on its protocol line.
_EQUAL, _DIFFERENT, _TIMED_OUT = "1", "0", "t"


def _verify_with_backend(pred: str, ref: str) -> str:
    global _process_backend_broken
    if _process_backend_active():
        try:
            return _get_pool().grade(pred, ref, _settings.timeout_s)
        except _WorkerStartFailed as err:
            _process_backend_broken = True
            log.warning(
                "cannot start a grading worker process (%s); grading in-process from now on, "
                "bounded in time only in the main thread",
                err,
            )
    budget = _settings.timeout_s if _signals_usable() else None
    return _grade_here(pred, ref, budget)


# ── grading in this process (what a worker runs; also the inline backend) ──
class _Deadline(BaseException):
    """Raised by our SIGALRM handler. A BaseException so that the
    `except Exception` blocks in math-verify and sympy cannot swallow it."""


def _signals_usable() -> bool:
    return hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()


@contextmanager
def _alarm(seconds: float | None) -> Iterator[None]:
    """Raise _Deadline in the main thread after `seconds`; no-op when None or unusable."""
    if seconds is None or not _signals_usable():
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


def _parse_once(answer: str, seconds: float | None) -> list:
    if answer in _parsed:
        return _parsed[answer]
    if seconds is not None and seconds <= _parse_timeouts.get(answer, 0.0):
        raise _Deadline
    from math_verify import parse

    if len(_parsed) + len(_parse_timeouts) >= _PARSE_MEMORY_MAX:
        _parsed.clear()
        _parse_timeouts.clear()
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


def _grade_here(pred: str, ref: str, budget: float | None) -> str:
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
            return _DIFFERENT
        left = None if budget is None else budget - (time.monotonic() - started)
        if left is not None and left <= 0:
            return _TIMED_OUT
        with _alarm(left):
            # math-verify's `verify(gold, target)` is not symmetric: the
            # reference is the gold.
            return _EQUAL if verify(gold, target, timeout_seconds=None) else _DIFFERENT
    except _Deadline:
        return _TIMED_OUT
    except Exception:
        log.debug("math-verify failed", exc_info=True)
        return _DIFFERENT


@functools.cache
def _quiet_math_verify() -> None:
    # math-verify warns once that its own timeout is off (we bound time
    # ourselves) and logs whole inputs on failures, which can be 100k chars.
    logging.getLogger("math_verify").setLevel(logging.ERROR)


# ── the process backend: a pool of killable grading workers ──────────────
class _NoWorkerInTime(Exception):
    pass


class _WorkerStartFailed(Exception):
    pass


class _WorkerGone(Exception):
    pass


class _ReadTimeout(Exception):
    pass


# The worker imports this module from the same source tree as its parent,
# even when ttrl is not installed (e.g. tests run from a checkout).
_SOURCE_ROOT = str(Path(__file__).resolve().parents[2])
_WORKER_MAIN = "from ttrl.labeling.grade import _serve; _serve()"
_process_backend_broken = False


def _process_backend_active() -> bool:
    # Waiting on a pipe with a deadline uses select(), which is POSIX-only.
    return _settings.backend == "process" and os.name == "posix" and not _process_backend_broken


class _Worker:
    """One helper process, talking one JSON line in, one verdict line out."""

    def __init__(self) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_SOURCE_ROOT, env.get("PYTHONPATH")) if p)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _WORKER_MAIN],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                env=env,
                close_fds=True,
            )
        except OSError as err:
            raise _WorkerStartFailed(err) from err
        self._pending = b""
        self._ready = False

    def wait_ready(self) -> None:
        if self._ready:
            return
        try:
            line = self._read_line(time.monotonic() + _WORKER_STARTUP_TIMEOUT_S)
        except (_ReadTimeout, _WorkerGone) as err:
            raise _WorkerStartFailed(f"worker did not start: {type(err).__name__}") from err
        if line != b"ready":
            raise _WorkerStartFailed(f"worker said {line[:80]!r} instead of 'ready'")
        self._ready = True

    def grade(self, pred: str, ref: str, budget: float, deadline: float) -> str:
        request = json.dumps([pred, ref, budget]).encode() + b"\n"
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write(request)
            self.proc.stdin.flush()
        except (OSError, ValueError) as err:
            raise _WorkerGone(err) from err
        return self._read_line(deadline).decode()

    def _read_line(self, deadline: float) -> bytes:
        """One protocol line, or _ReadTimeout at `deadline` (select: no thread blocks forever)."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._pending:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise _ReadTimeout
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                raise _WorkerGone("worker closed its output")
            self._pending += chunk
        line, _, self._pending = self._pending.partition(b"\n")
        return line

    def kill(self) -> None:
        try:
            self.proc.kill()
            self.proc.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            pass
        self._close_pipes()

    def close(self) -> None:
        """Ask politely (closing stdin ends the worker's loop), then insist."""
        self._close_pipes()
        try:
            self.proc.wait(timeout=1)
        except subprocess.TimeoutExpired:
            self.kill()

    def _close_pipes(self) -> None:
        for pipe in (self.proc.stdin, self.proc.stdout):
            try:
                if pipe is not None:
                    pipe.close()
            except OSError:
                pass


class _WorkerPool:
    """Up to `size` workers; a check borrows an idle one (or starts one)."""

    def __init__(self, size: int) -> None:
        self._slots = threading.BoundedSemaphore(size)
        self._idle: list[_Worker] = []
        self._lock = threading.Lock()
        self._closed = False

    def grade(self, pred: str, ref: str, timeout_s: float) -> str:
        # Queueing for a free worker has its own bound (raising, so that
        # the outcome is not cached): under contention a check may wait up
        # to `timeout_s` and then run up to `timeout_s`.
        if not self._slots.acquire(timeout=timeout_s):
            raise _NoWorkerInTime
        try:
            worker = self._borrow()
            try:
                # The one-off start-up is not charged to this check.
                worker.wait_ready()
                deadline = time.monotonic() + timeout_s
                # A fixed budget (not "what is left") keeps the worker's
                # memory of slow parses comparable from one check to the next.
                budget = _WORKER_BUDGET_SHARE * timeout_s
                verdict = worker.grade(pred, ref, budget, deadline)
            except _WorkerStartFailed:
                worker.kill()
                raise
            except _ReadTimeout:
                # Stuck where its own alarm cannot reach (C code, swapping).
                self._replace(worker)
                return _TIMED_OUT
            except _WorkerGone:
                log.warning("a grading worker died (out of memory?); counted as not equivalent")
                self._replace(worker)
                return _DIFFERENT
            except BaseException:
                # E.g. KeyboardInterrupt mid-request: the worker's reply would
                # be read by the next check, so this worker cannot be reused.
                worker.kill()
                raise
            self._give_back(worker)
            return verdict
        finally:
            self._slots.release()

    def _borrow(self) -> _Worker:
        with self._lock:
            if self._idle:
                return self._idle.pop()
        return _Worker()

    def _give_back(self, worker: _Worker) -> None:
        with self._lock:
            if not self._closed:
                self._idle.append(worker)
                return
        worker.close()

    def _replace(self, worker: _Worker) -> None:
        worker.kill()
        try:
            # Started now, so that its import overlaps with other work.
            self._give_back(_Worker())
        except _WorkerStartFailed:
            pass  # the next check tries again, and falls back if it must

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for worker in idle:
            worker.close()


_pool: _WorkerPool | None = None
_pool_lock = threading.Lock()


def _get_pool() -> _WorkerPool:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = _WorkerPool(_settings.max_workers)
        return _pool


def warm_up(workers: int = 1) -> None:
    """Start up to `workers` grading workers now, side by side, so that the
    first checks do not wait for their start (about a second each)."""
    if not _process_backend_active():
        return
    pool = _get_pool()
    started: list[_Worker] = []
    try:
        for _ in range(min(workers, _settings.max_workers)):
            started.append(pool._borrow())
        for worker in started:
            worker.wait_ready()
    except _WorkerStartFailed:
        for worker in started:
            worker.kill()
        return  # the first check falls back to in-process grading and says so
    for worker in started:
        pool._give_back(worker)


def shutdown() -> None:
    """Stop the grading workers (the next check starts new ones)."""
    global _pool
    with _pool_lock:
        pool, _pool = _pool, None
    if pool is not None:
        pool.close()


def _forget_pool_after_fork() -> None:
    # A forked child must not talk to its parent's workers over shared pipes:
    # it drops the pool (without killing anything) and starts its own.
    global _pool, _pool_lock
    _pool, _pool_lock = None, threading.Lock()


atexit.register(shutdown)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_after_fork)


# ── the worker process's side ──────────────────────────────────────────────
def _serve() -> None:
    """Main loop of a grading worker: one JSON request per stdin line, one verdict per line."""
    # The protocol gets a private copy of stdout; anything sympy prints goes
    # to stderr instead of corrupting it.
    protocol = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)
    # Ctrl-C is for the parent, which then closes our stdin and we exit.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _limit_memory()
    _quiet_math_verify()
    import math_verify  # noqa: F401  (pay the import before saying ready)

    protocol.write(b"ready\n")
    for line in sys.stdin.buffer:
        try:
            pred, ref, budget = json.loads(line)
            verdict = _grade_here(pred, ref, budget)
        except Exception:
            verdict = _DIFFERENT
        protocol.write(verdict.encode() + b"\n")


def _limit_memory() -> None:
    try:
        import resource

        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        if hard == resource.RLIM_INFINITY or hard > _WORKER_MEMORY_LIMIT_BYTES:
            resource.setrlimit(resource.RLIMIT_AS, (_WORKER_MEMORY_LIMIT_BYTES, hard))
    except (ImportError, ValueError, OSError):
        pass  # best effort: the parent's deadline still bounds the time
