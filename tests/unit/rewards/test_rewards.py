"""Rewards: majority vote, ground truth, custom functions, and ground-truth isolation."""

import dataclasses
import random
import string
import subprocess
import sys
from pathlib import Path

import pytest

from ttrl.rewards import REWARDS, RewardError, RewardOutput, build_reward, compute_rewards
from ttrl.types import Group, Prompt, Sample

pytestmark = pytest.mark.unit

FAKES = "reward_fns_fake"  # tests/unit/reward_fns_fake.py, put on sys.path below


@pytest.fixture(autouse=True)
def _fakes_importable(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))


def make_group(pid: str, answers: list[str | None], truth: str | None = None) -> Group:
    samples = [
        Sample(text="no idea" if a is None else f"so it is $\\boxed{{{a}}}$", answer=a) for a in answers
    ]
    return Group(
        prompt=Prompt(id=pid, problem=f"problem {pid}", answer=truth), prompt_token_ids=[], samples=samples
    )


def step_groups() -> list[Group]:
    return [
        make_group("p0", ["1/2", "0.5", "3", None], truth="3"),
        make_group("p1", ["x=2", "2", "4", "4"], truth="2"),  # tie: the first-seen class wins
        make_group("p2", [None, None, None, None], truth="9"),
        make_group("p3", [r"\{1,2\}", r"\{2,1\}", "(1,3)", r"\{1, 2\}"], truth="(1,3)"),
    ]


# ── majority vote ──────────────────────────────────────────────────────────
def test_majority_vote_rewards_by_hand() -> None:
    out = compute_rewards(build_reward("majority_vote"), step_groups())
    assert out.rewards == [
        [1.0, 1.0, 0.0, 0.0],
        [1.0, 1.0, 0.0, 0.0],
        [0.0, 0.0, 0.0, 0.0],  # nobody answered: no label, no reward
        [1.0, 1.0, 0.0, 1.0],
    ]
    assert out.votes is not None
    assert [v.label for v in out.votes] == ["1/2", "x=2", None, r"\{1,2\}"]
    assert [v.ratio for v in out.votes] == [0.5, 0.5, 0.0, 0.75]
    assert out.none_count == 0


def test_majority_vote_min_ratio_silences_weak_votes() -> None:
    out = compute_rewards(build_reward("majority_vote", min_ratio=0.6), step_groups())
    # Only p3's vote (3 of 4) reaches 0.6; the 2-of-4 votes reward nobody.
    assert out.rewards == [[0.0] * 4, [0.0] * 4, [0.0] * 4, [1.0, 1.0, 0.0, 1.0]]
    assert [v.label for v in out.votes] == ["1/2", "x=2", None, r"\{1,2\}"]  # the votes themselves unchanged
    with pytest.raises(ValueError, match="reward.min_ratio"):
        build_reward("majority_vote", min_ratio=1.5)


def test_random_reward_is_seeded_and_ignores_answers() -> None:
    groups = [make_group(f"p{i}", ["1"] * 64) for i in range(8)]
    a = compute_rewards(build_reward("random", p=0.5, seed=3), groups).rewards
    b = compute_rewards(build_reward("random", p=0.5, seed=3), groups).rewards
    c = compute_rewards(build_reward("random", p=0.5, seed=4), groups).rewards
    assert a == b and a != c
    flat = [x for row in a for x in row]
    assert set(flat) == {0.0, 1.0} and 0.4 < sum(flat) / len(flat) < 0.6  # 512 draws: s.e. 0.022
    assert all(x == 0.0 for row in compute_rewards(build_reward("random", p=0.0), groups).rewards for x in row)


class LengthScorer:
    """A stand-in reward model: scores a completion by its length (it sees prompt texts, never answers)."""

    def score(self, prompts: list[str], completions: list[str]) -> list[float]:
        return [float(len(c)) for c in completions]

    def close(self) -> None:
        pass


# What a registered reward needs to be built at all (a function, a scorer); every other reward builds bare.
REQUIRED_OPTIONS = {"custom": {"fn": f"{FAKES}:length"}, "reward_model": {"scorer": LengthScorer()}}
# Options that change what a reward computes, scrubbed too.
VARIANTS = [("majority_vote", {"min_ratio": 0.6}), ("trajectory_logprob", {"per_token": True}),
            ("co_reward", {"min_ratio": 0.5}), ("self_harmony", {"min_score": 0.3}),
            ("scrl", {"mode": "binary"}), ("rent", {"last_tokens": None}),
            ("tool_verified", {"sandbox": False}), ("evol_rl", {"mean_weight": 1.0})]
LABEL_FREE = sorted(n for n in REWARDS.names() if not getattr(REWARDS.get(n), "needs_ground_truth", False))


