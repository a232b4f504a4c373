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
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass
class CollapseEvent:
    signal: str
    message: str


class CollapseDetector:
    def __init__(self, cfg: Any, vote_signals: bool = True):
        self.cfg = cfg
        self.vote_signals = vote_signals
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
            ("label/flip_rate", c.max_flip_rate if self.vote_signals else None, "above"),
            ("label/first_vote_drift", c.max_first_vote_drift if self.vote_signals else None, "above"),
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


class VoteTracker:
    """Label-free signals from how each prompt's vote moves across visits.

    A test-time run sees every prompt again each epoch. Healthy learning
    strengthens the votes it already had (most starting votes are right) and
    fixes a few; a run that is learning to agree on wrong answers changes
    votes that had been confident. Both read from the votes alone:

    - `label/flip_rate`: of the step's prompts whose previous vote held at
      least `confident` of the samples, the share whose vote changed;
    - `label/first_vote_drift`: of the step's revisited (or anchored)
      prompts, the share whose vote differs from the one at their first
      visit, or from their anchor vote: `anchor` takes votes of the starting
      policy drawn before training, so drift is measured from step 1 instead
      of from the first revisit;
    - `label/distinct_answers`: distinct answers per prompt (missing ones not
      counted), which shrinks as the policy's answers narrow.

    It keeps the label and ratio of each prompt's first and last vote (two
    small dicts), compares labels as normalised strings, and sees no ground
    truth.
    """

    def __init__(self, confident: float = 0.5):
        # A prompt's first vote (or its anchor vote), and its last vote with its ratio.
        self.confident = confident
        self.first: dict[str, str | None] = {}
        self.last: dict[str, tuple[str | None, float]] = {}

    def anchor(self, prompt_ids: Sequence[str], votes: Sequence[Any]) -> None:
        """Votes of the starting policy: the reference each prompt's later votes drift from."""
        for pid, vote in zip(prompt_ids, votes):
            self.first[pid] = self._key(vote.label)

    @staticmethod
    def _key(label: str | None) -> str | None:
        return None if label is None else "".join(label.split())

    def update(self, prompt_ids: Sequence[str], votes: Sequence[Any]) -> dict[str, float]:
        flips = confident = drift = revisits = 0
        distinct = 0
        for pid, vote in zip(prompt_ids, votes):
            label = self._key(vote.label)
            distinct += len(vote.counts)
            if pid in self.first:
                revisits += 1
                drift += int(label != self.first[pid])
            else:
                self.first[pid] = label
            if pid in self.last:
                prev, prev_ratio = self.last[pid]
                if prev_ratio >= self.confident:
                    confident += 1
                    flips += int(label != prev)
            self.last[pid] = (label, vote.ratio)
        out = {"label/distinct_answers": distinct / max(len(votes), 1)}
        if revisits:
            out["label/first_vote_drift"] = drift / revisits
        if confident:
            out["label/flip_rate"] = flips / confident
        return out
