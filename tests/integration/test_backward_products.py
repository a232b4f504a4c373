"""trainer.backward_products=bfloat16 and trainer.autocast=bfloat16 in the real PolicyWorker.

DeepSpeed ZeRO-2 on gloo, one rank, a tiny random Qwen2, three times from the
same weights (float32; bfloat16 products in the backward; the update under
bf16 autocast), the same batch. The backward's products: the losses and
metrics the forward gives are identical, the gradient norm and the weights
after the step within a percent, and the bf16 run did change something (the
products really ran in bf16). Autocast: the worker loads plain attention, the
entropy and the gradient norm within a few percent, the update's direction
kept. In a child process: the worker sets the process's distributed
environment and torch's thread count.
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
    runs = {"float32": {"backward_products": "float32"}, "bfloat16": {"backward_products": "bfloat16"},
            # Asked together: autocast wins (its products are bf16 already).
            "autocast": {"autocast": "bfloat16", "backward_products": "bfloat16"}}
    for which, keys in runs.items():
        w = PolicyWorker(0, 1, spec("cpu", "float32", 2, 4, 2) | keys)
        w.setup("127.0.0.1", port, path, total_opt_steps=10)
        attn = w.engine.module.config._attn_implementation
        before = {n: p.detach().clone() for n, p in w.engine.module.named_parameters()}
        stats = w.train_step(b, float(b["response_mask"].sum()), UpdateOptions(policy_loss="ppo_clip"))
        after = {n: p.detach().clone() for n, p in w.engine.module.named_parameters()}
        delta = torch.cat([(after[n] - before[n]).flatten() for n in after])
        out[which] = ([w.backward_products, w.autocast, attn], stats, delta)
        del w
    d32 = out["float32"][2]
    res = {"resolved": {k: v[0] for k, v in out.items()}, "stats": {k: v[1] for k, v in out.items()}}
    for k in ("bfloat16", "autocast"):
        res[f"{k}_update_rel_diff"] = float((out[k][2] - d32).norm() / d32.norm())
        res[f"{k}_update_cos"] = float(torch.nn.functional.cosine_similarity(out[k][2], d32, 0))
    print("RESULT " + json.dumps(res), flush=True)


@pytest.fixture(scope="module")
def res(tmp_path_factory):
    """The three runs, once for both tests (one child process)."""
    from tests.integration.child import run_child  # here: the child runs this file as a script

    return run_child(__file__, tmp_path_factory.mktemp("precision"))


def test_bf16_backward_products_keep_the_forward_and_move_the_update_by_under_a_percent(res):
    assert res["resolved"]["float32"][:2] == ["float32", "float32"]
    assert res["resolved"]["bfloat16"][:2] == ["bfloat16", "float32"]
    s32, s16 = res["stats"]["float32"], res["stats"]["bfloat16"]
    # What the forward gives (the loss, the entropy the guard reads, the ratio's clip share) does not move.
    for k in ("pg_loss", "entropy_sum", "clip_frac"):
        if k in s32:
            assert s16[k] == s32[k], (k, s16[k], s32[k])
    assert abs(s16["grad_norm"] - s32["grad_norm"]) <= 0.01 * s32["grad_norm"]
    # Adam's first step is about lr * sign(grad): a different update means the bf16 products really ran.
    assert 0 < res["bfloat16_update_rel_diff"] < 0.2, res
    assert res["bfloat16_update_cos"] > 0.98, res


def test_autocast_loads_plain_attention_and_keeps_the_update_close(res):
    # Autocast resolved on, the backward's own bf16 products off under it, plain attention loaded.
    assert res["resolved"]["autocast"] == ["float32", "bfloat16", "eager"], res["resolved"]
    assert res["resolved"]["float32"][2] != "eager"  # the exact run keeps the fused attention
    s32, sac = res["stats"]["float32"], res["stats"]["autocast"]
    assert sac["entropy_sum"] != s32["entropy_sum"]  # the forward really ran in bf16
    assert abs(sac["entropy_sum"] - s32["entropy_sum"]) <= 0.02 * abs(s32["entropy_sum"])
    assert abs(sac["grad_norm"] - s32["grad_norm"]) <= 0.05 * s32["grad_norm"]
    assert 0 < res["autocast_update_rel_diff"] < 0.5, res
    assert res["autocast_update_cos"] > 0.9, res


if __name__ == "__main__":
    _child(sys.argv[1])
