"""The vLLM rollout engine, hosted in a Ray actor.

It samples completions (token ids, text, per-token log-probs), scores fixed
token sequences (prompt log-probs, used to check weight sync), and receives
new weights. Weights arrive as packed bytes, are checked against the
checkpoint's names and shapes first (a failed in-place reload would kill the
engine), loaded through the worker extension, and then the prefix cache is
reset: cached KV blocks were computed with the old weights.

With `EngineArgs.lora` (model.lora.enabled) the engine starts with vLLM's
LoRA support on and keeps its base weights: every weight path then carries
the policy's adapter alone, checked against the shapes this engine expects
(`ttrl.rollout.lora`), and installed in place of the adapter it served;
every request from then on runs with it.

With `EngineArgs.tenant_slots` (ttrl-serve's `serve.tenants`) a LoRA engine
also serves per-request adapters beside that shared one: `generate_tenants`
takes each prompt's adapter folder and stable int id, vLLM loads it from
disk the first time and keeps `tenant_slots` of them resident (its own LRU;
the shared adapter is pinned), and the loads and unloads are counted. A
new folder for an id it holds (a tenant's new version) drops the old
adapter and resets the prefix cache before the call: no stale copy answers.

It must never import deepspeed or see a ground-truth answer: it returns
samples and nothing else.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

from ttrl.distributed.startup import process_created
from ttrl.rollout.weights import check_weights, checkpoint_shapes, unpack


def sampled_logprobs(lps: Any, ids: list[int]) -> list[float]:
    """The sampled token's log-prob at each position (vLLM asked with logprobs=0)."""
    if not lps:
        return []
    flat_ids = getattr(lps, "token_ids", None)
    if flat_ids is not None and len(flat_ids) == len(ids):
        # FlatLogprobs with logprobs=0: exactly one entry, the sampled token, per position.
        return list(lps.logprobs)
    return [pos[tok].logprob for pos, tok in zip(lps, ids)]


@dataclass
class EngineArgs:
    model_path: str
    dtype: str = "float32"
    max_model_len: int = 1024
    seed: int = 0
    enforce_eager: bool = True
    enable_prefix_caching: bool = True
    gpu_memory_utilization: float = 0.5
    tensor_parallel_size: int = 1
    cpu_kv_cache_gb: float = 1.0
    cpu_threads: int = 0  # 0: leave torch's default (Ray's: the actor's CPU count)
    device: str = "cpu"
    enable_sleep_mode: bool = False
    # LoRA spec (ttrl.rollout.lora.lora_spec): serve the base plus an adapter that syncs replace.
    lora: dict | None = None
    # With lora: adapters a request may name besides the shared one (ttrl-serve's tenants), resident at once.
    tenant_slots: int = 0


