"""Collapse detectors for label-free training.

Without labels a run can quietly go wrong: the policy learns to agree with
itself (majority ratio climbs to 1) on wrong answers, its entropy
collapses, or its responses shrink or balloon. `CollapseDetector` watches
the metrics rows a run logs and returns an event for each threshold a
moving average crosses, and for eval/pass@1 falling too far below its best.
Pure Python on metric rows: no model, no ground truth beyond what the
metrics (eval) already computed.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any


@dataclass
class CollapseEvent:
    signal: str
    message: str


class CollapseDetector:
    def __init__(self, cfg: Any):
        self.cfg = cfg
        self.history: dict[str, deque] = {}
        self.best_eval: float | None = None

    def _avg(self, key: str, value: float) -> float:
        q = self.history.setdefault(key, deque(maxlen=self.cfg.window))
        q.append(value)
        return sum(q) / len(q)

    def _full(self, key: str) -> bool:
        return len(self.history.get(key, ())) >= self.cfg.window

    def reset(self) -> None:
        """Forget the moving averages (after a rollback the old window no longer applies)."""
        self.history.clear()

    def update(self, row: dict[str, Any]) -> list[CollapseEvent]:
        c, events = self.cfg, []
        checks = [
            ("train/entropy", c.min_entropy, "below"),
            ("label/majority_ratio", c.max_majority_ratio, "above"),
            ("rollout/response_length", c.min_response_length, "below"),
            ("rollout/response_length", c.max_response_length, "above"),
        ]
        seen: set[str] = set()
        for key, limit, side in checks:
            value = row.get(key)
            if value is None:
                continue
            avg = self._avg(key, float(value)) if key not in seen else sum(self.history[key]) / len(self.history[key])
            seen.add(key)
            if limit is None or not self._full(key):
                continue
            if (side == "below" and avg < limit) or (side == "above" and avg > limit):
                events.append(CollapseEvent(key, f"{key} averaged {avg:.4g} over {c.window} steps, {side} {limit:g}"))
        ev = row.get("eval/pass@1")
        if ev is not None:
            if c.max_eval_drop is not None and self.best_eval is not None and ev < self.best_eval - c.max_eval_drop:
                events.append(CollapseEvent("eval/pass@1", f"eval/pass@1 fell to {ev:.3f}, best was "
                                                           f"{self.best_eval:.3f} (allowed drop {c.max_eval_drop:g})"))
            self.best_eval = ev if self.best_eval is None else max(self.best_eval, ev)
        return events
