"""Loggers (JSON lines, W&B) and label-quality metrics."""

from __future__ import annotations

from typing import Any


def column_mean(rows: list[dict[str, Any]], key: str, default: Any = float("nan")) -> Any:
    """Mean of `key` over the metric rows that have it (a row may lack a key, or hold None)."""
    vals = [float(r[key]) for r in rows if r.get(key) is not None]
    return sum(vals) / len(vals) if vals else default