class VLLMEngine:
    """One vLLM engine (possibly tensor-parallel). Methods are called over Ray."""

    def __init__(self, args: EngineArgs):
        self.t_init = time.time()
        self.args = args
        self.lora_ops = "vllm"  # which CPU LoRA ops run here: vLLM's own, or ttrl.rollout.lora_cpu_ops
        if args.device == "cpu":
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, round(args.cpu_kv_cache_gb)))
            # No torch.compile in a CPU engine. The model already runs eager (enforce_eager), but vLLM
            # decorates two sampler helpers with torch.compile (inductor), and on CPU their first calls
            # generated and built C++ kernels: the demo's first eval took 24.6 s where later ones took
            # 5.5-6.4 (2-core AMD EPYC; 10.2 s with inductor's on-disk cache warm). Eager: the first eval
            # 7.3 s, the same evals and rewards to the last digit. Read when vLLM's modules are imported
            # (the decorators check it then), so it goes before the import below, and holds for the rest
            # of this process (an engine's own, or ttrl-eval's, which compiles nothing else). The bench's
            # bare vLLM keeps vLLM's default, so rollout_vs_vllm would show a cost to the steady state.
            os.environ["TORCHDYNAMO_DISABLE"] = "1"
            if args.cpu_threads > 0:
                import torch

                # Before vLLM starts: its CPU worker locks the thread count afterwards.
                torch.set_num_threads(args.cpu_threads)
        if args.tensor_parallel_size == 1:
            # Keep the engine core in this process: no extra process to start,
            # and collective_rpc reaches the single worker directly.
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM

        self.t_imported = time.time()
        t0 = time.perf_counter()
        kwargs: dict[str, Any] = dict(
            model=args.model_path,
            dtype=args.dtype,
            max_model_len=args.max_model_len,
            seed=args.seed,
            enforce_eager=args.enforce_eager,
            enable_prefix_caching=args.enable_prefix_caching,
            tensor_parallel_size=args.tensor_parallel_size,
            worker_extension_cls="ttrl.rollout.vllm_ext.TTRLWorkerExtension",
            # Log-probs after temperature: the distribution the tokens were
            # really drawn from, which is what the trainer recomputes.
            logprobs_mode="processed_logprobs",
        )
        if args.device != "cpu":
            kwargs["gpu_memory_utilization"] = args.gpu_memory_utilization
            kwargs["enable_sleep_mode"] = args.enable_sleep_mode
        if args.lora:
            from ttrl.rollout.lora import engine_rank

            if args.device == "cpu" and args.tensor_parallel_size == 1:
                from ttrl.rollout.lora_cpu_ops import install

                # One GEMM per adapter instead of one per token (the ops run in this process: TP 1).
                self.lora_ops = "grouped" if install() else "vllm"

            # The policy's adapter (pinned when tenants share the engine) and one slot per resident tenant
            # adapter; as many cached as served, so an unloaded tenant is read from disk again.
            slots = 1 + max(0, int(args.tenant_slots))
            kwargs.update(enable_lora=True, max_lora_rank=engine_rank(args.lora["r"]), max_loras=slots,
                          max_cpu_loras=slots)
        self.llm = LLM(**kwargs)
        self.startup_s = time.perf_counter() - t0
        self.expected_shapes = checkpoint_shapes(args.model_path)
        self._lora_setup(args)
        self._tenant_requests: dict[int, Any] = {}  # tenant id -> its LoRARequest
        self._tenant_counts = {"loads": 0, "unloads": 0}  # as last reported by generate_tenants
        if args.lora and args.tenant_slots > 0:
            self.llm.collective_rpc("ttrl_count_adapters")
        self.tokenizer = self.llm.get_tokenizer()
        self.t_ready = time.time()

    def _lora_setup(self, args: EngineArgs) -> None:
        """What a LoRA engine expects of an adapter; its version is -1 until it holds one.

        -1 differs from every version the driver has, so a fresh (or
        restarted) LoRA engine is always pushed the current adapter, even the
        starting one (version 0).
        """
        self.weights_version = 0
        self.adapter_shapes: dict | None = None
        self._peft: dict | None = None
        self._lora_request: Any = None  # the LoRARequest of every request, once an adapter is in
        if args.lora:
            from ttrl.rollout.lora import adapter_shapes, peft_config

            self.adapter_shapes = adapter_shapes(self.expected_shapes, args.lora["target_modules"], args.lora["r"])
            self._peft = peft_config(args.lora, args.model_path)
            self.weights_version = -1

    # ── health ────────────────────────────────────────────────────────────
    def info(self) -> dict[str, Any]:
        return {"startup_s": self.startup_s, "weights_version": self.weights_version, "pid": os.getpid(),
                "lora_ops": self.lora_ops,
                "t_spawned": process_created(), "t_imported": self.t_imported, "t_ready": self.t_ready}

    # ── sampling ──────────────────────────────────────────────────────────
    def generate(self, prompt_token_ids: list[list[int]], n: int, temperature: float, top_p: float,
                 top_k: int, max_tokens: int, seed: int | None = None) -> list[list[dict[str, Any]]]:
        """n samples per prompt: [prompts][n] dicts of token_ids, logprobs, text, finish_reason."""
        return self._generate(prompt_token_ids, self._params(n, temperature, top_p, top_k, max_tokens, seed))

    def generate_each(self, prompt_token_ids: list[list[int]], keys: list[tuple]) -> list[list[dict[str, Any]]]:
        """`generate` with each prompt's own (n, temperature, top_p, top_k, max_tokens, seed), in one batch.

        The server's batches mix requests: a client's own seed or temperature
        must not cost it (or anyone) a batch of its own.
        """
        return self._generate(prompt_token_ids, [self._params(*k) for k in keys])

    def generate_tenants(self, prompt_token_ids: list[list[int]], keys: list[tuple],
                         adapters: list[tuple[str, int, str] | None]) -> dict[str, Any]:
        """`generate_each` where each prompt names its adapter: (tenant, int id, adapter folder), or None for
        the shared one. {"outputs": as generate_each's, "loads", "unloads": adapters read from disk and
        dropped during this call, "resident": tenant adapters held now}.

        At most `tenant_slots` distinct tenants per call (the pool's batches
        respect it): with more, vLLM would evict an adapter a running request needs.
        """
        from vllm.lora.request import LoRARequest

        if not self.args.lora or self.args.tenant_slots < 1:
            raise ValueError("generate_tenants: this engine was started without tenant slots (EngineArgs.tenant_slots)")
        distinct = {a[1] for a in adapters if a is not None}
        if len(distinct) > self.args.tenant_slots:
            raise ValueError(f"generate_tenants: {len(distinct)} tenants in one call, the engine holds "
                             f"{self.args.tenant_slots} (serve.tenants.max_loaded)")
        requests = []
        replaced = False
        for a in adapters:
            if a is None:
                requests.append(self._lora_request)
                continue
            name, int_id, path = a
            req = self._tenant_requests.get(int_id)
            if req is not None and req.lora_path != path:
                # A new version of the tenant's adapter (a new folder): vLLM caches adapters by int id, so the
                # old one is dropped first, and the prefix cache too, whose blocks were computed with it.
                self.llm.llm_engine.remove_lora(int_id)
                replaced = True
            if req is None or req.lora_path != path:
                req = self._tenant_requests[int_id] = LoRARequest(f"tenant:{name}", int_id, lora_path=path)
            requests.append(req)
        if replaced:
            self.llm.reset_prefix_cache()  # between calls: no request is running
        params = [self._params(*k) for k in keys]
        outs = self._generate(prompt_token_ids, params, requests)
        now = self.llm.collective_rpc("ttrl_adapter_counts")[0]
        delta = {k: now[k] - self._tenant_counts[k] for k in ("loads", "unloads")}
        self._tenant_counts = {k: now[k] for k in ("loads", "unloads")}
        return {"outputs": outs, **delta, "resident": now["resident"]}

    @staticmethod
    def _params(n: int, temperature: float, top_p: float, top_k: int, max_tokens: int, seed: int | None) -> Any:
        from vllm import SamplingParams

        # Flat log-probs (a few lists per sample, not an object per token) and
        # no incremental detokenisation, which would also decode every
        # log-prob's token: one batch decode at the end gives the same text.
        # Together they make sampling with log-probs ~19% faster on CPU.
        return SamplingParams(n=n, temperature=temperature, top_p=top_p, top_k=top_k, max_tokens=max_tokens,
                              logprobs=0, seed=seed, flat_logprobs=True, detokenize=False)

    def _generate(self, prompt_token_ids: list[list[int]], params: Any,
                  lora_requests: list | None = None) -> list[list[dict[str, Any]]]:
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompt_token_ids], params, use_tqdm=False,
                                 lora_request=self._lora_request if lora_requests is None else lora_requests)
        ids = [[list(o.token_ids) for o in req.outputs] for req in outs]
        texts = iter(self.tokenizer.batch_decode([x for per_prompt in ids for x in per_prompt],
                                                 skip_special_tokens=True))
        return [[{"token_ids": x, "logprobs": sampled_logprobs(o.logprobs, x), "text": next(texts),
                  "finish_reason": o.finish_reason} for o, x in zip(req.outputs, per_prompt)]
                for req, per_prompt in zip(outs, ids)]

    def score(self, prompt_token_ids: list[list[int]], completion_token_ids: list[list[int]]) -> list[list[float]]:
        """Log-probs (temperature 1) of each completion token given its prompt."""
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0)
        seqs = [{"prompt_token_ids": p + c} for p, c in zip(prompt_token_ids, completion_token_ids)]
        outs = self.llm.generate(seqs, params, use_tqdm=False, lora_request=self._lora_request)
        result = []
        for req, p, c in zip(outs, prompt_token_ids, completion_token_ids):
            full = p + c
            lps = req.prompt_logprobs  # position i: log p(token i | tokens < i); position 0 is None
            result.append([lps[i][full[i]].logprob for i in range(len(p), len(full))])
        return result

    # ── weights ───────────────────────────────────────────────────────────
    def load_weights(self, blobs: list, version: int) -> dict[str, float]:
        """Check, then load a full set of packed weights (`weights.pack`) in place; reset the prefix cache.

        Served versions come this way (ttrl.serve.versions); `blobs` are bytes
        or object refs to them. They are unpacked and checked in full (names,
        shapes, finiteness) before vLLM sees them. The training loop's syncs
        use `load_store_weights`.
        """
        import ray

        t0 = time.perf_counter()
        if any(isinstance(b, ray.ObjectRef) for b in blobs):
            blobs = ray.get(list(blobs))
        received: dict[str, Any] = {}
        for blob in blobs:
            received.update(unpack(blob))
        if self.args.lora:  # a LoRA engine's versions are adapters
            from ttrl.rollout.lora import check_adapter_tensors

            check_adapter_tensors(received, self.adapter_shapes, self.args.lora)
            del received
            self._install(version, lambda: self.llm.collective_rpc("ttrl_install_adapter_blobs",
                                                                   args=(blobs, self._peft)))
            return {"load_s": time.perf_counter() - t0, "bytes": float(sum(len(b) for b in blobs))}
        # A tied lm_head is not stored separately in the checkpoint.
        check_weights(received, self.expected_shapes, optional=("lm_head.weight",))
        del received
        self.llm.collective_rpc("ttrl_load_weights", args=(blobs,))
        self.llm.reset_prefix_cache()
        self.weights_version = version
        return {"load_s": time.perf_counter() - t0, "bytes": float(sum(len(b) for b in blobs))}

    def load_store_weights(self, refs: list, version: int, plan_wire: list[dict]) -> dict[str, float]:
        """Load a full set of weights from the trainer's buckets (object refs); reset the prefix cache.

        The plan (names, dtypes, shapes, offsets) is checked first, so a bad
        name never reaches vLLM; the buckets are read in place in the object
        store (no copy) and copied once, into the model. The sender checked
        finiteness after its cast.
        """
        import functools

        import ray

        t0 = time.perf_counter()
        self._check_plan(plan_wire)
        arrays = ray.get(list(refs))
        nbytes = float(sum(a.nbytes for bucket in arrays for a in bucket))
        if self.args.lora:
            # The worker copies the adapter out of the store's buffers (vLLM scales its tensors in place).
            self._install(version, functools.partial(self.llm.collective_rpc, "ttrl_install_adapter",
                                                     args=(arrays, plan_wire, self._peft)))
            return {"load_s": time.perf_counter() - t0, "bytes": nbytes}
        self.llm.collective_rpc("ttrl_load_store_weights", args=(arrays, plan_wire))
        del arrays  # the store may free the buckets once the sender drops its refs
        self.llm.reset_prefix_cache()
        self.weights_version = version
        return {"load_s": time.perf_counter() - t0, "bytes": nbytes}

    # ── weights, colocated path (buckets by handle, ipc.py) ───────────────
    def probe_shared(self, handle: dict) -> int:
        """Checksum of the bytes behind a trainer rank's handle (start-up check of the colocated path)."""
        return self.llm.collective_rpc("ttrl_shared_probe", args=(handle,))[0]

    def begin_shared_sync(self, plan_wire: list[dict]) -> int:
        """Check the plan, then open a round of buckets by handle; returns the bucket count."""
        self._check_plan(plan_wire)
        if self.args.lora:
            return self.llm.collective_rpc("ttrl_adapter_begin", args=(plan_wire,))[0]
        return self.llm.collective_rpc("ttrl_shared_begin", args=(plan_wire,))[0]

    def load_shared_bucket(self, index: int, handle: dict) -> int:
        if self.args.lora:
            return self.llm.collective_rpc("ttrl_adapter_bucket", args=(index, handle))[0]
        return self.llm.collective_rpc("ttrl_shared_bucket", args=(index, handle))[0]

    def end_shared_sync(self, version: int | None) -> dict[str, float]:
        """Close the round (the model is whole again) and reset the prefix cache.

        `version` None: the sender gave the round up; the engine keeps its
        old version number (its weights are not a whole version, so the
        driver re-syncs it).
        """
        t0 = time.perf_counter()
        if self.args.lora:  # the adapter is installed now, whole, or not at all
            res: dict = {}

            def end() -> None:
                res.update(self.llm.collective_rpc("ttrl_adapter_end", args=(self._peft,))[0])

            if version is None:
                self.llm.collective_rpc("ttrl_adapter_end", args=(None,))
                return {"load_s": time.perf_counter() - t0, "bytes": 0.0}
            self._install(version, end)
            return {"load_s": res["receive_s"] + time.perf_counter() - t0, "bytes": res["bytes"]}
        try:
            res = self.llm.collective_rpc("ttrl_shared_end")[0]
        finally:
            self.llm.reset_prefix_cache()  # cached KV blocks were computed with other weights
        if version is not None:
            self.weights_version = version
        return {"load_s": res["receive_s"] + time.perf_counter() - t0, "bytes": res["bytes"]}

    # ── weights, GPU path (NCCL) ──────────────────────────────────────────
    def device_uuids(self) -> list[str]:
        """The GPU of each worker (TP rank) of this engine, in rank order."""
        return self.llm.collective_rpc("ttrl_device_uuid")

    def init_weight_group(self, master_addr: str, master_port: int, rank_offset: int,
                          world_size: int) -> list[int]:
        """(Re)join the trainer's NCCL weight group; blocks until every rank has joined."""
        return self.llm.collective_rpc("ttrl_init_weight_group",
                                       args=(master_addr, master_port, rank_offset, world_size))

    def check_weight_plan(self, bucket_metas: list[dict]) -> None:
        """Refuse a bucket plan whose names, shapes or dtypes this engine cannot load."""
        self._check_plan(bucket_metas)

    def _check_plan(self, plan_wire: list[dict]) -> None:
        """The full model's names and shapes, or on a LoRA engine its adapter's: ValueError naming a tensor."""
        from ttrl.rollout.nccl_sync import check_plan, plan_from_wire

        plan = plan_from_wire(plan_wire)
        if self.args.lora:
            from ttrl.rollout.lora import check_adapter_plan

            check_adapter_plan(plan, self.adapter_shapes, self.args.lora, self.args.dtype)
        else:
            check_plan(plan, self.expected_shapes, self.args.dtype, optional=("lm_head.weight",))

    def _install(self, version: int, load: Any) -> None:
        """Run `load` (an adapter install on every worker), then serve the adapter from the next request.

        The prefix cache is reset either way (its blocks hold the old
        adapter's keys and values). If the install fails after vLLM removed
        the old adapter, this engine serves the base until the driver
        re-syncs it (its version is then -1, which no version matches).
        """
        from vllm.lora.request import LoRARequest

        from ttrl.rollout.lora import ADAPTER_ID, ADAPTER_NAME

        try:
            load()
        except BaseException:
            self._lora_request, self.weights_version = None, -1
            raise
        finally:
            self.llm.reset_prefix_cache()
        # The path is never read: the adapter is in vLLM's manager before any request names it.
        self._lora_request = LoRARequest(ADAPTER_NAME, ADAPTER_ID, lora_path=f"in-memory:{ADAPTER_NAME}")
        self.weights_version = version

    def load_adapter_dir(self, path: str, version: int = 0) -> dict[str, float]:
        """Serve the adapter in a peft dir (ttrl-eval, the start of ttrl-serve): read, checked, installed."""
        from ttrl.rollout.lora import check_adapter_tensors, read_tensors
        from ttrl.rollout.nccl_sync import to_dtype
        from ttrl.rollout.weights import pack

        t0 = time.perf_counter()
        if not self.args.lora:
            raise ValueError(f"adapter {path}: this engine was started without LoRA (EngineArgs.lora)")
        tensors = {n: t.to(to_dtype(self.args.dtype)) for n, t in read_tensors(path).items()}
        check_adapter_tensors(tensors, self.adapter_shapes, self.args.lora)
        blobs = [pack(tensors.items())]
        self._install(version, lambda: self.llm.collective_rpc("ttrl_install_adapter_blobs",
                                                               args=(blobs, self._peft)))
        return {"load_s": time.perf_counter() - t0, "bytes": float(len(blobs[0]))}

    def receive_weights_nccl(self, bucket_metas: list[dict], version: int,
                             timeout_s: float | None = None) -> dict[str, float]:
        """Receive a full set of weights by broadcast into every worker; reset the prefix cache.

        Past `timeout_s` every worker gives up (and leaves the group), the
        weights version stays the old one, and the caller re-syncs.
        """
        t0 = time.perf_counter()
        if self.args.lora:
            out: list = []
            self._install(version, lambda: out.extend(
                self.llm.collective_rpc("ttrl_receive_adapter", args=(bucket_metas, self._peft, timeout_s))))
            return {"load_s": time.perf_counter() - t0, "bytes": out[0]["bytes"]}
        res = self.llm.collective_rpc("ttrl_receive_weights", args=(bucket_metas, timeout_s))
        self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights
        self.weights_version = version
        return {"load_s": time.perf_counter() - t0, "bytes": res[0]["bytes"]}

    # ── CPU threads ───────────────────────────────────────────────────────
    def set_cpu_threads(self, n: int) -> int:
        """Torch threads for the next generations (CPU); returns the previous count."""
        import torch

        before = torch.get_num_threads()
        # vLLM's CPU worker replaced torch.set_num_threads with a warning;
        # torch._C's is the real one. Safe here: one in-process worker, no pinning.
        torch._C.set_num_threads(int(n))
        return before

    # ── GPU memory (colocated with training) ──────────────────────────────
    def sleep(self) -> None:
        if self.args.enable_sleep_mode:
            self.llm.sleep(level=1)

    def wake_up(self, tags: list[str] | None = None) -> None:
        """Reallocate what sleep freed: `tags` "weights" or "kv_cache" alone, or (None) everything."""
        if self.args.enable_sleep_mode:
            self.llm.wake_up(tags)
