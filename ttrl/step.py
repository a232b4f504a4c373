"""One training step, top to bottom: the step every run takes.

`ttrl-train` (synchronous or overlapped), `ttrl-serve`'s learner and the
bench all call `step()`: sample n_votes completions per prompt on the vLLM
engines, vote over their answers, reward agreement with the vote, keep
n_train samples, score them under the policy/reference/critic, compute
advantages, update the policy on the DeepSpeed workers, push the new weights
into the engines, and measure. What a step reads from the config is read
once into a frozen `StepOptions`; what differs from step to step (the
prompts to sample next, fault injection) is an argument.

Must never: read a ground-truth answer above the metrics banner (rewards
come from `compute_rewards`, which hands a label-free reward scrubbed
prompts; tests/unit/test_house_rules.py checks the banner); start or stop
actors (the runtime is handed in); write files or logs (the run does).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ttrl.algos import compute_advantages, kl, kl_penalty, masked_mean
from ttrl.distributed.seam import StepRuntime
from ttrl.labeling.extract import CustomExtractorError, configured_extractor, extract_answer
from ttrl.labeling.vote import majority_votes
from ttrl.metrics.label_quality import label_quality
from ttrl.metrics.logger import sample_rows
from ttrl.metrics.safety import VoteTracker, vote_alignment, vote_row
from ttrl.rewards import Reward, RewardError, RewardOutput, compute_rewards
from ttrl.trainer.batch import Batch, pack_batch
from ttrl.trainer.options import UpdateOptions
from ttrl.types import Group, Prompt, Sample


@dataclass(frozen=True)
class StepOptions:
    """What a step reads from the config, read once (`from_config`)."""

    n_votes: int
    n_train: int
    subsample: str  # "first" n_train of the n_votes, or a "random" draw
    temperature: float
    top_p: float
    top_k: int
    max_new_tokens: int
    # Free the engines' KV cache while the trainer runs (engines sharing GPUs with it).
    sleep_between_steps: bool
    advantage: str
    gamma: float
    lam: float
    update: UpdateOptions
    # label.extractor: how every sample's answer is read, for the vote, the reward and the metrics alike.
    extractor: str = "boxed"
    # The sample table a step leaves for the loggers: prompts x completions.
    samples_prompts: int = 4
    samples_per_prompt: int = 4

    @classmethod
    def from_config(cls, cfg: Any, overlap: bool | None = None) -> StepOptions:
        """`overlap` (default: rollout.overlap): samples may come from the weights before the last sync."""
        r, a, lg = cfg.rollout, cfg.algorithm, cfg.logger
        return cls(n_votes=r.n_votes, n_train=r.n_train, subsample=r.subsample, temperature=r.temperature,
                   top_p=r.top_p, top_k=r.top_k, max_new_tokens=r.max_new_tokens,
                   sleep_between_steps=r.sleep_between_steps, advantage=a.advantage, gamma=a.gamma, lam=a.lam,
                   update=UpdateOptions.from_config(cfg, overlap), extractor=configured_extractor(cfg.label),
                   samples_prompts=lg.samples_prompts,
                   samples_per_prompt=lg.samples_per_prompt)


@dataclass
class Rollout:
    """Samples of a batch of prompts being generated: `submit` starts it, `collect` waits for it."""

    prompts: list[Prompt]
    prompt_ids: list[list[int]]  # [P][prompt tokens]
    handle: Any
    t_submit: float
    # Each prompt's second view was sampled too (after the P prompts, in the same call).
    with_views: bool = False


@dataclass
class StepContext:
    """What steps share: the actors, the reward, the options, and what one step leaves the next."""

    rt: StepRuntime
    reward: Reward
    tokenizer: Any
    opts: StepOptions
    # Draws the random subsample; a checkpoint keeps its state.
    rng: random.Random
    # Each prompt's vote across visits: the guard's label-free signals.
    votes: VoteTracker = field(default_factory=VoteTracker)
    # Overlap mode: the next step's rollout, submitted while this one trained.
    pending: Rollout | None = None
    # The last step's tables for the loggers: samples (prompts, completions,
    # vote, rewards) and votes (one row per prompt: id, label, ratio, classes).
    samples: list[dict] = field(default_factory=list)
    vote_rows: list[dict] = field(default_factory=list)


def step(ctx: StepContext, prompts: list[Prompt], *, next_prompts: list[Prompt] | None = None,
         inject_nan: bool = False, t0: float | None = None) -> dict[str, float]:
    """One step on `prompts`; returns its metrics.

    `next_prompts` (overlap mode): the engines start sampling them as soon as
    this step's samples are in, with the weights of the last sync, while this
    step trains; the next `step` on them collects that rollout. `inject_nan`
    makes the update's loss NaN (tests of the guard). `t0`: when the step
    began for `timing/step` (default now; the run passes the end of the last
    step, so that the steps' times add up to the run's).
    """
    o, rt = ctx.opts, ctx.rt
    t_step = time.perf_counter() if t0 is None else t0
    timings: dict[str, float] = {}

    # ── 1. rollout: n_votes samples per prompt on the vLLM engines ────────
    t = time.perf_counter()
    ro = ctx.pending or submit(ctx, prompts)
    ctx.pending = None
    assert [p.id for p in ro.prompts] == [p.id for p in prompts], "the rollout in flight is of other prompts"
    try:
        groups = collect(ctx, ro)                                                    # [P][n_votes]
    except CustomExtractorError as err:
        # A user's extractor failed on a sample: scoring that sample 0 would
        # train on a made-up verdict, so the step is skipped, its reason logged
        # (the guard counts it with the other skipped updates).
        return _skipped(err, t_step)
    t_sampled = time.perf_counter()
    timings["timing/generate"] = t_sampled - t  # the wait only, when it overlapped the last step
    if next_prompts:
        ctx.pending = submit(ctx, next_prompts)

    # ── 2+3. label without labels, reward agreement with the vote ─────────
    t = time.perf_counter()
    token_stats = None
    needs = getattr(ctx.reward, "needs", ())
    if "token_stats" in needs:
        # Intrinsic rewards read each token's whole distribution: one trainer pass.
        token_stats = sample_token_stats(rt, groups, ctx.tokenizer.pad_token_id, o.temperature,  # [P][n_votes]
                                         with_entropies="token_entropies" in needs)
        timings["timing/token_stats"] = time.perf_counter() - t
    try:
        out = compute_rewards(ctx.reward, groups, token_stats)                       # [P][n_votes]
    except RewardError as err:
        # A user's reward failed on these samples: skip the step, say why (the guard counts skips).
        return _skipped(err, t_step)
    votes = out.votes if out.votes is not None else majority_votes([g.answers() for g in groups], o.extractor)
    timings["timing/label"] = time.perf_counter() - t

    # ── keep n_train of the n_votes samples per prompt ────────────────────
    keep = [subsample(o.n_votes, o.n_train, o.subsample, ctx.rng) for _ in groups]   # [P][n_train]
    kept_rewards = [[out.rewards[p][i] for i in rows] for p, rows in enumerate(keep)]  # [P][n_train]
    batch = _pack(groups, keep, ctx.tokenizer.pad_token_id)

    # ── 4. old/ref log-probs, values, advantages ─────────────────────────
    t = time.perf_counter()
    fused_old, token_rewards, stats = _score(rt, batch, o)  # adds old_logp, ref_logp, values to the batch
    batch["advantages"], batch["returns"] = compute_advantages(
        o.advantage, torch.tensor(kept_rewards), batch["response_mask"], values=batch.get("values"),
        token_rewards=token_rewards, gamma=o.gamma, lam=o.lam)                       # [B, R] each
    timings["timing/prepare"] = time.perf_counter() - t

    # ── 5. update the policy (and critic) on the DeepSpeed workers ────────
    t = time.perf_counter()
    if o.sleep_between_steps:
        rt.sleep_engines()
    trained = rt.train_policy(batch, o.update, inject_nan=inject_nan)
    if rt.need_critic:
        trained |= {f"critic/{k}": v for k, v in rt.train_critic(batch, o.update).items()}
    timings["timing/train"] = time.perf_counter() - t

    # ── 6. push the new weights into every rollout engine ─────────────────
    t = time.perf_counter()
    sync = push_weights(rt, o.sleep_between_steps)
    timings["timing/sync"] = time.perf_counter() - t
    timings["timing/step"] = time.perf_counter() - t_step

    # ── metrics: the only place that may look at ground truth ────────────
    stats |= _metrics(groups, batch, out, kept_rewards, trained, sync, fused_old,
                      sampling_s=t_sampled - ro.t_submit)
    stats |= ctx.votes.update([g.prompt.id for g in groups], votes)
    stats |= vote_alignment(out.rewards, votes)
    stats |= label_quality(groups, votes, kept_rewards, keep, extractor=o.extractor)
    ctx.vote_rows = [vote_row(g.prompt.id, v) for g, v in zip(groups, votes)]
    ctx.samples = sample_rows(groups, votes, out.rewards, o.samples_prompts, o.samples_per_prompt)
    return stats | timings


# ── the stages' details ───────────────────────────────────────────────────
def submit(ctx: StepContext, prompts: list[Prompt]) -> Rollout:
    """Start sampling n_votes completions per prompt (and per second view, when the reward votes on one)."""
    o = ctx.opts
    ids = token_ids(ctx.tokenizer, prompts)
    views = "views" in getattr(ctx.reward, "needs", ())
    asked = ids
    if views:
        missing = [p.id for p in prompts if not p.view_text]
        if missing:
            raise ValueError(f"reward {type(ctx.reward).__name__} votes on a second view of each prompt, and "
                             f"prompt {missing[0]!r} has none (reward.view makes them when the prompts load)")
        asked = ids + [ctx.tokenizer(p.view_text, add_special_tokens=False)["input_ids"] for p in prompts]
    handle = ctx.rt.submit_generate(asked, n=o.n_votes, temperature=o.temperature, top_p=o.top_p,
                                    top_k=o.top_k, max_tokens=o.max_new_tokens)
    return Rollout(prompts, ids, handle, time.perf_counter(), with_views=views)


def collect(ctx: StepContext, ro: Rollout) -> list[Group]:
    """Wait for a rollout's samples and extract each one's answer."""
    outs = ctx.rt.collect(ro.handle)                                  # [P][n_votes], then [P][n_votes] views
    extractor = ctx.opts.extractor

    def samples(p: Prompt, out: list[dict]) -> list[Sample]:
        return [Sample(text=s["text"], token_ids=s["token_ids"], logprobs=s["logprobs"],
                       answer=extract_answer(s["text"], extractor, prompt=p.id), finish_reason=s["finish_reason"])
                for s in out]

    P = len(ro.prompts)
    return [Group(p, ids, samples(p, outs[i]), view_samples=samples(p, outs[P + i]) if ro.with_views else None)
            for i, (p, ids) in enumerate(zip(ro.prompts, ro.prompt_ids))]


def rollout(ctx: StepContext, prompts: list[Prompt]) -> list[Group]:
    """Stage 1 alone: `collect(submit(...))`, for the bench."""
    return collect(ctx, submit(ctx, prompts))


def token_ids(tokenizer: Any, prompts: list[Prompt]) -> list[list[int]]:
    return [tokenizer(p.text, add_special_tokens=False)["input_ids"] for p in prompts]


def subsample(n_votes: int, n_train: int, how: str, rng: random.Random) -> list[int]:
    """Which of a prompt's n_votes samples train: the first n_train, or a random draw."""
    if how == "first" or n_train == n_votes:
        return list(range(n_train))
    return sorted(rng.sample(range(n_votes), n_train))


