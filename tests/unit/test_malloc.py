"""ttrl.malloc: freed memory stays in the process (fewer page faults), and a user's own setting wins.

The page-fault test runs real glibc malloc in fresh processes, one with
ttrl's settings and one with glibc's defaults, on the pattern a training step
makes: several MB-sized blocks taken, all freed, taken again.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from ttrl.distributed.ray_setup import actor_env
from ttrl.malloc import USER_KEYS, malloc_env, wanted

pytestmark = pytest.mark.unit

# Five 8 MB blocks touched, freed, 20 times over; prints the minor page faults of the last 19 rounds.
_CHURN = r"""
import ctypes, json, resource, sys
if sys.argv[1] == "tuned":
    from ttrl.malloc import tune_malloc
    assert tune_malloc(), "mallopt refused ttrl's values"
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
size = 8 << 20
def round_():
    blocks = [libc.malloc(size) for _ in range(5)]
    for b in blocks:
        ctypes.memset(b, 1, size)
    for b in reversed(blocks):
        libc.free(b)
round_()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(19):
    round_()
print(json.dumps(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before))
"""


def _faults(mode: str) -> int:
    env = {k: v for k, v in os.environ.items() if k not in (*USER_KEYS, "GLIBC_TUNABLES", "TTRL_MALLOC")}
    out = subprocess.run([sys.executable, "-c", _CHURN, mode], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_tuned_process_reuses_freed_blocks_where_glibc_defaults_fault_them_in_again():
    pages = 19 * 5 * (8 << 20) // 4096  # every page of every block, every round
    default, tuned = _faults("default"), _faults("tuned")
    assert default > pages // 2, f"glibc's defaults gave the blocks back only {default} faults: the test shows nothing"
    assert tuned < pages // 20, f"ttrl's settings still faulted {tuned} pages in 19 rounds (glibc defaults: {default})"


def test_a_users_own_glibc_setting_or_the_opt_out_leaves_the_defaults_alone(monkeypatch):
    for key in (*USER_KEYS, "GLIBC_TUNABLES"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.delenv("TTRL_MALLOC", raising=False)
    assert wanted() and malloc_env()["MALLOC_TRIM_THRESHOLD_"] == str(256 << 20)
    assert actor_env("cpu")["MALLOC_TOP_PAD_"] == str(64 << 20)
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")  # not one of ours: ttrl still sets its three
    assert wanted()
    for key in USER_KEYS:
        monkeypatch.setenv(key, "1")
        assert not wanted() and malloc_env() == {}, key
        assert not set(actor_env("cpu")) & {"MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_THRESHOLD_"}
        monkeypatch.delenv(key)
    # GLIBC_TUNABLES: an entry for one of the three is the user's choice; a container's arena cap is not.
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2:glibc.cpu.hwcaps=-AVX512F")
    assert wanted() and malloc_env()
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2:glibc.malloc.top_pad=0")
    assert not wanted() and malloc_env() == {}
    monkeypatch.delenv("GLIBC_TUNABLES")
    monkeypatch.setenv("TTRL_MALLOC", "glibc")
    assert malloc_env() == {} and "MALLOC_TRIM_THRESHOLD_" not in actor_env("cuda")
