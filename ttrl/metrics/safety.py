"""Collapse detectors for label-free training.

Without labels a run can quietly go wrong: the policy learns to agree with
itself (majority ratio climbs to 1) on wrong answers, its entropy
collapses, or its responses shrink or balloon. `CollapseDetector` watches
the metrics rows a run logs and returns an event for each threshold a
moving average crosses, and for eval/pass@1 falling too far below its best.
`VoteTracker` derives the label-free vote signals it watches. `Guard` is
what a run checks after every step: skipped updates, the detectors, and the
action (warn, stop, roll back). Pure Python (numpy for the drift floor) on
metric rows: no model, no ground truth beyond what the metrics (eval)
already computed; the guard reaches the actors only through the
`StepRuntime` it is handed, and must never import ray, vllm or deepspeed.
"""

from __future__ import annotations

import functools
import sys
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ttrl.distributed.seam import StepRuntime


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
            ("label/excess_drift", c.max_excess_drift if self.vote_signals else None, "above"),
            ("label/excess_flip_rate", c.max_excess_flip_rate if self.vote_signals else None, "above"),
            ("label/consensus_change",
             -c.max_consensus_drop if self.vote_signals and c.max_consensus_drop is not None else None, "below"),
            ("label/vote_alignment", c.min_vote_alignment if self.vote_signals else None, "below"),
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
    - `label/consensus_change`: over the same revisited (or anchored)
      prompts, the mean change of the majority ratio since that first (or
      anchor) vote, paired prompt by prompt so that which prompts a step
      drew cancels out. Healthy test-time training sharpens the votes it
      has (the change climbs from 0); a reward that pushes the policy
      anywhere but toward its own consensus (the random control) spreads the
      answers, and the change goes negative while the votes that remain stay
      mostly where they were, so neither drift nor flips see it;
    - `label/distinct_answers`: distinct answers per prompt (missing ones not
      counted), which shrinks as the policy's answers narrow;
    - `label/drift_floor`: the drift that sampling alone would show over the
      same prompts, had the policy not changed at all (`drift_floor` of each
      prompt's first or anchor vote), and `label/excess_drift`, the drift
      above it. With 16 votes a prompt whose answers split 5/4/3/... elects
      another winner on a fresh draw about a third of the time: on a weak
      model (the hard bed: majority ratio 0.4, floor 0.26) the raw drift sits
      at any fixed limit from step 1, while on the demo's warm start (ratio
      0.8, floor 0.06) it barely differs from the excess;
    - `label/flip_floor` and `label/excess_flip_rate`: the same for the
      flip rate, over the same confident prompts: each one's chance that a
      fresh vote elects another winner than its previous vote did, had the
      policy not changed since (`drift_floor` of that previous vote), over
      the confident prompts whose previous vote kept its class sizes. It
      depends on the runner-up: with 16 samples, 9/7 loses its winner about
      0.3 of the time, 8/2/2/2/2 about 0.07. The previous vote's shares are
      taken as the policy's, and a prompt counts because that vote looked
      confident, so the floor errs low: on replays of the hard bed the excess
      fired on 11 of the 12 runs that gained (learning flips votes as well).

    It keeps the label and ratio of each prompt's first and last vote, the
    first one's drift floor and the last one's class sizes (small dicts), compares labels as normalised strings, and sees no ground truth.
    """

    def __init__(self, confident: float = 0.5):
        # A prompt's first vote (or its anchor vote), and its last vote with its ratio.
        self.confident = confident
        self.first: dict[str, str | None] = {}
        self.first_ratio: dict[str, float] = {}
        self.first_floor: dict[str, float] = {}
        # The last vote's class sizes and sample count, for its flip floor; None when it has no sizes.
        self.last: dict[str, tuple[str | None, float, tuple[tuple[int, ...], int] | None]] = {}

    def anchor(self, prompt_ids: Sequence[str], votes: Sequence[Any]) -> None:
        """Votes of the starting policy: the reference each prompt's later votes drift from."""
        for pid, vote in zip(prompt_ids, votes):
            self._remember(pid, vote)

    def _remember(self, pid: str, vote: Any) -> None:
        self.first[pid] = self._key(vote.label)
        self.first_ratio[pid] = float(vote.ratio)
        sizes, n = vote_sizes(vote)
        if sizes is not None:
            self.first_floor[pid] = drift_floor(sizes, n)

    @staticmethod
    def _key(label: str | None) -> str | None:
        return None if label is None else "".join(label.split())

    def update(self, prompt_ids: Sequence[str], votes: Sequence[Any]) -> dict[str, float]:
        flips = confident = drift = revisits = floored = flip_floored = 0
        distinct = 0
        consensus = floor = floored_drift = flip_floor = floored_flips = 0.0
        for pid, vote in zip(prompt_ids, votes):
            label = self._key(vote.label)
            distinct += len(vote.counts)
            if pid in self.first:
                revisits += 1
                moved = int(label != self.first[pid])
                drift += moved
                consensus += float(vote.ratio) - self.first_ratio[pid]
                if pid in self.first_floor:
                    floored += 1
                    floor += self.first_floor[pid]
                    floored_drift += moved
            else:
                self._remember(pid, vote)
            if pid in self.last:
                prev, prev_ratio, prev_sizes = self.last[pid]
                if prev_ratio >= self.confident:
                    confident += 1
                    flipped = int(label != prev)
                    flips += flipped
                    if prev_sizes is not None:
                        flip_floored += 1
                        flip_floor += drift_floor(*prev_sizes)
                        floored_flips += flipped
            sizes, n = vote_sizes(vote)
            self.last[pid] = (label, vote.ratio, (tuple(sizes), n) if sizes is not None else None)
        out = {"label/distinct_answers": distinct / max(len(votes), 1)}
        if revisits:
            out["label/first_vote_drift"] = drift / revisits
            out["label/consensus_change"] = consensus / revisits
        if floored:
            out["label/drift_floor"] = floor / floored
            out["label/excess_drift"] = (floored_drift - floor) / floored
        if confident:
            out["label/flip_rate"] = flips / confident
        if flip_floored:
            out["label/flip_floor"] = flip_floor / flip_floored
            out["label/excess_flip_rate"] = (floored_flips - flip_floor) / flip_floored
        return out


