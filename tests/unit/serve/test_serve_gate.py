"""The safety gate: scoring samples against labels, and the promote / reject decision."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from ttrl.serve.gate import EvalResult, decide, freezable, paired_stderr, score_samples
from ttrl.serve.testing import boxed

GATE = SimpleNamespace(tolerance=0.02, min_agreement=0.75, max_entropy_drop=0.5, max_answer_rate_drop=0.1,
                       max_length_change=1.0)


def _res(score=0.5, answer_rate=0.9, entropy=1.0, length=10.0, items=20):
    return EvalResult(score=score, answer_rate=answer_rate, entropy=entropy, mean_length=length,
                      self_agreement=0.6, n_items=items, n_samples=items * 8)


def test_score_samples_grades_equivalent_answers_and_measures_collapse_signals():
    none = {"text": "no idea", "token_ids": [1, 2], "logprobs": [-2.0, -2.0], "finish_reason": "stop"}
    samples = [
        [boxed("1/2"), boxed("0.5"), boxed("3"), none],  # 2 of 4 right (equivalent forms count)
        [boxed("7"), boxed("7"), boxed("7"), boxed("7")],  # 4 of 4
    ]
    r = score_samples(["\\frac{1}{2}", "7"], samples)
    assert r.score == pytest.approx((0.5 + 1.0) / 2)
    assert r.answer_rate == pytest.approx(7 / 8)
    assert r.self_agreement == pytest.approx((2 / 4 + 4 / 4) / 2)
    assert r.mean_length == pytest.approx((3 * 7 + 2) / 8)
    assert r.entropy == pytest.approx((0.5 * 21 + 2.0 * 2) / 23)
    assert (r.n_items, r.n_samples) == (2, 8)
    assert r.item_scores == (0.5, 1.0) and "item_scores" not in r.as_dict()


def test_the_reason_gives_the_paired_noise():
    cur = EvalResult(0.5, 1, 1, 10, 0.5, 4, 32, item_scores=(0.5, 0.5, 0.5, 0.5))
    cand = EvalResult(0.4, 1, 1, 10, 0.5, 4, 32, item_scores=(0.3, 0.5, 0.3, 0.5))
    assert paired_stderr(cur, cand) == pytest.approx(0.0577, abs=1e-4)
    d = decide(cur, cand, GATE)
    assert not d.promote and "difference -0.100 ± 0.058 s.e. over 4 items" in d.reasons[0]
    assert paired_stderr(cur, _res()) is None


def test_a_candidate_within_tolerance_is_promoted():
    d = decide(_res(0.50), _res(0.49), GATE)
    assert d.promote and d.reasons == [] and d.delta == pytest.approx(-0.01)
    assert decide(_res(0.5), _res(0.7), GATE).promote


def test_a_worse_candidate_is_rejected_with_the_reason():
    d = decide(_res(0.50), _res(0.40), GATE)
    assert not d.promote and "regression score fell from 0.500 to 0.400" in d.reasons[0]


@pytest.mark.parametrize("candidate, words", [
    (_res(entropy=0.3), "entropy collapsed"),
    (_res(answer_rate=0.7), "share of samples with an answer fell"),
    (_res(length=25.0), "mean response length moved"),
    (_res(length=4.0, entropy=1.0), None),  # shorter by 60%: within max_length_change=1.0
])
def test_collapse_signals_reject_even_an_equal_score(candidate, words):
    d = decide(_res(), candidate, GATE)
    if words is None:
        assert d.promote, d.reasons
    else:
        assert not d.promote and any(words in r for r in d.reasons), d.reasons


def test_disabled_signals_are_not_checked():
    gate = SimpleNamespace(**{**vars(GATE), "max_entropy_drop": None, "max_answer_rate_drop": None,
                              "max_length_change": None})
    assert decide(_res(), _res(entropy=0.01, answer_rate=0.0, length=100.0), gate).promote


def test_training_events_and_an_empty_regression_set_block_promotion():
    d = decide(_res(), _res(0.9), GATE, training_events=["step 2: non-finite loss"])
    assert not d.promote and d.reasons == ["training: step 2: non-finite loss"]
    d = decide(_res(items=0), _res(items=0), GATE)
    assert not d.promote and "no regression set yet" in d.reasons[0]


def test_only_confident_votes_are_frozen():
    assert freezable([0.9, 0.5, 0.75, 1.0], ["1", "2", "3", None], 0.75) == [0, 2]


def test_the_contrarian_reward_is_ttrl_inverted_per_prompt():
    """The harmful reward of the integration test: 1 exactly where TTRL's majority-vote reward is 0."""
    from ttrl.rewards import build_reward
    from ttrl.serve.testing import contrarian_reward

    answers = ["12", "12.0", "13", None, "5", "6", "6"]
    ids = ["a", "a", "a", "a", "b", "b", "b"]
    out = contrarian_reward(prompts=[""] * 7, completions=[""] * 7, answers=answers, prompt_ids=ids)
    assert out == [0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0]  # "12.0" ≡ "12" joins the majority
    # It loads as reward=custom (the signature check of ttrl/rewards/custom.py passes).
    build_reward("custom", fn="ttrl.serve.testing:contrarian_reward", needs_ground_truth=False)
