"""Preference data: row validation naming file and line, presets, and the synthetic task
(whose chosen/rejected must differ in their sums only, not in length, position or direction)."""

from __future__ import annotations

import json
import random
import re

import pytest

from tests.conftest import compose_config
from ttrl.config import ConfigError
from ttrl.data.preferences import (
    DataError,
    PreferencePair,
    load_preference_file,
    row_to_pair,
    split_pairs,
    synthetic_points,
    synthetic_preferences,
    unordered,
    wrong_answer,
)
from ttrl.labeling.extract import extract_answer

pytestmark = pytest.mark.unit


def _write(tmp_path, rows, name="prefs.jsonl"):
    p = tmp_path / name
    p.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return p


# ── files ─────────────────────────────────────────────────────────────────
def test_jsonl_file_loads(tmp_path):
    p = _write(tmp_path, [{"prompt": "q1", "chosen": "good", "rejected": "bad"},
                          {"id": "x", "prompt": "q2", "chosen": "yes", "rejected": "no"}])
    pairs = load_preference_file(str(p))
    assert pairs == [PreferencePair("0", "q1", "good", "bad"), PreferencePair("x", "q2", "yes", "no")]


@pytest.mark.parametrize("row, message", [
    ({"prompt": "q", "chosen": "a"}, r"missing field 'rejected' \(set ser.rejected_key"),
    ({"chosen": "a", "rejected": "b"}, r"missing field 'prompt' \(set ser.prompt_key"),
    ({"prompt": "q", "chosen": "", "rejected": "b"}, r"'chosen' is empty"),
    ({"prompt": "q", "chosen": "same", "rejected": "same"}, r"identical"),
    ({"prompt": "q", "chosen": 3, "rejected": "b"}, r"'chosen' must be a string"),
    (["not", "an", "object"], r"expected a JSON object"),
])
def test_bad_rows_name_file_and_line(tmp_path, row, message):
    p = _write(tmp_path, [{"prompt": "q", "chosen": "a", "rejected": "b"}, row])
    with pytest.raises(DataError, match=rf"{re.escape(str(p))}:2: .*{message}"):
        load_preference_file(str(p))


def test_invalid_json_and_missing_or_empty_files(tmp_path):
    p = _write(tmp_path, [{"prompt": "q", "chosen": "a", "rejected": "b"}, "{oops"])
    with pytest.raises(DataError, match=rf"{re.escape(str(p))}:2: not valid JSON"):
        load_preference_file(str(p))
    with pytest.raises(DataError, match="does not exist"):
        load_preference_file(str(tmp_path / "nope.jsonl"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="holds no rows"):
        load_preference_file(str(empty))


def test_renamed_fields_stack_exchange_style(tmp_path):
    p = _write(tmp_path, [{"question": "q", "response_j": "good", "response_k": "bad"}])
    pairs = load_preference_file(str(p), prompt_key="question", chosen_key="response_j", rejected_key="response_k")
    assert pairs[0].prompt == "q" and pairs[0].chosen == "good" and pairs[0].rejected == "bad"


def test_whole_conversations_split_at_the_marker_hh_rlhf_style():
    row = {"chosen": "\n\nHuman: hi\n\nAssistant: hello!\n\nHuman: joke?\n\nAssistant: a good one",
           "rejected": "\n\nHuman: hi\n\nAssistant: hello!\n\nHuman: joke?\n\nAssistant: no"}
    pair = row_to_pair(row, "hh[train] index 0", prompt_key=None, prompt_marker="\n\nAssistant:")
    assert pair.prompt.endswith("joke?\n\nAssistant:")
    assert pair.chosen == " a good one" and pair.rejected == " no"
    bad = dict(row, rejected="\n\nHuman: other\n\nAssistant: no")
    with pytest.raises(DataError, match="hh\\[train\\] index 0: .*must share the prompt"):
        row_to_pair(bad, "hh[train] index 0", prompt_key=None, prompt_marker="\n\nAssistant:")
    with pytest.raises(DataError, match="does not contain the prompt marker"):
        row_to_pair({"chosen": "x", "rejected": "y"}, "f:1", prompt_key=None, prompt_marker="\n\nAssistant:")


def test_chat_message_lists_ultrafeedback_style():
    row = {"prompt": "What is 2+2?",
           "chosen": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}],
           "rejected": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "5"}]}
    pair = row_to_pair(row, "uf index 0")
    assert (pair.prompt, pair.chosen, pair.rejected) == ("What is 2+2?", "4", "5")