def _pack(groups: list[Group], keep: list[list[int]], pad_id: int) -> Batch:
    """The kept samples as one padded batch of B = P * n_train rows, with the engine's log-probs."""
    kept = [g.samples[i] for g, rows in zip(groups, keep) for i in rows]
    return pack_batch([g.prompt_token_ids for g, rows in zip(groups, keep) for _ in rows],
                      [s.token_ids for s in kept], pad_id=pad_id, behavior_logps=[s.logprobs for s in kept])


def push_weights(rt: StepRuntime, asleep: bool) -> dict[str, float]:
    """Sync the new weights into the engines, waking sleeping engines in the order memory allows.

    Weights first, then the sync writes into them, then the KV cache, which
    is the large part: waking both before the sync would need the cache's
    memory while the trainer's buffers still hold theirs.
    """
    if asleep:
        rt.wake_engines(["weights"])
    sync = rt.sync_weights()
    if asleep:
        rt.wake_engines(["kv_cache"])
    return sync


def _skipped(err: Exception, t_step: float) -> dict[str, Any]:
    """The row of a step skipped before its update: the reason, for the log and the guard."""
    return {"train/skipped": 1.0, "event/skip_reason": str(err), "timing/step": time.perf_counter() - t_step}


def sample_token_stats(rt: StepRuntime, groups: list[Group], pad_id: int,
                 temperature: float, with_entropies: bool = False) -> list[list[dict[str, Any]]]:
    """Each sample's mean token entropy and self-certainty under the policy, and its token count.

    [P][n] dicts {"entropy", "self_certainty", "tokens"}; the means are NaN for a sample with no tokens.
    `with_entropies` (a reward that `needs` "token_entropies", e.g. rent) adds "entropies": the entropy
    of each of the sample's response tokens, in order (a list as long as its response).
    """
    batch = _pack(groups, [list(range(len(g.samples))) for g in groups], pad_id)
    per_token = rt.token_stats(batch, temperature)                                  # name -> [B, R]
    mask = batch["response_mask"].float()
    n = mask.sum(1)
    means = {k: torch.where(n > 0, (v * mask).sum(1) / n.clamp(min=1), torch.nan).tolist()
             for k, v in per_token.items()}
    means["tokens"] = n.tolist()
    # Responses are left-aligned in the batch: a sample's tokens are its row's first n columns.
    entropies = per_token_rows(per_token["entropy"], n) if with_entropies else None
    out, row = [], 0
    for g in groups:
        out.append([{k: means[k][row + i] for k in means} | ({"entropies": entropies[row + i]} if entropies is not None else {})
                    for i in range(len(g.samples))])
        row += len(g.samples)
    return out


