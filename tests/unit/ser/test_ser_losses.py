"""Reward-model losses, hand-computed, and the scoring helpers that need no model."""

from __future__ import annotations

import math

import pytest
import torch

from ttrl.ser.losses import bradley_terry_loss, pairwise_accuracy, pointwise_accuracy, pointwise_loss

pytestmark = pytest.mark.unit


def close(a, b, tol=1e-6):
    assert float(a) == pytest.approx(b, abs=tol)


# ── Bradley-Terry ─────────────────────────────────────────────────────────
def test_bt_loss_hand_computed():
    # Margins 2, 0, -1: -log sigmoid(m) = log(1 + e^-m).
    r_c = torch.tensor([3.0, 0.5, -1.0])
    r_r = torch.tensor([1.0, 0.5, 0.0])
    per = [math.log1p(math.exp(-2.0)), math.log(2.0), math.log1p(math.exp(1.0))]
    close(bradley_terry_loss(r_c, r_r), sum(per) / 3)
    # A global normaliser: the sum over these rows / the rows of the whole step.
    close(bradley_terry_loss(r_c, r_r, normalizer=6), sum(per) / 6)


def test_bt_loss_only_sees_differences_without_centering():
    r_c, r_r = torch.tensor([2.0, -1.0]), torch.tensor([0.5, -3.0])
    close(bradley_terry_loss(r_c, r_r), float(bradley_terry_loss(r_c + 7.0, r_r + 7.0)))


def test_bt_centering_term_hand_computed():
    r_c, r_r = torch.tensor([3.0]), torch.tensor([1.0])
    # log(1 + e^-2) + 0.01 * (3 + 1)^2
    close(bradley_terry_loss(r_c, r_r, center_coef=0.01), math.log1p(math.exp(-2.0)) + 0.16)


def test_bt_gradient_pushes_chosen_up_and_rejected_down():
    r_c = torch.tensor([0.0], requires_grad=True)
    r_r = torch.tensor([0.0], requires_grad=True)
    bradley_terry_loss(r_c, r_r).backward()
    # d/dm -log sigmoid(m) = -(1 - sigmoid(m)) = -0.5 at m = 0
    close(r_c.grad[0], -0.5)
    close(r_r.grad[0], 0.5)


def test_bt_micro_batches_add_up_to_the_full_batch():
    g = torch.Generator().manual_seed(0)
    r_c, r_r = torch.randn(8, generator=g), torch.randn(8, generator=g)
    full = bradley_terry_loss(r_c, r_r)
    parts = sum(bradley_terry_loss(r_c[i:i + 2], r_r[i:i + 2], normalizer=8) for i in range(0, 8, 2))
    close(parts, float(full))


def test_bt_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="differ"):
        bradley_terry_loss(torch.zeros(2), torch.zeros(3))


# ── pointwise ─────────────────────────────────────────────────────────────
def test_pointwise_loss_hand_computed():
    scores = torch.tensor([0.0, 2.0, -1.0])
    labels = torch.tensor([1.0, 0.0, 0.0])
    # BCE(sigmoid(s), y): y=1: -log sigmoid(s); y=0: -log(1 - sigmoid(s)) = log(1 + e^s)
    per = [math.log(2.0), math.log1p(math.exp(2.0)), math.log1p(math.exp(-1.0))]
    close(pointwise_loss(scores, labels), sum(per) / 3)
    close(pointwise_loss(scores, labels, normalizer=4), sum(per) / 4)


def test_pointwise_loss_is_small_when_confident_and_right():
    assert float(pointwise_loss(torch.tensor([10.0, -10.0]), torch.tensor([1.0, 0.0]))) < 1e-4


def test_accuracies():
    assert pairwise_accuracy(torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0.0, 0.0, 3.0])) == pytest.approx(1 / 3)
    assert pointwise_accuracy(torch.tensor([0.5, -0.5, 2.0, -2.0]), torch.tensor([1, 0, 0, 1])) == 0.5
    assert math.isnan(pairwise_accuracy(torch.zeros(0), torch.zeros(0)))


# ── scoring helpers (no model) ────────────────────────────────────────────
def test_last_token_index_left_and_right_padding():
    from ttrl.trainer.reward_model import last_token_index

    right = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    left = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1]])
    assert last_token_index(right).tolist() == [2, 3, 0]
    assert last_token_index(left).tolist() == [3, 3]


def test_pack_pairs_shares_one_width():
    from ttrl.trainer.reward_model import pack_pairs, split_rows

    b = pack_pairs([[5, 6], [7]], [[8, 9, 10], [11]], pad_id=0)
    assert b["chosen_input_ids"].shape == b["rejected_input_ids"].shape == (2, 3)
    assert b["chosen_attention_mask"].tolist() == [[1, 1, 0], [1, 0, 0]]
    assert b["rejected_position_ids"].tolist() == [[0, 1, 2], [0, 0, 0]]
    halves = split_rows(b, 2)
    assert halves[1]["chosen_input_ids"].tolist() == [[7, 0, 0]]


def test_rm_format_template_keeps_braces(tmp_path):
    from ttrl.trainer.reward_model import DEFAULT_TEMPLATE, RMFormat

    f = RMFormat()
    assert f.template == DEFAULT_TEMPLATE == "Question: {q}\n\nAnswer: {a}"
    assert f.text("1+2=", "\\boxed{3}") == "Question: 1+2=\n\nAnswer: \\boxed{3}"
    f2 = RMFormat(template="{q}{a}", mode="pointwise", transform="sigmoid")
    f2.save(tmp_path, base_model="x")
    assert RMFormat.load(tmp_path) == f2
    assert RMFormat.load(tmp_path / "nothing") == RMFormat()
