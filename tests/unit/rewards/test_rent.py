"""rent: minus the entropy of a response's last tokens, and the per-token entropies the step hands it."""

import math

import pytest
import torch

from ttrl.rewards import build_reward, compute_rewards
from ttrl.rewards.rent import tail_entropy
from ttrl.types import Group, Prompt, Sample

pytestmark = pytest.mark.unit


def group(pid: str, n: int) -> Group:
    return Group(Prompt(pid, f"problem {pid}", answer="5"), [], [Sample(text="\\boxed{5}", answer="5")] * n)


def stats(*rows: list[list[float]]) -> list[list[dict]]:
    return [[{"entropy": sum(e) / len(e) if e else math.nan, "self_certainty": 0.0, "tokens": len(e),
              "entropies": e} for e in row] for row in rows]


def test_tail_entropy_by_hand() -> None:
    e = [2.0, 2.0, 0.5, 0.1, 0.3]
    assert tail_entropy(e, 2) == pytest.approx(0.2)         # (0.1 + 0.3) / 2
    assert tail_entropy(e, 3) == pytest.approx(0.3)         # (0.5 + 0.1 + 0.3) / 3
    assert tail_entropy(e, 99) == pytest.approx(0.98)       # shorter than k: all 5 tokens, 4.9 / 5
    assert tail_entropy(e, None) == pytest.approx(0.98)
    assert math.isnan(tail_entropy([], 4))


def test_rent_pays_a_confident_ending_not_a_confident_start() -> None:
    # Sample 0 hesitates early and ends sure; sample 1 starts sure and hesitates at the end.
    # Over all tokens they tie (3.2 / 5 = 0.64 each); over the last 2 tokens: -(0.1 + 0.1)/2 = -0.1 and
    # -(1.0 + 1.0)/2 = -1.0.
    ts = stats([[1.0, 1.0, 1.0, 0.1, 0.1], [0.1, 0.1, 1.0, 1.0, 1.0]])
    out = compute_rewards(build_reward("rent", last_tokens=2), [group("p0", 2)], ts)
    assert out.rewards == [pytest.approx([-0.1, -1.0])]
    assert out.votes is None  # the step votes (plain majority) for the metrics
    every = compute_rewards(build_reward("rent", last_tokens=None), [group("p0", 2)], ts).rewards[0]
    assert every == pytest.approx([-0.64, -0.64])  # all tokens: token_entropy's view cannot tell them apart


def test_an_empty_response_gets_its_groups_lowest_reward() -> None:
    ts = stats([[0.2, 0.2], [], [0.6, 0.8]])
    # -0.2, (nothing: the group's lowest), -0.7
    assert compute_rewards(build_reward("rent", last_tokens=2), [group("p0", 3)], ts).rewards == \
        [pytest.approx([-0.2, -0.7, -0.7])]


def test_rent_needs_each_tokens_entropy_and_checks_its_option() -> None:
    means_only = [[{"entropy": 0.1, "self_certainty": 0.0}]]
    with pytest.raises(ValueError, match="needs each token's entropy"):
        compute_rewards(build_reward("rent"), [group("p0", 1)], means_only)
    with pytest.raises(ValueError, match=r"reward.rent.last_tokens=0"):
        build_reward("rent", last_tokens=0)
    assert build_reward("rent").needs == frozenset({"token_stats", "token_entropies"})


def test_the_step_hands_each_samples_own_token_entropies_in_order() -> None:
    from ttrl.step import sample_token_stats

    class Runtime:
        def token_stats(self, batch, temperature):
            B, R = batch["response_mask"].shape
            # Entropy of token t of row b: 10 * b + t, so each list shows which row and columns it came from.
            ent = (10 * torch.arange(B)[:, None] + torch.arange(R)[None, :]).float()
            return {"entropy": ent, "self_certainty": torch.zeros(B, R)}

    def sample(ids: list[int]) -> Sample:
        return Sample(text="x", token_ids=ids, logprobs=[-0.1] * len(ids))

    groups = [Group(Prompt("a", "1+1="), [7, 7], [sample([1, 2, 3]), sample([4])]),
              Group(Prompt("b", "2+2="), [7], [sample([])])]
    out = sample_token_stats(Runtime(), groups, pad_id=0, temperature=1.0, with_entropies=True)
    assert [s["entropies"] for s in out[0]] == [[0.0, 1.0, 2.0], [10.0]]
    assert out[1][0]["entropies"] == [] and math.isnan(out[1][0]["entropy"])
    assert out[0][0]["entropy"] == pytest.approx(1.0) and out[0][0]["tokens"] == 3
    # Without with_entropies (every other reward) the lists are not built.
    assert "entropies" not in sample_token_stats(Runtime(), groups, pad_id=0, temperature=1.0)[0][0]