def per_token_rows(values: Tensor, lengths: Tensor) -> list[list[float]]:
    """Each row's first `lengths[row]` values ([B, R] -> B lists): a left-aligned response's tokens."""
    return [row[:int(k)] for row, k in zip(values.tolist(), lengths.tolist())]


def _score(rt: StepRuntime, batch: Batch, o: StepOptions) -> tuple[bool, Tensor | None, dict[str, float]]:
    """Add old_logp, ref_logp and values to `batch` as the algorithm needs.

    Returns (fused_old, the KL penalty per token [B, R] when it is part of
    the reward, {train/kl}).

    One optimizer step on the whole batch (one epoch, one mini-batch) sees
    the very weights that would compute old_logp, so the trainer takes them
    from its own forward pass (detached) and a whole forward pass is saved
    (fused_old). With several updates per batch, or a KL term that needs
    them now, they are computed up front.
    """
    u, mask = o.update, batch["response_mask"]                                      # [B, R]
    stats: dict[str, float] = {}
    token_rewards = None
    fused_old = u.ppo_epochs == 1 and rt.mini >= mask.shape[0] and not rt.need_ref
    if not fused_old:
        batch["old_logp"] = rt.logprobs(batch, o.temperature)                         # [B, R]
    if rt.need_ref:
        batch["ref_logp"] = rt.logprobs(batch, o.temperature, which="ref")            # [B, R]
        stats["train/kl"] = float(masked_mean(kl(u.kl_estimator, batch["old_logp"], batch["ref_logp"]), mask))
        if u.kl_in_reward:
            token_rewards = kl_penalty(u.kl_estimator, batch["old_logp"], batch["ref_logp"], mask, u.kl_coef)
    if rt.need_critic:
        batch["values"] = rt.values(batch)                                             # [B, R]
    return fused_old, token_rewards, stats