def test_the_scrub_test_covers_every_registered_label_free_reward() -> None:
    # Built from the registry: a new reward is scrubbed the day it is registered. Only the oracle is left out.
    assert set(REWARDS.names()) - set(LABEL_FREE) == {"ground_truth"}


def scrub_groups() -> list[Group]:
    """step_groups() with worked steps in the texts, engine log-probs, and a reversed second view."""
    worked = ["1+2=3,3+4=7 ", "1+2=4,4+4=8 ", "", "5*2=10 "]
    groups = []
    for i, g in enumerate(step_groups()):
        samples = [dataclasses.replace(smp, text=worked[j % len(worked)] + smp.text, logprobs=[-0.1 * (i + 1)] * (j + 1))
                   for j, smp in enumerate(g.samples)]
        groups.append(dataclasses.replace(g, samples=samples, view_samples=samples[::-1]))
    return groups


@pytest.mark.parametrize("name, options", [(n, REQUIRED_OPTIONS.get(n, {})) for n in LABEL_FREE] + VARIANTS)
def test_ground_truth_scrub_changes_nothing(name: str, options: dict) -> None:
    """Label-free means label-free: hiding or corrupting every ground-truth
    answer leaves the rewards and votes of every label-free reward unchanged."""
    groups = scrub_groups()
    token_stats = [[{"entropy": 0.1 * j + i, "self_certainty": 2.0 - 0.1 * j, "tokens": j + 1,
                     "entropies": [0.3 * i, 0.1 * j, 0.05 * (i + j)][:j + 1]}
                    for j in range(len(g.samples))] for i, g in enumerate(groups)]

    def rewards_of(gs: list[Group]) -> RewardOutput:
        reward = build_reward(name, **options)  # fresh: random restarts, running statistics start over
        try:
            return compute_rewards(reward, gs, token_stats)
        finally:
            reward.close()

    baseline = rewards_of(groups)
    rng = random.Random(0)
    garbage = lambda: "".join(rng.choices(string.printable, k=12))  # noqa: E731
    for replace_answer in (lambda: None, garbage, lambda: "1/2"):
        scrubbed = [
            dataclasses.replace(g, prompt=dataclasses.replace(g.prompt, answer=replace_answer()))
            for g in groups
        ]
        again = rewards_of(scrubbed)
        assert again.rewards == baseline.rewards
        assert again.votes == baseline.votes


class SpyReward:
    """Records the prompts it is handed."""

    def __init__(self, needs_ground_truth: bool):
        self.needs_ground_truth = needs_ground_truth
        self.seen: list[Prompt] = []

    def __call__(self, prompts, completions, answers) -> RewardOutput:
        self.seen.extend(prompts)
        return RewardOutput(rewards=[[0.0] * len(row) for row in completions])


def test_compute_rewards_hides_ground_truth_from_label_free_rewards() -> None:
    groups = step_groups()
    assert all(g.prompt.answer is not None for g in groups)

    label_free = SpyReward(needs_ground_truth=False)
    compute_rewards(label_free, groups)
    assert [p.answer for p in label_free.seen] == [None] * len(groups)
    assert [p.problem for p in label_free.seen] == [g.prompt.problem for g in groups]

    oracle = SpyReward(needs_ground_truth=True)
    compute_rewards(oracle, groups)
    assert [p.answer for p in oracle.seen] == [g.prompt.answer for g in groups]

    # The built-in label-free reward declares itself so.
    assert build_reward("majority_vote").needs_ground_truth is False


def test_compute_rewards_checks_the_shape() -> None:
    class Broken:
        needs_ground_truth = False

        def __call__(self, prompts, completions, answers):
            return RewardOutput(rewards=[[1.0]] * len(prompts))

    with pytest.raises(
        RewardError, match=r"Broken returned rewards of shape \[1, 1, 1, 1\].*expected \[4, 4, 4, 4\]"
    ):
        compute_rewards(Broken(), step_groups())


# ── ground truth ───────────────────────────────────────────────────────────
def test_ground_truth_rewards() -> None:
    reward = build_reward("ground_truth")
    assert reward.needs_ground_truth is True
    out = compute_rewards(reward, step_groups())
    assert out.rewards == [
        [0.0, 0.0, 1.0, 0.0],
        [1.0, 1.0, 0.0, 0.0],
        [0.0, 0.0, 0.0, 0.0],
        [0.0, 0.0, 1.0, 0.0],
    ]
    assert out.votes is not None and [v.label for v in out.votes][:2] == ["1/2", "x=2"]


def test_ground_truth_without_answers_is_a_clear_error() -> None:
    groups = [make_group("p0", ["1"], truth="1"), make_group("unlabeled-7", ["1"], truth=None)]
    with pytest.raises(ValueError, match=r"'ground_truth' needs a ground-truth answer.*'unlabeled-7'"):
        compute_rewards(build_reward("ground_truth"), groups)


