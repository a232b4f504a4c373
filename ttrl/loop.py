"""The training step, readable top to bottom, and the run around it.

One step: sample n_votes completions per prompt on the vLLM engines, vote
over their answers, reward agreement with the vote, keep n_train samples,
score them under the policy/reference/critic, compute advantages, update
the policy on the DeepSpeed workers, push the new weights to every engine,
and log. Ground truth appears only below the metrics banner, through
`label_quality`; the reward is computed by `compute_rewards`, which hands a
label-free reward prompts whose answers are scrubbed.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from ttrl.algos import compute_advantages, kl, kl_penalty, masked_mean
from ttrl.data.loader import load_prompts
from ttrl.data.sampler import PromptSampler
from ttrl.data.templates import render_prompt
from ttrl.distributed.runtime import Runtime
from ttrl.labeling import grade
from ttrl.labeling.extract import extract_answer
from ttrl.labeling.vote import majority_votes
from ttrl.metrics import column_mean
from ttrl.metrics.label_quality import label_quality
from ttrl.metrics.logger import Loggers, build_loggers, sample_rows
from ttrl.metrics.safety import VoteTracker
from ttrl.models import resolve_model_path
from ttrl.rewards import build_reward, compute_rewards
from ttrl.trainer.batch import pack_batch
from ttrl.types import Group, Prompt, Sample


@dataclass
class Ctx:
    """What a step needs besides its batch of prompts."""

    cfg: Any
    rt: Runtime
    reward: Any
    tokenizer: Any
    algo: dict
    rng: random.Random
    # The last step's sample table (prompts, completions, vote, rewards), for the loggers.
    samples: list[dict] | None = None
    # Each prompt's vote across visits: the guard's label-free signals.
    votes: VoteTracker = field(default_factory=VoteTracker)
    # The last step's votes, one row per prompt (id, label, ratio, classes), for votes.jsonl.
    vote_rows: list[dict] | None = None


@dataclass
class Rollout:
    """A batch of prompts whose samples are being (or have been) generated."""

    prompts: list[Prompt]
    prompt_ids: list[list[int]]
    handle: Any = None
    groups: list[Group] | None = None
    t_submit: float = 0.0
    generate_s: float = 0.0


def start_rollout(ctx: Ctx, prompts: list[Prompt]) -> Rollout:
    """Submit n_votes samples per prompt to the engines; returns at once."""
    r = ctx.cfg.rollout
    prompt_ids = [ctx.tokenizer(p.text, add_special_tokens=False)["input_ids"] for p in prompts]
    handle = ctx.rt.submit_generate(prompt_ids, n=r.n_votes, temperature=r.temperature, top_p=r.top_p,
                                    top_k=r.top_k, max_tokens=r.max_new_tokens)
    return Rollout(prompts, prompt_ids, handle, t_submit=time.perf_counter())


def finish_rollout(ctx: Ctx, ro: Rollout) -> Rollout:
    """Wait for the samples and extract each one's answer."""
    t = time.perf_counter()
    outs = ctx.rt.collect(ro.handle)                                             # [P][n_votes]
    ro.groups = [Group(p, ids, [Sample(text=o["text"], token_ids=o["token_ids"], logprobs=o["logprobs"],
                                       answer=extract_answer(o["text"]), finish_reason=o["finish_reason"])
                                for o in out])
                 for p, ids, out in zip(ro.prompts, ro.prompt_ids, outs)]
    # Time the step waited for generation (all of it unless generation overlapped training).
    ro.generate_s = time.perf_counter() - t
    return ro


def step(ctx: Ctx, prompts: list[Prompt]) -> dict[str, float]:
    """One synchronous step: generate with the current weights, then learn from it."""
    t_step = time.perf_counter()
    ro = finish_rollout(ctx, start_rollout(ctx, prompts))
    ro.generate_s = time.perf_counter() - t_step
    return learn(ctx, ro, t_step)


