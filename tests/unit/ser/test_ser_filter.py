"""SER's learning-status filter and stop rule on hand-made score tables."""

from __future__ import annotations

import math

import pytest

from ttrl.ser.filter import (
    PairDecision,
    judge_pair,
    judge_pairs,
    judge_point,
    rounds_without_improvement,
    sigmoid,
    stop_reason,
    summarize_pairs,
    summarize_points,
)

pytestmark = pytest.mark.unit

RULE = {"high": 0.55, "low": 0.45, "min_gap": 0.3}


# ── status 1: one response above `high`, the other below `low` ────────────
@pytest.mark.parametrize("p_a, p_b, a_better", [
    (0.90, 0.10, True),
    (0.56, 0.44, True),   # just past both thresholds: kept although the gap is only 0.12
    (0.10, 0.90, False),  # b is the better one: chosen/rejected swap to follow the model
    (0.44, 0.56, False),
])
def test_status1_keeps_and_labels_by_the_model(p_a, p_b, a_better):
    assert judge_pair(p_a, p_b, **RULE) == PairDecision(1, a_better)


def test_status1_thresholds_are_strict():
    # Exactly on a threshold is not "above"/"below"; the gap (0.10) is too small for status 2.
    assert judge_pair(0.55, 0.45, **RULE) == PairDecision(0, None)
    assert judge_pair(0.55, 0.40, **RULE).status == 0
    assert judge_pair(0.60, 0.45, **RULE).status == 0


# ── status 2: otherwise, |p_a - p_b| > min_gap ────────────────────────────
@pytest.mark.parametrize("p_a, p_b, a_better", [
    (0.95, 0.60, True),   # both "good", but far apart: 0.35 > 0.3
    (0.60, 0.95, False),  # same, swapped
    (0.40, 0.05, True),   # both "bad", far apart
    (0.05, 0.40, False),
])
def test_status2_keeps_confident_differences(p_a, p_b, a_better):
    d = judge_pair(p_a, p_b, **RULE)
    assert d == PairDecision(2, a_better)
    assert d.keep


@pytest.mark.parametrize("p_a, p_b", [
    (0.95, 0.70),   # gap 0.25: both high, not far enough apart
    (0.30, 0.10),   # gap 0.20: both low
    (0.50, 0.50),   # the RM cannot tell
    (0.50, 0.20),   # gap exactly 0.3 is not "more than"
    (0.52, 0.48),   # on the right sides of 0.5 but inside the band
])
def test_unsure_pairs_wait(p_a, p_b):
    d = judge_pair(p_a, p_b, **RULE)
    assert d == PairDecision(0, None)
    assert not d.keep


def test_status1_takes_precedence_over_status2():
    # 0.9 vs 0.1 passes both rules; it is counted as status 1.
    assert judge_pair(0.9, 0.1, **RULE).status == 1


def test_status2_can_be_switched_off():
    assert judge_pair(0.95, 0.60, **RULE, use_status2=False).status == 0
    assert judge_pair(0.95, 0.10, **RULE, use_status2=False).status == 1


def test_a_score_table_counts_and_self_label_accuracy():
    # Six pairs; truth says whether response a is really the better one.
    p_a = [0.90, 0.20, 0.95, 0.50, 0.10, 0.70]
    p_b = [0.10, 0.80, 0.60, 0.50, 0.60, 0.65]
    truth = [True, False, False, None, False, True]
    ds = judge_pairs(p_a, p_b, **RULE)
    assert [d.status for d in ds] == [1, 1, 2, 0, 1, 0]
    assert [d.a_better for d in ds] == [True, False, True, None, False, None]
    s = summarize_pairs(ds, truth)
    assert s["kept_status1"] == 3 and s["kept_status2"] == 1 and s["kept"] == 4
    # Kept and graded: pairs 0, 1, 2, 4; the status-2 pair (2) is labelled wrongly.
    assert s["self_label_graded"] == 4 and s["self_label_correct"] == 3
    assert s["self_label_accuracy"] == pytest.approx(0.75)


def test_judge_pairs_checks_lengths():
    with pytest.raises(ValueError, match="3 scores for response a but 2"):
        judge_pairs([0.1, 0.2, 0.3], [0.1, 0.2], **RULE)


def test_nothing_kept_has_nan_accuracy():
    s = summarize_pairs([PairDecision(0, None)], [True])
    assert s["kept"] == 0 and math.isnan(s["self_label_accuracy"])


# ── pointwise ─────────────────────────────────────────────────────────────
def test_pointwise_status1_only():
    assert judge_point(0.9).correct is True
    assert judge_point(0.1).correct is False
    assert not judge_point(0.5).keep
    assert not judge_point(0.55).keep and not judge_point(0.45).keep
    ds = [judge_point(p) for p in (0.9, 0.1, 0.5, 0.3)]
    s = summarize_points(ds, [True, True, False, False])
    assert s["kept"] == 3 and s["kept_positive"] == 1
    assert s["self_label_accuracy"] == pytest.approx(2 / 3)


def test_sigmoid_is_stable_and_symmetric():
    assert sigmoid(0.0) == 0.5
    assert sigmoid(1000.0) == 1.0 and sigmoid(-1000.0) == 0.0
    assert sigmoid(2.0) == pytest.approx(1 - sigmoid(-2.0))


# ── the stop rule ─────────────────────────────────────────────────────────
def test_rounds_without_improvement():
    assert rounds_without_improvement([0.6]) == 0
    assert rounds_without_improvement([0.6, 0.7, 0.8]) == 0
    assert rounds_without_improvement([0.6, 0.7, 0.65]) == 1
    assert rounds_without_improvement([0.6, 0.7, 0.7, 0.69]) == 2   # a tie is no improvement
    assert rounds_without_improvement([0.7, 0.6, 0.72]) == 0        # a new best resets the count
    assert rounds_without_improvement([0.70, 0.705], min_delta=0.01) == 1


def test_stop_when_no_new_pair_passes():
    assert "no unlabelled pair passed" in stop_reason(2, 0, [0.6, 0.7], max_rounds=5, patience=2)


def test_stop_on_patience():
    assert stop_reason(1, 10, [0.6, 0.7], max_rounds=5, patience=1) is None
    assert "not improved for 1 round" in stop_reason(2, 10, [0.6, 0.7, 0.7], max_rounds=5, patience=1)
    assert stop_reason(2, 10, [0.6, 0.7, 0.65], max_rounds=5, patience=2) is None
    assert "not improved for 2 round" in stop_reason(3, 10, [0.6, 0.7, 0.65, 0.66], max_rounds=5, patience=2)


def test_stop_at_max_rounds():
    assert stop_reason(2, 10, [0.6, 0.7, 0.8], max_rounds=3, patience=1) is None
    assert "max_rounds=3" in stop_reason(3, 10, [0.6, 0.7, 0.8, 0.9], max_rounds=3, patience=1)


def test_no_new_pairs_wins_over_other_reasons():
    assert "no unlabelled pair" in stop_reason(3, 0, [0.9, 0.5], max_rounds=3, patience=1)