def _metrics(groups: list[Group], batch: Batch, out: RewardOutput, kept_rewards: list[list[float]],
             trained: dict[str, float], sync: dict[str, float], fused_old: bool,
             sampling_s: float) -> dict[str, float]:
    """Rewards, rollout and update metrics (no ground truth here: `label_quality` grades)."""
    mask = batch["response_mask"]                                                    # [B, R]
    n_tokens = sum(len(s.token_ids) for g in groups for s in g.samples)
    trained = dict(trained)
    stats = {
        "reward/mean": float(torch.tensor(out.rewards).float().mean()),
        # Intrinsic rewards live on their own scales (nats, log-probs): their spread says more than 0/1's.
        "reward/std": float(torch.tensor(out.rewards).float().std(correction=0)),
        "reward/train_mean": float(torch.tensor(kept_rewards).mean()),
        # Over the time the engines had: from submit to the samples being in.
        "rollout/tokens_per_s": n_tokens / max(sampling_s, 1e-9),
        "rollout/response_length": n_tokens / max(sum(len(g.samples) for g in groups), 1),
        # Engine vs trainer log-probs of the same tokens, before the update:
        # near zero when the last weight sync worked.
        "rollout/logprob_diff": (trained.pop("logprob_diff_sum") / max(trained.pop("logprob_diff_n"), 1.0)
                                 if fused_old else
                                 float(masked_mean((batch["behavior_logp"] - batch["old_logp"]).abs(), mask))),
        # Nats per response token, under the policy before this update.
        "train/entropy": trained.pop("entropy_sum", float("nan")) / max(trained.pop("entropy_n", 1.0), 1.0),
        "train/clip_frac": trained.pop("clip_frac", float("nan")),
        # Trained rows whose advantage is zero on every token (their group agreed): no policy gradient
        # comes from them, and with trainer.skip_zero_advantage they skip the backward.
        "train/zero_advantage_share": trained.pop("zero_adv_rows", float("nan")) / max(trained.pop("rows", 1.0), 1.0),
        # The clipped surrogate alone; the KL term is train/kl_loss (times algorithm.kl_coef in the loss).
        "train/pg_loss": trained.pop("pg_loss", float("nan")),
        "train/grad_norm": trained.pop("grad_norm", float("nan")),
        "train/lr": trained.pop("lr", float("nan")),
        "sync/bytes": sync.get("bytes", 0.0),
        # The sync round alone, as its sender timed it (timing/sync also holds waking sleeping engines).
        "sync/seconds": sync.get("total_s", 0.0),
    }
    return stats | {f"train/{k}" if "/" not in k else k: v for k, v in trained.items()}


__all__ = ["Rollout", "StepContext", "StepOptions", "collect", "push_weights", "rollout", "sample_token_stats", "step", "submit",
           "subsample", "token_ids"]