def learn(ctx: Ctx, ro: Rollout, t_step: float) -> dict[str, float]:
    """Label, reward, update and sync on a finished rollout; returns the step's metrics."""
    cfg, rt, r = ctx.cfg, ctx.rt, ctx.cfg.rollout
    groups = ro.groups
    assert groups is not None, "finish_rollout first"
    timings: dict[str, float] = {"timing/generate": ro.generate_s}
    n_tokens = sum(len(s.token_ids) for g in groups for s in g.samples)

    # ── 2+3. label without labels, reward agreement with the vote ─────────
    t = time.perf_counter()
    out = compute_rewards(ctx.reward, groups)                    # rewards [P][n_votes]
    votes = out.votes if out.votes is not None else majority_votes([g.answers() for g in groups])
    timings["timing/label"] = time.perf_counter() - t

    # ── keep n_train of the n_votes samples per prompt ────────────────────
    keep = [subsample(r.n_votes, r.n_train, r.subsample, ctx.rng) for _ in groups]   # [P][n_train]
    rewards = torch.tensor([[out.rewards[p][i] for i in rows] for p, rows in enumerate(keep)])  # [P, n_train]
    kept = [g.samples[i] for g, rows in zip(groups, keep) for i in rows]
    batch = pack_batch([g.prompt_token_ids for g, rows in zip(groups, keep) for _ in rows],
                       [s.token_ids for s in kept], pad_id=ctx.tokenizer.pad_token_id,
                       behavior_logps=[s.logprobs for s in kept])
    mask = batch["response_mask"]                                                    # [B, R]

    # ── 4. old/ref log-probs, values, advantages ─────────────────────────
    t = time.perf_counter()
    a = cfg.algorithm
    # One optimizer step on the whole batch (one epoch, one mini-batch) sees
    # the very weights that would compute old_logp, so the trainer takes them
    # from its own forward pass (detached) and a whole forward pass is saved.
    # With several updates per batch, or a KL term that needs them now, they
    # must be computed up front.
    fused_old = ctx.algo["ppo_epochs"] == 1 and rt.mini >= len(kept) and not rt.need_ref
    if not fused_old:
        batch["old_logp"] = rt.logprobs(batch, r.temperature)                        # [B, R]
    token_rewards = None
    stats: dict[str, float] = {}
    if rt.need_ref:
        batch["ref_logp"] = rt.logprobs(batch, r.temperature, which="ref")
        stats["train/kl"] = float(masked_mean(kl(a.kl_estimator, batch["old_logp"], batch["ref_logp"]), mask))
        if a.kl_in_reward:
            token_rewards = kl_penalty(a.kl_estimator, batch["old_logp"], batch["ref_logp"], mask, a.kl_coef)
    if rt.need_critic:
        batch["values"] = rt.values(batch)
    batch["advantages"], batch["returns"] = compute_advantages(
        a.advantage, rewards, mask, values=batch.get("values"), token_rewards=token_rewards,
        gamma=a.gamma, lam=a.lam)
    timings["timing/prepare"] = time.perf_counter() - t

    # ── 5. update the policy (and critic) on the DeepSpeed workers ────────
    t = time.perf_counter()
    if r.sleep_between_steps:
        rt.sleep_engines()
    train_stats = rt.train_policy(batch, ctx.algo)
    if rt.need_critic:
        train_stats |= {f"critic/{k}": v for k, v in rt.train_critic(batch, ctx.algo).items()}
    timings["timing/train"] = time.perf_counter() - t

    # ── 6. push the new weights into every rollout engine ─────────────────
    t = time.perf_counter()
    if r.sleep_between_steps:
        rt.wake_engines()
    sync = rt.sync_weights()
    timings["timing/sync"] = time.perf_counter() - t
    timings["timing/step"] = time.perf_counter() - t_step

    # ── metrics: the only place that may look at ground truth ────────────
    stats |= {
        "reward/mean": float(torch.tensor(out.rewards).float().mean()),
        "reward/train_mean": float(rewards.mean()),
        "rollout/tokens_per_s": n_tokens / max(time.perf_counter() - ro.t_submit if r.overlap
                                               else timings["timing/generate"], 1e-9),
        "rollout/response_length": n_tokens / max(len(groups) * r.n_votes, 1),
        # Engine vs trainer log-probs of the same tokens, before the update:
        # near zero when the last weight sync worked.
        "rollout/logprob_diff": (train_stats.pop("logprob_diff_sum") / max(train_stats.pop("logprob_diff_n"), 1.0)
                                 if fused_old else
                                 float(masked_mean((batch["behavior_logp"] - batch["old_logp"]).abs(), mask))),
        # Nats per response token, under the policy before this update.
        "train/entropy": train_stats.pop("entropy_sum", float("nan")) / max(train_stats.pop("entropy_n", 1.0), 1.0),
        "train/clip_frac": train_stats.pop("clip_frac", float("nan")),
        "train/pg_loss": train_stats.pop("pg_loss", float("nan")),
        "train/grad_norm": train_stats.pop("grad_norm", float("nan")),
        "train/lr": train_stats.pop("lr", float("nan")),
        "sync/bytes": sync.get("bytes", 0.0),
    }
    stats |= {f"train/{k}" if "/" not in k else k: v for k, v in train_stats.items()}
    stats |= ctx.votes.update([g.prompt.id for g in groups], votes)
    ctx.vote_rows = [{"id": g.prompt.id, "label": v.label, "ratio": round(v.ratio, 4), "classes": len(v.counts)}
                     for g, v in zip(groups, votes)]
    stats |= label_quality(groups, votes, [[out.rewards[p][i] for i in rows] for p, rows in enumerate(keep)], keep)
    lg = cfg.logger
    ctx.samples = sample_rows(groups, votes, out.rewards, lg.samples_prompts, lg.samples_per_prompt)
    return stats | timings


