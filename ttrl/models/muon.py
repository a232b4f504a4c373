"""Muon for the warm start's hidden matrices, their orthogonalisation done one shape at a time.

Muon (K. Jordan et al., 2024, "Muon: An optimizer for hidden layers in neural
networks"): Nesterov momentum on the gradient, then the update replaced by the
nearest semi-orthogonal matrix, approximated by five quintic Newton-Schulz
iterations in bf16; its rate scaled by 0.2 * sqrt(max(rows, cols)) so that one
learning rate serves it and AdamW alike (J. Liu et al., 2025, "Muon is
Scalable for LLM Training"). The arithmetic is torch.optim.Muon's with
adjust_lr_fn="match_rms_adamw" and no weight decay (a unit test holds them
together); what differs is how: torch's loops over the matrices, and on the
demo model's 28 small ones (128x128, 128x512) that loop cost a third of a
warm-start step on 2 cores, so the matrices of one shape are stacked and
orthogonalised by one batched matmul per iteration.

Must never see embeddings, the output head, norms or biases: those are
AdamW's (the caller splits the parameters; `hidden_matrices` says how).
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

import torch

# Newton-Schulz coefficients (quintic, steepest at zero) and steps: torch's and the paper's.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5


def hidden_matrices(model: torch.nn.Module) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    """(the 2-D weights inside the layers, everything else): Muon's and AdamW's."""
    muon, rest = [], []
    for name, p in model.named_parameters():
        inner = p.ndim == 2 and "embed_tokens" not in name and "lm_head" not in name
        (muon if inner else rest).append(p)
    return muon, rest


def orthogonalize(g: torch.Tensor, steps: int = NS_STEPS, eps: float = 1e-7) -> torch.Tensor:
    """A stack of matrices (n, rows, cols) mapped to near-orthogonal ones of the same shape, in bf16."""
    a, b, c = NS_COEFFICIENTS
    x = g.bfloat16()
    tall = x.size(-2) > x.size(-1)
    if tall:  # iterate on the wide side: the Gram matrix is the smaller one
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.mT if tall else x


class StackedMuon(torch.optim.Optimizer):
    """Muon (momentum 0.95, Nesterov, no weight decay) over 2-D parameters; one group's lr is set per step."""

    def __init__(self, params: Any, lr: float, momentum: float = 0.95) -> None:
        super().__init__(params, {"lr": lr, "momentum": momentum})
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"Muon takes 2-D matrices only, not a parameter of shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        for group in self.param_groups:
            mu = group["momentum"]
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            bufs = [self.state[p].setdefault("momentum_buffer", torch.zeros_like(p)) for p in params]
            torch._foreach_mul_(bufs, mu)
            torch._foreach_add_(bufs, grads)
            # Nesterov: the step looks ahead along the momentum.
            updates = torch._foreach_add(grads, bufs, alpha=mu)
            by_shape: dict[tuple[int, ...], list[int]] = defaultdict(list)
            for i, p in enumerate(params):
                by_shape[tuple(p.shape)].append(i)
            for shape, idx in by_shape.items():
                ortho = orthogonalize(torch.stack([updates[i] for i in idx]))
                scale = group["lr"] * 0.2 * math.sqrt(max(shape))
                torch._foreach_add_([params[i] for i in idx], [o.to(params[i].dtype) for i, o in zip(idx, ortho)],
                                    alpha=-scale)