def test_split_and_unordered_hide_the_order():
    pairs = synthetic_preferences(200, seed=3)
    rest, held = split_pairs(pairs, 0.1, seed=0)
    assert len(held) == 20 and len(rest) == 180 and not {p.id for p in rest} & {p.id for p in held}
    un = unordered(rest, seed=0)
    share_a = sum(u.a_better for u in un) / len(un)
    assert 0.35 < share_a < 0.65
    for u, p in zip(un, rest):
        assert u.as_labelled(u.a_better) == p  # the truth rebuilds the original pair


# ── the synthetic task ────────────────────────────────────────────────────
def test_synthetic_pairs_are_right_vs_plausibly_wrong():
    pairs = synthetic_preferences(1000, terms=3, digits=2, seed=7)
    assert len({p.prompt for p in pairs}) == 1000
    for p in pairs:
        nums = [int(x) for x in p.prompt.rstrip("=").split("+")]
        right, wrong = extract_answer(p.chosen), extract_answer(p.rejected)
        assert int(right) == sum(nums)
        assert int(wrong) != sum(nums)
        assert len(p.chosen) == len(p.rejected)          # length is no cue


def test_synthetic_wrong_answers_carry_no_direction_or_digit_cue():
    pairs = synthetic_preferences(2000, seed=7)
    above = sum(int(extract_answer(p.rejected)) > int(extract_answer(p.chosen)) for p in pairs) / len(pairs)
    assert 0.4 < above < 0.6                            # "bigger is wrong" is no rule
    # The last digit of right and wrong answers is spread alike (no parity cue).
    odd_right = sum(int(extract_answer(p.chosen)) % 2 for p in pairs) / len(pairs)
    odd_wrong = sum(int(extract_answer(p.rejected)) % 2 for p in pairs) / len(pairs)
    assert abs(odd_right - odd_wrong) < 0.1
    # Several kinds of slip: off by 1 or 2, by 10, by 100, swaps, dropped carries.
    diffs = {abs(int(extract_answer(p.rejected)) - int(extract_answer(p.chosen))) for p in pairs}
    assert {1, 2, 10, 100} <= diffs and len(diffs) > 10


def test_worked_solutions_slip_in_one_step_and_carry_it_through():
    pairs = synthetic_preferences(500, seed=7, style="worked")
    for p in pairs:
        nums = [int(x) for x in p.prompt.rstrip("=").split("+")]
        assert p.chosen.startswith(f"{nums[0]}+{nums[1]}=") and int(extract_answer(p.chosen)) == sum(nums)
        assert int(extract_answer(p.rejected)) != sum(nums)
        assert len(p.chosen) == len(p.rejected)
        # The rejected solution is consistent after its slip: every later step adds right.
        steps = p.rejected.split(" ")[0].split(",")
        bad = [s for s in steps if eval(s.split("=")[0]) != int(s.split("=")[1])]
        assert len(bad) == 1
    with pytest.raises(DataError, match="style"):
        synthetic_preferences(3, style="essay")


def test_wrong_answer_keeps_digit_count():
    rng = random.Random(0)
    for nums in [(1, 2, 6), (33, 33, 33), (50, 49, 1), (99, 99, 99), (10, 10, 80)]:
        for _ in range(50):
            w = wrong_answer(nums, rng)
            assert w != sum(nums) and len(str(w)) == len(str(sum(nums)))