# Fresh votes drawn per prompt to estimate its drift floor: the estimate's
# standard error is at most 0.5 / sqrt(2000) = 0.011, and a step averages it
# over its prompts; seeded, so a replay computes the same floor as the run.
FLOOR_DRAWS = 2000


def vote_sizes(vote: Any) -> tuple[list[int] | None, int]:
    """(class sizes with the winner first, samples voted) of a vote; (None, 0) when it cannot say.

    A live `Vote` has every class's size; a vote replayed from an older
    votes.jsonl row may carry only its ratio, margin and class count
    (`sizes` None there, and no floor).
    """
    sizes = getattr(vote, "sizes", None)
    if sizes is not None:
        return list(sizes), int(vote.n)
    counts, assignment = getattr(vote, "counts", None), getattr(vote, "assignment", None)
    if not isinstance(counts, dict) or not assignment:
        return None, 0
    values = list(counts.values())
    if vote.winner is not None:
        values.insert(0, values.pop(vote.winner))
    return values, len(assignment)


def vote_row(prompt_id: str, vote: Any) -> dict[str, Any]:
    """One votes.jsonl row (the step is added by the logger): what a replay of the guard needs."""
    sizes, n = vote_sizes(vote)
    return {"id": prompt_id, "label": vote.label, "ratio": round(vote.ratio, 4), "margin": round(vote.margin, 4),
            "classes": len(vote.counts), "sizes": sizes, "n": n}


@functools.lru_cache(maxsize=4096)
def _floor(sizes: tuple[int, ...], n: int) -> float:
    import numpy as np

    if not sizes or sizes[0] == 0:
        return 0.0  # no answers: a fresh draw from the same policy gives none either
    n = max(n, sum(sizes))
    shares = np.array([*sizes, max(n - sum(sizes), 0)], dtype=float) / n
    draws = np.random.default_rng(0).multinomial(n, shares, size=FLOOR_DRAWS)[:, :-1]
    top = draws.max(axis=1)
    tied = (draws == top[:, None]).sum(axis=1)
    # The winner keeps its seat when it leads, or shares the lead and wins the
    # tie: ties go to the class seen first, which on a fresh draw is any of them.
    kept = np.where((draws[:, 0] == top) & (top > 0), 1.0 / tied, 0.0)
    return float(1.0 - kept.mean())


def drift_floor(sizes: Sequence[int], n: int) -> float:
    """The chance that a fresh vote of `n` samples from an unchanged policy elects another winner.

    `sizes`: the vote's class sizes, its winner first (samples with no answer
    are `n` minus their sum). Each class is taken to hold its observed share
    of the policy's answers, and fresh votes are drawn from those shares: the
    share of them won by another class (or by no answer) is the vote drift
    that sampling alone shows on this prompt.
    """
    return _floor(tuple(int(x) for x in sizes), int(n)) if n > 0 else 0.0


def vote_alignment(rewards: Sequence[Sequence[float]], votes: Sequence[Any]) -> dict[str, float]:
    """`label/vote_alignment`: how far the reward sides with the vote it trains against.

    For each prompt whose samples both agree and disagree with its vote and
    whose rewards are not all equal, the share of (agreeing, disagreeing)
    sample pairs in which the agreeing sample is paid more (a tie counts
    half): 1 when the reward pays the majority's answer (majority vote, soft
    majority), 0.5 when it ignores it (a random reward), below 0.5 when it
    pays the answers the vote rejects. Averaged over those prompts. A reward
    that does not vote (token entropy, self-certainty, a learned judge) can
    drift the policy off its own consensus from the first step, faster than
    the vote signals above see it: on the demo's warm start such rewards pay
    a slipped carry by a hair, and the votes follow within ten steps.
    Reads rewards and votes only, no ground truth; prompts with one kind of
    sample or one reward value push nothing either way and are left out.
    """
    scores = []
    for row, vote in zip(rewards, votes):
        if vote is None or len(set(row)) < 2:
            continue
        agree: list[float] = []
        other: list[float] = []
        for i, r in enumerate(row):
            (agree if vote.agrees(i) else other).append(r)
        if not agree or not other:
            continue
        won = sum((a > b) + 0.5 * (a == b) for a in agree for b in other)
        scores.append(won / (len(agree) * len(other)))
    return {"label/vote_alignment": sum(scores) / len(scores)} if scores else {}


