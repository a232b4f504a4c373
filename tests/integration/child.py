"""Run a test file's `_child` in a process of its own and read back the one JSON line it prints.

For tests of a real trainer worker: the worker sets the process's distributed
environment and torch's thread count, which must not leak into pytest's.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_child(test_file: str, tmp: Path, timeout_s: float = 540) -> dict:
    """`python test_file tmp`; the dict of its last `RESULT {json}` line (the child's stderr on failure)."""
    proc = subprocess.run([sys.executable, test_file, str(tmp)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout_s)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT "):])
