"""Decide whether two final answers are mathematically equivalent.

`is_equivalent(pred, ref)` answers "is `pred` the same answer as `ref`?" for
the strings that `extract_answer` returns: "1/2" ≡ "0.5" ≡ "\\frac{1}{2}",
"(1, 2]" ≡ "\\left(1,2\\right]", "\\{1,2\\}" ≡ "\\{2,1\\}", "x = 3" ≡ "3",
"5\\text{ cm}" ≡ "5". `equivalence_classes` groups a list of answers with it
(the vote in vote.py is built on it).

Both take the run's extractor (label.extractor, "boxed" by default): the
answers of a typed extractor ("choice", "number") compare as match.py says
(letters exactly, numbers numerically), with none of the steps below;
"boxed" and custom extractors' answers take the math path below.

How a check runs, cheapest first:
  1. light normalisation; identical strings are equal (normalise.py);
  2. a numeric compare of plain numbers ("0.5" vs "1/2", "142.0" vs "142");
  3. math-verify (mathverify.py), cached per normalised pair.

Step 3 can take unbounded time and memory on model output (`9^{9^{9^9}}`,
10k nested braces), so by default ("process" backend) it runs in killable
helper processes (sandbox.py), which bounds it from any thread. The
"inline" backend grades in this process instead: bounded by SIGALRM in the
main thread, unbounded elsewhere; it is the fallback when no helper process
can be started.

A `Grader` holds what a check depends on: its `GradeOptions` (time bound,
backend, worker count), its cache, its workers and its counters. The
module-level functions use the process's grader, which a run sets from its
config with `use(GradeOptions(timeout_s=...))` (ttrl.parts.build_parts) before it
grades; code that wants other settings builds its own `Grader`.

Must never: raise (a failed or timed-out check is "not equivalent"), block
past its time bound (aside from a worker's one-off start-up, and from waiting
up to one more bound for a free worker when more threads grade at once than
there are workers), see a ground-truth answer except as the `ref` argument a
caller chose to pass, or import torch, ray, vllm or deepspeed.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ttrl.labeling import sandbox
from ttrl.labeling.match import matching
from ttrl.labeling.mathverify import DIFFERENT, EQUAL, TIMED_OUT, forget_parses, signals_usable, verify_here
from ttrl.labeling.normalise import fast_verdict, normalize_answer

__all__ = [
    "GradeOptions",
    "GradeStats",
    "Grader",
    "clear_cache",
    "configure",
    "equivalence_classes",
    "grade_stats",
    "grader",
    "is_equivalent",
    "normalize_answer",
    "parallel_checks",
    "reset_stats",
    "shutdown",
    "use",
    "warm_up",
    "warm_up_in_background",
]

log = logging.getLogger(__name__)

BACKENDS = ("process", "inline")
# What a grading worker runs, and imports before it says it is ready.
_WORKER_TARGET = "ttrl.labeling.mathverify:verify_here"
_WORKER_PRELOAD = ("math_verify",)


def _default_workers() -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    # Each worker holds sympy (~100 MB); more than 8 rarely pays off.
    return max(1, min(8, cores))


@dataclass(frozen=True)
class GradeOptions:
    """How checks run: the time bound of one check, where it runs, and how many run at once."""

    timeout_s: float = 5.0
    backend: str = "process"  # "process" (killable workers) | "inline" (this process)
    max_workers: int = field(default_factory=_default_workers)

    def __post_init__(self) -> None:
        if not (isinstance(self.timeout_s, int | float) and self.timeout_s > 0):
            raise ValueError(f"grade timeout_s must be > 0 seconds, got {self.timeout_s!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"grade backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if not (isinstance(self.max_workers, int) and self.max_workers >= 1):
            raise ValueError(f"grade max_workers must be >= 1, got {self.max_workers!r}")


@dataclass(frozen=True)
class GradeStats:
    """Counters since the last reset (tests and benchmarks count math-verify calls with these)."""

    calls: int = 0  # is_equivalent calls
    fast_path: int = 0  # settled without math-verify (normalisation, numbers, length cap)
    verify_calls: int = 0  # pairs sent to math-verify (result-cache misses)
    timeouts: int = 0  # of those, how many ran out of time (graded "not equivalent")


class Grader:
    """Equivalence checks under one set of `GradeOptions`, with their cache, workers and counters."""

    def __init__(self, options: GradeOptions | None = None) -> None:
        self.options = options or GradeOptions()
        self._counts = dict.fromkeys(GradeStats.__dataclass_fields__, 0)
        self._counts_lock = threading.Lock()
        self._pool: sandbox.WorkerPool | None = None
        self._pool_lock = threading.Lock()
        self.process_backend_broken = False  # set when no worker could start: graded inline from then on
        # Per grader: a cached timeout depends on the bound.
        self._verify_cached = functools.lru_cache(maxsize=1 << 16)(self._verify)

    # ── the checks ─────────────────────────────────────────────────────────
    def is_equivalent(self, pred: str, ref: str, extractor: str = "boxed") -> bool:
        """True when answer `pred` is equivalent to the reference `ref`, as `extractor` reads them; never raises."""
        typed = matching(extractor)
        if typed is not None:
            return _typed_check(typed.equivalent, pred, ref)
        self._count("calls")
        try:
            if not isinstance(pred, str) or not isinstance(ref, str):
                return False
            pred_key, ref_key = normalize_answer(pred), normalize_answer(ref)
            if not pred_key or not ref_key:
                return False
            verdict = fast_verdict(pred_key, ref_key)
            if verdict is not None:
                self._count("fast_path")
                return verdict
            return self._verify_cached(pred_key, ref_key)
        except sandbox.NoWorkerInTime:
            # Every worker stayed busy for the whole bound. Not cached: it says
            # nothing about the answers.
            log.warning("no grading worker became free within %.1fs; counted as not equivalent",
                        self.options.timeout_s)
            return False
        except Exception:
            log.debug("equivalence check failed; counted as not equivalent", exc_info=True)
            return False

    def equivalence_classes(self, answers: Sequence[str | None],
                            extractor: str = "boxed") -> tuple[list[str], list[int | None]]:
        """Group answers (read by `extractor`) into classes of equivalent ones.

        Returns (representatives, assignment): a class's representative is its
        first-seen member, classes are in first-seen order, and `assignment[i]`
        is the class of `answers[i]` (None for a missing or empty answer).

        A new answer is compared only with the representatives, and answers that
        normalise to the same string share one lookup, so U distinct answers in C
        classes cost at most U * C checks, however many samples there are.
        """
        typed = matching(extractor)
        if typed is not None:
            return typed.classes(answers)
        representatives: list[str] = []
        class_of_key: dict[str, int] = {}
        assignment: list[int | None] = []
        for answer in answers:
            key = normalize_answer(answer) if isinstance(answer, str) else ""
            if not key:
                assignment.append(None)
                continue
            if key not in class_of_key:
                match = next((i for i, rep in enumerate(representatives) if self.is_equivalent(answer, rep)),
                             None)
                if match is None:
                    match = len(representatives)
                    representatives.append(answer)
                class_of_key[key] = match
            assignment.append(class_of_key[key])
        return representatives, assignment

    def parallel_checks(self) -> int:
        """How many checks can usefully run at once from different threads.

        1 unless grading runs in worker processes: in-process checks outside the
        main thread have no time bound, so callers should not spread them.
        """
        return self.options.max_workers if self._process_backend_active() else 1

    # ── math-verify, in a worker or here ───────────────────────────────────
    def _verify(self, pred: str, ref: str) -> bool:
        self._count("verify_calls")
        verdict = self._verify_with_backend(pred, ref)
        if verdict == TIMED_OUT:
            self._count("timeouts")
        return verdict == EQUAL

    def _verify_with_backend(self, pred: str, ref: str) -> str:
        if self._process_backend_active():
            try:
                return self._verify_in_worker(pred, ref)
            except sandbox.WorkerStartFailed as err:
                self.process_backend_broken = True
                log.warning("cannot start a grading worker process (%s); grading in-process from now on, "
                            "bounded in time only in the main thread", err)
        budget = self.options.timeout_s if signals_usable() else None
        return verify_here(pred, ref, budget)

    def _verify_in_worker(self, pred: str, ref: str) -> str:
        try:
            reply = self._get_pool().call([pred, ref], self.options.timeout_s)
        except sandbox.WorkerTimedOut:
            return TIMED_OUT  # stuck where its own alarm cannot reach (C code, swapping)
        except sandbox.WorkerDied:
            log.warning("a grading worker died (out of memory?); counted as not equivalent")
            return DIFFERENT
        return reply if reply in (EQUAL, TIMED_OUT) else DIFFERENT

    def _process_backend_active(self) -> bool:
        return self.options.backend == "process" and sandbox.available() and not self.process_backend_broken

    def _get_pool(self) -> sandbox.WorkerPool:
        with self._pool_lock:
            if self._pool is None:
                self._pool = sandbox.WorkerPool(self.options.max_workers, _WORKER_TARGET, _WORKER_PRELOAD)
            return self._pool

    # ── upkeep ─────────────────────────────────────────────────────────────
    def warm_up(self, workers: int = 1) -> None:
        """Start up to `workers` grading workers now, side by side, so that the
        first checks do not wait for their start (about a second each)."""
        if self._process_backend_active():
            self._get_pool().warm_up(workers)  # on failure the first check falls back and says so

    def clear_cache(self) -> None:
        """Forget cached verdicts and this process's parses (workers keep their parse memory)."""
        self._verify_cached.cache_clear()
        forget_parses()

    def close(self) -> None:
        """Stop the grading workers (the next check starts new ones)."""
        with self._pool_lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()

    def _take_workers(self, other: Grader) -> None:
        # Workers hold nothing that depends on the time bound (their memory of
        # slow parses is keyed by budget), so a new grader of the same size reuses them.
        with other._pool_lock:
            self._pool, other._pool = other._pool, None
        self.process_backend_broken = other.process_backend_broken

    def stats(self) -> GradeStats:
        with self._counts_lock:
            return GradeStats(**self._counts)

    def reset_stats(self) -> None:
        with self._counts_lock:
            for name in self._counts:
                self._counts[name] = 0

    def _count(self, name: str) -> None:
        with self._counts_lock:
            self._counts[name] += 1


