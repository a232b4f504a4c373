"""The run around the step: build, resume, evaluate, guard, step, checkpoint, report.

`run(cfg, run_dir)` is what `ttrl-train` runs. Its loop is the few lines
below; each thing it does around `ttrl.step.step` is a small named part:
`resume` (ttrl.checkpoint), `evaluate` (eval/* on the training prompts),
`start_guard` (ttrl.metrics.safety.Guard: skipped updates, collapse,
rollback), checkpoints (ttrl.checkpoint), and the console report
(ttrl.metrics.report). In overlap mode the loop hands `step` the next
batch, which the engines sample while the current one trains.

Must never: compute rewards, losses or votes (the step does), or read
ground truth except through eval/* metrics; a run that stops itself raises
RunStopped, whose message says why and what was kept.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import torch

from ttrl import checkpoint
from ttrl.data.sampler import PromptSampler
from ttrl.distributed.seam import StepRuntime
from ttrl.distributed.startup import process_created
from ttrl.labeling.extract import extract_answer
from ttrl.labeling.vote import majority_votes
from ttrl.metrics.logger import Loggers, build_loggers
from ttrl.metrics.report import eval_line, final_report, guard_summary, progress, say
from ttrl.metrics.safety import Guard, VoteTracker, vote_row
from ttrl.models.resolve import weights_fingerprint
from ttrl.parts import SetupError, build_parts
from ttrl.step import StepContext, StepOptions, step, token_ids
from ttrl.types import Prompt


class RunStopped(RuntimeError):
    """The run stopped itself (non-finite updates, a collapse): the message says why and what is kept."""


def run(cfg: Any, run_dir: Path) -> float | None:
    """Train for the configured number of steps; return the last step's `logger.objective`."""
    t_start = time.perf_counter()
    quiet = not cfg.logger.progress
    parts = build_parts(cfg)
    prompts = parts.prompts
    sampler = PromptSampler(len(prompts), cfg.data.prompts_per_step, cfg.data.shuffle, cfg.seed)
    steps = total_steps(cfg, len(prompts))
    rng = random.Random(cfg.seed)
    torch.manual_seed(cfg.seed)
    log: Loggers | None = None
    try:
        if not quiet:
            say(f"starting Ray, {cfg.rollout.num_engines} vLLM engine(s), {cfg.trainer.num_workers} "
                f"DeepSpeed ZeRO-{cfg.trainer.zero_stage} rank(s) ...")
        rt = parts.start_runtime(optimizer_steps(cfg, steps))
        log = build_loggers(cfg, run_dir)  # metrics.jsonl (+ samples.jsonl, votes.jsonl), and W&B when enabled
        start, resumed = resume(cfg, run_dir, rt, sampler, rng, log)
        if not quiet:
            bf16 = ("; the update under bf16 autocast" if rt.autocast == "bfloat16" else
                    "; the backward's products in bf16" if rt.backward_products == "bfloat16" else "")
            say(f"ready in {rt.startup_s:.0f}s ({rt.phases.line()}{bf16}); training {steps} steps, "
                f"run dir {run_dir}")
        ctx = StepContext(rt, parts.reward, parts.tokenizer, StepOptions.from_config(cfg), rng,
                          votes=VoteTracker(cfg.safety.flip_confident))
        history: list[dict[str, Any]] = []
        if cfg.eval.at_start and start == 0:
            t_eval = time.perf_counter()
            history.append({"step": 0, **evaluate(cfg, ctx, prompts)})
            rt.phases.after["first_eval"] = time.perf_counter() - t_eval
            log.log(history[-1])
            if not quiet:
                say(f"before training: {eval_line(history[-1])}")
        t_guard = time.perf_counter()
        guard = start_guard(cfg, ctx, prompts, run_dir, start, history[-1] if history else None, sampler, quiet)
        if ctx.vote_rows:
            rt.phases.after["anchor_votes"] = time.perf_counter() - t_guard
        # The anchor votes (if any) as step 0 of votes.jsonl: a guard signal can be replayed on a finished run.
        log.log_votes(0, ctx.vote_rows)
        # Seconds from the command (this process's creation) to the first step, with the phases: a
        # metric of the first step's row (make bench's startup section reads it).
        started = {"startup/first_step_s": time.time() - process_created(), **rt.phases.as_dict()}
        # Which weights the run started from (the warm start's, also on a resume): a report that puts runs
        # side by side as one warm start checks they agree, since a build on another CPU differs.
        fingerprint = weights_fingerprint(parts.model_path)
        if fingerprint is not None:
            started["model/fingerprint"] = fingerprint
        if not quiet:
            say(f"first step {started['startup/first_step_s']:.0f}s after the command ({rt.phases.line()})")

        def draw() -> list[Prompt]:
            return [prompts[i] for i in sampler.next_batch()]

        row: dict[str, Any] = {}
        upcoming: list[Prompt] | None = None
        t_last = t_loop = time.perf_counter()
        for step_no in range(start + 1, steps + 1):
            batch = upcoming if upcoming is not None else draw()
            # What a checkpoint of this step records: the batches drawn up to this one.
            sampler_state = sampler.state_dict()
            # Overlap: the next batch is sampled while this one trains, one step off-policy.
            upcoming = draw() if cfg.rollout.overlap and step_no < steps else None
            row = {"step": step_no, **step(ctx, batch, next_prompts=upcoming, t0=t_last,
                                           inject_nan=step_no in cfg.faults.nan_loss_at_steps), **resumed, **started}
            resumed, started = {}, {}
            if eval_due(cfg, step_no, steps):
                row |= evaluate(cfg, ctx, prompts)
            stop_reason = guard.check(row)  # may roll back, adding event/* keys to the row
            record(cfg, log, ctx, row)
            history.append(row)
            if not quiet:
                progress(step_no, steps, row, t_loop, start + 1)
            t_last = time.perf_counter()
            if stop_reason:
                raise RunStopped(stop_reason)
            if checkpoint_due(cfg, step_no, steps):
                path = checkpoint.save(rt, run_dir, step_no, sampler_state, rng, cfg.trainer.keep_last,
                                       eval_pass1=row.get("eval/pass@1"), protect=guard.best_ckpt)
                guard.saved(path, row.get("eval/pass@1"))
        final_report(run_dir, cfg, history, time.perf_counter() - t_start, quiet, guard.label_free)
        return row.get(cfg.logger.objective)
    finally:
        if log is not None:
            log.close()
        parts.close()