def subsample(n_votes: int, n_train: int, how: str, rng: random.Random) -> list[int]:
    """Which of a prompt's n_votes samples train: the first n_train, or a random draw."""
    if how == "first" or n_train == n_votes:
        return list(range(n_train))
    return sorted(rng.sample(range(n_votes), n_train))


def anchor_votes(ctx: Ctx, prompts: list[Prompt]) -> float:
    """Vote on `prompts` with the starting policy (the rollout's sampling); the tracker's reference.

    Label-free: the votes are kept, never graded. Returns the mean majority ratio.
    """
    r = ctx.cfg.rollout
    ids = [ctx.tokenizer(p.text, add_special_tokens=False)["input_ids"] for p in prompts]
    outs = ctx.rt.generate(ids, n=r.n_votes, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                           max_tokens=r.max_new_tokens)
    votes = majority_votes([[extract_answer(o["text"]) for o in out] for out in outs])
    ctx.votes.anchor([p.id for p in prompts], votes)
    return sum(v.ratio for v in votes) / max(len(votes), 1)


def evaluate_policy(ctx: Ctx, prompts: list[Prompt]) -> dict[str, float]:
    """eval/* metrics of the current policy on `prompts` (ground truth: metrics only)."""
    from ttrl.eval.runner import evaluate

    e = ctx.cfg.eval
    ids = [ctx.tokenizer(p.text, add_special_tokens=False)["input_ids"] for p in prompts]
    summary, _ = evaluate(ctx.rt.generate, prompts, ids, n=e.n_samples, temperature=e.temperature, top_p=e.top_p,
                          max_tokens=e.max_new_tokens or ctx.cfg.rollout.max_new_tokens, ks=list(e.ks),
                          greedy=e.greedy)
    return {f"eval/{k}": v for k, v in summary.items() if k not in ("n_problems", "n_samples")}


# ── the run ───────────────────────────────────────────────────────────────
def algo_options(cfg: Any) -> dict:
    a = cfg.algorithm
    return {
        "policy_loss": a.policy_loss, "clip_low": a.clip_low, "clip_high": a.clip_high,
        "dual_clip": a.dual_clip, "loss_agg": a.loss_agg, "kl_coef": a.kl_coef,
        "kl_estimator": a.kl_estimator, "kl_in_reward": a.kl_in_reward, "entropy_coef": a.entropy_coef,
        "ppo_epochs": a.ppo_epochs, "value_clip": a.value_clip, "temperature": cfg.rollout.temperature,
    }


