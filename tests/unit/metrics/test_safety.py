"""Collapse detectors and the run's guard, on scripted metric streams (no engine).

`FakeRuntime` stands in for the distributed Runtime: it records what the
guard asks of it (load a checkpoint, scale the lr, sync) and nothing else.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from ttrl.config import TTRLConfig
from ttrl.metrics.safety import CollapseDetector, Guard


def _cfg(**safety):
    cfg = OmegaConf.structured(TTRLConfig)
    for k, v in safety.items():
        cfg.safety[k] = v
    return cfg


class FakeRuntime:
    def __init__(self):
        self.calls: list[tuple] = []

    def load(self, path):
        self.calls.append(("load", path))

    def scale_lr(self, factor):
        self.calls.append(("scale_lr", factor))
        return 1e-5 * factor

    def sync_weights(self):
        self.calls.append(("sync",))
        return {}


def test_majority_ratio_and_entropy_use_a_moving_average():
    det = CollapseDetector(_cfg(window=3, max_majority_ratio=0.9, min_entropy=0.05).safety)
    assert det.update({"label/majority_ratio": 0.99, "train/entropy": 0.01}) == []  # window not full yet
    assert det.update({"label/majority_ratio": 0.99, "train/entropy": 0.5}) == []
    events = det.update({"label/majority_ratio": 0.95, "train/entropy": 0.5})
    assert [e.signal for e in events] == ["label/majority_ratio"]  # entropy mean 0.337 is fine
    assert "0.9767" in events[0].message and "above 0.9" in events[0].message


def test_response_length_bounds_and_eval_drop():
    det = CollapseDetector(_cfg(window=1, min_response_length=4.0, max_response_length=100.0,
                                max_eval_drop=0.1).safety)
    assert [e.signal for e in det.update({"rollout/response_length": 2.0})] == ["rollout/response_length"]
    assert [e.signal for e in det.update({"rollout/response_length": 200.0})] == ["rollout/response_length"]
    assert det.update({"eval/pass@1": 0.50}) == []
    assert det.update({"eval/pass@1": 0.45}) == []  # within the allowed drop
    assert [e.signal for e in det.update({"eval/pass@1": 0.39})] == ["eval/pass@1"]


def test_disabled_thresholds_never_fire():
    det = CollapseDetector(_cfg(window=1).safety)
    for _ in range(5):
        assert det.update({"label/majority_ratio": 1.0, "train/entropy": 0.0, "eval/pass@1": 0.0}) == []


@pytest.mark.parametrize("action", ["warn", "stop", "rollback"])
def test_guard_applies_each_action(action, tmp_path):
    cfg = _cfg(window=2, max_majority_ratio=0.9, action=action, lr_factor=0.5, max_eval_drop=0.5)
    rt = FakeRuntime()
    guard = Guard(cfg, rt, tmp_path)
    guard.saved(tmp_path / "checkpoints" / "step_2", eval_pass1=0.6)
    guard.saved(tmp_path / "checkpoints" / "step_4", eval_pass1=0.4)  # worse: not the rollback target
    rows = [{"step": s, "label/majority_ratio": r} for s, r in [(5, 0.5), (6, 0.95), (7, 0.99)]]
    reasons = [guard.check(row) for row in rows]
    assert reasons[:2] == [None, None]
    fired = rows[2]
    assert "label/majority_ratio" in fired["event/collapse"] and fired["event/action"] == action
    if action == "warn":
        assert reasons[2] is None and rt.calls == []
    elif action == "stop":
        assert "safety.action=stop" in reasons[2] and rt.calls == []
    else:
        assert reasons[2] is None
        assert rt.calls == [("load", str(tmp_path / "checkpoints" / "step_2")), ("scale_lr", 0.5), ("sync",)]
        assert fired["event/rollback_to"].endswith("step_2")
        assert fired["event/lr_after_rollback"] == pytest.approx(5e-6)


def test_guard_rollback_limit_then_stop(tmp_path):
    cfg = _cfg(window=1, max_majority_ratio=0.9, action="rollback", max_rollbacks=1, max_eval_drop=0.5)
    rt = FakeRuntime()
    guard = Guard(cfg, rt, tmp_path)
    guard.saved(Path("ck/step_1"), eval_pass1=0.5)
    assert guard.check({"step": 2, "label/majority_ratio": 1.0}) is None  # first rollback
    rt.calls.clear()
    row = {"step": 3, "label/majority_ratio": 1.0}
    reason = guard.check(row)
    assert reason and "no rollback left" in reason
    # Out of rollbacks, the run still ends on its best weights, not the collapsed ones.
    assert rt.calls == [("load", "ck/step_1"), ("sync",)]
    assert row["event/action"] == "restored best, stopping" and "ck/step_1" in reason


def test_guard_without_a_checkpoint_stops(tmp_path):
    cfg = _cfg(window=1, max_majority_ratio=0.9, action="rollback")
    rt = FakeRuntime()
    guard = Guard(cfg, rt, tmp_path)
    reason = guard.check({"step": 1, "label/majority_ratio": 1.0})
    assert reason and "no checkpoint to roll back to" in reason and rt.calls == []


def test_label_free_guard_rolls_back_to_the_start_and_logs_its_first_step(tmp_path):
    # No graded signal watched (max_eval_drop null): the target is not chosen by a
    # ground-truth score, however good a later evaluated checkpoint looked.
    cfg = _cfg(window=1, max_flip_rate=0.3, action="rollback", lr_factor=0.5)
    rt = FakeRuntime()
    guard = Guard(cfg, rt, tmp_path)
    guard.saved(tmp_path / "checkpoints" / "step_0", eval_pass1=0.5)
    guard.saved(tmp_path / "checkpoints" / "step_10", eval_pass1=0.9)
    first = {"step": 11, "label/flip_rate": 0.5}
    assert guard.check(first) is None
    assert first["safety/collapse_step"] == 11 and "label/flip_rate" in first["safety/reason"]
    assert rt.calls[0] == ("load", str(tmp_path / "checkpoints" / "step_0"))
    later = {"step": 12, "label/flip_rate": 0.6}
    guard.check(later)
    assert "safety/collapse_step" not in later  # only the first firing is the collapse step


def test_vote_signals_are_off_for_a_ground_truth_reward(tmp_path):
    cfg = _cfg(window=1, max_flip_rate=0.3, max_first_vote_drift=0.2)
    guard = Guard(cfg, FakeRuntime(), tmp_path, label_free=False)
    row = {"step": 5, "label/flip_rate": 0.9, "label/first_vote_drift": 0.9}
    assert guard.check(row) is None and "safety/collapse_step" not in row


def test_guard_counts_consecutive_skips(tmp_path):
    cfg = _cfg()
    cfg.trainer.max_skipped_steps = 2
    guard = Guard(cfg, FakeRuntime(), tmp_path)
    assert guard.check({"step": 1, "train/skipped": 1.0}) is None
    assert guard.check({"step": 2, "train/skipped": 0.0}) is None  # streak broken
    assert guard.check({"step": 3, "train/skipped": 1.0}) is None
    reason = guard.check({"step": 4, "train/skipped": 1.0})
    assert reason and "2 updates in a row" in reason and "non-finite" in reason


def test_a_step_skipped_for_a_failing_extractor_says_why(tmp_path):
    cfg = _cfg()
    cfg.trainer.max_skipped_steps = 2
    guard = Guard(cfg, FakeRuntime(), tmp_path)
    why = "custom answer extractor 'pkg.mod:fn' raised ValueError: bad (prompt 'p7')"
    row = {"step": 1, "train/skipped": 1.0, "event/skip_reason": why}
    assert guard.check(row) is None
    assert row["event/skipped_update"].startswith(why)
    reason = guard.check({"step": 2, "train/skipped": 1.0, "event/skip_reason": why})
    assert reason and "2 updates in a row" in reason and "pkg.mod:fn" in reason and "p7" in reason


# ── label-free vote signals ──────────────────────────────────────────────
def _vote(label, ratio, classes=2):
    from ttrl.labeling.vote import Vote

    counts = {label: 1} if label is not None else {}
    counts |= {f"other{i}": 1 for i in range(classes - len(counts))}
    return Vote(label=label, ratio=ratio, counts=counts)


def test_vote_tracker_flip_rate_counts_only_confident_previous_votes():
    from ttrl.metrics.safety import VoteTracker

    t = VoteTracker(confident=0.5)
    first = t.update(["a", "b", "c"], [_vote("1", 0.8), _vote("2", 0.3), _vote("3", 0.6)])
    assert "label/flip_rate" not in first and "label/first_vote_drift" not in first  # nothing revisited yet
    # a (was confident) flips, b (was not) flips, c (was confident) holds.
    row = t.update(["a", "b", "c"], [_vote("9", 0.5), _vote("8", 0.4), _vote(" 3", 0.7)])
    assert row["label/flip_rate"] == pytest.approx(1 / 2)
    assert row["label/first_vote_drift"] == pytest.approx(2 / 3)  # " 3" is "3": white space ignored
    # a flips back to its first vote: no drift for it any more, but a confident flip again.
    row = t.update(["a"], [_vote("1", 0.9)])
    assert row["label/flip_rate"] == 1.0 and row["label/first_vote_drift"] == 0.0


def test_vote_tracker_counts_distinct_answers():
    from ttrl.metrics.safety import VoteTracker

    row = VoteTracker().update(["a", "b"], [_vote("1", 0.5, classes=4), _vote(None, 0.0, classes=0)])
    assert row["label/distinct_answers"] == 2.0


def test_vote_tracker_anchor_measures_drift_from_the_first_step():
    from ttrl.metrics.safety import VoteTracker

    t = VoteTracker()
    t.anchor(["a", "b"], [_vote("1", 0.6), _vote("2", 0.4)])
    row = t.update(["a", "b", "c"], [_vote("1", 0.7), _vote("5", 0.5), _vote("3", 0.9)])
    # a and b are compared with their anchors (b drifted); c has no anchor and is a first visit.
    assert row["label/first_vote_drift"] == pytest.approx(1 / 2)
    assert "label/flip_rate" not in row  # flips need a previous training-time vote


def test_vote_tracker_consensus_change_pairs_each_prompt_with_its_anchor():
    from ttrl.metrics.safety import VoteTracker

    t = VoteTracker()
    t.anchor(["a", "b"], [_vote("1", 0.6), _vote("2", 0.4)])
    # a: 0.6 -> 0.3 (its vote holds, its consensus halves); b: 0.4 -> 0.5; c: a first visit, no pair yet.
    row = t.update(["a", "b", "c"], [_vote("1", 0.3), _vote("7", 0.5), _vote("3", 0.9)])
    assert row["label/consensus_change"] == pytest.approx(((0.3 - 0.6) + (0.5 - 0.4)) / 2)
    # c's first visit is its reference from now on; the anchors stay the reference for a and b.
    row = t.update(["c", "a"], [_vote("3", 0.7), _vote("1", 0.8)])
    assert row["label/consensus_change"] == pytest.approx(((0.7 - 0.9) + (0.8 - 0.6)) / 2)


def test_consensus_drop_fires_below_its_negative_limit_and_only_for_label_free_runs():
    rows = [{"label/consensus_change": v} for v in (-0.01, -0.05, -0.06)]  # averages -0.04 at the third
    det = CollapseDetector(_cfg(window=3, max_consensus_drop=0.03).safety)
    assert [det.update(r) for r in rows[:2]] == [[], []]
    events = det.update(rows[2])
    assert [e.signal for e in events] == ["label/consensus_change"] and "below -0.03" in events[0].message
    quiet = CollapseDetector(_cfg(window=3, max_consensus_drop=0.03).safety, vote_signals=False)
    assert [quiet.update(r) for r in rows] == [[], [], []]
    off = CollapseDetector(_cfg(window=3, max_consensus_drop=None).safety)
    assert [off.update(r) for r in rows] == [[], [], []]


def test_vote_alignment_reads_which_side_of_the_vote_the_reward_pays():
    from ttrl.labeling.vote import majority_vote
    from ttrl.metrics.safety import vote_alignment

    vote = majority_vote(["7", "7", "7", "9"])  # samples 0-2 agree, 3 does not
    assert vote_alignment([[1, 1, 1, 0]], [vote]) == {"label/vote_alignment": 1.0}   # majority vote's reward
    assert vote_alignment([[0, 0, 0, 1]], [vote]) == {"label/vote_alignment": 0.0}   # pays the dissenter
    # Pairs (agree, dissent): 0.5 beats 0.2, ties 0.3 (half), loses to 0.9 -> (1 + 0.5 + 0) / 3.
    assert vote_alignment([[0.5, 0.3, 0.1, 0.3]], [vote])["label/vote_alignment"] == pytest.approx(0.5)
    # Prompts that push nothing either way are left out: all equal rewards, a unanimous vote, no answer at all.
    unanimous, none = majority_vote(["4", "4", "4", "4"]), majority_vote([None, None, None, None])
    # (and a prompt with no vote object at all)
    rows = vote_alignment([[0.2] * 4, [1, 0, 0, 0], [1, 0, 1, 0], [1, 0, 0, 1], [0, 0, 0, 1]],
                          [vote, unanimous, none, None, vote])
    assert rows == {"label/vote_alignment": 0.0}
    assert vote_alignment([[1, 1, 1, 1]], [vote]) == {}


def test_vote_alignment_fires_below_its_limit_and_only_for_label_free_runs():
    rows = [{"label/vote_alignment": v} for v in (0.45, 0.35, 0.3)]  # averages 0.367 at the third
    det = CollapseDetector(_cfg(window=3, min_vote_alignment=0.4).safety)
    assert [det.update(r) for r in rows[:2]] == [[], []]
    events = det.update(rows[2])
    assert [e.signal for e in events] == ["label/vote_alignment"] and "below 0.4" in events[0].message
    assert [CollapseDetector(_cfg(window=3).safety, vote_signals=False).update(r) for r in rows] == [[], [], []]
    assert [CollapseDetector(_cfg(window=3, min_vote_alignment=None).safety).update(r) for r in rows] == [[], [], []]


@pytest.mark.parametrize("key, value", [("max_flip_rate", 1.5), ("max_first_vote_drift", -0.1),
                                        ("flip_confident", 2.0), ("anchor_prompts", -1),
                                        ("max_consensus_drop", 1.5), ("min_vote_alignment", 1.2)])
def test_vote_signal_settings_are_validated_naming_the_key(key, value):
    from tests.conftest import compose_config
    from ttrl.config import ConfigError, validate

    with pytest.raises(ConfigError, match=f"safety.{key}"):
        validate(compose_config("experiment=debug", f"safety.{key}={value}"))


def test_vote_signals_are_on_by_default():
    cfg = _cfg()
    assert cfg.safety.max_flip_rate is not None and cfg.safety.max_first_vote_drift is not None


# ── the default label-free guard on recorded runs ─────────────────────────
SERIES = json.loads((Path(__file__).parent / "data" / "guard_series.json").read_text())


def _replay(rows, **safety):
    """The first step the guard (defaults + `safety`) fires on, seeing only label-free keys."""
    guard = Guard(_cfg(**safety), FakeRuntime(), Path("unused"))
    for row in rows:
        guard.check({k: v for k, v in row.items() if not k.startswith("eval/")})
    return guard.fired_at


def test_default_guard_fires_on_the_recorded_collapse_at_its_first_full_window():
    rows = SERIES["collapse_grpo_lr1e-4"]
    # Vote signals exist from the first revisit (step 5); a 3-step window is full at step 7.
    assert _replay(rows) == 7
    # Each vote signal alone catches it too, on the same step.
    assert _replay(rows, max_flip_rate=None) == 7
    assert _replay(rows, max_first_vote_drift=None) == 7
    # Graded eval confirms it was a collapse: maj@16 fell from 0.805 to 0.141 by step 10.
    evals = [r for r in rows if "eval/maj@16" in r]
    assert evals[0]["eval/maj@16"] - evals[1]["eval/maj@16"] > 0.5


def test_default_guard_stays_quiet_on_the_recorded_healthy_run():
    rows = SERIES["healthy_demo_drgrpo_lr3e-5"]
    assert _replay(rows) is None
    evals = [r for r in rows if "eval/maj@16" in r]
    assert evals[-1]["eval/pass@1"] - evals[0]["eval/pass@1"] > 0.15  # it was a good run
    # The majority ratio climbs steadily in a healthy run (0.49 -> 0.79): it is no collapse signal by itself.
    assert rows[-1]["label/majority_ratio"] > 0.75


def test_vote_alignment_catches_the_recorded_self_certainty_collapse_at_step_3():
    # reward=self_certainty pays a slipped carry by a hair: the pairs it decides side with the vote under half the
    # time from step 1, and the default guard fires at its first full window. The vote signals saw it at step 7,
    # by when eval maj@16 had fallen 3.9 points at step 5 and was on its way to -8.6 at step 10.
    rows = SERIES["self_certainty_ws0-0_s0"]
    assert _replay(rows) == 3
    assert _replay(rows, min_vote_alignment=None) == 7
    evals = {r["step"]: r["eval/maj@16"] for r in rows if "eval/maj@16" in r}
    assert evals[0] - evals[5] < 0.05 < evals[0] - evals[10]


def test_vote_alignment_stays_high_on_the_recorded_healthy_intrinsic_reward():
    # reward=trajectory_logprob learns (maj@16 0.984 -> 1.000): a slip costs log-prob, so it pays the vote's side.
    rows = SERIES["trajectory_logprob_ws0-0_s0"]
    assert _replay(rows) is None
    assert min(r["label/vote_alignment"] for r in rows if "label/vote_alignment" in r) > 0.9


# ── the default guard on recorded votes (anchored, as runs record them now) ──
VOTES = json.loads((Path(__file__).parent / "data" / "guard_votes.json").read_text())


def _replay_votes(name, **safety):
    from ttrl.metrics.replay import replay_votes

    rows = [{"step": s, "id": i, "label": lab, "ratio": r, "classes": c} for s, i, lab, r, c in VOTES[name]]
    return replay_votes(rows, _cfg(**safety).safety)


def test_consensus_signal_catches_the_recorded_random_reward_run_that_drift_and_flips_miss():
    # A random reward: the votes keep their labels while ever fewer samples agree (eval maj@16 0.984 -> 0.875
    # by step 20). Drift and flips stay under their limits for 30 steps; the consensus change fires at step 11.
    r = _replay_votes("random_ws0-0_s0")
    assert r.anchored == 128 and r.fired_at == 11 and "label/consensus_change" in r.reason
    assert _replay_votes("random_ws0-0_s0", max_consensus_drop=None).fired_at is None
    assert max(x["label/first_vote_drift"] for x in r.rows) < 0.25


def test_default_guard_stays_quiet_on_the_recorded_healthy_votes():
    r = _replay_votes("majority_vote_ws0-0_s0")
    assert r.fired_at is None
    # Healthy test-time training sharpens its votes: the consensus climbs.
    assert r.rows[-1]["label/consensus_change"] > 0.05


def test_drift_floor_is_the_chance_a_fresh_vote_elects_another_winner():
    from ttrl.metrics.safety import drift_floor

    assert drift_floor([16], 16) == 0.0                      # unanimous: a fresh vote agrees
    assert drift_floor([], 16) == 0.0                        # no answers now, none on a fresh draw either
    # A dead heat: the anchor's winner keeps its seat on about half the fresh draws.
    assert drift_floor([8, 8], 16) == pytest.approx(0.5, abs=0.04)
    # 15 of 16: another class wins only if it draws more than the winner's ~15 (never), or ties at 8 (rare).
    assert drift_floor([15, 1], 16) < 0.01
    # The closer the split, the higher the floor.
    assert drift_floor([12, 4], 16) < drift_floor([9, 7], 16) < drift_floor([8, 8], 16)
    assert drift_floor([6, 5, 5], 16) == drift_floor([6, 5, 5], 16)  # seeded: a replay gets the run's value


def test_excess_drift_is_the_drift_above_what_sampling_alone_shows():
    from ttrl.labeling.vote import majority_vote
    from ttrl.metrics.safety import VoteTracker, drift_floor

    def vote(*groups: tuple[str, int]):
        return majority_vote([a for a, k in groups for _ in range(k)], extractor="number")

    t = VoteTracker()
    # a: 14 of 16 agree (floor ~0); b: 6/5/5, a near three-way tie (floor ~0.5).
    t.anchor(["a", "b"], [vote(("1", 14), ("2", 2)), vote(("3", 6), ("4", 5), ("5", 5))])
    fa, fb = drift_floor([14, 2], 16), drift_floor([6, 5, 5], 16)
    assert fa < 0.01 and 0.4 < fb < 0.7
    # b's vote moves (as sampling alone would about half the time), a's holds.
    row = t.update(["a", "b"], [vote(("1", 15), ("2", 1)), vote(("4", 7), ("3", 6), ("5", 3))])
    assert row["label/first_vote_drift"] == 0.5
    assert row["label/drift_floor"] == pytest.approx((fa + fb) / 2)
    assert row["label/excess_drift"] == pytest.approx(0.5 - (fa + fb) / 2)
    # A move on the confident prompt is nearly all excess.
    row = t.update(["a"], [vote(("2", 9), ("1", 7))])
    assert row["label/excess_drift"] == pytest.approx(1 - fa)


def test_excess_drift_limit_fires_on_its_moving_average_only_for_label_free_runs():
    d = CollapseDetector(_cfg(max_excess_drift=0.15, window=3).safety)
    rows = [{"label/excess_drift": x} for x in (0.05, 0.1, 0.2, 0.3)]
    fired = [bool(d.update(r)) for r in rows]
    assert fired == [False, False, False, True]  # windows: -, -, 0.117, 0.2
    off = CollapseDetector(_cfg(max_excess_drift=0.15, window=1).safety, vote_signals=False)
    assert not off.update({"label/excess_drift": 0.9})


def test_excess_flip_rate_is_the_flip_rate_above_what_sampling_alone_shows():
    from ttrl.labeling.vote import majority_vote
    from ttrl.metrics.safety import VoteTracker, drift_floor

    def vote(*groups: tuple[str, int]):
        return majority_vote([a for a, k in groups for _ in range(k)], extractor="number")

    t = VoteTracker(confident=0.5)
    # a: 9 of 16 (confident, floor ~0.3); b: 15 of 16 (floor ~0); c: 6/5/5 (ratio 0.375, not confident).
    t.update(["a", "b", "c"], [vote(("1", 9), ("2", 7)), vote(("3", 15), ("4", 1)),
                               vote(("5", 6), ("6", 5), ("7", 5))])
    fa, fb = drift_floor([9, 7], 16), drift_floor([15, 1], 16)
    assert 0.2 < fa < 0.45 and fb < 0.01
    # a flips (as sampling alone often would), b holds, c flips but was never confident: it counts for neither.
    row = t.update(["a", "b", "c"], [vote(("2", 10), ("1", 6)), vote(("3", 16)), vote(("6", 8), ("5", 8))])
    assert row["label/flip_rate"] == 0.5
    assert row["label/flip_floor"] == pytest.approx((fa + fb) / 2)
    assert row["label/excess_flip_rate"] == pytest.approx(0.5 - (fa + fb) / 2)
    # The floor is the previous vote's: a's 10/6 vote now, b's unanimous one; b flipping is all excess.
    row = t.update(["a", "b"], [vote(("2", 10), ("1", 6)), vote(("4", 9), ("3", 7))])
    assert row["label/flip_floor"] == pytest.approx((drift_floor([10, 6], 16) + 0.0) / 2)
    assert row["label/excess_flip_rate"] == pytest.approx(0.5 - row["label/flip_floor"])


def test_a_replay_judges_flips_above_their_floor_and_an_old_row_without_sizes_has_none():
    from ttrl.metrics.replay import replay_votes

    # Four prompts, each split 9/7 on every visit, its winner trading places each step: the raw flip rate is
    # 1.0, all of it at a ratio where sampling alone flips the winner about a third of the time.
    rows = [{"step": s, "id": f"p{i}", "label": str(s % 2), "ratio": 0.5625, "classes": 2, "sizes": [9, 7], "n": 16}
            for s in range(1, 7) for i in range(4)]
    safety = _cfg(max_flip_rate=None, max_first_vote_drift=None, max_consensus_drop=None, min_vote_alignment=None,
                  window=3).safety
    assert replay_votes(rows, safety).fired_at is None
    safety.max_excess_flip_rate = 0.5
    r = replay_votes(rows, safety)
    # Flips from step 2 on (step 1 is every prompt's first visit): the first full window ends at step 4.
    assert r.fired_at == 4 and "label/excess_flip_rate" in r.reason
    old = [{k: v for k, v in row.items() if k not in ("sizes", "n")} for row in rows]
    assert "label/excess_flip_rate" not in replay_votes(old, safety).rows[-1]
