"""SCRL: a positive label only under strict consensus, and negative labels for rare answers the model is unsure of.

SCRL (Yan et al., 2026, arXiv 2603.19880, "What If Consensus Lies?
Selective-Complementary Reinforcement Learning at Test Time") keeps TTRL's
vote but trusts it less, and adds what TTRL never has: answers to push
away from. For one prompt with answer shares p(a) over its n samples
(samples with no answer count in n), the policy's mean token entropy H_i
of each sample (from the step's token_stats), the class mean H(a) over the
samples that answered a, and the prompt's mean H over all its samples:

- Selective positive label: the top answer a1 is the label y+ only when
  p(a1) >= tau_pos and either it is the only answer or p(a1) - p(a2) >
  tau_marg (a2 the runner-up); else the prompt has no positive label.
- Entropy-gated negative labels: every other answer a with p(a) < tau_low
  and H(a) >= H (rare, and produced with more hesitation than the prompt's
  average) is a negative.
- Rewards, `mode=binary`: +a_plus for y+, -a_minus for a negative, 0 for
  any other answer; `mode=continuous` (the authors' released script):
      y+:        a_plus * p(a) - lambda_h * (H(a) - H)
      negative: -a_minus * (tau_low - p(a)) - lambda_h * (H(a) - H)
      other:    -lambda_h * (H(a) - H)
  and -1 for a sample with no answer, in both modes.

What we follow: the authors' code (github.com/Jasper-Yan/SCRL), including
its defaults for 32 votes, tau_pos 0.375, tau_marg 0.125, tau_low 0.125,
a_plus = a_minus = 1, lambda_h 0.1, continuous mode, and its positive term
a_plus * p(a) (its docstring writes a_plus * (p(a) - tau_pos); the code
that produced the paper's numbers does not subtract). What we simplify:
the entropy is the trainer's per-token entropy at the sampling temperature
averaged over each response (the step's token_stats, one forward pass),
where the authors read the rollout engine's; samples with nothing to
measure are left out of the means. With 16 votes tau_low 0.125 makes the
singletons (p = 1/16) the negative candidates.

The votes it reports to the metrics and the guard are the plain majority
votes: its positive label, whenever it pays one, is that vote's winner, so
label/accuracy reads the consensus, not the abstentions. Label-free: it
reads answers and token statistics, never `prompt.answer`.
"""

from __future__ import annotations

import math

from ttrl.labeling.vote import Vote, majority_votes
from ttrl.rewards.base import REWARDS, Reward, RewardOutput
from ttrl.types import Prompt

__all__ = ["SCRLReward", "scrl_labels"]

MODES = ("binary", "continuous")


def _mean(values: list[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else math.nan


def scrl_labels(vote: Vote, entropy: list[float], tau_pos: float, tau_marg: float,
                tau_low: float) -> tuple[int | None, set[int], list[float], float]:
    """(positive class or None, negative classes, each class's mean entropy, the prompt's mean entropy)."""
    n = len(vote.assignment)
    sizes = list(vote.counts.values())
    shares = [s / n for s in sizes]
    class_h = [_mean([entropy[i] for i, c in enumerate(vote.assignment) if c == k]) for k in range(len(sizes))]
    prompt_h = _mean(entropy)
    positive = None
    if vote.winner is not None:
        top = shares[vote.winner]
        runner_up = max((s for k, s in enumerate(shares) if k != vote.winner), default=None)
        if top >= tau_pos and (runner_up is None or top - runner_up > tau_marg):
            positive = vote.winner
    negatives = {k for k in range(len(sizes))
                 if k != positive and shares[k] < tau_low and class_h[k] >= prompt_h}  # NaN compares False
    return positive, negatives, class_h, prompt_h


@REWARDS.register("scrl")
class SCRLReward(Reward):
    needs_ground_truth = False
    needs = frozenset({"token_stats"})

    def __init__(self, mode: str = "continuous", tau_pos: float = 0.375, tau_marg: float = 0.125,
                 tau_low: float = 0.125, a_plus: float = 1.0, a_minus: float = 1.0, lambda_h: float = 0.1,
                 extractor: str = "boxed"):
        if mode not in MODES:
            raise ValueError(f"reward.scrl.mode={mode!r} is not one of {', '.join(MODES)}")
        for key, value in (("tau_pos", tau_pos), ("tau_marg", tau_marg), ("tau_low", tau_low)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"reward.scrl.{key}={value} must lie in [0, 1]")
        for key, value in (("a_plus", a_plus), ("a_minus", a_minus), ("lambda_h", lambda_h)):
            if value < 0:
                raise ValueError(f"reward.scrl.{key}={value} must be at least 0")
        self.mode, self.extractor = mode, extractor
        self.tau_pos, self.tau_marg, self.tau_low = tau_pos, tau_marg, tau_low
        self.a_plus, self.a_minus, self.lambda_h = a_plus, a_minus, lambda_h

    def __call__(self, prompts: list[Prompt], completions: list[list[str]], answers: list[list[str | None]],
                 token_stats: list[list[dict[str, float]]] | None = None) -> RewardOutput:
        if token_stats is None:
            raise ValueError("scrl needs token_stats (the step computes them)")
        votes = majority_votes(answers, extractor=self.extractor)
        rewards = []
        for vote, stats in zip(votes, token_stats):
            entropy = [float(s["entropy"]) for s in stats]
            positive, negatives, class_h, prompt_h = scrl_labels(vote, entropy, self.tau_pos, self.tau_marg,
                                                                 self.tau_low)
            shares = [s / len(vote.assignment) for s in vote.counts.values()]
            row = []
            for c in vote.assignment:
                if c is None:
                    row.append(-1.0)
                    continue
                if self.mode == "binary":
                    row.append(self.a_plus if c == positive else -self.a_minus if c in negatives else 0.0)
                    continue
                gap = class_h[c] - prompt_h
                penalty = 0.0 if math.isnan(gap) else self.lambda_h * gap
                if c == positive:
                    row.append(self.a_plus * shares[c] - penalty)
                elif c in negatives:
                    row.append(-self.a_minus * (self.tau_low - shares[c]) - penalty)
                else:
                    row.append(-penalty)
            rewards.append(row)
        return RewardOutput(rewards=rewards, votes=votes)