# ── custom ─────────────────────────────────────────────────────────────────
def test_custom_reward_trl_convention() -> None:
    from reward_fns_fake import CALLS

    CALLS.clear()
    reward = build_reward("custom", fn=f"{FAKES}:length")
    groups = step_groups()[:2]
    out = compute_rewards(reward, groups)

    texts = [[s.text for s in g.samples] for g in groups]
    assert out.rewards == [[float(len(t)) for t in row] for row in texts]
    assert out.votes is None and out.none_count == 0
    (call,) = CALLS
    assert call["completions"] == texts[0] + texts[1]  # flat over all samples
    assert call["prompts"] == ["problem p0"] * 4 + ["problem p1"] * 4
    assert call["answers"] == ["1/2", "0.5", "3", None, "x=2", "2", "4", "4"]
    assert call["prompt_ids"] == ["p0"] * 4 + ["p1"] * 4
    assert "ground_truth" not in call  # label-free unless asked for


@pytest.mark.parametrize("path", [f"{FAKES}.length", f"{FAKES}:Scorers.zero"])
def test_custom_reward_path_forms(path: str) -> None:
    out = compute_rewards(build_reward("custom", fn=path), step_groups()[:1])
    assert len(out.rewards[0]) == 4


def test_custom_reward_none_becomes_zero_and_is_counted() -> None:
    out = compute_rewards(build_reward("custom", fn=f"{FAKES}:none_without_answer"), step_groups())
    assert out.rewards[0] == [1.0, 1.0, 1.0, 0.0]
    assert out.rewards[2] == [0.0] * 4
    assert out.none_count == 5


def test_custom_reward_with_ground_truth() -> None:
    reward = build_reward("custom", fn=f"{FAKES}:exact_match", needs_ground_truth=True)
    out = compute_rewards(reward, step_groups()[:2])
    assert out.rewards == [[0.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 0.0]]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"fn": "no_such_pkg.rewards:fn"},
            r"'no_such_pkg.rewards:fn'.*module 'no_such_pkg.rewards' not found",
        ),
        ({"fn": f"{FAKES}:missing"}, rf"'{FAKES}:missing'.*has no attribute 'missing'"),
        ({"fn": f"{FAKES}:NOT_CALLABLE"}, r"is a int, not a function"),
        ({"fn": "length"}, r"must be a dotted path"),
        ({"fn": f"{FAKES}:strict_signature"}, r"strict_signature' cannot be called as .*\*\*kwargs"),
        # needs ground truth but the config did not say so: caught at build time
        ({"fn": f"{FAKES}:exact_match"}, r"exact_match' cannot be called as"),
    ],
)
def test_custom_reward_build_errors_name_the_path(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_reward("custom", **options)


@pytest.mark.parametrize(
    ("fn", "message"),
    [
        ("too_few", r"'reward_fns_fake:too_few' returned 7 rewards for 8 completions .*'p0', 'p1'"),
        ("not_a_list", r"'reward_fns_fake:not_a_list' must return a list of float \| None, got float"),
        ("nan_reward", r"'reward_fns_fake:nan_reward' returned nan at index 0 \(prompt 'p0'\)"),
        ("raises", r"'reward_fns_fake:raises' raised ZeroDivisionError: division by zero.*'p0', 'p1'"),
    ],
)
def test_custom_reward_bad_returns_name_the_path_and_prompts(fn: str, message: str) -> None:
    """A failing user reward is a RewardError: the step skips with this message instead of scoring zeros."""
    reward = build_reward("custom", fn=f"{FAKES}:{fn}")
    with pytest.raises(RewardError, match=message):
        compute_rewards(reward, step_groups()[:2])


# ── registry ───────────────────────────────────────────────────────────────
def test_registry_and_factory_errors() -> None:
    assert {"majority_vote", "ground_truth", "custom"} <= set(REWARDS.names())
    with pytest.raises(KeyError, match="unknown reward 'majority'.*majority_vote"):
        build_reward("majority")
    with pytest.raises(ValueError, match="reward 'majority_vote' does not accept options"):
        build_reward("majority_vote", fn="x:y")


def test_pure_core_imports_nothing_heavy() -> None:
    # House rule: labeling/ and rewards/ run without torch, ray, vllm or deepspeed.
    code = (
        "import sys, ttrl.labeling, ttrl.rewards; "
        "print(sorted({'torch', 'ray', 'vllm', 'deepspeed'} & {m.split('.')[0] for m in sys.modules}))"
    )
    root = Path(__file__).resolve().parents[3]
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"