# ── the process's grader, and the contract's functions on it ───────────────
_current: Grader | None = None
_current_lock = threading.Lock()


def grader() -> Grader:
    """The grader that the functions below use (default options until `use` is called)."""
    global _current
    with _current_lock:
        if _current is None:
            _current = Grader()
        return _current


def use(options: GradeOptions) -> Grader:
    """Make checks in this process run with `options` (a run calls this once, from its config).

    Per process: a Ray actor that grades calls it too. Starts with an empty
    cache, since cached timeouts depend on the bound.
    """
    global _current
    new = Grader(options)
    with _current_lock:
        old, _current = _current, new
    if old is not None:
        if old.options.max_workers == options.max_workers:
            new._take_workers(old)
        else:
            old.close()
    return new


def configure(
    *, timeout_s: float | None = None, backend: str | None = None, max_workers: int | None = None
) -> None:
    """`use` the current options with these changed (the older spelling, kept for its callers)."""
    changes = {k: v for k, v in (("timeout_s", timeout_s), ("backend", backend), ("max_workers", max_workers))
               if v is not None}
    use(dataclasses.replace(grader().options, **changes))


def _typed_check(check: Callable[[str, str], bool], pred: str, ref: str) -> bool:
    try:
        return check(pred, ref)
    except Exception:  # match.py never raises by design; this keeps the promise if it ever did
        log.debug("typed equivalence check failed; counted as not equivalent", exc_info=True)
        return False


