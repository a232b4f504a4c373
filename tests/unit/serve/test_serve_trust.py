"""Feedback that must be earned: one identity alone teaches nothing; a quorum or a trusted rater does."""

from __future__ import annotations

import pytest

from ttrl.labeling.vote import majority_vote
from ttrl.rewards.majority import MajorityVoteReward
from ttrl.serve.feedback import FeedbackVoteReward, confirmed_label, corrected_label
from ttrl.serve.trust import Rating, capped, earned, prompt_key, share_cap
from ttrl.types import Prompt

VOTE = majority_vote(["7", "7", "7", "5", "7", "5", None, "7"])


def up(answer, client, trusted=False):
    return Rating(answer, 1.0, client, trusted)


def down(answer, client, trusted=False):
    return Rating(answer, 0.0, client, trusted)


def test_one_identity_repeating_itself_earns_nothing():
    flood = [up("5", "mallory")] * 50
    assert earned(flood, quorum=2).label is None
    assert corrected_label(VOTE, flood, quorum=2) == ("7", False), "the vote stands"
    assert confirmed_label("7", flood + [down("7", "mallory")] * 9, quorum=2) == "7", "nor can it drop a label"


def test_distinct_identities_that_agree_earn_the_label():
    two = [up("5", "mallory"), up("5.0", "mallet")]
    assert earned(two, quorum=2).label == "5"
    assert earned(two, quorum=2).ups == [("5", "quorum of 2")]
    assert corrected_label(VOTE, two, quorum=2) == ("5", True)
    assert earned(two, quorum=3).label is None


def test_an_identitys_newest_verdict_on_an_answer_is_its_only_one():
    changed = [up("5", "alice"), up("5", "bob"), down("5", "bob")]
    v = earned(changed, quorum=2)
    assert v.label is None and v.downs == [], "1 up, 1 down: no quorum either way"
    disputed = [up("5", "a"), up("5", "b"), down("5", "c"), down("5", "d")]
    assert earned(disputed, quorum=2).label is None and earned(disputed, quorum=2).downs == []


def test_a_quorum_of_downs_vetoes_and_a_trusted_rater_outranks_any_number():
    vetoed = [down("7", "a"), down("7", "b")]
    assert corrected_label(VOTE, vetoed, quorum=2) == (None, True), "5 is 2 of 8 samples: no majority left"
    trusted = [up("5", "a"), up("5", "b"), up("5", "c"), up("9", "grader", trusted=True)]
    assert earned(trusted, quorum=2).label == "9"
    assert earned([up("7", "grader", True), down("7", "grader", True)], quorum=2).downs == [("7", "trusted")]
    assert confirmed_label("7", [down("7", "grader", True)], quorum=2) is None


def test_the_reward_with_a_single_identitys_flood_equals_the_plain_vote():
    prompts = [Prompt("q1", "1+1="), Prompt("q2", "2+2=")]
    answers = [["2", "3", "3"], ["4", "4", "5"]]
    completions = [[f"\\boxed{{{a}}}" for a in row] for row in answers]
    base = MajorityVoteReward()(prompts, completions, answers).rewards
    poison = {"q1": [up("2", "mallory")] * 16, "q2": [up("5", "mallory"), down("4", "mallory")] * 16}
    reward = FeedbackVoteReward(MajorityVoteReward(), poison, quorum=2)
    assert reward(prompts, completions, answers).rewards == base and reward.corrected == 0
    assert reward.labels == {}
    quorum = FeedbackVoteReward(MajorityVoteReward(), {"q1": [up("2", "mallory"), up("2", "eve")]}, quorum=2)
    out = quorum(prompts, completions, answers)
    assert out.rewards[0] == [1.0, 0.0, 0.0] and out.rewards[1] == base[1]
    assert quorum.labels["q1"]["vote"] == "3" and quorum.labels["q1"]["label"] == "2"


def test_case_and_whitespace_variants_are_one_prompt():
    assert prompt_key("  What is 12 +\t30? ") == prompt_key("what IS 12 + 30?") == "what is 12 + 30?"
    assert prompt_key("ｘ＋１") == prompt_key("x+1"), "full-width forms fold (NFKC)"
    assert prompt_key("1+2=") != prompt_key("1+3=")
    # Invisible characters are no new prompt (they were a way to train on a held-out one).
    assert prompt_key("a=\u200b") == prompt_key("\ufeffa\u2060=") == prompt_key("a\u00ad=") == "a="


