"""glibc malloc settings for ttrl's processes: freed memory is kept for the next step, not handed back.

A training step on CPU allocates and frees the same few tensors of a few MB
each, hundreds of times a second. With glibc's defaults those blocks go back
to the kernel when freed (`munmap`, or a trim of the heap's top) and come back
as fresh pages that the kernel has to zero on first touch: the demo's warm
start spent 68-70 of its 475-535 CPU-seconds in the kernel on a 2-core AMD
EPYC. Keeping up to `TRIM_THRESHOLD` free at the heap's top, growing the heap
`TOP_PAD` at a time and serving blocks up to `MMAP_THRESHOLD` (glibc's
ceiling for it) from the heap took that to 12 s and the build from 241-272 s
to 216-222 s (10-18%), with the same weights to the bit (docs/performance.md, "Memory
that the kernel zeroes").

Two ways in, one set of values: `tune_malloc()` sets them in a process that
is already running (the drivers of `ttrl-train`, `ttrl-eval`, `ttrl-serve`,
and a warm-start build), `malloc_env()` is the environment that sets them in
a process at its start (every Ray actor: rollout engines, trainer ranks).

Must never change a number (it only decides where memory comes from), fail
a run (no glibc, no `mallopt`: nothing is done), or override what a user
set: any of glibc's own variables for these three in the environment
(`MALLOC_*_` or a `GLIBC_TUNABLES` entry), or `TTRL_MALLOC=glibc`, leaves
glibc's defaults alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

# Bytes. mallopt's parameter numbers are glibc's (malloc.h).
TRIM_THRESHOLD = 256 << 20  # M_TRIM_THRESHOLD (-1)
TOP_PAD = 64 << 20  # M_TOP_PAD (-2)
MMAP_THRESHOLD = 32 << 20  # M_MMAP_THRESHOLD (-3); glibc refuses more on 64-bit
_PARAMS = {-1: TRIM_THRESHOLD, -2: TOP_PAD, -3: MMAP_THRESHOLD}
_ENV = {"MALLOC_TRIM_THRESHOLD_": TRIM_THRESHOLD, "MALLOC_TOP_PAD_": TOP_PAD,
        "MALLOC_MMAP_THRESHOLD_": MMAP_THRESHOLD}
# A user's own choice of any of these wins over ours.
USER_KEYS = tuple(_ENV)
# The same three as GLIBC_TUNABLES entries ("name=value:name=value"). Other tunables (a container's
# glibc.malloc.arena_max=2, say) are no choice about these three and leave ttrl's settings on.
_TUNABLES = ("glibc.malloc.trim_threshold", "glibc.malloc.top_pad", "glibc.malloc.mmap_threshold")

_done: bool | None = None


def wanted() -> bool:
    """Whether ttrl sets malloc here: not opted out (TTRL_MALLOC=glibc), and no glibc setting of the user's."""
    if os.environ.get("TTRL_MALLOC", "").strip().lower() == "glibc":
        return False
    tunables = {entry.split("=", 1)[0].strip() for entry in os.environ.get("GLIBC_TUNABLES", "").split(":")}
    return not any(key in os.environ for key in USER_KEYS) and not tunables & set(_TUNABLES)


def malloc_env() -> dict[str, str]:
    """Environment for a child process that sets the same values at its start (empty when not wanted)."""
    return {key: str(value) for key, value in _ENV.items()} if wanted() else {}


def tune_malloc() -> bool:
    """Set the values in this process (once); True when they are in force."""
    global _done
    if _done is not None:
        return _done
    _done = False
    if not wanted():
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl without mallopt): glibc's settings do not apply
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _done = all(mallopt(param, value) == 1 for param, value in _PARAMS.items())
    return _done
