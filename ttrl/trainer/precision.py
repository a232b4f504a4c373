"""Reduced precision for an fp32 model's update on a CPU: the backward's products in bf16, or bf16 autocast.

Two choices, both for fp32 training (a GPU trains in bf16 already):

- `trainer.backward_products`, below: the forward exact, the backward's products in bf16.
- `trainer.autocast` (`resolve_autocast`, `autocast_context`): the policy's
  forward and backward under `torch.autocast(bfloat16)`, as TRL's and
  Transformers' `bf16=True` do on a CPU, with plain matmul-softmax attention
  (torch's fused CPU attention has a bf16 backward about 4x slower than its
  fp32 one, which eats what the bf16 products save). Weights, gradients, the
  optimizer and the log-softmax over the vocabulary stay fp32.

The backward's products, in detail:

What it does: gives each float32 `nn.Linear` of a model a forward whose result
is the same fp32 product as before (so log-probs, the PPO ratio, the losses and
every metric are unchanged to the bit) and whose backward computes the input
and weight gradients as bfloat16 products, cast back to fp32 before they reach
the parameters, DeepSpeed's reduction and the optimizer. On a CPU with AMX a
bf16 product runs about 6x faster than the fp32 one (the tiny demo model's
[1504, 128] x [128, 512]: 0.19 ms against 1.21), and the backward holds two
thirds of a layer's products; the gradient moves by about 0.3% of its norm.

Where it differs from autocast: the forward is exact, so the log-probs, the
ratio and every metric match an fp32 engine's; autocast's forward is bf16 (its
log-probs move by about a hundredth) and saves more (its forward products too).

What it must never do: change a forward result (backward_products), the fp32
master weights or the optimizer state; apply under ZeRO-3 (its partitioned
parameters come with their own linear) or on a GPU (training there is bf16
already); turn itself on by "auto" where bf16 products are emulated (slower,
not faster); load the policy for autocast with the fused CPU attention.
"""

from __future__ import annotations

import types
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ttrl.config import AUTOCAST, BACKWARD_PRODUCTS


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The CPU's feature flags: the first `flags` line of /proc/cpuinfo (or of `cpuinfo`); empty off Linux."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:  # not Linux: no way to tell, so the exact path
            return set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[-1].split())
    return set()


def cpu_has_amx(cpuinfo: str | None = None) -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (AMX tiles), from /proc/cpuinfo's flags."""
    return "amx_bf16" in cpu_flags(cpuinfo)


def cpu_has_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU has any bf16 instructions: AVX512-BF16 (AMD Zen 4, Intel Cooper Lake on) or AMX
    (Intel Sapphire Rapids on). Without them torch converts bf16 to fp32 and back, slower than fp32 itself."""
    return bool(cpu_flags(cpuinfo) & {"avx512_bf16", "amx_bf16"})


def resolve_autocast(choice: str, device: str, dtype: str, bf16: bool | None = None) -> str:
    """trainer.autocast on this rank: "bfloat16" or "float32" (no autocast).

    Only fp32 training on a CPU autocasts: a GPU's update is bf16 already
    (`trainer.dtype`). "auto" autocasts where the CPU has bf16 instructions
    (`cpu_has_bf16`); an explicit "bfloat16" autocasts anyway (emulated bf16
    is slower than fp32, but the numbers are what was asked for).
    """
    if choice not in AUTOCAST:
        raise ValueError(f"trainer.autocast={choice!r}: expected one of {', '.join(AUTOCAST)}")
    if device != "cpu" or dtype != "float32" or choice == "float32":
        return "float32"
    if choice == "bfloat16":
        return "bfloat16"
    return "bfloat16" if (cpu_has_bf16() if bf16 is None else bf16) else "float32"


def autocast_context(which: str):
    """The context the policy's forward runs in: CPU bf16 autocast for "bfloat16", else nothing."""
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=which == "bfloat16")


def autocast_load_kwargs(which: str) -> dict[str, str]:
    """`from_pretrained` arguments for a model that will run under `autocast_context(which)`.

    Under bf16 autocast, plain matmul-softmax attention: torch's fused CPU attention (sdpa) runs its backward
    about 4x slower in bf16 than in fp32, more than the bf16 products save (the warm start's profile). In fp32
    the model's own choice stays.
    """
    return {"attn_implementation": "eager"} if which == "bfloat16" else {}


def resolve_backward_products(choice: str, device: str, dtype: str, zero_stage: int,
                              amx: bool | None = None, autocast: str = "float32") -> str:
    """"auto" -> "bfloat16" for fp32 training on a CPU with AMX below ZeRO-3, else "float32".

    Under bf16 autocast ("bfloat16" from `resolve_autocast`) the products are bf16 already: "float32" (none
    of this module's linears), whatever was asked.
    """
    if choice not in BACKWARD_PRODUCTS:
        raise ValueError(f"trainer.backward_products={choice!r}: expected one of {', '.join(BACKWARD_PRODUCTS)}")
    if autocast == "bfloat16":
        return "float32"
    if choice != "auto":
        return choice
    if device != "cpu" or dtype != "float32" or zero_stage >= 3:
        return "float32"
    return "bfloat16" if (cpu_has_amx() if amx is None else amx) else "float32"


class _Bf16BackwardLinear(torch.autograd.Function):
    """y = x W^T + b in fp32; dy W and dy^T x as bf16 products."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        # The bf16 copies are what the backward needs, at half the memory of the fp32 input.
        ctx.save_for_backward(x.to(torch.bfloat16), weight.to(torch.bfloat16))
        ctx.has_bias = bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x16, w16 = ctx.saved_tensors
        g16 = grad.to(torch.bfloat16)
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = (g16 @ w16).to(grad.dtype)
        if ctx.needs_input_grad[1]:
            gw = (g16.reshape(-1, g16.shape[-1]).t() @ x16.reshape(-1, x16.shape[-1])).to(grad.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = grad.reshape(-1, grad.shape[-1]).sum(0)  # a sum, not a product: kept in fp32
        return gx, gw, gb


def _forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if not torch.is_grad_enabled() or not (x.requires_grad or self.weight.requires_grad):
        return F.linear(x, self.weight, self.bias)  # no backward coming: the plain product
    return _Bf16BackwardLinear.apply(x, self.weight, self.bias)


def bf16_backward_products(model: torch.nn.Module) -> int:
    """Give every fp32 nn.Linear of `model` the bf16 backward; returns how many it changed."""
    n = 0
    for mod in model.modules():
        if type(mod) is torch.nn.Linear and mod.weight.dtype == torch.float32:
            mod.forward = types.MethodType(_forward, mod)
            n += 1
    return n


__all__ = ["autocast_context", "autocast_load_kwargs", "bf16_backward_products", "cpu_flags", "cpu_has_amx", "cpu_has_bf16", "resolve_autocast",
           "resolve_backward_products"]