# ── the parts ─────────────────────────────────────────────────────────────
def total_steps(cfg: Any, num_prompts: int) -> int:
    """trainer.total_steps, or trainer.episodes passes over the prompts."""
    if cfg.trainer.total_steps:
        return int(cfg.trainer.total_steps)
    return max(1, num_prompts // cfg.data.prompts_per_step) * cfg.trainer.episodes


def optimizer_steps(cfg: Any, steps: int) -> int:
    """Optimizer steps over the run (the lr schedule's length): epochs x mini-batches per step."""
    step_batch = cfg.data.prompts_per_step * cfg.rollout.n_train
    return steps * cfg.algorithm.ppo_epochs * (step_batch // (cfg.trainer.mini_batch_size or step_batch))


def resume(cfg: Any, run_dir: Path, rt: StepRuntime, sampler: PromptSampler, rng: random.Random,
           log: Loggers) -> tuple[int, dict[str, Any]]:
    """Restore the checkpoint `trainer.resume` names, if any: (its step, resume/* keys for the next row)."""
    ckpt = checkpoint.find(run_dir, cfg.trainer.resume)
    if ckpt is None:
        return 0, {}
    state = checkpoint.restore(rt, ckpt, rng)
    sampler.load_state_dict(state["sampler"])
    start = int(state["step"])
    rt.sync_weights()
    log.truncate_from(start + 1)
    say(f"resumed from {ckpt} at step {start}")
    return start, {"resume/from_step": float(start), "resume/weights_fingerprint": rt.fingerprint(),
                   "resume/checkpoint_fingerprint": state.get("weights_fingerprint")}


def evaluate(cfg: Any, ctx: StepContext, prompts: list[Prompt]) -> dict[str, float]:
    """eval/* metrics of the current policy on `prompts` (ground truth: metrics only)."""
    from ttrl.eval.runner import evaluate as grade_policy

    e = cfg.eval
    summary, _ = grade_policy(ctx.rt.generate, prompts, token_ids(ctx.tokenizer, prompts), n=e.n_samples,
                              temperature=e.temperature, top_p=e.top_p,
                              max_tokens=e.max_new_tokens or cfg.rollout.max_new_tokens, ks=list(e.ks),
                              greedy=e.greedy, extractor=ctx.opts.extractor)
    return {f"eval/{k}": v for k, v in summary.items() if k not in ("n_problems", "n_samples")}


def eval_due(cfg: Any, step_no: int, steps: int) -> bool:
    every = cfg.eval.every_n_steps
    return bool(every and step_no % every == 0) or (cfg.eval.at_end and step_no == steps)


def start_guard(cfg: Any, ctx: StepContext, prompts: list[Prompt], run_dir: Path, start: int,
                first_eval: dict[str, Any] | None, sampler: PromptSampler, quiet: bool) -> Guard:
    """The guard, anchored on the starting policy's votes, with the starting weights as a rollback target.

    The anchor votes are always a generation of their own, even when the
    starting eval sampled as a step's votes do. Reusing the eval's answers
    (tried: one 128 x 16 generation saved) biased the consensus signal: on warm
    start 0:0 the eval's draw had a mean majority ratio of 0.628 against 0.597
    and 0.599 for two draws of the rollout's own (fresh anchors; step 1, all
    128 prompts, the same policy), a -0.03 shift that is the signal's whole
    threshold, and a healthy LoRA run (+0.288 pass@1) was flagged at step 3.
    """
    label_free = not ctx.reward.needs_ground_truth
    guard = Guard(cfg, ctx.rt, run_dir, label_free=label_free)
    if not quiet:
        say(f"collapse guard {guard_summary(cfg.safety, label_free)}; on a collapse: {cfg.safety.action}"
            + ("" if label_free else " (vote signals off: the reward reads the ground truth)"))
    if label_free and cfg.safety.anchor_prompts and start == 0:
        k = cfg.safety.anchor_prompts
        # Its own generator: the run's rng (subsampling) draws as it would without an anchor.
        anchored = prompts if k >= len(prompts) else random.Random(cfg.seed).sample(prompts, k)
        ratio = anchor_votes(cfg, ctx, anchored)
        if not quiet:
            say(f"guard anchored on the starting policy's votes for {len(anchored)} prompts "
                f"(majority ratio {ratio:.3f})")
    first_pass1 = first_eval.get("eval/pass@1") if first_eval else None
    if first_eval:
        # The starting eval is the first "best": a run that only ever gets
        # worse than where it began must trip safety.max_eval_drop.
        guard.detector.update({"eval/pass@1": first_pass1})
    if cfg.safety.action == "rollback" and start == 0:
        # The starting weights are a rollback target too: a run that collapses
        # from its first steps can always return to where it began.
        path = checkpoint.save(ctx.rt, run_dir, 0, sampler.state_dict(), ctx.rng, max(cfg.trainer.keep_last, 1),
                               eval_pass1=first_pass1)
        guard.saved(path, first_pass1)
    return guard


def anchor_votes(cfg: Any, ctx: StepContext, prompts: list[Prompt]) -> float:
    """Vote on `prompts` with the starting policy (the rollout's sampling); the tracker's reference.

    Label-free: the votes are kept, never graded. Returns the mean majority ratio.
    """
    r = cfg.rollout
    extractor = ctx.opts.extractor
    outs = ctx.rt.generate(token_ids(ctx.tokenizer, prompts), n=r.n_votes, temperature=r.temperature,
                           top_p=r.top_p, top_k=r.top_k, max_tokens=r.max_new_tokens)
    answers = [[extract_answer(o["text"], extractor, prompt=p.id) for o in out] for p, out in zip(prompts, outs)]
    votes = majority_votes(answers, extractor=extractor)
    ctx.votes.anchor([p.id for p in prompts], votes)
    ctx.vote_rows = [vote_row(p.id, v) for p, v in zip(prompts, votes)]
    return sum(v.ratio for v in votes) / max(len(votes), 1)


def record(cfg: Any, log: Loggers, ctx: StepContext, row: dict[str, Any]) -> None:
    """The step's row, its votes, and (every logger.samples_every steps, and the first) its sample table."""
    step_no = int(row["step"])
    log.log(row)
    if cfg.logger.samples_every and (step_no % cfg.logger.samples_every == 0 or step_no == 1):
        log.log_samples(step_no, ctx.samples)
    log.log_votes(step_no, ctx.vote_rows)


def checkpoint_due(cfg: Any, step_no: int, steps: int) -> bool:
    every = cfg.trainer.save_every
    return bool(every and step_no % every == 0) or step_no == steps


__all__ = ["RunStopped", "SetupError", "anchor_votes", "evaluate", "optimizer_steps", "resume", "run",
           "start_guard", "total_steps"]
