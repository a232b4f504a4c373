"""Killable helper processes that run one bounded call at a time: the grading sandbox.

A `WorkerPool(size, target)` keeps up to `size` long-lived Python processes;
each imports the function `target` ("package.module:function") once and
then answers one request per line: `target(*args, budget)` must return a
short string, and the worker writes it back. The caller waits for the reply
with `select()` up to a hard deadline, and kills (and replaces) a worker that
misses it. That bounds every call from any thread (thread pools, Ray actor
threads) without touching the caller's signal handlers, and keeps a runaway
computation's memory out of the caller's process (a worker's address space
is capped).

grade.py runs its math-verify checks here (mathverify.py's `verify_here`).

Must never: block past a call's deadline (aside from a worker's one-off
start-up, and from waiting up to one more bound for a free worker when more
threads call at once than there are workers), leave a worker running after
the process exits, share a worker with a forked child, or import torch, ray,
vllm or deepspeed.
"""

from __future__ import annotations

import atexit
import importlib
import json
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path

__all__ = ["NoWorkerInTime", "WorkerDied", "WorkerPool", "WorkerStartFailed", "WorkerTimedOut", "available"]

log = logging.getLogger(__name__)

# A worker imports its target (for grading: sympy and math-verify, about a
# second) before its first call; that one-off start is not charged to the call.
WORKER_STARTUP_TIMEOUT_S = 60.0
# Share of the hard deadline a worker may spend before it gives up by
# itself: giving up is cheap, being killed costs a restart.
WORKER_BUDGET_SHARE = 0.8
# Address-space cap of a worker, so that a runaway sympy computation fails
# with MemoryError instead of eating the node's memory.
WORKER_MEMORY_LIMIT_BYTES = 4 << 30

# The worker imports ttrl from the same source tree as its parent, even
# when ttrl is not installed (e.g. tests run from a checkout).
_SOURCE_ROOT = str(Path(__file__).resolve().parents[2])
# How a worker starts (tests swap in a worker that never answers).
WORKER_MAIN = "from ttrl.labeling.sandbox import serve; serve({target!r}, {preload!r})"
# A worker's reply when its target raised.
FAILED = "!"


class NoWorkerInTime(Exception):
    """Every worker stayed busy for the whole bound (says nothing about the request)."""


class WorkerStartFailed(Exception):
    """No worker process could be started (no fork, no python, a broken import)."""


class WorkerDied(Exception):
    """The worker died during the call (out of memory?); it has been replaced."""


class WorkerTimedOut(Exception):
    """The worker missed the deadline (stuck where its own alarm cannot reach); it has been replaced."""


class _ReadTimeout(Exception):
    pass


def available() -> bool:
    # Waiting on a pipe with a deadline uses select(), which is POSIX-only.
    return os.name == "posix"


class _Worker:
    """One helper process, talking one JSON line in, one reply line out."""

    def __init__(self, target: str, preload: tuple[str, ...]) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_SOURCE_ROOT, env.get("PYTHONPATH")) if p)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", WORKER_MAIN.format(target=target, preload=preload)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                env=env,
                close_fds=True,
            )
        except OSError as err:
            raise WorkerStartFailed(err) from err
        self._pending = b""
        self._ready = False

    def wait_ready(self) -> None:
        if self._ready:
            return
        try:
            line = self._read_line(time.monotonic() + WORKER_STARTUP_TIMEOUT_S)
        except (_ReadTimeout, WorkerDied) as err:
            raise WorkerStartFailed(f"worker did not start: {type(err).__name__}") from err
        if line != b"ready":
            raise WorkerStartFailed(f"worker said {line[:80]!r} instead of 'ready'")
        self._ready = True

    def call(self, args: list, budget: float, deadline: float) -> str:
        request = json.dumps([args, budget]).encode() + b"\n"
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write(request)
            self.proc.stdin.flush()
        except (OSError, ValueError) as err:
            raise WorkerDied(err) from err
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
                raise WorkerDied("worker closed its output")
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


# Every open pool, so that the process's exit (and a fork) can reach them.
_live: weakref.WeakSet[WorkerPool] = weakref.WeakSet()


