"""Tool-verified voting: each sample's worked steps checked by a calculator, its vote weighted by how many hold.

T3RL (Liao et al., 2026, arXiv 2603.02203, "Tool Verification for
Test-Time Reinforcement Learning") guards TTRL against a spurious but
popular answer by verifying each rollout with a tool before the vote: a
verifier turns the rollout's reasoning into code, runs it, and a rollout
whose executed result matches its answer votes with weight omega (about 5
worked best in the paper) instead of 1. The pseudo-label is the answer with
the largest total weight; a sample is rewarded 1 when its answer is
equivalent to it, else 0, as in TTRL.

Here the worked steps are arithmetic ("37+48=85,85+12=97 \\boxed{97}"), so
no model is needed to turn them into code: a calculator
(ttrl/rewards/calculator.py) re-computes each step and checks the boxed
answer against the last step's value. A sample's weight grows with the
share s of its checks that hold,

    w = 1 + (omega - 1) * s,     omega = reward.tool_verified.verified_weight,

so a fully verified sample votes with omega, one whose every check fails
with 1 (as an unverified rollout in T3RL), and one with no checkable steps
(nothing to verify) with 1. The demo model's characteristic mistake, a
dropped carry carried on consistently ("37+48=75,75+12=87 \\boxed{87}"),
fails the first step's check: a wrong answer that many samples share weighs
less than the same number of samples that add up. What we follow: tool
evidence per rollout, a weighted vote, the 0/1 reward against its winner.
What we simplify: T3RL's binary verified/unverified becomes the share of
checks that hold (a chain with one slip is partly verified); no verifier
model writes code (the steps are already executable); and only arithmetic
steps of the form "integers joined by + - * = integer" are checked.

The calculator runs in a sandboxed worker process (`reward.tool_verified.
sandbox`, ttrl/labeling/sandbox.py: a separate process with a hard deadline
and a capped address space, one call per step for all its samples), as a
tool that executes model-written text should; if it misses
`reward.tool_verified.timeout_s` the step is skipped with that reason, never
scored on a made-up verdict. The calculator itself parses integers and
operators only and evaluates nothing else.

Label-free: the tool checks the samples' own arithmetic; it never reads
`prompt.answer` (the ground-truth firewall test covers it). The vote it
reports to the metrics is the weighted vote, so label/accuracy measures the
labels that paid; its ratio is the winner's share of the samples, as for
the plain vote.
"""

from __future__ import annotations

import json

from ttrl.labeling.grade import equivalence_classes
from ttrl.labeling.vote import Vote
from ttrl.rewards.base import REWARDS, Reward, RewardError, RewardOutput
from ttrl.rewards.calculator import check_many
from ttrl.types import Prompt

__all__ = ["ToolVerifiedReward", "weighted_vote"]

# What a sandbox worker imports and runs: a list of texts in, [[checks, held], ...] as JSON out.
CALCULATOR = "ttrl.rewards.calculator:check_many"


def weighted_vote(answers: list[str | None], weights: list[float], extractor: str = "boxed") -> Vote:
    """The class with the largest total weight wins (ties: the class seen first); counts stay sample counts."""
    reps, assignment = equivalence_classes(answers, extractor)
    if not reps:
        return Vote(label=None, ratio=0.0, assignment=assignment)
    sizes, mass = [0] * len(reps), [0.0] * len(reps)
    for c, w in zip(assignment, weights):
        if c is not None:
            sizes[c] += 1
            mass[c] += w
    winner = max(range(len(reps)), key=mass.__getitem__)
    return Vote(label=reps[winner], ratio=sizes[winner] / len(answers), counts=dict(zip(reps, sizes)),
                assignment=assignment, winner=winner)


@REWARDS.register("tool_verified")
class ToolVerifiedReward(Reward):
    needs_ground_truth = False

    def __init__(self, verified_weight: float = 5.0, sandbox: bool = True, timeout_s: float = 10.0,
                 extractor: str = "boxed"):
        if verified_weight < 1.0:
            raise ValueError(f"reward.tool_verified.verified_weight={verified_weight} must be at least 1 "
                             f"(1: the plain majority vote)")
        if timeout_s <= 0:
            raise ValueError(f"reward.tool_verified.timeout_s={timeout_s} must be > 0")
        self.verified_weight, self.timeout_s, self.extractor = verified_weight, timeout_s, extractor
        self._pool = None
        if sandbox:
            from ttrl.labeling.sandbox import WorkerPool, available

            if available():
                self._pool = WorkerPool(1, CALCULATOR)

    def checks(self, texts: list[str]) -> list[tuple[int, int]]:
        """(checks, held) of every text, from the sandboxed calculator (or in process without a sandbox)."""
        if self._pool is None:
            reply = check_many(texts)
        else:
            from ttrl.labeling.sandbox import FAILED

            try:
                reply = self._pool.call([texts], self.timeout_s)
            except Exception as err:  # noqa: BLE001 - any way the worker fails: say which and skip the step
                raise RewardError(f"tool_verified: the sandboxed calculator failed ({type(err).__name__}: {err}); "
                                  f"reward.tool_verified.timeout_s={self.timeout_s}") from err
            if reply == FAILED:
                raise RewardError("tool_verified: the sandboxed calculator raised on this step's completions")
        return [(int(c), int(h)) for c, h in json.loads(reply)]

    def weight(self, checks: int, held: int) -> float:
        """1 + (omega - 1) * the share of checks that hold; 1 when there was nothing to check."""
        return 1.0 + (self.verified_weight - 1.0) * (held / checks) if checks else 1.0

    def __call__(self, prompts: list[Prompt], completions: list[list[str]],
                 answers: list[list[str | None]]) -> RewardOutput:
        flat = self.checks([t for row in completions for t in row])
        rewards, votes, k = [], [], 0
        for row, ans in zip(completions, answers):
            weights = [self.weight(*flat[k + i]) for i in range(len(row))]
            k += len(row)
            vote = weighted_vote(list(ans), weights, self.extractor)
            rewards.append([1.0 if vote.agrees(i) else 0.0 for i in range(len(row))])
            votes.append(vote)
        return RewardOutput(rewards=rewards, votes=votes)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