def test_pointwise_file_rows_are_validated_and_graded_against_the_answer(tmp_path):
    from ttrl.data.preferences import load_point_file

    p = _write(tmp_path, [{"problem": "1+1=", "response": "so \\boxed{2}", "answer": 2},
                          {"problem": "1+2=", "response": "\\boxed{\\frac{6}{2}}", "answer": "3"},
                          {"problem": "2+2=", "response": "no box", "answer": "4"}], "points.jsonl")
    items = load_point_file(str(p))
    assert [it.correct for it in items] == [True, True, False]
    assert items[0].answer == "2"
    bad = _write(tmp_path, [{"problem": "1+1=", "response": "x", "answer": "2"}, {"problem": "q", "response": "x"}],
                 "bad.jsonl")
    with pytest.raises(DataError, match=rf"{re.escape(str(bad))}:2: missing or empty 'answer' \(set ser.answer_key"):
        load_point_file(str(bad))


def test_synthetic_points_are_graded():
    items = synthetic_points(100, per_problem=2, seed=1)
    assert len(items) == 200 and all(it.answer is not None for it in items)
    for it in items:
        nums = [int(x) for x in it.prompt.rstrip("=").split("+")]
        assert (int(extract_answer(it.response)) == sum(nums)) == it.correct
    assert 0.35 < sum(it.correct for it in items) / len(items) < 0.65


# ── configs ───────────────────────────────────────────────────────────────
@pytest.mark.parametrize("preset, source", [("synthetic", "synthetic"), ("synthetic_pointwise", "synthetic"),
                                            ("hh_rlhf", "hf"), ("ultrafeedback", "hf"), ("summarize", "hf"),
                                            ("stack_exchange", "hf")])
def test_presets_compose(preset, source):
    cfg = compose_config(f"ser={preset}", "reward=reward_model", "reward.path=ser", "ser.then_policy=true")
    assert cfg.ser.enabled and cfg.ser.source == source and cfg.ser.preset == preset


def test_ser_experiments_compose():
    cfg = compose_config("experiment=debug_ser")
    assert cfg.ser.enabled and cfg.ser.max_rounds == 1
    assert cfg.algorithm.name == "ppo" and cfg.reward.name == "reward_model" and cfg.reward.path == "ser"
    assert cfg.trainer.total_steps == 2
    cfg = compose_config("experiment=ser_synthetic")
    assert cfg.ser.enabled and cfg.reward.path == "ser" and cfg.algorithm.name == "ppo"
    cfg = compose_config("experiment=ser_synthetic", "ser.synthetic_style=worked")
    assert cfg.ser.synthetic_style == "worked" and cfg.ser.rm.head == "scalar"
    # ser_demo: the demo's policy run (data, eval, steps) behind a likelihood-head SER stage.
    demo, cfg = compose_config("experiment=demo"), compose_config("experiment=ser_demo")
    assert cfg.ser.synthetic_style == "worked" and cfg.ser.rm.head == "likelihood"
    assert (cfg.data, cfg.eval, cfg.rollout, cfg.trainer.total_steps) == (demo.data, demo.eval, demo.rollout,
                                                                           demo.trainer.total_steps)
    assert cfg.model == demo.model and cfg.algorithm.name == "ppo" and cfg.reward.path == "ser"
    # The RM alone needs no reward override (no policy stage runs).
    assert compose_config("experiment=ser_demo", "ser.then_policy=false").ser.enabled


@pytest.mark.parametrize("overrides, message", [
    (["ser=synthetic", "ser.high=0.4"], "ser.low=0.45 and ser.high=0.4"),
    (["ser=synthetic", "ser.seed_fraction=0"], "ser.seed_fraction=0"),
    (["ser=synthetic", "ser.rm.batch_size=30", "ser.rm.micro_batch_size=8"], "ser.rm.batch_size=30"),
    (["ser=synthetic", "ser.mode=listwise"], "ser.mode='listwise'"),
    (["ser=synthetic", "ser.rm.template=no answer here"], "ser.rm.template"),
    (["reward=reward_model", "reward.path=ser"], "reward.path=ser means"),
    (["reward=reward_model"], "reward.path must point to a reward model dir"),
    (["ser=jsonl"], "ser.source=jsonl needs ser.local_path"),
    (["ser=synthetic"], "but the policy stage would use reward=majority_vote"),
    (["ser=synthetic", "reward=reward_model", "reward.path=/some/rm"], "reward=reward_model from /some/rm"),
])
def test_bad_ser_configs_fail_in_one_sentence(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        compose_config(*overrides)
