"""evol_rl: the majority decides the side, the novelty of the reasoning orders samples within it (worked by hand)."""

import math
from collections import Counter

import pytest

from ttrl.rewards import build_reward, compute_rewards
from ttrl.rewards.evol_rl import cosine, ngram_vector, novelty, reasoning
from ttrl.types import Group, Prompt, Sample

pytestmark = pytest.mark.unit


def group(pid: str, samples: list[tuple[str, str | None]]) -> Group:
    """(reasoning, answer) pairs; the completion is the reasoning then the boxed answer."""
    return Group(Prompt(pid, f"problem {pid}", answer="5"), [],
                 [Sample(text=f"{r} \\boxed{{{a}}}" if a else r, answer=a) for r, a in samples])


def test_reasoning_and_its_ngram_cosine() -> None:
    assert reasoning("37+48=85,85+12=97 \\boxed{97}") == "37+48=85,85+12=97"
    assert reasoning("no box at all") == "no box at all"
    # "abab" -> bigrams ab x2, ba x1; "ab" -> ab x1: cos = 2 / (sqrt(5) * 1).
    assert ngram_vector("abab", 2) == Counter({"ab": 2, "ba": 1})
    assert cosine(ngram_vector("abab", 2), ngram_vector("ab", 2)) == pytest.approx(2 / math.sqrt(5))
    assert cosine(Counter(), ngram_vector("ab", 2)) == 0.0


def test_evol_rl_rewards_by_hand() -> None:
    # Bigram vectors: "ab" -> {ab}, "cd" -> {cd}: cos 1 between equal paths, 0 between different ones.
    # Majority 5 (3 of 5): side M = {0, 1, 2}, the other side {3}; sample 4 gave no answer: -1.
    # s0: mean cos to M\{0} = (1 + 0)/2 = 0.5, max cos to any other = 1 -> s = 0.75, u = 0.25 (s1 alike).
    # s2: mean over {0, 1} = 0, max = 0 -> u = 1.  M normalised: [0.25, 0.25, 1] -> [0, 0, 1].
    # s3: alone on its side -> mean over all others (1 + 1 + 0)/3, max 1 -> u = 1/6; a side of one sits at 0.5.
    # Rewards: majority 0.5 + 0.5 u -> 0.5, 0.5, 1.0; the other side -1 + 0.5 * 0.5 = -0.75.
    g = group("p0", [("ab", "5"), ("ab", "5"), ("cd", "5"), ("ab", "7"), ("xyz", None)])
    out = compute_rewards(build_reward("evol_rl", ngram=2), [g])
    assert out.rewards[0] == pytest.approx([0.5, 0.5, 1.0, -0.75, -1.0])
    assert out.votes[0].label == "5"  # the anchor is the plain majority vote


def test_every_majority_sample_outranks_every_other_and_equal_novelty_sits_mid_range() -> None:
    # All majority paths identical: equally novel -> each 0.5 + 0.5 * 0.5 = 0.75.
    # The two minority samples: "zz" vs "ab": mean over its side {other} and max over all.
    # s3 ("zz"): mean cos to s4 ("ab") = 0, max cos to anyone = 0 -> u = 1;
    # s4 ("ab"): mean cos to s3 = 0, max = 1 (the majority's "ab") -> u = 0.5.
    # Normalised on their side: [1, 0.5] -> [1, 0]: rewards -0.5 and -1.0.
    g = group("p0", [("ab", "5"), ("ab", "5"), ("ab", "5"), ("zz", "6"), ("ab", "7")])
    out = compute_rewards(build_reward("evol_rl", ngram=2), [g]).rewards[0]
    assert out == pytest.approx([0.75, 0.75, 0.75, -0.5, -1.0])
    assert min(out[:3]) > max(out[3:])


def test_mean_weight_moves_the_similarity_between_ones_side_and_the_closest_sample() -> None:
    # Majority side {0, 1, 2}, one dissenter 3. s2 is unlike its own side (cos 0.1) but nearly copies
    # the dissenter (cos 0.95).
    sim = [[1.0, 0.9, 0.1, 0.0],
           [0.9, 1.0, 0.1, 0.0],
           [0.1, 0.1, 1.0, 0.95],
           [0.0, 0.0, 0.95, 1.0]]
    side = [True, True, True, False]
    # mean_weight=1 (mean cos to one's side): s0, s1 mean(0.9, 0.1) = 0.5 -> u = 0.5; s2 mean(0.1, 0.1)
    # -> u = 0.9. Normalised on the side: [0, 0, 1]: s2 is the novel one.
    assert novelty(sim, side, 1.0)[:3] == pytest.approx([0.0, 0.0, 1.0])
    # mean_weight=0 (max cos to anyone): s0, s1 max 0.9 -> u = 0.1; s2 max 0.95 -> u = 0.05.
    # Normalised: [1, 1, 0]: copying the dissenter makes s2 the least novel.
    assert novelty(sim, side, 0.0)[:3] == pytest.approx([1.0, 1.0, 0.0])
    # The dissenter alone on its side sits mid-range whatever the weight.
    assert novelty(sim, side, 0.5)[3] == 0.5


def test_evol_rl_checks_its_options() -> None:
    with pytest.raises(ValueError, match=r"reward.evol_rl.mean_weight=2"):
        build_reward("evol_rl", mean_weight=2)
    with pytest.raises(ValueError, match=r"reward.evol_rl.ngram=0"):
        build_reward("evol_rl", ngram=0)
