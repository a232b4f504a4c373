"""Rows of zero advantage skip the backward, and the update is the one they would have given.

The real `PolicyWorker` (DeepSpeed ZeRO-2 on gloo, one rank, a tiny random
Qwen2), twice from the same weights: `trainer.skip_zero_advantage` on and
off, the same two batches in turn. Run in a child process: the worker sets
the process's distributed environment and torch's thread count.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


def _child(tmp: str) -> None:
    import torch

    from ttrl.bench.gpu_torch_check import batch, build_model, new_worker
    from ttrl.distributed.ports import free_port
    from ttrl.trainer.options import UpdateOptions

    path, _ = build_model(Path(tmp), (64, 2, 2, 128, 32), "float32")
    # 8 rows, 2 micro-batches of 4: three rows carry gradient in the first batch, one in the second (so one
    # micro-batch has to borrow a zero-advantage row).
    batches = []
    for seed, live in ((0, [0, 3, 5]), (1, [6])):
        b = batch(8, 6, 10, 32, seed=seed)
        keep = torch.zeros(8, 1)
        keep[live] = 1.0
        b["advantages"] = b["advantages"] * keep
        batches.append(b)
    port = free_port()
    out = {}
    for skip in (False, True):
        w = new_worker("cpu", "float32", 2, 4, 2, path, port)
        grad_rows: list[int] = []
        logp = w._logp

        def counting(model, mb, *a, _logp=logp, grad_rows=grad_rows, **k):
            if torch.is_grad_enabled():
                grad_rows.append(int(mb["input_ids"].shape[0]))
            return _logp(model, mb, *a, **k)

        w._logp = counting
        opts = UpdateOptions(policy_loss="ppo_clip", loss_agg="token_mean", skip_zero_advantage=skip)
        stats = [w.train_step(b, float(b["response_mask"].sum()), opts) for b in batches]
        params = {n: p.detach().clone() for n, p in w.engine.module.named_parameters()}
        out[skip] = (stats, params, grad_rows)
        del w
    (s_off, p_off, rows_off), (s_on, p_on, rows_on) = out[False], out[True]
    worst = max(float((p_off[n] - p_on[n]).abs().max()) for n in p_off)
    moved = max(float(p.abs().sum()) for p in p_on.values()) > 0
    print("RESULT " + json.dumps({
        "worst_param_diff": worst, "moved": moved, "grad_rows_off": rows_off, "grad_rows_on": rows_on,
        "stats_off": [{k: v for k, v in s.items()} for s in s_off],
        "stats_on": [{k: v for k, v in s.items()} for s in s_on]}), flush=True)


def test_zero_advantage_rows_skip_the_backward_and_the_update_is_unchanged(tmp_path):
    from tests.integration.child import run_child  # here: the child runs this file as a script

    res = run_child(__file__, tmp_path)
    # Every row went through a backward without the skip; with it, only the rows with an advantage
    # (3, then 1 plus the one zero row the empty micro-batch borrows), still 2 micro-batches a step.
    assert sum(res["grad_rows_off"]) == 16 and len(res["grad_rows_off"]) == 4
    assert sum(res["grad_rows_on"][:2]) == 3 and sum(res["grad_rows_on"][2:]) == 2 and len(res["grad_rows_on"]) == 4
    # The same two updates: weights, losses and the metrics over every row (entropy, log-prob gap).
    assert res["worst_param_diff"] < 1e-6, res["worst_param_diff"]
    for off, on in zip(res["stats_off"], res["stats_on"]):
        assert on["skipped"] == off["skipped"] == 0.0
        for key in ("pg_loss", "grad_norm", "entropy_sum", "entropy_n", "logprob_diff_sum", "logprob_diff_n"):
            assert on[key] == pytest.approx(off[key], rel=1e-5, abs=1e-7), key


if __name__ == "__main__":
    _child(sys.argv[1])
