"""The actors of a run and the verbs a step uses on them.

`Runtime` starts (or joins) Ray, places the rollout engines and the trainer
worker groups, and implements the seam a step talks through
(`ttrl.distributed.seam.StepRuntime`): generate, log-probs, values, train,
sync weights, save and load. It splits batches across ranks and engines; it
knows nothing of rewards, votes or ground truth. With model.lora.enabled
the engines start with LoRA on and every sync moves the policy's adapter
alone (the same paths; `ttrl.rollout.lora`).
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict
from typing import Any

import ray
import torch
from ray.exceptions import RayActorError

from ttrl.algos import aggregation_normalizer
from ttrl.distributed.device import resolve_device, resolve_dtype
from ttrl.distributed.group import WorkerGroup
from ttrl.distributed.placement import Placement
from ttrl.distributed.ray_setup import Needs, engine_cpu_threads, start_ray, stop_ray, usable_cpus
from ttrl.distributed.startup import ActorTimes, Phases, bring_up, engines_size_first
from ttrl.rollout.lora import lora_spec
from ttrl.rollout.vllm_engine import EngineArgs, VLLMEngine
from ttrl.rollout.weights import EngineSyncError
from ttrl.trainer.batch import Batch, batch_size, concat, select, split, spread_rows, zero_advantage_rows
from ttrl.trainer.options import UpdateOptions
from ttrl.trainer.worker import ADDITIVE_STATS, CriticWorker, PolicyWorker


class Runtime:
    need_ref: bool
    need_critic: bool
    mini: int
    weights_version: int

    def __init__(self, cfg: Any, model_path: str, total_opt_steps: int, tenant_slots: int = 0):
        # tenant_slots: per-request adapters each LoRA engine holds besides the policy's (ttrl-serve's tenants).
        t0 = time.perf_counter()
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.dtype = resolve_dtype(cfg.trainer.dtype, self.device)
        self.engine_dtype = resolve_dtype(cfg.model.dtype, self.device)
        self.model_path = model_path
        r, t, a = cfg.rollout, cfg.trainer, cfg.algorithm
        self.need_ref = a.kl_coef > 0
        self.need_critic = a.use_critic
        # The LoRA spec (r, alpha, targets: model.lora, or the adapter dir it names), None for full weights.
        self.lora = lora_spec(cfg.model.lora)
        gpu = self.device == "cuda"
        W = t.num_workers
        n_groups = 1 + int(self.need_critic)
        colocate = cfg.cluster.placement == "colocate"
        trainer_res, engine_res = dict(cfg.cluster.trainer_resources), dict(cfg.cluster.engine_resources)
        custom = {k: v * (W if colocate else W * n_groups) for k, v in trainer_res.items()}
        for k, v in engine_res.items():
            custom[k] = custom.get(k, 0.0) + v * r.num_engines
        needs = Needs(cpus=W * n_groups + r.num_engines,
                      gpus=(max(W, r.num_engines * r.tensor_parallel_size) if colocate
                            else W * n_groups + r.num_engines * r.tensor_parallel_size) if gpu else 0,
                      resources=custom)
        self.phases = Phases(t0=time.time())
        self.owns_ray = start_ray(cfg.cluster.address, self.device, needs, cfg.cluster.num_cpus,
                                  cfg.cluster.num_gpus)
        self.phases.ray_s = time.time() - self.phases.t0
        submitted: dict[str, float] = {}
        # Colocated: slot i hosts engine i and rank i of each trainer group.
        # Split: every actor has its own slot (see placement.py).
        self.placement = Placement(gpu=gpu, colocate=colocate, world_size=W, n_groups=n_groups,
                                   engines=r.num_engines, tp=r.tensor_parallel_size,
                                   timeout_s=cfg.cluster.placement_timeout_s,
                                   trainer_extra=trainer_res, engine_extra=engine_res)

        # ── rollout engines ──────────────────────────────────────────────
        eargs = EngineArgs(
            model_path=model_path, dtype=self.engine_dtype, max_model_len=cfg.model.max_model_len,
            seed=r.seed + cfg.seed, enforce_eager=(not gpu) if r.enforce_eager is None else r.enforce_eager,
            enable_prefix_caching=r.enable_prefix_caching, gpu_memory_utilization=r.gpu_memory_utilization,
            tensor_parallel_size=r.tensor_parallel_size, cpu_kv_cache_gb=r.cpu_kv_cache_gb,
            device=self.device, enable_sleep_mode=gpu and r.sleep_between_steps,
            cpu_threads=0 if gpu else self.engine_threads(r.overlap), lora=self.lora,
            tenant_slots=tenant_slots if self.lora else 0)
        engine_cls = ray.remote(VLLMEngine)

        def start_engines():
            submitted["engines"] = time.time()
            self.engines = [
                engine_cls.options(name=f"rollout-{i}", max_restarts=r.max_restarts, max_task_retries=0,
                                   **self.placement.engine(i)).remote(
                    EngineArgs(**{**asdict(eargs), "seed": eargs.seed + i}))
                for i in range(r.num_engines)
            ]
            refs = [e.info.remote() for e in self.engines]
            return lambda: ray.get(refs)

        # ── trainer groups ───────────────────────────────────────────────
        step_batch = cfg.data.prompts_per_step * r.n_train
        self.mini = t.mini_batch_size or step_batch
        grad_accum = self.mini // W // t.micro_batch_size
        spec = dict(device=self.device, dtype=self.dtype, seed=cfg.seed, zero_stage=t.zero_stage,
                    micro_batch_size=t.micro_batch_size, grad_accum=grad_accum, betas=list(t.betas),
                    logprob_micro_batch_size=t.logprob_micro_batch_size,  # null: the worker uses micro_batch_size
                    weight_decay=t.weight_decay, grad_clip=t.grad_clip, offload=t.offload, lr=t.lr,
                    critic_lr=a.critic_lr, lr_schedule=t.lr_schedule,
                    warmup_steps=t.warmup_steps or round((t.warmup_ratio or 0.0) * total_opt_steps),
                    min_lr_ratio=t.min_lr_ratio, gradient_checkpointing=t.gradient_checkpointing,
                    backward_products=t.backward_products,  # "auto" is resolved on the rank's own CPU
                    autocast=t.autocast,  # so is this
                    prompt_once=t.prompt_once,
                    # With LoRA the reference is the policy's base (its adapter off): no second copy.
                    with_ref=self.need_ref and self.lora is None,
                    lora=self.lora, lora_path=cfg.model.lora.path if self.lora else None, base_path=model_path)

        def start_trainers():
            submitted["ranks"] = time.time()
            self.policy = WorkerGroup(PolicyWorker, W, spec, name="policy",
                                      placement=lambda rank: self.placement.trainer(0, rank))
            self.critic = WorkerGroup(CriticWorker, W, spec, name="critic",
                                      placement=lambda rank: self.placement.trainer(1, rank)) \
                if self.need_critic else None
            setups = self.policy.call_async("setup", self.policy.master_addr, self.policy.master_port,
                                            model_path, total_opt_steps)
            if self.critic:
                setups += self.critic.call_async("setup", self.critic.master_addr, self.critic.master_port,
                                                 model_path, total_opt_steps)
            return lambda: ray.get(setups)

        # Engines and DeepSpeed initialise at once, except where they share a
        # GPU: there the engines size their KV cache first (startup.py).
        infos, setups = bring_up(start_engines, start_trainers, engines_size_first(gpu, colocate))
        self.startup_s = time.perf_counter() - t0
        self.phases.engines = [ActorTimes(submitted["engines"], i["t_spawned"], i["t_imported"], i["t_ready"])
                               for i in infos]
        self.phases.ranks = [ActorTimes(submitted["ranks"], x["t_spawned"], x["t_imported"], x["t_ready"])
                             for x in setups]
        self.engine_startup_s = max(i["startup_s"] for i in infos)
        # What "auto" became on the ranks' CPUs (the policy's ranks; a critic's are alike).
        self.backward_products = setups[0].get("backward_products", "float32")
        self.autocast = setups[0].get("autocast", "float32")
        self.weights_version = 0
        self.engine_restarts = 0
        self.weight_sync = self._pick_weight_sync(r.weight_sync, gpu, colocate, W, r.num_engines)
        if self.weight_sync == "nccl":
            self.policy.call("init_weight_group", self.engines, self.engine_dtype, r.sync_bucket_mb)
        if self.weight_sync == "ipc":
            # Each engine must map its trainer rank's memory (same GPU, or same
            # node on CPU): probe once with known bytes before relying on it.
            why = [w for w in self.policy.call("probe_shared", self.engines) if w]
            if why and r.weight_sync == "ipc":
                raise RuntimeError(f"rollout.weight_sync=ipc: {why[0]}")
            if why:
                print(f"ttrl: colocated weight handoff unavailable ({why[0]}); using the Ray path",
                      file=sys.stderr, flush=True)
                self.weight_sync = "ray"
        if self.lora:
            # The starting adapter (zero, or model.lora.path's), pushed as version 0: from here on every
            # engine serves base + adapter, and a refused adapter stops the run before its first step.
            self.policy.call("push_weights", self.engines, 0, self.engine_dtype)

    @staticmethod
    def _pick_weight_sync(asked: str, gpu: bool, colocate: bool, ranks: int, engines: int) -> str:
        """The weight path: NCCL broadcast (GPU, split: a GPU per engine worker apart from rank 0's),
        buckets by handle (colocated, engine i beside rank i), or the Ray object store (anywhere)."""
        if asked == "nccl" and not (gpu and not colocate):
            raise RuntimeError("rollout.weight_sync=nccl needs GPUs and cluster.placement=split")
        if asked == "ipc" and not (colocate and engines <= ranks):
            raise RuntimeError("rollout.weight_sync=ipc needs cluster.placement=colocate and rollout.num_engines "
                               "<= trainer.num_workers (engine i is fed by trainer rank i)")
        if asked != "auto":
            return asked
        if gpu and not colocate:
            return "nccl"
        return "ipc" if gpu and colocate and engines <= ranks else "ray"

    # ── rollout ───────────────────────────────────────────────────────────
    def generate(self, prompt_ids: list[list[int]], n: int, temperature: float, top_p: float, top_k: int,
                 max_tokens: int, seed: int | None = None) -> list[list[dict]]:
        """n samples for every prompt; a dead engine is restarted, re-synced, and the call retried."""
        return self.collect(self.submit_generate(prompt_ids, n, temperature, top_p, top_k, max_tokens, seed))

    def submit_generate(self, prompt_ids: list[list[int]], n: int, temperature: float, top_p: float, top_k: int,
                        max_tokens: int, seed: int | None = None) -> tuple[list, tuple]:
        """Start generating (prompts spread over the engines in contiguous chunks); `collect` the result."""
        args = (prompt_ids, n, temperature, top_p, top_k, max_tokens, seed)
        E = len(self.engines)
        chunk = -(-len(prompt_ids) // E)
        parts = [prompt_ids[i * chunk:(i + 1) * chunk] for i in range(E)]
        refs = [e.generate.remote(p, n, temperature, top_p, top_k, max_tokens, None if seed is None else seed + i)
                for i, (e, p) in enumerate(zip(self.engines, parts)) if p]
        return refs, args

    def collect(self, handle: tuple[list, tuple]) -> list[list[dict]]:
        refs, args = handle
        retries = self.cfg.rollout.max_retries
        for attempt in range(retries + 1):
            try:
                out: list[list[dict]] = []
                for res in ray.get(refs):
                    out.extend(res)
                return out
            except RayActorError as err:
                if attempt == retries:
                    raise RuntimeError(f"rollout engine failed {retries + 1} times in a row; giving up") from err
                self.engine_restarts += 1
                print(f"ttrl: a rollout engine died ({type(err).__name__}); restarting and re-syncing "
                      f"(retry {attempt + 1}/{retries})", file=sys.stderr, flush=True)
                self.recover_engines()
                refs, args = self.submit_generate(*args)
        raise AssertionError("unreachable")

    def recover_engines(self, timeout_s: float = 600.0) -> list[int]:
        """Wait for Ray to restart dead engines, then push the current weights into them."""
        deadline = time.monotonic() + timeout_s
        stale: list[int] = []
        for i, e in enumerate(self.engines):
            while True:
                try:
                    info = ray.get(e.info.remote(), timeout=max(1.0, deadline - time.monotonic()))
                    break
                except (RayActorError, ray.exceptions.GetTimeoutError) as err:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"rollout engine {i} did not come back within {timeout_s:.0f}s") from err
                    time.sleep(1.0)
            if info["weights_version"] != self.weights_version:
                stale.append(i)
        # A LoRA engine (re)starts without an adapter: push it even the starting one (version 0).
        if stale and (self.weights_version > 0 or self.lora):
            self.policy.call("push_weights", [self.engines[i] for i in stale], self.weights_version,
                             self.engine_dtype)
        if stale and self.weight_sync == "nccl":
            # A restarted engine is outside the old group: every member joins a new one.
            self.policy.call("init_weight_group", self.engines, self.engine_dtype, self.cfg.rollout.sync_bucket_mb)
        return stale

    def engine_score(self, prompt_ids: list[list[int]], completion_ids: list[list[int]],
                     engine: int = 0) -> list[list[float]]:
        return ray.get(self.engines[engine].score.remote(prompt_ids, completion_ids))

    def engine_threads(self, overlap: bool) -> int:
        """Torch threads of each CPU engine: rollout.cpu_threads, or the cores the loop leaves it."""
        r, t = self.cfg.rollout, self.cfg.trainer
        ranks = t.num_workers * (1 + int(self.need_critic))
        return r.cpu_threads or engine_cpu_threads(usable_cpus(), r.num_engines, ranks, overlap)

    def set_engine_threads(self, overlap: bool) -> None:
        """Re-share the CPUs for a loop that does (not) overlap (the bench runs both on one cluster)."""
        if self.device == "cpu":
            n = self.engine_threads(overlap)
            ray.get([e.set_cpu_threads.remote(n) for e in self.engines])

    def sleep_engines(self) -> None:
        ray.get([e.sleep.remote() for e in self.engines])

    def wake_engines(self, tags: list[str] | None = None) -> None:
        if tags is None or "weights" in tags:
            # Engines wake into the driver's free memory: empty the trainers' allocator cache first.
            self.policy.call("release_memory")
            if self.critic:
                self.critic.call("release_memory")
        ray.get([e.wake_up.remote(tags) for e in self.engines])

    # ── trainer forward passes ────────────────────────────────────────────
    def _pad_to_ranks(self, batch: Batch) -> tuple[Batch, int]:
        """Pad rows so that every rank gets an equal share (extra rows are dropped after)."""
        W, B = self.policy.world_size, batch_size(batch)
        extra = (-B) % W
        if extra:
            batch = concat([batch, select(batch, slice(0, extra))])
        return batch, B

    def logprobs(self, batch: Batch, temperature: float, which: str = "policy") -> torch.Tensor:
        padded, B = self._pad_to_ranks(batch)
        parts = self.policy.call_sharded("compute_logprobs", split(padded, self.policy.world_size),
                                         temperature, which)
        return torch.cat(parts, 0)[:B]

    def token_stats(self, batch: Batch, temperature: float) -> dict[str, torch.Tensor]:
        padded, B = self._pad_to_ranks(batch)
        parts = self.policy.call_sharded("compute_token_stats", split(padded, self.policy.world_size), temperature)
        return {"entropy": torch.cat([p[0] for p in parts], 0)[:B],
                "self_certainty": torch.cat([p[1] for p in parts], 0)[:B]}

    def values(self, batch: Batch) -> torch.Tensor:
        assert self.critic is not None
        padded, B = self._pad_to_ranks(batch)
        parts = self.critic.call_sharded("compute_values", split(padded, self.critic.world_size))
        return torch.cat(parts, 0)[:B]

    # ── updates ───────────────────────────────────────────────────────────
    def _train_group(self, group: WorkerGroup, batch: Batch, opts: UpdateOptions, mode: str,
                     *extra: Any, spread: bool = False) -> dict[str, float]:
        """Mini-batch loop over the step batch; one optimizer step per mini-batch.

        `spread`: the rows that carry gradient are shared out evenly over the
        ranks (zero-advantage rows skip their backward, so consecutive groups
        of them would leave one rank idle).
        """
        B = batch_size(batch)
        stats: list[dict[str, float]] = []
        for _ in range(opts.ppo_epochs):
            for i in range(0, B, self.mini):
                mb = select(batch, slice(i, i + self.mini))
                if spread:
                    mb = spread_rows(mb, zero_advantage_rows(mb), group.world_size)
                norm = float(aggregation_normalizer(mb["response_mask"], mode))
                per_rank = group.call_sharded("train_step", split(mb, group.world_size), norm, opts, *extra)
                merged = {}
                for k in per_rank[0]:
                    vals = [r[k] for r in per_rank if k in r]
                    merged[k] = sum(vals) if k in ADDITIVE_STATS else sum(vals) / len(vals)
                stats.append(merged)
        # Report the mean over optimizer steps.
        keys = {k for s in stats for k in s}
        return {k: sum(s.get(k, 0.0) for s in stats) / len(stats) for k in keys}

    def train_policy(self, batch: Batch, opts: UpdateOptions, inject_nan: bool = False) -> dict[str, float]:
        return self._train_group(self.policy, batch, opts, opts.loss_agg, inject_nan,
                                 spread=opts.skips_zero_advantage)

    def train_critic(self, batch: Batch, opts: UpdateOptions) -> dict[str, float]:
        assert self.critic is not None
        return self._train_group(self.critic, batch, opts, "token_mean")

    # ── weights ───────────────────────────────────────────────────────────
    def sync_weights(self) -> dict[str, float]:
        """Policy -> every rollout engine (all ranks gather, rank 0 sends).

        An engine that dies or stalls mid-round (EngineSyncError, raised by
        the sending rank; on the NCCL path within rollout.sync_timeout_s, as
        every side gives the round up by the same deadline) is restarted by
        Ray and every engine left on the old weights is re-synced; the run
        goes on. A trainer rank's death stays fatal (WorkerDiedError).
        """
        self.weights_version += 1
        try:
            if self.weight_sync == "nccl":
                res = self.policy.call("push_weights_nccl", self.engines, self.weights_version,
                                       self.cfg.rollout.sync_timeout_s)
            elif self.weight_sync == "ipc":
                res = self.policy.call("push_weights_shared", self.engines, self.weights_version,
                                       self.engine_dtype, self.cfg.rollout.sync_bucket_mb,
                                       self.cfg.rollout.sync_timeout_s)
                loads = [x["engine_load_s"] for x in res if x]
                res = [{**res[0], "engine_load_s": max(loads)}]
            else:
                res = self.policy.call("push_weights", self.engines, self.weights_version, self.engine_dtype)
        except EngineSyncError as err:
            self.engine_restarts += 1
            why = str(getattr(err, "cause", None) or err).strip().splitlines()  # without Ray's wrapper
            print(f"ttrl: {why[0] if why else type(err).__name__}; restarting dead engines and re-syncing",
                  file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            stale = self.recover_engines()
            return {"total_s": time.perf_counter() - t0, "resynced_engines": float(len(stale))}
        return res[0]

    # ── checkpoints ───────────────────────────────────────────────────────
    def save(self, path: str, export_hf: bool = True) -> None:
        self.policy.call("save_state", f"{path}/policy_ds", "ds")
        if self.critic:
            self.critic.call("save_state", f"{path}/critic_ds", "ds")
        if export_hf:
            self.policy.call("save_hf", f"{path}/policy", self.model_path)

    def load(self, path: str) -> None:
        self.policy.call("load_state", f"{path}/policy_ds", "ds")
        if self.critic:
            self.critic.call("load_state", f"{path}/critic_ds", "ds")

    def fingerprint(self) -> float:
        """Sum of |w| of the policy (to check that a resume restored the weights)."""
        return self.policy.call("fingerprint")[0]

    def scale_lr(self, factor: float) -> float:
        lr = self.policy.call("scale_lr", factor)[0]
        if self.critic:
            self.critic.call("scale_lr", factor)
        return lr

    def shutdown(self) -> None:
        for e in self.engines:
            ray.kill(e)
        self.policy.kill()
        if self.critic:
            self.critic.kill()
        self.placement.remove()
        stop_ray(self.owns_ray)
