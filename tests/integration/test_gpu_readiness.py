"""The GPU path's start-up choices, checked on CPU against the pinned libraries themselves.

No GPU here: these read what DeepSpeed would build from our config, so that
the first GPU run does not stop on a compiler it lacks.
"""

from __future__ import annotations

import pytest
import torch

from ttrl.trainer.ds_config import build_ds_config

pytestmark = pytest.mark.integration


def test_deepspeed_builds_torch_adamw_from_the_gpu_config_not_a_jit_op():
    from deepspeed.runtime.engine import DeepSpeedEngine

    cfg = build_ds_config(zero_stage=2, micro_batch_size=1, grad_accum=1, world_size=1, lr=1e-5,
                          betas=(0.9, 0.99), weight_decay=0.0, grad_clip=1.0, dtype="bfloat16", device="cuda",
                          offload=False)
    params = dict(cfg["optimizer"]["params"])

    class _Engine:  # what the method reads of the engine before it picks a compiled Adam
        def zero_use_cpu_optimizer(self):
            raise AssertionError("DeepSpeed went on to choose a compiled Adam")

    cls, extra = DeepSpeedEngine.get_optimizer_configuration(_Engine(), params, True)
    assert cls is torch.optim.AdamW
    # The leftover keys are what DeepSpeed passes on: torch accepts them (fused runs on CPU tensors too).
    w = torch.nn.Parameter(torch.ones(3))
    opt = cls([w], **params, **extra)
    w.grad = torch.ones(3)
    opt.step()
    assert opt.param_groups[0]["fused"] is True and float(w[0]) < 1.0
