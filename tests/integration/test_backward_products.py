"""trainer.backward_products=bfloat16 in the real PolicyWorker: the same forward, a gradient within a percent.

DeepSpeed ZeRO-2 on gloo, one rank, a tiny random Qwen2, twice from the same
weights (float32, then bfloat16 products in the backward), the same batch:
the losses and metrics the forward gives are identical, the gradient norm and
the weights after the step within a percent, and the bf16 run did change
something (the products really ran in bf16). In a child process: the worker
sets the process's distributed environment and torch's thread count.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


def _child(tmp: str) -> None:
    import torch

    from ttrl.bench.gpu_torch_check import batch, build_model, spec
    from ttrl.distributed.ports import free_port
    from ttrl.trainer.options import UpdateOptions
    from ttrl.trainer.worker import PolicyWorker

    path, _ = build_model(Path(tmp), (64, 2, 2, 128, 32), "float32")
    b = batch(8, 6, 10, 32, seed=0)
    port = free_port()
    out = {}
    for which in ("float32", "bfloat16"):
        w = PolicyWorker(0, 1, spec("cpu", "float32", 2, 4, 2) | {"backward_products": which})
        w.setup("127.0.0.1", port, path, total_opt_steps=10)
        before = {n: p.detach().clone() for n, p in w.engine.module.named_parameters()}
        stats = w.train_step(b, float(b["response_mask"].sum()), UpdateOptions(policy_loss="ppo_clip"))
        after = {n: p.detach().clone() for n, p in w.engine.module.named_parameters()}
        out[which] = (w.backward_products, stats, {n: after[n] - before[n] for n in after})
        del w
    (r32, s32, d32), (r16, s16, d16) = out["float32"], out["bfloat16"]
    delta32 = torch.cat([d.flatten() for d in d32.values()])
    delta16 = torch.cat([d.flatten() for d in d16.values()])
    print("RESULT " + json.dumps({
        "resolved": [r32, r16], "stats32": s32, "stats16": s16,
        "update_rel_diff": float((delta16 - delta32).norm() / delta32.norm()),
        "update_cos": float(torch.nn.functional.cosine_similarity(delta16, delta32, 0))}), flush=True)


def test_bf16_backward_products_keep_the_forward_and_move_the_update_by_under_a_percent(tmp_path):
    from tests.integration.child import run_child  # here: the child runs this file as a script

    res = run_child(__file__, tmp_path)
    assert res["resolved"] == ["float32", "bfloat16"]
    s32, s16 = res["stats32"], res["stats16"]
    # What the forward gives (the loss, the entropy the guard reads, the ratio's clip share) does not move.
    for k in ("pg_loss", "entropy_sum", "clip_frac"):
        if k in s32:
            assert s16[k] == s32[k], (k, s16[k], s32[k])
    assert abs(s16["grad_norm"] - s32["grad_norm"]) <= 0.01 * s32["grad_norm"]
    # Adam's first step is about lr * sign(grad): a different update means the bf16 products really ran.
    assert 0 < res["update_rel_diff"] < 0.2, res
    assert res["update_cos"] > 0.98, res


if __name__ == "__main__":
    _child(sys.argv[1])