def total_steps(cfg: Any, num_prompts: int) -> int:
    if cfg.trainer.total_steps:
        return int(cfg.trainer.total_steps)
    return max(1, num_prompts // cfg.data.prompts_per_step) * cfg.trainer.episodes


def find_checkpoint(run_dir: Path, resume: str) -> Path | None:
    """The checkpoint to resume from: newest complete one ('auto'), none, or a path."""
    if resume == "none":
        return None
    if resume != "auto":
        p = Path(resume)
        if not (p / "trainer_state.json").exists():
            raise FileNotFoundError(f"trainer.resume={resume}: no trainer_state.json there")
        return p
    ckpts = sorted((run_dir / "checkpoints").glob("step_*"), key=lambda p: int(p.name.split("_")[1]))
    complete = [p for p in ckpts if (p / "trainer_state.json").exists()]
    return complete[-1] if complete else None


def save_checkpoint(rt: Runtime, run_dir: Path, step_no: int, sampler_state: dict, rng: random.Random,
                    keep_last: int, eval_pass1: float | None = None, protect: Path | None = None) -> Path:
    """Write checkpoints/step_N atomically (tmp dir, then rename) and prune old ones.

    `protect` (the best evaluated checkpoint, the rollback target) survives pruning.
    """
    root = run_dir / "checkpoints"
    final = root / f"step_{step_no}"
    tmp = root / f".tmp-step_{step_no}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    rt.save(str(tmp))
    state = {"step": step_no, "sampler": sampler_state, "weights_version": rt.weights_version,
             "weights_fingerprint": rt.fingerprint(), "eval_pass1": eval_pass1}
    (tmp / "trainer_state.json").write_text(json.dumps(state))
    torch.save({"python": rng.getstate(), "torch": torch.get_rng_state()}, tmp / "rng.pt")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    complete = sorted((p for p in root.glob("step_*") if (p / "trainer_state.json").exists()),
                      key=lambda p: int(p.name.split("_")[1]))
    for old in complete[:-keep_last]:
        if protect is None or old.resolve() != protect.resolve():
            shutil.rmtree(old, ignore_errors=True)
    return final


class SetupError(ValueError):
    """The run cannot start: bad data, model dir or reward; the message names it."""


class RunStopped(RuntimeError):
    """The run stopped itself (non-finite updates, a collapse): the message says why and what is kept."""


def _eval_line(row: dict[str, float]) -> str:
    return ", ".join(f"{k[5:]} {v:.3f}" for k, v in row.items() if k.startswith("eval/") and "@" in k
                     and not k.endswith("_stderr"))


def finish_report(run_dir: Path, cfg: Any, history: list[dict[str, float]], wall: float, quiet: bool) -> None:
    """Plot the run; print a before/after table when it was evaluated at both ends."""
    from ttrl.metrics.plot import plot_run

    rows = history
    if (run_dir / "metrics.jsonl").exists():  # a resumed run plots its whole history
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    png = plot_run(rows, run_dir / "training.png", title=f"{cfg.experiment}: {cfg.algorithm.name}, "
                   f"reward={cfg.reward.name}")
    if quiet:
        return
    evals = [r for r in rows if r.get("eval/pass@1") is not None]
    steps = [r for r in rows if r.get("step", 0) > 0 and r.get("label/accuracy") is not None]
    if len(evals) >= 2 and steps:
        first, last = evals[0], evals[-1]
        maj = next((k for k in last if k.startswith("eval/maj@") and k != "eval/maj@1" and "stderr" not in k), None)
        lines = [f"{'':<34}{'before':>10}{'after':>10}",
                 f"{'pass@1 (test prompts)':<34}{first['eval/pass@1']:>10.3f}{last['eval/pass@1']:>10.3f}"]
        if maj:
            lines.append(f"{maj[5:] + ' (test prompts)':<34}{first.get(maj, float('nan')):>10.3f}{last[maj]:>10.3f}")
        # One step sees only data.prompts_per_step prompts: average a few steps at each end.
        k = max(1, min(5, len(steps) // 4))
        head, tail = steps[:k], steps[-k:]

        span = f" ({k} steps)" if k > 1 else ""
        lines += [
            f"{'pseudo-label accuracy' + span:<34}{column_mean(head, 'label/accuracy'):>10.3f}{column_mean(tail, 'label/accuracy'):>10.3f}",
            f"{'majority ratio' + span:<34}{column_mean(head, 'label/majority_ratio'):>10.3f}"
            f"{column_mean(tail, 'label/majority_ratio'):>10.3f}",
            f"{'training time':<34}{'':>10}{sum(r.get('timing/step') or 0.0 for r in steps):>9.0f}s",
        ]
        fired = next((r for r in rows if r.get("safety/collapse_step") is not None), None)
        lines.append(f"{'collapse guard':<34}" + (f"fired at step {fired['safety/collapse_step']}: "
                                                   f"{fired.get('safety/reason', '')}" if fired else
                                                   f"quiet ({guard_summary(cfg.safety, cfg.reward.name != 'ground_truth')})"))
        print("\n" + "\n".join(lines), file=sys.stderr)
    print(f"ttrl: done in {wall:.0f}s ({wall / 60:.1f} min); plot {png}; run dir {run_dir}", file=sys.stderr)


def guard_summary(sf: Any, vote_signals: bool = True) -> str:
    """The collapse detectors that are on, in a few words."""
    votes = (("vote flips", sf.max_flip_rate), ("vote drift", sf.max_first_vote_drift)) if vote_signals else ()
    on = [name for name, value in (*votes, ("entropy", sf.min_entropy), ("majority ratio", sf.max_majority_ratio),
                                   ("eval drop", sf.max_eval_drop)) if value is not None]
    return "watching " + ", ".join(on) if on else "no detector on"


def _progress(step_no: int, total: int, row: dict[str, float], t_loop: float, first: int, enabled: bool) -> None:
    """One console line per step; `t_loop` is when the first step of this process began."""
    if not enabled:
        return
    # Under CI (CI=true) about ten lines a run: the first step, every tenth of the run, the last.
    if os.environ.get("CI", "").lower() in ("1", "true") and step_no not in (1, total) \
            and step_no % max(1, total // 10):
        return
    # The rate of the steps this process ran: start-up, the starting eval and
    # the steps a resumed run skipped are not steps to come.
    done = step_no - first + 1
    eta = (time.perf_counter() - t_loop) / max(done, 1) * (total - step_no)
    parts = [f"step {step_no}/{total}"]
    for key, fmt in (("reward/mean", "reward {:.3f}"), ("train/pass@1", "pass@1 {:.3f}"),
                     ("label/accuracy", "label_acc {:.3f}"), ("rollout/tokens_per_s", "{:.0f} tok/s"),
                     ("timing/step", "{:.1f}s/step")):
        if key in row and row[key] is not None:
            parts.append(fmt.format(row[key]))
    parts.append(f"ETA {eta:.0f}s")
    print(" | ".join(parts), file=sys.stderr, flush=True)


class Guard:
    """Numerical and self-training safety, checked after every step.

    Counts skipped (non-finite) updates and stops after
    `trainer.max_skipped_steps` in a row; runs the collapse detectors and
    applies `safety.action`: warn, stop, or rollback with a lower learning
    rate. The rollback target is the best evaluated checkpoint when the guard
    watches eval/pass@1 (`safety.max_eval_drop`, which grades against ground
    truth); a label-free guard picks no checkpoint by a graded score and rolls
    back to the starting weights. The first step it fires is logged as
    `safety/collapse_step` with `safety/reason`.
    """

    def __init__(self, cfg: Any, rt: Runtime, run_dir: Path, quiet: bool, label_free: bool = True):
        from ttrl.metrics.safety import CollapseDetector

        self.cfg, self.rt, self.run_dir, self.quiet = cfg, rt, run_dir, quiet
        # The vote signals watch a run that makes its own labels; a reward
        # that reads the ground truth moves votes for the right reasons.
        self.detector = CollapseDetector(cfg.safety, vote_signals=label_free)
        self.skips = 0
        self.rollbacks = 0
        self.fired_at: int | None = None
        self.best_ckpt: Path | None = None
        self.best_eval: float | None = None
        self.by_eval = cfg.safety.max_eval_drop is not None

    def saved(self, path: Path, eval_pass1: float | None) -> None:
        if self.best_ckpt is None and int(path.name.split("_")[-1]) == 0:
            self.best_ckpt, self.best_eval = path, eval_pass1  # the starting weights: always a safe target
        elif self.by_eval and eval_pass1 is not None and (self.best_eval is None or eval_pass1 > self.best_eval):
            self.best_ckpt, self.best_eval = path, eval_pass1

    def _say(self, msg: str) -> None:
        print(f"ttrl: {msg}", file=sys.stderr, flush=True)

    def check(self, row: dict[str, Any]) -> str | None:
        """Add event/* and safety/* keys to `row`; return a reason when the run must stop."""
        if row.get("train/skipped"):
            self.skips += 1
            row["event/skipped_update"] = f"non-finite loss or gradient norm: update skipped ({self.skips} in a row)"
            self._say(row["event/skipped_update"])
            if self.skips >= self.cfg.trainer.max_skipped_steps:
                return (f"{self.skips} updates in a row had a non-finite loss or gradient norm; stopping. "
                        f"The last checkpoint in {self.run_dir / 'checkpoints'} is intact.")
        else:
            self.skips = 0
        events = self.detector.update(row)
        if not events:
            return None
        msg = "; ".join(e.message for e in events)
        row["event/collapse"] = msg
        if self.fired_at is None:
            self.fired_at = int(row["step"])
            row["safety/collapse_step"] = self.fired_at
            row["safety/reason"] = msg
        action = self.cfg.safety.action
        row["event/action"] = action
        self._say(f"collapse warning at step {row['step']}: {msg} (action: {action})")
        if action == "stop":
            return f"collapse detected ({msg}); stopping as safety.action=stop asks."
        if action == "rollback":
            if self.best_ckpt is None:
                row["event/action"] = "rollback impossible"
                return f"collapse detected ({msg}) and no checkpoint to roll back to; stopping."
            where = (f"{self.best_ckpt} (eval pass@1 {self.best_eval:.3f})" if self.best_eval is not None
                     else f"{self.best_ckpt} (the starting weights)")
            if self.rollbacks >= self.cfg.safety.max_rollbacks:
                # Out of retries: leave the engines and trainer on the best weights
                # seen, so what the run ends with is never the collapsed model.
                self.rt.load(str(self.best_ckpt))
                self.rt.sync_weights()
                row["event/action"] = "restored best, stopping"
                row["event/rollback_to"] = str(self.best_ckpt)
                return (f"collapse detected ({msg}) and no rollback left ({self.rollbacks} done); restored "
                        f"{where} and stopping.")
            self.rt.load(str(self.best_ckpt))
            lr = self.rt.scale_lr(self.cfg.safety.lr_factor ** (self.rollbacks + 1))
            self.rt.sync_weights()
            self.rollbacks += 1
            self.detector.reset()
            row["event/rollback_to"] = str(self.best_ckpt)
            row["event/lr_after_rollback"] = lr
            self._say(f"rolled back to {where}; lr now {lr:.3g}")
        return None


@dataclass
class Setup:
    """Everything a run needs before any actor starts."""

    model_path: str
    tokenizer: Any
    prompts: list[Prompt]
    reward: Any


def prepare(cfg: Any, with_prompts: bool = True) -> Setup:
    """Resolve the model, load and template the prompts, build the reward.

    `ttrl-serve` sets up through here too, with `with_prompts=False` (its
    prompts are the queries it serves): one set-up, so both build the same reward.
    """
    grade.use(grade.GradeOptions(timeout_s=cfg.label.grade_timeout_s))
    model_path = resolve_model_path(cfg.model, cfg.data)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(cfg.model.tokenizer_path or model_path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    prompts = [Prompt(p.id, p.problem, p.answer, render_prompt(p.problem, cfg.model, tokenizer))
               for p in load_prompts(cfg.data)] if with_prompts else []
    return Setup(model_path, tokenizer, prompts, build_reward(cfg.reward.name, **reward_options(cfg)))


def reward_options(cfg: Any) -> dict[str, Any]:
    """The constructor options of the configured reward, from its config section.

    For `reward_model` that is the scorer: the reward only turns scores into
    rewards (ttrl/rewards/ reaches no Ray actor); the model runs in a Ray
    actor that starts on the first score, once the Runtime has started Ray.
    """
    r = cfg.reward
    if r.name == "custom":
        return {"fn": r.fn, "needs_ground_truth": r.needs_ground_truth}
    if r.name == "reward_model":
        from ttrl.rewards.reward_model import check_reward_model_dir
        from ttrl.trainer.reward_model import RemoteRewardModel

        return {"scorer": RemoteRewardModel(check_reward_model_dir(r.path))}
    if r.name == "majority_vote":
        return {"min_ratio": r.min_ratio}
    if r.name == "random":
        return {"p": r.p, "seed": cfg.seed if r.seed is None else r.seed}
    return {}


def run(cfg: DictConfig, run_dir: Path) -> float | None:
    """Train for the configured number of steps; return the last mean reward."""
    t_start = time.perf_counter()
    try:
        setup = prepare(cfg)
    except (ValueError, FileNotFoundError) as err:
        # Bad data rows, model dirs or reward functions: the message names the culprit.
        raise SetupError(str(err)) from err
    prompts, tokenizer, reward, model_path = setup.prompts, setup.tokenizer, setup.reward, setup.model_path
    sampler = PromptSampler(len(prompts), cfg.data.prompts_per_step, cfg.data.shuffle, cfg.seed)
    steps = total_steps(cfg, len(prompts))
    step_batch = cfg.data.prompts_per_step * cfg.rollout.n_train
    opt_steps = steps * cfg.algorithm.ppo_epochs * (step_batch // (cfg.trainer.mini_batch_size or step_batch))
    rng = random.Random(cfg.seed)
    torch.manual_seed(cfg.seed)

    quiet = not cfg.logger.progress
    if not quiet:
        print(f"ttrl: starting Ray, {cfg.rollout.num_engines} vLLM engine(s), {cfg.trainer.num_workers} "
              f"DeepSpeed ZeRO-{cfg.trainer.zero_stage} rank(s) ...", file=sys.stderr, flush=True)
    rt = Runtime(cfg, model_path, opt_steps)
    log: Loggers | None = None
    try:
        log = build_loggers(cfg, run_dir)  # metrics.jsonl (+ samples.jsonl), and W&B when enabled

        start = 0
        resume_info: dict[str, Any] = {}
        ckpt = find_checkpoint(run_dir, cfg.trainer.resume)
        if ckpt is not None:
            state = json.loads((ckpt / "trainer_state.json").read_text())
            rt.load(str(ckpt))
            sampler.load_state_dict(state["sampler"])
            rs = torch.load(ckpt / "rng.pt", weights_only=False)
            rng.setstate(rs["python"])
            torch.set_rng_state(rs["torch"])
            start = int(state["step"])
            rt.sync_weights()
            log.truncate_from(start + 1)
            resume_info = {"resume/from_step": float(start), "resume/weights_fingerprint": rt.fingerprint(),
                           "resume/checkpoint_fingerprint": state.get("weights_fingerprint")}
            print(f"ttrl: resumed from {ckpt} at step {start}", file=sys.stderr, flush=True)
        if not quiet:
            print(f"ttrl: ready in {rt.startup_s:.0f}s; training {steps} steps, run dir {run_dir}",
                  file=sys.stderr, flush=True)

        ctx = Ctx(cfg, rt, reward, tokenizer, algo_options(cfg), rng)
        history: list[dict[str, float]] = []
        if cfg.eval.at_start and start == 0:
            history.append({"step": 0, **evaluate_policy(ctx, prompts)})
            log.log(history[-1])
            if not quiet:
                print(f"ttrl: before training: {_eval_line(history[-1])}", file=sys.stderr, flush=True)
        label_free = not getattr(reward, "needs_ground_truth", False)
        guard = Guard(cfg, rt, run_dir, quiet, label_free=label_free)
        ctx.votes.confident = cfg.safety.flip_confident
        if not quiet:
            print(f"ttrl: collapse guard {guard_summary(cfg.safety, label_free)}; on a collapse: {cfg.safety.action}"
                  + ("" if label_free else " (vote signals off: the reward reads the ground truth)"),
                  file=sys.stderr, flush=True)
        if label_free and cfg.safety.anchor_prompts and start == 0:
            k = cfg.safety.anchor_prompts
            # Its own generator: the run's rng (subsampling) draws as it would without an anchor.
            anchored = prompts if k >= len(prompts) else random.Random(cfg.seed).sample(prompts, k)
            ratio = anchor_votes(ctx, anchored)
            if not quiet:
                print(f"ttrl: guard anchored on the starting policy's votes for {len(anchored)} prompts "
                      f"(majority ratio {ratio:.3f})", file=sys.stderr, flush=True)
        if history:
            # The starting eval is the first "best": a run that only ever gets
            # worse than where it began must trip safety.max_eval_drop.
            guard.detector.update({"eval/pass@1": history[-1].get("eval/pass@1")})
        if cfg.safety.action == "rollback" and start == 0:
            # The starting weights are a rollback target too: a run that collapses
            # from its first steps can always return to where it began.
            path = save_checkpoint(rt, run_dir, 0, sampler.state_dict(), rng, max(cfg.trainer.keep_last, 1),
                                   eval_pass1=history[-1].get("eval/pass@1") if history else None)
            guard.saved(path, history[-1].get("eval/pass@1") if history else None)
        row: dict[str, float] = {}
        overlap = cfg.rollout.overlap
        ctx.algo["tis_cap"] = cfg.rollout.tis_cap if overlap else None
        t_last = t_loop = time.perf_counter()
        pending: Rollout | None = None
        for step_no in range(start + 1, steps + 1):
            if pending is None:
                pending = start_rollout(ctx, [prompts[i] for i in sampler.next_batch()])
            ro, pending = finish_rollout(ctx, pending), None
            # What a checkpoint of this step records: the batches trained so far.
            sampler_state = sampler.state_dict()
            if overlap and step_no < steps:
                # The engines start on the next batch now, with the weights of the
                # last sync, while this batch trains: one step off-policy.
                pending = start_rollout(ctx, [prompts[i] for i in sampler.next_batch()])
            ctx.algo["inject_nan"] = step_no in cfg.faults.nan_loss_at_steps
            row = {"step": step_no, **learn(ctx, ro, t_last)} | resume_info
            resume_info = {}
            every = cfg.eval.every_n_steps
            if (every and step_no % every == 0) or (cfg.eval.at_end and step_no == steps):
                row |= evaluate_policy(ctx, prompts)
            stop_reason = guard.check(row)  # may roll back, adding event/* keys to the row
            log.log(row)
            if cfg.logger.samples_every and (step_no % cfg.logger.samples_every == 0 or step_no == 1):
                log.log_samples(step_no, ctx.samples or [])
            log.log_votes(step_no, ctx.vote_rows or [])
            history.append(row)
            _progress(step_no, steps, row, t_loop, start + 1, not quiet)
            t_last = time.perf_counter()
            if stop_reason:
                raise RunStopped(stop_reason)
            save_every = cfg.trainer.save_every
            if (save_every and step_no % save_every == 0) or step_no == steps:
                path = save_checkpoint(rt, run_dir, step_no, sampler_state, rng, cfg.trainer.keep_last,
                                       eval_pass1=row.get("eval/pass@1"), protect=guard.best_ckpt)
                guard.saved(path, row.get("eval/pass@1"))
        wall = time.perf_counter() - t_start
        finish_report(run_dir, cfg, history, wall, quiet)
        return row.get(cfg.logger.objective)
    finally:
        if log is not None:
            log.close()
        if hasattr(reward, "close"):  # a reward that holds an actor (reward_model) lets it go
            reward.close()
        rt.shutdown()
