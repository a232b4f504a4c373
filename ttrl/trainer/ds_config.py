"""Build the DeepSpeed config and the LR schedule from the Hydra trainer config.

One source of truth: nobody writes a DeepSpeed JSON beside the Hydra config.
Pure Python (plus torch for the scheduler); never imports deepspeed itself.
"""

from __future__ import annotations

import math
from typing import Any


def build_ds_config(*, zero_stage: int, micro_batch_size: int, grad_accum: int, world_size: int,
                    lr: float, betas: tuple[float, float], weight_decay: float, grad_clip: float,
                    dtype: str, device: str, offload: bool, train: bool = True) -> dict[str, Any]:
    """A DeepSpeed config dict; `train=False` for frozen models (no optimizer)."""
    zero: dict[str, Any] = {"stage": zero_stage}
    if zero_stage == 3:
        # Keep gathered layers small: they are gathered one by one anyway.
        zero.update({"stage3_param_persistence_threshold": 0, "stage3_prefetch_bucket_size": 5e7})
    if offload and train:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": device == "cuda"}
        if zero_stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": device == "cuda"}
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch_size * grad_accum * world_size,
        "zero_optimization": zero,
        "bf16": {"enabled": dtype == "bfloat16"},
        # bf16 weights, but gradients accumulated over micro-batches in fp32:
        # a bf16 sum of many small per-micro-batch gradients drops bits.
        **({"data_types": {"grad_accum_dtype": "fp32"}} if dtype == "bfloat16" else {}),
        "fp16": {"enabled": dtype == "float16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if train:
        cfg["gradient_clipping"] = grad_clip
        params: dict[str, Any] = {"lr": lr, "betas": list(betas), "weight_decay": weight_decay}
        # torch's AdamW everywhere: DeepSpeed's own Adams are ops compiled at
        # start-up (CPU Adam needs a C++ toolchain, FusedAdam an nvcc matching
        # torch's CUDA), which most hosts and our image lack. On a GPU torch's
        # fused AdamW is one kernel, shipped compiled with torch.
        params["torch_adam"] = True
        if device == "cuda" and not offload:
            params["fused"] = True
        cfg["optimizer"] = {"type": "AdamW", "params": params}
    return cfg


def lr_lambda(schedule: str, warmup_steps: int, total_steps: int, min_ratio: float):
    """Multiplier of the peak lr at optimizer step `s` (linear warmup, then decay)."""

    def f(s: int) -> float:
        if warmup_steps and s < warmup_steps:
            return (s + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (s - warmup_steps) / span)
        if schedule == "linear":
            decay = 1.0 - progress
        else:  # cosine
            decay = 0.5 * (1.0 + math.cos(math.pi * progress))
        return min_ratio + (1.0 - min_ratio) * decay

    return f
