"""The measurements behind `make bench`, each a function returning flat numbers.

Absolute times on a shared machine are noise; ratios taken side by side in
one run are not. So every comparison here runs both sides in the same
process, on the same model, prompts and sampling parameters, alternating
repetitions and keeping medians. Nothing here changes the code it measures.
"""

from __future__ import annotations

import math
import os
import random
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

import torch


def median_time(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


# ── 0. the machine: what the box is, and how fast it ran at the time ──────
def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what `platform` says."""
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def product_gflops(dtype: torch.dtype, threads: int, repeats: int = 60) -> float:
    """GFLOP/s of a lone [2400x128] x [128x512] product on `threads` threads, median of `repeats`.

    Taken at the start and the end of a bench, a rough mark of the state the box was in: on a
    2-core AMD EPYC VM the two-thread fp32 figure moved 110-189 within ten minutes. The shape is a
    micro-batch of the demo's update (hidden 128, MLP 512).
    """
    a = torch.randn(2400, 128).to(dtype)
    b = torch.randn(128, 512).to(dtype)
    before = torch.get_num_threads()
    # torch._C's setter: vLLM, once used in a process, replaces torch.set_num_threads with a warning.
    torch._C.set_num_threads(threads)
    try:
        for _ in range(5):  # the first calls: allocation, kernel choice, caches
            a @ b
        dt, _ = median_time(lambda: a @ b, repeats)
    finally:
        torch._C.set_num_threads(before)
    return 2 * 2400 * 128 * 512 / dt / 1e9


def machine_speed(when: str) -> dict[str, float]:
    """The box's speed at that moment (see product_gflops), fp32 and bf16, on one thread (a core's
    speed) and on the threads a fresh torch process takes (`machine.product_threads`, the physical
    cores: on a shared VM this one also says whether the other cores were there)."""
    from ttrl.models.warmstart import build_threads

    threads, out = build_threads(), {}
    for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        out[f"machine.product_gflops_{name}.{when}"] = product_gflops(dt, threads)
        out[f"machine.product_gflops_{name}_1thread.{when}"] = product_gflops(dt, 1)
    return out | {"machine.product_threads": threads}


# ── 1. rollout: ttrl's rollout phase vs a bare vllm.LLM.generate ─────────
class BareVLLM:
    """A plain `vllm.LLM` in a process of its own (a Ray actor), timed from inside.

    The baseline gets what ttrl's engine gets: its own process, the same
    engine arguments and thread count. Its clock runs around `generate`
    alone, so the ratio charges ttrl for everything its rollout adds (Ray
    calls, moving the samples, answer extraction). It must not share the
    driver's process: vLLM's CPU worker pins that process's thread count
    for good, which would slow every later section.
    """

    def __init__(self, kwargs: dict, kv_cache_gb: int, threads: int):
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        if kv_cache_gb:
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(kv_cache_gb)
        if threads:
            torch.set_num_threads(threads)
        from vllm import LLM

        self.llm = LLM(**kwargs)

    def generate(self, ids: list[list[int]], params: dict) -> tuple[float, int]:
        from vllm import SamplingParams

        p = SamplingParams(**params)
        t0 = time.perf_counter()
        outs = self.llm.generate([{"prompt_token_ids": x} for x in ids], p, use_tqdm=False)
        dt = time.perf_counter() - t0
        return dt, sum(len(o.token_ids) for q in outs for o in q.outputs)


def bench_rollout(cfg: Any, ctx: Any, prompts: list, model_path: str, n: int, max_tokens: int,
                  repeats: int) -> dict:
    """tokens/s of ttrl's rollout phase (Ray engine actor + answer extraction) / bare vLLM, same params."""
    import ray

    from ttrl.step import rollout, token_ids

    r, rt = cfg.rollout, ctx.rt
    ids = token_ids(ctx.tokenizer, prompts)
    threads = ray.get(rt.engines[0].__ray_call__.remote(lambda self: torch.get_num_threads()))

    def ttrl_once():
        t0 = time.perf_counter()
        groups = rollout(ctx, prompts)
        return time.perf_counter() - t0, sum(len(s.token_ids) for g in groups for s in g.samples)

    kwargs = dict(model=model_path, dtype=rt.engine_dtype, enforce_eager=rt.device == "cpu",
                  max_model_len=cfg.model.max_model_len, seed=0, enable_prefix_caching=r.enable_prefix_caching,
                  logprobs_mode="processed_logprobs")
    opts: dict[str, Any] = {"num_cpus": 0, "num_gpus": 0}  # runs only while ttrl's engine is idle
    if rt.device != "cpu":
        # The run's placement holds every GPU: the baseline shares engine 0's,
        # with a KV cache of its own no bigger than what is left beside it.
        gpus = ray.get(rt.engines[0].__ray_call__.remote(lambda self: ray.get_gpu_ids()))
        opts["runtime_env"] = {"env_vars": {"CUDA_VISIBLE_DEVICES": ",".join(str(int(g)) for g in gpus)}}
        kwargs["gpu_memory_utilization"] = min(r.gpu_memory_utilization, 0.9 - r.gpu_memory_utilization)
    bare = ray.remote(BareVLLM).options(**opts).remote(
        kwargs, max(1, round(r.cpu_kv_cache_gb)) if rt.device == "cpu" else 0, threads if rt.device == "cpu" else 0)
    params = dict(n=n, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k, max_tokens=max_tokens, logprobs=0)
    no_lp = {**params, "logprobs": None}

    def bare_once(p=params):
        return ray.get(bare.generate.remote(ids, p))

    try:
        ttrl_once(), bare_once(), bare_once(no_lp)  # warm-up (first calls compile and allocate)
        t_ttrl, t_bare, t_nolp = [], [], []
        tok_ttrl = tok_bare = tok_nolp = 0
        for _ in range(repeats):  # alternate so that machine noise hits all sides alike
            dt, tok_ttrl = ttrl_once()
            t_ttrl.append(dt)
            dt, tok_bare = bare_once()
            t_bare.append(dt)
            dt, tok_nolp = bare_once(no_lp)
            t_nolp.append(dt)
    finally:
        ray.kill(bare)  # free the bare engine's memory before the next sections
    tps_ttrl = tok_ttrl / statistics.median(t_ttrl)
    tps_bare = tok_bare / statistics.median(t_bare)
    return {
        "rollout_vs_vllm": tps_ttrl / tps_bare,
        "rollout.ttrl_tokens_per_s": tps_ttrl,
        "rollout.vllm_tokens_per_s": tps_bare,
        "rollout.vllm_no_logprobs_tokens_per_s": tok_nolp / statistics.median(t_nolp),
        "rollout.prompts": len(prompts), "rollout.n": n, "rollout.max_tokens": max_tokens,
        "rollout.engine_threads": threads,
    }


