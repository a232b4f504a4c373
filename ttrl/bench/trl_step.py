"""TRL's GRPOTrainer on the bench's problem, in a process of its own.

    python -m ttrl.bench.trl_step '{"model_path": ..., "prompts": [...], "group": 8, ...}'

Prints one line `TRL_RESULT {json}` (seconds per step after a warm-up step).
It runs apart from the bench's driver so that TRL gets a clean process and
the whole machine, as ttrl's run had, and so that its vLLM (which would pin
the process's threads) cannot touch anything else.

TRL 1.16's colocated vLLM pushes weights with `model.load_weights`, which
vLLM 0.32 rejects after its CPU weight processing ("'Parameter' object has
no attribute 'weight_loader'"). With `vllm_reload=true` (the default) the
push goes through `model_runner.reload_weights` instead, the call ttrl's
own engine uses: the same tensors arrive, TRL's generation stays on vLLM.
This module changes nothing in TRL beyond that one method, and only here.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any


def digit_share(prompts, completions, **kwargs) -> list[float]:
    """The reward TRL optimises here (cheap and varied; the time is the point)."""
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


def _patch_vllm_weight_push() -> None:
    from trl.generation import vllm_generation

    cls = vllm_generation.VLLMGeneration
    original = cls.sync_weights

    def sync_weights(self):
        if self.mode != "colocate":
            return original(self)
        runner = self.llm.llm_engine.model_executor.driver_worker.model_runner
        # reload_weights needs the whole model in one call (it rebuilds every layer).
        runner.reload_weights(weights_iterator=((n, p.detach()) for n, p in self._iter_named_params()))
        self.llm.reset_prefix_cache()

    cls.sync_weights = sync_weights


def run(model_path: str, prompts: list[str], group: int, prompts_per_step: int, max_tokens: int, lr: float,
        steps: int, use_vllm: bool, vllm_reload: bool = True, kv_cache_gb: int = 1, threads: int = 0,
        bf16: bool = False) -> dict:
    """Seconds per GRPO step of TRL's GRPOTrainer (after one warm-up step); `bf16`: its update under bf16
    autocast (GRPOConfig's own default), else fp32."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    if use_vllm:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gb))
        if vllm_reload:
            _patch_vllm_weight_push()
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []
            self.t0 = 0.0
            self.first_step_at: float | None = None  # wall clock

        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()
            if self.first_step_at is None:
                self.first_step_at = time.time()

        def on_step_end(self, args, state, control, **kw):
            self.times.append(time.perf_counter() - self.t0)

    tok = AutoTokenizer.from_pretrained(model_path)
    tok.pad_token = tok.pad_token or tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    out = tempfile.mkdtemp(prefix="ttrl-bench-trl-")
    kw: dict[str, Any] = dict(
        output_dir=out, per_device_train_batch_size=group * prompts_per_step, num_generations=group,
        max_completion_length=max_tokens, learning_rate=lr, max_steps=steps + 1, logging_steps=1,
        report_to="none", save_strategy="no", use_cpu=not torch.cuda.is_available(), bf16=bf16,
        temperature=1.0, beta=0.0, seed=0, dataloader_num_workers=0, disable_tqdm=True)
    if use_vllm:
        kw |= dict(use_vllm=True, vllm_mode="colocate", vllm_gpu_memory_utilization=0.2,
                   vllm_max_model_length=256, vllm_enable_sleep_mode=False)
    timer = StepTimer()
    trainer = GRPOTrainer(model=model, reward_funcs=digit_share, args=GRPOConfig(**kw),
                          train_dataset=Dataset.from_dict({"prompt": prompts}), processing_class=tok,
                          callbacks=[timer])
    trainer.train()
    times = timer.times[1:] or timer.times  # the first step pays for warm-up
    lengths = [r["completions/mean_length"] for r in trainer.state.log_history if "completions/mean_length" in r]
    from ttrl.distributed.startup import process_created

    try:  # the precision TRL's colocated vLLM chose (vLLM's "auto" downcasts an fp32 checkpoint)
        engine_dtype = str(trainer.vllm_generation.llm.llm_engine.model_config.dtype).removeprefix("torch.")
    except AttributeError:
        engine_dtype = ""

    return {"trl.step_s": statistics.median(times), "trl.step_mean_s": statistics.mean(times),
            "trl.steps": len(times), "trl.use_vllm": float(use_vllm),
            # From this process's creation to its first step: imports, model, colocated vLLM, trainer.
            "trl.startup_s": (timer.first_step_at or time.time()) - process_created(),
            "trl.vllm_weight_push": ("reload_weights" if vllm_reload else "load_weights") if use_vllm else "",
            "trl.engine_dtype": engine_dtype if use_vllm else "",
            "trl.mean_completion_tokens": statistics.mean(lengths[1:] or lengths) if lengths else float("nan"),
            "trl.threads": torch.get_num_threads(), "trl.bf16": float(bf16)}


def measure(args: dict, timeout_s: float = 900) -> dict:
    """`run` in a fresh Python process; its error, if any, comes back as `trl.error`."""
    import subprocess

    proc = subprocess.run([sys.executable, "-m", "ttrl.bench.trl_step", json.dumps(args)], capture_output=True,
                          text=True, timeout=timeout_s)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("TRL_RESULT "):
            return json.loads(line[len("TRL_RESULT "):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"trl.error": f"exit {proc.returncode}: " + " | ".join(tail)}


if __name__ == "__main__":
    res = run(**json.loads(sys.argv[1]))
    print("TRL_RESULT " + json.dumps(res), flush=True)