class Guard:
    """Numerical and self-training safety, checked after every step of a run.

    Counts skipped (non-finite) updates and stops after
    `trainer.max_skipped_steps` in a row; runs the collapse detectors and
    applies `safety.action`: warn, stop, or rollback with a lower learning
    rate. The rollback target is the best evaluated checkpoint when the guard
    watches eval/pass@1 (`safety.max_eval_drop`, which grades against ground
    truth); a label-free guard picks no checkpoint by a graded score and rolls
    back to the starting weights. The first step it fires is logged as
    `safety/collapse_step` with `safety/reason`. It reaches the actors only
    through `rt` (load, scale_lr, sync_weights of the `StepRuntime` seam).
    """

    def __init__(self, cfg: Any, rt: StepRuntime, run_dir: Path, label_free: bool = True):
        self.cfg, self.rt, self.run_dir = cfg, rt, run_dir
        self.label_free = label_free
        # The vote signals watch a run that makes its own labels; a reward
        # that reads the ground truth moves votes for the right reasons.
        self.detector = CollapseDetector(cfg.safety, vote_signals=label_free)
        self.skips = 0
        self.rollbacks = 0
        self.fired_at: int | None = None
        self.best_ckpt: Path | None = None
        self.best_eval: float | None = None
        self.by_eval = cfg.safety.max_eval_drop is not None

    def saved(self, path: Path, eval_pass1: float | None) -> None:
        """A checkpoint was written: the starting one, or a better-evaluated one, becomes the rollback target."""
        if self.best_ckpt is None and int(path.name.split("_")[-1]) == 0:
            self.best_ckpt, self.best_eval = path, eval_pass1  # the starting weights: always a safe target
        elif self.by_eval and eval_pass1 is not None and (self.best_eval is None or eval_pass1 > self.best_eval):
            self.best_ckpt, self.best_eval = path, eval_pass1

    def _say(self, msg: str) -> None:
        print(f"ttrl: {msg}", file=sys.stderr, flush=True)

    def check(self, row: dict[str, Any]) -> str | None:
        """Add event/* and safety/* keys to `row`; return a reason when the run must stop."""
        if row.get("train/skipped"):
            self.skips += 1
            why = row.get("event/skip_reason") or "non-finite loss or gradient norm"
            row["event/skipped_update"] = f"{why}: update skipped ({self.skips} in a row)"
            self._say(row["event/skipped_update"])
            if self.skips >= self.cfg.trainer.max_skipped_steps:
                return (f"{self.skips} updates in a row were skipped (the last: {why}); stopping. "
                        f"The last checkpoint in {self.run_dir / 'checkpoints'} is intact.")
        else:
            self.skips = 0
        events = self.detector.update(row)
        if not events:
            return None
        msg = "; ".join(e.message for e in events)
        row["event/collapse"] = msg
        if self.fired_at is None:
            self.fired_at = int(row["step"])
            row["safety/collapse_step"] = self.fired_at
            row["safety/reason"] = msg
        action = self.cfg.safety.action
        row["event/action"] = action
        self._say(f"collapse warning at step {row['step']}: {msg} (action: {action})")
        if action == "stop":
            return f"collapse detected ({msg}); stopping as safety.action=stop asks."
        if action == "rollback":
            return self._rollback(row, msg)
        return None

    def _rollback(self, row: dict[str, Any], msg: str) -> str | None:
        if self.best_ckpt is None:
            row["event/action"] = "rollback impossible"
            return f"collapse detected ({msg}) and no checkpoint to roll back to; stopping."
        where = (f"{self.best_ckpt} (eval pass@1 {self.best_eval:.3f})" if self.best_eval is not None
                 else f"{self.best_ckpt} (the starting weights)")
        if self.rollbacks >= self.cfg.safety.max_rollbacks:
            # Out of retries: leave the engines and trainer on the best weights
            # seen, so what the run ends with is never the collapsed model.
            self.rt.load(str(self.best_ckpt))
            self.rt.sync_weights()
            row["event/action"] = "restored best, stopping"
            row["event/rollback_to"] = str(self.best_ckpt)
            return (f"collapse detected ({msg}) and no rollback left ({self.rollbacks} done); restored "
                    f"{where} and stopping.")
        self.rt.load(str(self.best_ckpt))
        lr = self.rt.scale_lr(self.cfg.safety.lr_factor ** (self.rollbacks + 1))
        self.rt.sync_weights()
        self.rollbacks += 1
        self.detector.reset()
        row["event/rollback_to"] = str(self.best_ckpt)
        row["event/lr_after_rollback"] = lr
        self._say(f"rolled back to {where}; lr now {lr:.3g}")
        return None
