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


def _runner_calls() -> dict[str, set[str]]:
    """Each `self.model_runner.<method>(...)` our worker extension makes, with the keywords it passes."""
    import ast
    import inspect

    from ttrl.rollout import vllm_ext

    calls: dict[str, set[str]] = {}
    for node in ast.walk(ast.parse(inspect.getsource(vllm_ext))):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Attribute) and node.func.value.attr == "model_runner"):
            calls.setdefault(node.func.attr, set()).update(k.arg for k in node.keywords if k.arg)
    return calls


@pytest.mark.parametrize("runner", [
    "vllm.v1.worker.gpu_model_runner:GPUModelRunner",   # V1: what CPU CI's engines descend from
    "vllm.v1.worker.gpu.model_runner:GPUModelRunner",   # V2: vLLM 0.32's default on CUDA
    "vllm.v1.worker.cpu_model_runner:CPUModelRunner",
])
def test_every_model_runner_offers_what_the_weight_reload_calls(runner):
    import importlib
    import inspect

    mod, name = runner.split(":")
    cls = getattr(importlib.import_module(mod), name)
    calls = _runner_calls()
    assert {"reload_weights", "get_model", "reset_lora_state"} <= set(calls)  # the parse found the calls
    for method, keywords in calls.items():
        assert hasattr(cls, method), f"{runner} has no {method}: the weight sync would fail on it"
        params = inspect.signature(getattr(cls, method)).parameters
        assert keywords <= set(params), f"{runner}.{method} takes no {keywords - set(params)}"


def test_the_layerwise_reload_the_nccl_path_streams_into_exists_in_the_pinned_vllm():
    import inspect

    from vllm.config import set_current_vllm_config  # noqa: F401  (the extension enters it)
    from vllm.model_executor.model_loader.reload import finalize_layerwise_reload, initialize_layerwise_reload

    assert list(inspect.signature(initialize_layerwise_reload).parameters)[:1] == ["model"]
    assert callable(finalize_layerwise_reload)  # wrapped by a decorator: (*args, **kwargs)


def test_bf16_training_accumulates_gradients_in_fp32_under_zero2(tmp_path, monkeypatch):
    """The GPU dtype (bf16) with our DeepSpeed config, really initialised (gloo, one rank) and stepped."""
    import deepspeed

    for k, v in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29561", "RANK": "0", "LOCAL_RANK": "0",
                 "WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(k, v)
    cfg = build_ds_config(zero_stage=2, micro_batch_size=2, grad_accum=2, world_size=1, lr=1e-2,
                          betas=(0.9, 0.99), weight_decay=0.0, grad_clip=1.0, dtype="bfloat16", device="cpu",
                          offload=False)
    assert cfg["data_types"] == {"grad_accum_dtype": "fp32"}
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 1))
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg,
                                      dist_init_required=True)
    try:
        before = [p.detach().float().clone() for p in engine.module.parameters()]
        for _ in range(2):  # two micro-batches, one optimizer step
            x = torch.randn(2, 8, dtype=torch.bfloat16)
            loss = engine(x).float().pow(2).mean()
            engine.backward(loss)
            engine.step()
        assert engine.optimizer.gradient_accumulation_dtype == torch.float32
        after = list(engine.module.parameters())
        assert all(a.dtype == torch.bfloat16 for a in after)
        assert any(not torch.equal(b, a.detach().float()) for b, a in zip(before, after))
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def test_the_torch_level_gpu_check_runs_its_checks_on_cpu_without_vllm_or_ray(tmp_path):
    # The self-test of `python -m ttrl.bench.gpu_check --device cpu` (what a GPU box without vLLM and Ray runs,
    # `ttrl.bench.gpu_torch_check`): the real PolicyWorker's ZeRO-2 and ZeRO-3 steps, its own weights handed
    # to a second process as push_weights_shared packs them, its log-probs against an fp32 forward, and a
    # colocated handoff opened in a second process, here over gloo and /dev/shm.
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    # In-process (not through gpu_check's subprocess), so that an import of vllm or ray would be seen here.
    code = ("import sys; from ttrl.bench.gpu_torch_check import main; rc = main(['--device', 'cpu']); "
            "leaked = {'vllm', 'ray'} & {m.split('.')[0] for m in sys.modules}; "
            "print('LEAKED', sorted(leaked)) if leaked else None; sys.exit(rc or (3 if leaked else 0))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = {x["measure"]: x for x in json.loads((tmp_path / "outputs/gpu_check/torch_cpu.json").read_text())}
    assert set(lines) == {"trainer log-probs (float32) vs fp32", "DeepSpeed ZeRO-2 steps (PolicyWorker)",
                          "DeepSpeed ZeRO-3 step (PolicyWorker)", "colocated handoff (ipc.py)",
                          "handoff of the worker's weights, ZeRO-2",
                          "handoff of the worker's weights, ZeRO-3 (gathered layer by layer)"}
    assert all(x["verdict"] == "ok" for x in lines.values()), lines
    assert "applied 2/2, weights moved True" in lines["DeepSpeed ZeRO-2 steps (PolicyWorker)"]["value"]
    assert "weights moved True" in lines["DeepSpeed ZeRO-3 step (PolicyWorker)"]["value"]
    assert "bit-exact" in lines["colocated handoff (ipc.py)"]["value"] and "/dev/shm" in \
        lines["colocated handoff (ipc.py)"]["value"]
    for zero in ("ZeRO-2", "ZeRO-3 (gathered layer by layer)"):
        value = lines[f"handoff of the worker's weights, {zero}"]["value"]
        done, total = value.split(" tensors")[0].split("/")
        assert done == total and int(total) > 10 and "/dev/shm" in value, value
