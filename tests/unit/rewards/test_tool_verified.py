"""tool_verified: the calculator, the checks it makes of worked steps, and the weighted vote (worked by hand)."""

import pytest

from ttrl.rewards import RewardError, build_reward, compute_rewards
from ttrl.rewards.calculator import MAX_DIGITS, check_steps, evaluate, steps
from ttrl.types import Group, Prompt, Sample

pytestmark = pytest.mark.unit

RIGHT = "37+48=85,85+12=97 \\boxed{97}"       # both steps hold, the answer is the last value: 3 of 3
CARRY = "37+48=75,75+12=87 \\boxed{87}"       # a dropped carry, carried on: step 1 fails -> 2 of 3
COPY = "37+48=85,85+12=97 \\boxed{87}"        # right steps, the answer miscopied -> 2 of 3
BARE = "\\boxed{87}"                          # nothing to check -> 0 of 0


def group(pid: str, texts: list[str]) -> Group:
    from ttrl.labeling.extract import extract_answer

    return Group(Prompt(pid, "37+48+12=", answer="97"), [],
                 [Sample(text=t, answer=extract_answer(t)) for t in texts])


def test_the_calculator_evaluates_integer_arithmetic_only() -> None:
    assert evaluate("37+48") == 85
    assert evaluate("2+3*4-5") == 9          # products first: 2 + 12 - 5
    assert evaluate("10 - 4 - 3") == 3       # left to right
    assert evaluate("7*6") == 42
    assert evaluate("1" * (MAX_DIGITS + 1) + "+1") is None  # out of bounds: not checked
    assert evaluate("__import__('os')") is None


def test_steps_and_checks_by_hand() -> None:
    assert steps(RIGHT) == ([("37+48", "85"), ("85+12", "97")], "97")
    assert check_steps(RIGHT) == (3, 3)
    assert check_steps(CARRY) == (3, 2)      # 37+48 is not 75; 75+12 is 87; 87 is the last value
    assert check_steps(COPY) == (3, 2)       # both steps hold; 87 is not the last value 97
    assert check_steps(BARE) == (0, 0)
    assert check_steps("37+48=85 and then I guess") == (2, 1)  # a step, and no boxed answer to agree with it


@pytest.mark.parametrize("sandbox", [False, True])
def test_verified_votes_outweigh_a_shared_slip(sandbox: bool) -> None:
    # Weights with omega = 5: w = 1 + 4 * held/checks.
    #   RIGHT 3/3 -> 5;  CARRY 2/3 -> 1 + 8/3 = 11/3;  BARE -> 1 (nothing checked).
    # Answers: 97 x2 (RIGHT, RIGHT), 87 x3 (CARRY, CARRY, BARE): the majority says 87.
    # Weighted: 97 -> 5 + 5 = 10;  87 -> 11/3 + 11/3 + 1 = 25/3 = 8.33.  The label is 97.
    g = group("p0", [CARRY, RIGHT, CARRY, RIGHT, BARE])
    reward = build_reward("tool_verified", sandbox=sandbox)
    try:
        out = compute_rewards(reward, [g])
    finally:
        reward.close()
    assert out.rewards == [[0.0, 1.0, 0.0, 1.0, 0.0]]
    vote = out.votes[0]
    # counts stay sample counts (the contract of Vote); the ratio is the winner's share of the samples.
    assert (vote.label, vote.ratio, vote.counts) == ("97", 0.4, {"87": 3, "97": 2})


def test_omega_one_is_the_plain_majority_and_bad_options_are_named() -> None:
    g = group("p0", [CARRY, RIGHT, CARRY, RIGHT, BARE])
    # omega = 1: every weight is 1 -> 87 (3 votes) beats 97 (2).
    assert compute_rewards(build_reward("tool_verified", verified_weight=1.0, sandbox=False), [g]).rewards == \
        [[1.0, 0.0, 1.0, 0.0, 1.0]]
    # omega = 2: RIGHT 2, CARRY 1 + 2/3 = 5/3, BARE 1 -> 97: 4, 87: 5/3 + 5/3 + 1 = 13/3 = 4.33 -> 87 still.
    assert compute_rewards(build_reward("tool_verified", verified_weight=2.0, sandbox=False), [g]).rewards == \
        [[1.0, 0.0, 1.0, 0.0, 1.0]]
    with pytest.raises(ValueError, match=r"reward.tool_verified.verified_weight=0.5"):
        build_reward("tool_verified", verified_weight=0.5)
    with pytest.raises(ValueError, match=r"reward.tool_verified.timeout_s=0"):
        build_reward("tool_verified", timeout_s=0)


def test_a_calculator_that_misses_its_deadline_skips_the_step(monkeypatch: pytest.MonkeyPatch) -> None:
    from ttrl.labeling import sandbox

    # A worker that never answers (the sandbox's own tests swap in the same).
    monkeypatch.setattr(sandbox, "WORKER_MAIN", "import time; print('ready', flush=True); time.sleep(60)")
    reward = build_reward("tool_verified", timeout_s=0.5)
    try:
        with pytest.raises(RewardError, match="tool_verified: the sandboxed calculator failed .WorkerTimedOut"):
            compute_rewards(reward, [group("p0", [RIGHT])])
    finally:
        reward.close()
