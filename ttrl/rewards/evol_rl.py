"""EVOL-RL: the majority vote as an anchor, plus a reward for reasoning unlike the group's other samples.

EVOL-RL (Zhou et al., 2025, arXiv 2509.15194, "Evolving Language Models
without Labels: Majority Drives Selection, Novelty Promotes Variation")
keeps TTRL's majority vote for selection and ranks the samples within each
side of the vote by how novel their reasoning is, against the entropy
collapse that majority-only training shows (pass@n falls, responses
shorten). For a sample i of a prompt's group:

    similarity  s_i = w * mean_{j in G_i} cos(i, j) + (1 - w) * max_{j != i} cos(i, j)
    novelty     u_i = 1 - s_i, min-max normalised to [0, 1] within i's side
    reward      r_i = 0.5 + 0.5 u_i   if i agrees with the majority  (in [0.5, 1])
                r_i = -1 + 0.5 u_i    if it does not                 (in [-1, -0.5])
                r_i = -1              if it gave no answer

G_i are the other samples on i's side of the vote (the mean over all other
answered samples when i is alone on its side), the max runs over every
other answered sample, and w = `reward.evol_rl.mean_weight` (0.5 in the
authors' code). Every majority sample outranks every other one, so the vote
still decides which answer is learned; novelty only orders samples within a
side. A side whose samples are all equally novel, or hold one sample, sits
at its midpoint (u = 0.5): the authors' code leaves such a side's raw
novelty unnormalised, we keep the two sides on their stated ranges.

The paper's other two parts are options of the update, not of the reward:
asymmetric clipping (DAPO's clip-higher, `algorithm.clip_high=0.28` above
`clip_low=0.2`) and an entropy bonus (`algorithm.entropy_coef`; the authors'
script takes 0.001 or 0.003, off by default). Both exist in ttrl/algos/losses.py and the
trainer; experiments/sweeps/hard_regime.sh sets them for this arm.

Which similarity, and why: the paper embeds each response with a sentence
embedding model (Qwen3-Embedding-4B) and takes cosines. Nothing here may
download a model, and the tiny demo model's embeddings would measure its
own confusion, so the vector of a sample is the bag of its reasoning's
character n-grams (`reward.evol_rl.ngram`, 3 by default), compared by
cosine: the cheapest embedding that needs no model, works on any text, and
on the demo's worked sums ("37+48=85,85+12=97") differs exactly where two
samples' steps differ. The reasoning is the completion before its last
`\\boxed{` (novelty of the path, not of the answer the side already shares).
It is a lexical measure: two phrasings of one idea count as different, which
a semantic embedding would not; on the synthetic task, where a path is its
steps, the two agree.

Label-free: it reads the completions' text and answers, never
`prompt.answer`. The votes it reports are the plain majority votes.
"""

from __future__ import annotations

import math
from collections import Counter

from ttrl.labeling.vote import majority_votes
from ttrl.rewards.base import REWARDS, Reward, RewardOutput
from ttrl.types import Prompt

__all__ = ["EvolRLReward", "cosine", "ngram_vector", "novelty", "reasoning"]

_BOXED = ("\\boxed{", "\\fbox{")


def reasoning(text: str) -> str:
    """The completion before its last boxed answer (all of it when there is none), stripped."""
    cut = max(text.rfind(b) for b in _BOXED)
    return (text if cut < 0 else text[:cut]).strip()


def ngram_vector(text: str, n: int) -> Counter[str]:
    """Counts of the text's character n-grams (the whole text once when it is shorter than n)."""
    if not text:
        return Counter()
    if len(text) <= n:
        return Counter([text])
    return Counter(text[i:i + n] for i in range(len(text) - n + 1))


def cosine(a: Counter[str], b: Counter[str]) -> float:
    """Cosine of two count vectors; 0 when either is empty."""
    dot = sum(v * b[k] for k, v in a.items() if k in b)
    na, nb = math.sqrt(sum(v * v for v in a.values())), math.sqrt(sum(v * v for v in b.values()))
    return dot / (na * nb) if na and nb else 0.0


def novelty(sim: list[list[float]], side: list[bool], mean_weight: float) -> list[float]:
    """Each sample's novelty, normalised within its side (`side[i]`: agrees with the majority).

    `sim` is the samples' [n][n] similarity matrix (answered samples only).
    """
    n = len(sim)
    raw = []
    for i in range(n):
        others = [j for j in range(n) if j != i]
        mates = [j for j in others if side[j] == side[i]] or others
        mean = sum(sim[i][j] for j in mates) / len(mates) if mates else 0.5
        top = max((sim[i][j] for j in others), default=0.5)
        raw.append(1.0 - (mean_weight * mean + (1.0 - mean_weight) * top))
    out = [0.5] * n
    for flag in (True, False):
        members = [i for i in range(n) if side[i] == flag]
        lo, hi = min((raw[i] for i in members), default=0.0), max((raw[i] for i in members), default=0.0)
        if len(members) > 1 and hi > lo:
            for i in members:
                out[i] = (raw[i] - lo) / (hi - lo)
    return out


@REWARDS.register("evol_rl")
class EvolRLReward(Reward):
    needs_ground_truth = False

    def __init__(self, mean_weight: float = 0.5, ngram: int = 3, extractor: str = "boxed"):
        if not 0.0 <= mean_weight <= 1.0:
            raise ValueError(f"reward.evol_rl.mean_weight={mean_weight} must lie in [0, 1]")
        if ngram < 1:
            raise ValueError(f"reward.evol_rl.ngram={ngram} must be at least 1")
        self.mean_weight, self.ngram, self.extractor = mean_weight, ngram, extractor

    def __call__(self, prompts: list[Prompt], completions: list[list[str]],
                 answers: list[list[str | None]]) -> RewardOutput:
        votes = majority_votes(answers, extractor=self.extractor)
        rewards = []
        for texts, vote in zip(completions, votes):
            answered = [i for i, c in enumerate(vote.assignment) if c is not None]
            vecs = [ngram_vector(reasoning(texts[i]), self.ngram) for i in answered]
            sim = [[cosine(a, b) for b in vecs] for a in vecs]
            side = [vote.agrees(i) for i in answered]
            u = dict(zip(answered, novelty(sim, side, self.mean_weight)))
            rewards.append([-1.0 if i not in u else (0.5 + 0.5 * u[i] if vote.agrees(i) else -1.0 + 0.5 * u[i])
                            for i in range(len(texts))])
        return RewardOutput(rewards=rewards, votes=votes)
