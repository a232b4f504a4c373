"""KL estimators against hand-computed values, exact expectations and their gradients."""

from __future__ import annotations

import math

import pytest
import torch

from ttrl.algos.kl import KL_ESTIMATORS, kl, kl_penalty

LOGP = torch.tensor([[-1.0, -2.0, -0.5]])
REF = torch.tensor([[-1.5, -1.0, -0.5]])


def close(actual: torch.Tensor, expected, atol: float = 1e-6) -> None:
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), atol=atol, rtol=0)


def test_k1_by_hand():
    close(kl("k1", LOGP, REF), [[0.5, -1.0, 0.0]])


def test_k2_by_hand():
    close(kl("k2", LOGP, REF), [[0.5 * 0.5**2, 0.5 * 1.0**2, 0.0]])


@pytest.mark.parametrize("name", ["k3", "low_var_kl"])
def test_k3_by_hand(name):
    # d = ref - logp = [-0.5, 1.0, 0.0]; k3 = e^d - d - 1
    expected = [[math.exp(-0.5) + 0.5 - 1, math.exp(1.0) - 1.0 - 1, 0.0]]
    close(kl(name, LOGP, REF), expected)


def test_k3_is_clamped_and_its_gradient_stays_finite():
    logp = torch.tensor([[-60.0, 0.0]], requires_grad=True)
    ref = torch.tensor([[0.0, -60.0]])
    value = kl("k3", logp, ref)
    # e^60 would be 1e26: clamped to 10; the other side is 60 - 1 = 59, clamped to 10 too.
    close(value, [[10.0, 10.0]])
    value.sum().backward()
    assert torch.isfinite(logp.grad).all()


def test_estimators_vanish_when_policy_equals_reference():
    x = torch.randn(3, 5)
    for name in KL_ESTIMATORS.names():
        close(kl(name, x, x.clone()), torch.zeros(3, 5))


def test_k2_and_k3_are_non_negative():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 7, generator=gen), torch.randn(4, 7, generator=gen)
    assert (kl("k2", a, b) >= 0).all() and (kl("k3", a, b) >= 0).all()


def _categorical():
    """A policy over 5 tokens (with grad) and a fixed reference."""
    theta = torch.tensor([0.3, -1.0, 2.0, 0.0, 0.5], requires_grad=True)
    ref_logp = torch.log_softmax(torch.tensor([1.0, 0.0, -0.5, 0.2, 0.1]), dim=0)
    return theta, ref_logp


def test_k1_and_k3_are_unbiased_estimates_of_reverse_kl():
    theta, ref_logp = _categorical()
    logp = torch.log_softmax(theta.detach(), dim=0)
    p = logp.exp()
    exact = (p * (logp - ref_logp)).sum()  # KL(pi || ref), by enumeration
    for name in ("k1", "k3"):
        expectation = (p * kl(name, logp[None], ref_logp[None])[0]).sum()
        close(expectation, exact)


def test_expected_loss_gradients_of_k2_and_k3():
    # Differentiating through logp only, with the sampling distribution held
    # fixed: E[grad k2] = grad KL(pi || ref) and E[grad k3] = grad KL(ref || pi).
    theta, ref_logp = _categorical()

    def expected_grad(name):
        logp = torch.log_softmax(theta, dim=0)
        p = logp.exp().detach()  # the expectation's weights do not depend on theta
        (grad,) = torch.autograd.grad((p * kl(name, logp[None], ref_logp[None])[0]).sum(), theta)
        return grad

    def exact_grad(reverse):
        logp = torch.log_softmax(theta, dim=0)
        value = (
            (logp.exp() * (logp - ref_logp)).sum() if reverse else (ref_logp.exp() * (ref_logp - logp)).sum()
        )
        (grad,) = torch.autograd.grad(value, theta)
        return grad

    close(expected_grad("k2"), exact_grad(reverse=True), atol=1e-6)
    close(expected_grad("k3"), exact_grad(reverse=False), atol=1e-6)
    close(expected_grad("k1"), torch.zeros(5), atol=1e-6)


def test_kl_penalty_is_a_detached_masked_reward():
    logp = LOGP.clone().requires_grad_(True)
    mask = torch.tensor([[1, 1, 0]])
    rewards = kl_penalty("k1", logp, REF, mask, coef=0.1)
    close(rewards, [[-0.1 * 0.5, -0.1 * -1.0, 0.0]])
    assert not rewards.requires_grad


def test_unknown_estimator_and_shape_mismatch():
    with pytest.raises(KeyError, match="valid choices: k1, k2, k3, low_var_kl"):
        kl("k4", LOGP, REF)
    with pytest.raises(ValueError, match="differ in shape"):
        kl("k1", LOGP, REF[:, :2])
