"""Reading a run's JSONL files (metrics, votes, samples), plain or gzipped.

A run appends one JSON object per line; an archived run
(experiments/results/) keeps the same files gzipped. A run killed mid-write
leaves its last line torn, and that is expected: it is skipped. A bad line
anywhere else is damage, and raises one ValueError naming the file and
line. Reads only; must never write, and imports nothing of ttrl.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def jsonl_file(run_dir: Path, name: str) -> Path | None:
    """`run_dir/name` (e.g. "votes.jsonl"), or its gzipped copy `name.gz` when only that exists; else None."""
    for p in (run_dir / name, run_dir / f"{name}.gz"):
        if p.exists():
            return p
    return None


def read_jsonl_text(path: Path) -> str:
    """The text of a JSONL file, gunzipped when its name ends in .gz."""
    if path.suffix == ".gz":
        import gzip

        return gzip.decompress(path.read_bytes()).decode()
    return path.read_text()


def read_jsonl_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a JSONL file (gzipped or not); a torn last line is skipped, any other bad line raises."""
    lines = read_jsonl_text(path).splitlines()
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i != last:
                raise ValueError(f"{path}:{i + 1}: not valid JSON") from None
    return rows