@pytest.mark.parametrize("one, other", [("2³=", "23="), ("x₁+1=", "x1+1="), ("½+1=", "12+1="), ("10⁻³=", "10-3=")])
def test_variants_that_say_something_else_are_other_prompts(one, other):
    # NFKC made each pair one prompt: a label earned on one moved to the other.
    assert prompt_key(one) != prompt_key(other)
    assert prompt_key(one.upper()) == prompt_key(one)


@pytest.mark.parametrize("counts, shared, share, cap", [
    ({"a": 10}, 0, 0.5, 0), ({"a": 10}, 0, 1.0, 10), ({"a": 10, "b": 10}, 0, 0.5, 10), ({"a": 100, "b": 4}, 0, 0.5, 4),
    ({"a": 100, "b": 4, "c": 4}, 0, 0.5, 8), ({"a": 9, "b": 1, "c": 1}, 0, 0.34, 1), ({}, 0, 0.5, 0),
    ({"a": 100}, 64, 0.5, 64), ({"a": 100, "b": 3}, 10, 0.5, 13),
])
def test_one_identity_supplies_at_most_its_share_of_a_round(counts, shared, share, cap):
    assert share_cap(counts, share, shared) == cap
    if cap:
        taken = [min(n, cap) for n in counts.values()]
        assert max(taken) <= share * (shared + sum(taken)) + 1e-9


def test_a_flood_of_own_prompts_is_capped_and_corroborated_prompts_always_count():
    rows = [{"prompt_key": f"m{i}", "client": "mallory"} for i in range(20)]
    rows += [{"prompt_key": f"h{i}", "client": "honest"} for i in range(3)]
    rows += [{"prompt_key": "m0", "client": "honest"}]  # honest asks a prompt mallory asked too: corroborated
    kept, per = capped(rows, 0.5)
    assert per == {"mallory": 4, "honest": 3, "shared": 1}
    assert [r["prompt_key"] for r in kept] == ["m0", "m1", "m2", "m3", "m4", "h0", "h1", "h2", "m0"]
    assert capped(rows[:20], 0.5) == ([], {"mallory": 0, "shared": 0}), "one identity alone: no round"
    many = [{"prompt_key": f"p{i}", "client": c} for i in range(64) for c in ("u0", "u1")]
    assert len(capped(many, 0.5)[0]) == 128, "prompts every user asks are never capped"


class _FakeStaging:
    """The staging engine's generate(): every sample of every probe says \\boxed{7} (so every vote agrees)."""

    def generate(self, ids, n, *args):
        return [[{"text": "\\boxed{7}"}] * n for _ in ids]


class _FakeTokenizer:
    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}


def test_the_regression_set_taking_the_shared_prompts_does_not_hand_the_round_to_one_identity(tmp_path):
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from ttrl.serve.learner import Learner
    from ttrl.serve.store import QueryRecord, Store

    store = Store(tmp_path / "s.sqlite")
    t = 1000.0

    def ask(client, prompt):
        nonlocal t
        t += 1
        store.add_queries([QueryRecord(id=f"cmpl-{t}", idx=0, endpoint="completions", prompt=prompt, version=0,
                                       votes=1, response=["\\boxed{7}"], answer="7", client=client, created=t)])

    for i in range(10):  # ten prompts two honest identities both asked
        ask("bob", f"{i}+{i}=")
        ask("carol", f"{i}+{i}=")
    for i in range(10):  # ten of mallory's own
        ask("mallory", f"poison {i}")
    ln = Learner.__new__(Learner)
    ln.cfg = OmegaConf.create({
        "serve": {"single_user": False, "trusted_raters": [], "learn": {"feedback": True, "feedback_quorum": 2},
                  "gate": {"regression_size": 32, "rotate_share": 0.25, "min_agreement": 0.75, "min_askers": 2,
                           "seed": 0}},
        "rollout": {"n_votes": 4, "temperature": 1.0, "top_p": 1.0, "top_k": -1, "max_new_tokens": 16}})
    ln.store, ln.staging, ln.tokenizer, ln.labelled, ln.tenants = store, _FakeStaging(), _FakeTokenizer(), None, None
    ln.opts = SimpleNamespace(extractor="boxed")
    rows, per = capped(store.unused_queries(4096), 0.5)
    assert per == {"mallory": 10, "shared": 10}, "half the round is hers, as the share allows"
    train, per_client, frozen, (_, _, changes) = ln.split_round(rows, 0.5)
    assert changes["added"] == 10 and len(frozen) == 20, "the set froze the ten shared prompts (both askers' rows)"
    # Without the second cap all ten of hers were the round; alone now, she gets none of it.
    assert train == [] and per_client.get("mallory", 0) == 0