def is_equivalent(pred: str, ref: str, extractor: str = "boxed") -> bool:
    """True when answer `pred` is equivalent to the reference `ref`, as answers `extractor` reads.

    Never raises; a check that fails or runs out of time is False. Bounded by
    the process grader's `timeout_s` from any thread (see the module docstring
    for the two exceptions: a worker's start-up and queueing for a free worker).
    """
    return grader().is_equivalent(pred, ref, extractor)


def equivalence_classes(answers: Sequence[str | None],
                        extractor: str = "boxed") -> tuple[list[str], list[int | None]]:
    """`Grader.equivalence_classes` with the process's grader."""
    return grader().equivalence_classes(answers, extractor)


def parallel_checks() -> int:
    """`Grader.parallel_checks` of the process's grader."""
    return grader().parallel_checks()


def warm_up(workers: int = 1) -> None:
    grader().warm_up(workers)


def warm_up_in_background() -> threading.Thread:
    """Start the grader's workers (as many as can check at once) in a daemon thread, and return it.

    A worker's start costs about 0.6 s on a 2-core box (its import of
    math-verify); without this the first step whose answers need math-verify
    waits for it (the demo's second step took 0.6-1.0 s to label, the others
    0.01). A check that comes first starts its own worker, as without it.
    """
    g = grader()
    thread = threading.Thread(target=g.warm_up, args=(g.parallel_checks(),), name="ttrl-grade-warm-up", daemon=True)
    thread.start()
    return thread


def clear_cache() -> None:
    grader().clear_cache()


def shutdown() -> None:
    """Stop the process grader's workers (the next check starts new ones)."""
    grader().close()


def _new_locks_after_fork() -> None:
    # A forked child inherits locks that a parent thread may have held at the
    # fork; nobody in the child would ever release them.
    global _current_lock
    _current_lock = threading.Lock()
    if _current is not None:
        _current._pool_lock, _current._counts_lock = threading.Lock(), threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_locks_after_fork)


def grade_stats() -> GradeStats:
    """A snapshot of the process grader's counters since the last `reset_stats()`."""
    return grader().stats()


def reset_stats() -> None:
    grader().reset_stats()