class WorkerPool:
    """Up to `size` workers running `target`; a call borrows an idle one (or starts one)."""

    def __init__(self, size: int, target: str, preload: tuple[str, ...] = ()) -> None:
        self.size, self.target, self.preload = size, target, tuple(preload)
        self._reset()
        _live.add(self)

    def _reset(self) -> None:
        self._slots = threading.BoundedSemaphore(self.size)
        self._idle: list[_Worker] = []
        self._lock = threading.Lock()
        self._closed = False

    def call(self, args: list, timeout_s: float) -> str:
        """`target(*args, budget)` in a worker, its reply within `timeout_s` (after the worker's start-up).

        Raises NoWorkerInTime, WorkerStartFailed, WorkerTimedOut or WorkerDied;
        returns FAILED when the target raised.
        """
        # Queueing for a free worker has its own bound (raising, so that
        # the caller does not cache the outcome): under contention a call may
        # wait up to `timeout_s` and then run up to `timeout_s`.
        if not self._slots.acquire(timeout=timeout_s):
            raise NoWorkerInTime
        try:
            worker = self._borrow()
            try:
                # The one-off start-up is not charged to this call.
                worker.wait_ready()
                deadline = time.monotonic() + timeout_s
                # A fixed budget (not "what is left") keeps a worker's memory
                # of slow inputs comparable from one call to the next.
                reply = worker.call(args, WORKER_BUDGET_SHARE * timeout_s, deadline)
            except WorkerStartFailed:
                worker.kill()
                raise
            except _ReadTimeout:
                self._replace(worker)
                raise WorkerTimedOut from None
            except WorkerDied:
                self._replace(worker)
                raise
            except BaseException:
                # E.g. KeyboardInterrupt mid-request: the worker's reply would
                # be read by the next call, so this worker cannot be reused.
                worker.kill()
                raise
            self._give_back(worker)
            return reply
        finally:
            self._slots.release()

    def warm_up(self, workers: int = 1) -> bool:
        """Start up to `workers` workers now, side by side; False when none could start.

        Each takes a free slot, as a call does (none is waited for), so a
        warm-up in a background thread beside calls never leaves more than
        `size` workers in the pool.
        """
        slots = 0
        while slots < min(workers, self.size) and self._slots.acquire(blocking=False):
            slots += 1
        started: list[_Worker] = []
        try:
            for _ in range(slots):
                started.append(self._borrow())
            for worker in started:
                worker.wait_ready()
        except WorkerStartFailed:
            for worker in started:
                worker.kill()
            return False
        else:
            for worker in started:
                self._give_back(worker)
        finally:
            for _ in range(slots):
                self._slots.release()
        return True

    def _borrow(self) -> _Worker:
        with self._lock:
            if self._idle:
                return self._idle.pop()
        return _Worker(self.target, self.preload)

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
            self._give_back(_Worker(self.target, self.preload))
        except WorkerStartFailed:
            pass  # the next call tries again

    def close(self) -> None:
        """Stop the idle workers; busy ones stop when their call returns."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for worker in idle:
            worker.close()


def _close_all() -> None:
    for pool in list(_live):
        pool.close()


def _forget_workers_after_fork() -> None:
    # A forked child must not talk to its parent's workers over shared pipes:
    # its pools drop them (without killing anything) and start their own.
    for pool in list(_live):
        pool._reset()


atexit.register(_close_all)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_workers_after_fork)


# ── the worker process's side ──────────────────────────────────────────────
def serve(target: str, preload: tuple[str, ...] = ()) -> None:
    """Main loop of a worker: import `target`, say ready, then one JSON request per stdin line."""
    # The protocol gets a private copy of stdout; anything the target prints
    # goes to stderr instead of corrupting it.
    protocol = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)
    # Ctrl-C is for the parent, which then closes our stdin and we exit.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _limit_memory()
    module, _, name = target.partition(":")
    fn = getattr(importlib.import_module(module), name)
    for mod in preload:  # pay the imports before saying ready
        importlib.import_module(mod)

    protocol.write(b"ready\n")
    for line in sys.stdin.buffer:
        try:
            args, budget = json.loads(line)
            reply = str(fn(*args, budget))
        except Exception:
            reply = FAILED
        protocol.write(reply.encode() + b"\n")


def _limit_memory() -> None:
    try:
        import resource

        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        if hard == resource.RLIM_INFINITY or hard > WORKER_MEMORY_LIMIT_BYTES:
            resource.setrlimit(resource.RLIMIT_AS, (WORKER_MEMORY_LIMIT_BYTES, hard))
    except (ImportError, ValueError, OSError):
        pass  # best effort: the parent's deadline still bounds the time
