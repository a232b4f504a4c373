"""trainer.backward_products: bf16 products in the backward leave the forward exact and the gradient close;
trainer.autocast: where it turns on, and what the bf16 forward moves."""

from __future__ import annotations

import pytest
import torch

from ttrl.trainer.precision import (
    autocast_context,
    bf16_backward_products,
    cpu_has_amx,
    resolve_autocast,
    resolve_backward_products,
)


def _model(seed: int = 0, attn: str | None = None):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=50, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, head_dim=32)
    if attn:
        cfg._attn_implementation = attn
    return Qwen2ForCausalLM(cfg)


def _loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids).logits
    loss = torch.log_softmax(logits, -1)[:, :-1].gather(-1, ids[:, 1:, None]).mean()
    loss.backward()
    return logits.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])


def test_the_forward_is_bit_for_bit_and_the_gradient_within_a_percent():
    ids = torch.randint(1, 50, (6, 20), generator=torch.Generator().manual_seed(3))
    exact, patched = _model(), _model()
    assert bf16_backward_products(patched) == 2 * 7 + 1  # q, k, v, o, gate, up, down per layer; lm_head
    logits0, g0 = _loss_and_grads(exact, ids)
    logits1, g1 = _loss_and_grads(patched, ids)
    assert torch.equal(logits0, logits1)  # the log-probs the ratio and the metrics read do not move
    with torch.no_grad():
        assert torch.equal(exact(input_ids=ids).logits, patched(input_ids=ids).logits)
    rel = float((g1 - g0).norm() / g0.norm())
    # bf16 keeps 8 bits of mantissa: the gradient moves, a little (0 would mean the patch never ran).
    assert 1e-4 < rel < 0.02, rel
    assert torch.nn.functional.cosine_similarity(g0, g1, 0) > 0.9999


def test_one_linear_gets_exactly_the_bf16_products_and_an_fp32_bias_sum():
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 8)
    bf16_backward_products(lin)
    x = torch.randn(3, 5, 16, requires_grad=True)
    g = torch.randn(3, 5, 8)
    y = lin(x)
    assert torch.equal(y, torch.nn.functional.linear(x, lin.weight, lin.bias))
    y.backward(g)
    bf = torch.bfloat16
    assert torch.equal(x.grad, (g.to(bf) @ lin.weight.to(bf)).float())
    assert torch.equal(lin.weight.grad, (g.reshape(-1, 8).to(bf).t() @ x.detach().reshape(-1, 16).to(bf)).float())
    assert torch.allclose(lin.bias.grad, g.reshape(-1, 8).sum(0), atol=0, rtol=1e-6)
    assert x.grad.dtype == lin.weight.grad.dtype == torch.float32


def test_a_frozen_weight_gets_no_gradient_and_its_input_still_does():
    lin = torch.nn.Linear(4, 4)
    lin.weight.requires_grad_(False)
    lin.bias.requires_grad_(False)
    bf16_backward_products(lin)
    x = torch.randn(2, 4, requires_grad=True)
    lin(x).sum().backward()
    assert lin.weight.grad is None and x.grad is not None


def test_bf16_modules_are_left_alone():
    lin = torch.nn.Linear(4, 4).to(torch.bfloat16)
    assert bf16_backward_products(lin) == 0


@pytest.mark.parametrize("choice,device,dtype,stage,amx,want", [
    ("auto", "cpu", "float32", 2, True, "bfloat16"),
    ("auto", "cpu", "float32", 2, False, "float32"),   # emulated bf16 would be slower
    ("auto", "cpu", "float32", 3, True, "float32"),    # ZeRO-3 has its own linear
    ("auto", "cuda", "float32", 2, True, "float32"),
    ("auto", "cpu", "bfloat16", 2, True, "float32"),   # already bf16 throughout
    ("bfloat16", "cpu", "float32", 2, False, "bfloat16"),
    ("float32", "cpu", "float32", 2, True, "float32"),
])
def test_auto_means_bf16_only_for_fp32_training_on_a_cpu_with_amx(choice, device, dtype, stage, amx, want):
    assert resolve_backward_products(choice, device, dtype, stage, amx=amx) == want


def test_a_bad_choice_names_the_key():
    with pytest.raises(ValueError, match="trainer.backward_products='fp16'"):
        resolve_backward_products("fp16", "cpu", "float32", 2)


def test_amx_is_read_from_the_flags_line():
    assert cpu_has_amx("processor : 0\nflags : fpu avx512f amx_bf16 amx_tile\n")
    assert not cpu_has_amx("processor : 0\nflags : fpu avx2 avx512_bf16\n")
    assert not cpu_has_amx("processor : 0\n")


@pytest.mark.parametrize("choice,device,dtype,bf16,want", [
    ("auto", "cpu", "float32", True, "bfloat16"),
    ("auto", "cpu", "float32", False, "float32"),     # emulated bf16 would be slower
    ("bfloat16", "cpu", "float32", False, "bfloat16"),  # asked for: the numbers it gives, however slow
    ("auto", "cuda", "float32", True, "float32"),     # a GPU trains in bf16 through trainer.dtype
    ("bfloat16", "cpu", "bfloat16", True, "float32"),  # bf16 weights: nothing to autocast
    ("float32", "cpu", "float32", True, "float32"),
])
def test_autocast_only_for_fp32_training_on_a_cpu(choice, device, dtype, bf16, want):
    assert resolve_autocast(choice, device, dtype, bf16=bf16) == want


def test_autocast_takes_over_the_backward_products_and_a_bad_choice_names_the_key():
    assert resolve_backward_products("bfloat16", "cpu", "float32", 2, amx=True, autocast="bfloat16") == "float32"
    assert resolve_backward_products("auto", "cpu", "float32", 2, amx=True, autocast="float32") == "bfloat16"
    with pytest.raises(ValueError, match="trainer.autocast='fp16'"):
        resolve_autocast("fp16", "cpu", "float32")


def test_autocast_runs_the_forward_in_bf16_and_moves_log_probs_and_gradient_a_little():
    """What the worker does under trainer.autocast=bfloat16 (eager attention, logits back to fp32), against the
    exact fp32 forward of the same weights: the log-probs within 0.1, the gradient's direction kept."""
    ids = torch.randint(0, 50, (4, 12), generator=torch.Generator().manual_seed(1))
    exact = _model(attn="eager")
    l32, g32 = _loss_and_grads(exact, ids)
    cast = _model(attn="eager")
    with autocast_context("bfloat16"):
        logits = cast(input_ids=ids).logits
    assert logits.dtype == torch.bfloat16  # the products really ran in bf16
    cast.zero_grad(set_to_none=True)
    with autocast_context("bfloat16"):
        logits = cast(input_ids=ids).logits.float()
    loss = torch.log_softmax(logits, -1)[:, :-1].gather(-1, ids[:, 1:, None]).mean()
    loss.backward()
    g16 = torch.cat([p.grad.flatten() for p in cast.parameters()])
    assert all(p.dtype == torch.float32 for p in cast.parameters())  # weights and gradients stay fp32
    assert g16.dtype == torch.float32
    lp32 = torch.log_softmax(l32, -1)
    lp16 = torch.log_softmax(logits.detach(), -1)
    gap = (lp16 - lp32).abs().max().item()
    assert 0 < gap < 0.1, gap
    assert torch.nn.functional.cosine_similarity(g16, g32, 0) > 0.99
    # "float32" is no autocast at all: the exact forward, bit for bit.
    with autocast_context("float32"):
        again = exact(input_ids=ids).logits.detach()
    assert torch.equal(again, l32)