# ── 2. labelling: a per-sample reference labeller vs ttrl's ──────────────
def reference_labels(groups: list[list[str]]) -> list[str | None]:
    """Extract, then math-verify every sample against every candidate label; no dedup, no cache."""
    from math_verify import parse, verify

    from ttrl.labeling.extract import extract_answer

    labels = []
    for texts in groups:
        answers = [extract_answer(t) for t in texts]
        candidates: list[str] = []
        for a in answers:
            if a is not None and a.strip() and a not in candidates:
                candidates.append(a)
        best, best_count = None, 0
        for cand in candidates:
            gold = parse("\\boxed{" + cand + "}")
            count = sum(1 for a in answers if a is not None and a.strip()
                        and verify(gold, parse("\\boxed{" + a + "}")))
            if count > best_count:  # strict: ties keep the candidate seen first
                best, best_count = cand, count
        labels.append(best)
    return labels


def ttrl_labels(groups: list[list[str]]) -> list[str | None]:
    from ttrl.labeling.extract import extract_answer
    from ttrl.labeling.vote import majority_votes

    return [v.label for v in majority_votes([[extract_answer(t) for t in g] for g in groups])]


def bench_labeling(groups: list[list[str]], repeats: int) -> dict:
    from ttrl.labeling import grade

    def ours():
        grade.clear_cache()  # no help from earlier calls: each measurement starts cold
        return ttrl_labels(groups)

    ours()  # start the grading workers outside the timing
    t_ref, ref = median_time(lambda: reference_labels(groups), max(1, repeats // 2))
    t_ours, mine = median_time(ours, repeats)
    same = sum(a == b for a, b in zip(ref, mine))
    return {
        "labeling_speedup": t_ref / t_ours,
        "labeling.reference_s": t_ref,
        "labeling.ttrl_s": t_ours,
        "labeling.groups": len(groups),
        "labeling.samples_per_group": len(groups[0]) if groups else 0,
        "labeling.identical_labels": same / max(len(groups), 1),
        "labeling.distinct_answers_per_group": statistics.mean(len(set(g)) for g in groups) if groups else 0,
    }


def latex_groups(answers: list[str], n_groups: int, group_size: int, seed: int) -> list[list[str]]:
    """Groups of boxed completions whose answers are real MATH-500 answers written several equivalent ways."""
    rng = random.Random(seed)
    groups = []
    for _ in range(n_groups):
        pool = rng.sample(answers, 4)
        weights = [8, 4, 2, 1]
        texts = []
        for _ in range(group_size):
            a = rng.choices(pool, weights)[0]
            variant = rng.choice([a, f" {a} ", a.replace("\\frac", "\\dfrac"), f"{a}\\,"])
            texts.append(f"... so the answer is \\boxed{{{variant}}}.")
        groups.append(texts)
    return groups


# ── 3. weight sync vs a plain in-memory copy ─────────────────────────────
def memcpy_bytes_per_s(nbytes: int, repeats: int = 5) -> float:
    src = torch.empty(max(1, nbytes // 4), dtype=torch.float32).uniform_()
    dt, _ = median_time(lambda: src.clone(), repeats)
    return nbytes / dt


class _Sampler:
    """Calls `sample()` every `every_s` in a thread while the `with` block runs."""

    def __init__(self, every_s: float):
        self.every_s = every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        raise NotImplementedError

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.every_s)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


class StorePeak(_Sampler):
    """Samples the Ray object store's bytes in use (every alive node, summed) in a thread; keeps the peak.

    Through each raylet's GetNodeStats (what `ray memory` reads), without the
    per-object listing. `peak - base` is what the work inside the block
    added, `base` being the use when it was made.
    """

    def __init__(self, every_s: float = 0.01):
        import ray
        from ray._private.grpc_utils import init_grpc_channel
        from ray.core.generated import node_manager_pb2, node_manager_pb2_grpc

        self._req = node_manager_pb2.GetNodeStatsRequest(include_memory_info=False)
        self._stubs = [node_manager_pb2_grpc.NodeManagerServiceStub(
            init_grpc_channel(f"{n['NodeManagerAddress']}:{n['NodeManagerPort']}"))
            for n in ray.nodes() if n["Alive"]]
        super().__init__(every_s)
        self.base = self.used()
        self.peak = self.base

    def used(self) -> int:
        return sum(int(s.GetNodeStats(self._req, timeout=10).store_stats.object_store_bytes_used)
                   for s in self._stubs)

    def wait_for_base(self, timeout_s: float = 30.0) -> int:
        """Wait until what work since construction put in the store is freed (Ray frees asynchronously)."""
        t_end = time.monotonic() + timeout_s
        while (now := self.used()) > self.base and time.monotonic() < t_end:
            time.sleep(0.1)
        return now

    def sample(self) -> None:
        try:
            self.peak = max(self.peak, self.used())
        except Exception:  # noqa: BLE001 - a missed sample only lowers the resolution
            pass

    @property
    def added(self) -> int:
        return self.peak - self.base


# Layers of the sync_large model: hidden 1024, 16 heads of 64, MLP 4096,
# 16.8M parameters (67.1 MB in fp32) a layer.
LARGE_LAYER_BYTES = 4 * (4 * 1024 * 1024 + 3 * 1024 + 3 * 1024 * 4096 + 2 * 1024)


def sync_large_overrides(mib: int, path: str = "ray") -> list[str]:
    """A tiny-architecture model of at least `mib` MiB in fp32, 2 engines, no reference; 1 trainer rank on
    the Ray path, 2 on the colocated path ("ipc": engine i is fed by rank i)."""
    layers = max(1, -(-(mib << 20) // LARGE_LAYER_BYTES))
    ranks = ["trainer.num_workers=2", "rollout.weight_sync=ipc"] if path == "ipc" else ["trainer.num_workers=1"]
    return [*ranks, "experiment=debug", "algorithm=grpo", "algorithm.kl_coef=0", "model.dtype=float32",
            "model.tiny.hidden_size=1024", "model.tiny.num_heads=16", "model.tiny.head_dim=64",
            "model.tiny.intermediate_size=4096", f"model.tiny.num_layers={layers}", "model.max_model_len=128",
            "rollout.num_engines=2", "rollout.cpu_kv_cache_gb=1", "trainer.zero_stage=2", "logger.progress=false"]


def bench_sync_large(mib: int, repeats: int = 3, path: str = "ray") -> dict[str, float]:
    """Sync a >= `mib` MiB fp32 model from the trainer into 2 engines through the Ray path, timed.

    `sync_large_vs_memcpy`: model bytes per second of sync over a plain
    in-memory copy's bytes per second (goal >= 0.3); `sync_large_store_ratio`:
    the object store's peak growth during the syncs over the model's bytes
    (goal <= 1.2: one copy in the store, none per engine). With path="ipc"
    the same through the colocated path (keys `sync_large_ipc*`; its store
    ratio should be ~0: nothing goes through the store).
    """
    from ttrl.cli import compose
    from ttrl.parts import build_parts
    from ttrl.rollout.weights import checkpoint_shapes

    cfg = compose(sync_large_overrides(mib, path))
    p = "sync_large" if path == "ray" else f"sync_large_{path}"
    setup = build_parts(cfg)
    model_bytes = 4 * sum(math.prod(s) for s in checkpoint_shapes(setup.model_path).values())
    rt = setup.start_runtime(total_opt_steps=10)
    try:
        store = StorePeak()
        rt.sync_weights()  # warm-up: the plan, the first puts, the engines' first reload
        times, res = [], {}
        with store:
            for _ in range(repeats):
                # The last sync's buckets freed first (Ray frees asynchronously), as the
                # rollout and the update between two syncs of a run would leave them.
                store.wait_for_base()
                t0 = time.perf_counter()
                res = rt.sync_weights()
                times.append(time.perf_counter() - t0)
        secs = statistics.median(times)
        nbytes = float(res["bytes"])
        memcpy = memcpy_bytes_per_s(int(nbytes), repeats=3)
        if rt.weight_sync != path:
            raise RuntimeError(f"the run took the {rt.weight_sync} weight path, not {path}")
        return {f"{p}.model_bytes": float(model_bytes), f"{p}.bytes": nbytes,
                f"{p}.seconds": secs, f"{p}.engines": float(len(rt.engines)),
                f"{p}.gather_s": float(res.get("gather_s", float("nan"))),
                f"{p}.engine_load_s": float(res.get("engine_load_s", float("nan"))),
                **{f"{p}.{k}": float(res[k]) for k in ("check_s", "begin_s", "pack_s", "wait_s") if k in res},
                f"{p}.memcpy_gbps": memcpy / 1e9, f"{p}.gbps": model_bytes / secs / 1e9,
                f"{p}.store_peak_bytes": float(store.added),
                f"{p}_vs_memcpy": (model_bytes / secs) / memcpy,
                f"{p}_store_ratio": store.added / model_bytes}
    finally:
        setup.close()


# ── 4b. LoRA: the adapter's sync (and step) against the full model's ────
def _timed_syncs(rt: Any, repeats: int) -> tuple[float, float]:
    """Median seconds of `repeats` syncs after a warm-up one, and the bytes one moves."""
    rt.sync_weights()  # warm-up: the plan, the first puts, the engines' first load
    times, res = [], {}
    for _ in range(repeats):
        t0 = time.perf_counter()
        res = rt.sync_weights()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), float(res["bytes"])


def bench_lora(overrides: list[str], prefix: str, repeats: int = 3, steps: int = 0,
               step_fn: Callable[[Any, Any, Any], list[dict]] | None = None) -> dict[str, float]:
    """The same model and config twice in this process, full weights then a LoRA adapter (model.lora).

    `<prefix>.sync_bytes_ratio`: bytes a sync moves, adapter over full model;
    `<prefix>.sync_vs_full`: median seconds of a sync, adapter over full (one
    cluster each, one after the other, the same repeats). With `step_fn`
    (runtime, parts, cfg -> step rows), `<prefix>.step_vs_full`: the mean
    `timing/step` of its rows, adapter over full (and each mode's generate,
    train and sync seconds of those steps).
    """
    from ttrl.cli import compose
    from ttrl.metrics import column_mean
    from ttrl.parts import build_parts

    out: dict[str, float] = {}
    for mode in ("full", "lora"):
        cfg = compose([*overrides, f"model.lora.enabled={'true' if mode == 'lora' else 'false'}"])
        setup = build_parts(cfg)
        rt = setup.start_runtime(total_opt_steps=1000)
        try:
            secs, nbytes = _timed_syncs(rt, repeats)
            out[f"{prefix}.{mode}_sync_s"], out[f"{prefix}.{mode}_sync_bytes"] = secs, nbytes
            if step_fn is not None:
                rows = step_fn(rt, setup, cfg)
                # The step and where it goes: vLLM's LoRA kernels (generate) and peft's layers (train) cost too.
                for key in ("step", "generate", "train", "sync"):
                    out[f"{prefix}.{mode}_{key}_s" if key != "sync" else f"{prefix}.{mode}_step_sync_s"] = \
                        column_mean(rows, f"timing/{key}")
        finally:
            setup.close()
    out[f"{prefix}.sync_bytes_ratio"] = out[f"{prefix}.lora_sync_bytes"] / out[f"{prefix}.full_sync_bytes"]
    out[f"{prefix}.sync_vs_full"] = out[f"{prefix}.lora_sync_s"] / out[f"{prefix}.full_sync_s"]
    if step_fn is not None:
        out[f"{prefix}.step_vs_full"] = out[f"{prefix}.lora_step_s"] / out[f"{prefix}.full_step_s"]
    return out


# ── 5. scaling fit ───────────────────────────────────────────────────────
def loglog_slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log(y) on log(x): 1.0 means linear growth."""
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = statistics.mean(lx), statistics.mean(ly)
    den = sum((a - mx) ** 2 for a in lx)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / den if den else float("nan")


# ── 6. memory ────────────────────────────────────────────────────────────
class PeakRSS(_Sampler):
    """Samples the resident memory of some PIDs in a thread; keeps each one's peak."""

    def __init__(self, pids: dict[str, int], every_s: float = 0.2):
        import psutil

        super().__init__(every_s)
        self.procs = {name: psutil.Process(pid) for name, pid in pids.items()}
        self.peak = {name: 0 for name in pids}

    def sample(self) -> None:
        for name, p in self.procs.items():
            try:
                self.peak[name] = max(self.peak[name], p.memory_info().rss)
            except Exception:  # noqa: BLE001 - a process that ended keeps its last peak
                pass

    def mib(self) -> dict[str, float]:
        return {f"memory.peak_rss_mib.{k}": v / 2**20 for k, v in self.peak.items()}
