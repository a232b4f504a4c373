"""The background learner: TTRL rounds on served queries, behind the safety gate.

Three parties hold weights, and only promotion connects them:

    serving engines   the promoted version, nothing else; they only answer users
    trainer (ZeRO)    the candidate: the served version plus this round's updates
    staging engine    a copy of the trainer's weights: the learner's rollouts and
                      the gate's evaluation run here, never on a serving engine

A round (every `serve.learn.every_queries` queries, or `every_seconds`):

    1. take the unused, not held-out queries from the store
    2. regression set: the user's labelled set, or frozen pseudo-labels: queries
       whose n_votes samples (current weights) agree >= gate.min_agreement are
       frozen, held out of training for good
    3. score the current weights on it (staging holds them at this point)
    4. `learn.steps` TTRL steps with `ttrl.step.step`, the step training runs
       (majority-vote reward, corrected by user feedback), on `StagingRuntime`:
       rollouts on staging, synced every step
    5. score the candidate on the same set, same sampling seed
    6. `gate.decide`: promote (save v<N+1>, hot-swap the serving engines from
       disk) or reject (trainer and staging roll back to the served version
       from disk; an alert is logged, stored and counted)

Serving never waits for the learner; the learner never touches a serving
engine except through `EnginePool.swap`. One lock (`trainer_lock`) orders
rounds, admin rollbacks and restarts on the trainer.
"""

from __future__ import annotations

import random
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

import ray

from ttrl.distributed.group import WorkerDiedError
from ttrl.labeling.extract import extract_answer
from ttrl.labeling.vote import majority_votes
from ttrl.metrics import column_mean
from ttrl.serve.feedback import FeedbackVoteReward, Rating, confirmed_label
from ttrl.serve.gate import EvalResult, GateDecision, decide, freezable, score_samples
from ttrl.serve.store import Store
from ttrl.serve.versions import Versions
from ttrl.step import StepContext, StepOptions, step
from ttrl.trainer.batch import Batch
from ttrl.trainer.options import UpdateOptions
from ttrl.types import Prompt

STAGING_TAG = 1_000_000  # weights_version tags of the staging engine (internal, never served)


class _Aborted(RuntimeError):
    """A round cut short by shutdown (the trainer's state is about to go anyway)."""


class StagingRuntime:
    """The step's seam (`ttrl.distributed.seam.StepRuntime`) for the learner.

    Rollouts and weight syncs go to the staging engine only; the trainer
    (log-probs, updates, saved state) is the server's `Runtime`, shared.
    """

    need_ref: bool
    need_critic: bool
    mini: int

    def __init__(self, rt: Any, staging: Any):
        self.rt, self.staging = rt, staging
        self.need_ref, self.need_critic, self.mini = rt.need_ref, rt.need_critic, rt.mini
        self.syncs = 0

    @property
    def weights_version(self) -> int:
        """Syncs into the staging engine (tagged STAGING_TAG + this, never a served version)."""
        return self.syncs

    # rollout: the staging engine
    def submit_generate(self, prompt_ids: list[list[int]], n: int, temperature: float, top_p: float, top_k: int,
                        max_tokens: int, seed: int | None = None) -> Any:
        return self.staging.generate.remote(prompt_ids, n, temperature, top_p, top_k, max_tokens, seed)

    def collect(self, handle: Any) -> list[list[dict]]:
        return ray.get(handle)

    def generate(self, prompt_ids: list[list[int]], n: int, temperature: float, top_p: float, top_k: int,
                 max_tokens: int, seed: int | None = None) -> list[list[dict]]:
        return self.collect(self.submit_generate(prompt_ids, n, temperature, top_p, top_k, max_tokens, seed))

    def sync_weights(self) -> dict[str, float]:
        """Trainer -> staging engine (never a serving engine)."""
        self.syncs += 1
        return self.rt.policy.call("push_weights", [self.staging], STAGING_TAG + self.syncs,
                                   self.rt.engine_dtype)[0]

    def sleep_engines(self) -> None:
        ray.get(self.staging.sleep.remote())

    def wake_engines(self, tags: list[str] | None = None) -> None:
        ray.get(self.staging.wake_up.remote(tags))

    # trainer: the server's, unchanged
    def logprobs(self, batch: Batch, temperature: float, which: str = "policy") -> Any:
        return self.rt.logprobs(batch, temperature, which)

    def token_stats(self, batch: Batch, temperature: float) -> dict[str, Any]:
        return self.rt.token_stats(batch, temperature)

    def values(self, batch: Batch) -> Any:
        return self.rt.values(batch)

    def train_policy(self, batch: Batch, opts: UpdateOptions, inject_nan: bool = False) -> dict[str, float]:
        return self.rt.train_policy(batch, opts, inject_nan)

    def train_critic(self, batch: Batch, opts: UpdateOptions) -> dict[str, float]:
        return self.rt.train_critic(batch, opts)

    def save(self, path: str, export_hf: bool = True) -> None:
        self.rt.save(path, export_hf)

    def load(self, path: str) -> None:
        self.rt.load(path)

    def fingerprint(self) -> float:
        return self.rt.fingerprint()

    def scale_lr(self, factor: float) -> float:
        return self.rt.scale_lr(factor)

    def shutdown(self) -> None:
        """Nothing: the staging engine and the trainer belong to the server's Runtime, which it shuts down."""


class Learner:
    def __init__(self, cfg: Any, rt: Any, staging: Any, store: Store, versions: Versions, tokenizer: Any,
                 base_reward: Any, swap: Callable[[int], dict], served: Callable[[], int],
                 trainer_lock: threading.Lock, labelled: list[Prompt] | None = None,
                 on_round: Callable[[dict], None] | None = None, alert: Callable[[str, dict], None] | None = None):
        self.cfg, self.rt, self.store, self.versions, self.tokenizer = cfg, rt, store, versions, tokenizer
        self.staging = StagingRuntime(rt, staging)
        self.base_reward = base_reward
        self.swap, self.served = swap, served
        self.trainer_lock = trainer_lock
        self.labelled = labelled
        self.on_round = on_round or (lambda summary: None)
        self.alert = alert or (lambda msg, payload: None)
        # Staging is synced every step: its rollouts are on-policy, whatever rollout.overlap says.
        self.opts = StepOptions.from_config(cfg, overlap=False)
        self.rng = random.Random(cfg.seed)
        self.state = "idle"
        self.last_error: str | None = None
        self.disabled: str | None = None
        self.rounds_done = 0
        self._new = 0
        self._last_round = time.monotonic()
        self._cond = threading.Condition()
        self._manual = False
        self._stop = False
        self._thread: threading.Thread | None = None

    # ── triggering ────────────────────────────────────────────────────────
    def notify(self, n_new: int) -> None:
        with self._cond:
            self._new += n_new
            self._cond.notify()

    def trigger(self) -> None:
        with self._cond:
            self._manual = True
            self._cond.notify()

    def start(self) -> None:
        self._new = self.store.count_unused()
        self._thread = threading.Thread(target=self._loop, name="ttrl-learner", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 60.0) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        if self._thread:
            self._thread.join(timeout)

    def _due(self) -> str | None:
        ln = self.cfg.serve.learn
        if self._manual:
            return "manual"
        if ln.every_queries and self._new >= ln.every_queries:
            return f"{self._new} new queries"
        if ln.every_seconds and self._new >= ln.min_queries and \
                time.monotonic() - self._last_round >= ln.every_seconds:
            return f"{time.monotonic() - self._last_round:.0f}s since the last round"
        return None

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stop and self._due() is None:
                    self._cond.wait(timeout=1.0)
                if self._stop:
                    return
                why = self._due()
                self._manual = False
                self._new = 0
            if self.disabled:
                continue
            try:
                self.run_round(why or "")
            except Exception as err:  # noqa: BLE001 - the server must keep serving
                self.last_error = f"{type(err).__name__}: {err}"
                print(f"ttrl-serve: learning round failed: {self.last_error}\n{traceback.format_exc()}",
                      file=sys.stderr, flush=True)
                if isinstance(err, WorkerDiedError):
                    # ZeRO shards are gone: no more learning; serving goes on with what is promoted.
                    self.disabled = self.last_error
                    self.state = "disabled"
                    self.alert(f"the learner is off: {self.last_error}", {"error": self.last_error})
            finally:
                self._last_round = time.monotonic()

    # ── a round ───────────────────────────────────────────────────────────
    def _gate_sampling(self) -> tuple[float, int]:
        s, g, r = self.cfg.serve, self.cfg.serve.gate, self.cfg.rollout
        temperature = g.temperature if g.temperature is not None else (
            s.temperature if s.temperature is not None else r.temperature)
        if temperature == 0:
            temperature = r.temperature  # the gate samples; greedy would make n_samples copies
        max_tokens = g.max_new_tokens or s.max_tokens or r.max_new_tokens
        return float(temperature), int(max_tokens)

    def _ids(self, texts: list[str]) -> list[list[int]]:
        return [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]

    def evaluate(self, prompts: list[str], labels: list[str]) -> EvalResult:
        """Score the staging engine's weights on a regression set (fixed seed)."""
        if not prompts:
            return EvalResult(0.0, 0.0, 0.0, 0.0, 0.0, 0, 0)
        g = self.cfg.serve.gate
        temperature, max_tokens = self._gate_sampling()
        outs = self.staging.generate(self._ids(prompts), g.n_samples, temperature, 1.0, -1, max_tokens, g.seed)
        return score_samples(labels, outs, self.opts.extractor)

    def _prompt_ratings(self, texts: list[str]) -> dict[str, list[Rating]]:
        """Prompt text -> every user rating of an answer the server gave to it."""
        if not self.cfg.serve.learn.feedback:
            return {}
        fb = self.store.feedback_by_prompt(texts)
        return {t: [Rating(extract_answer(f["rated"], self.opts.extractor) if f["rated"] is not None else None, float(f["score"]))
                    for f in rows] for t, rows in fb.items()}

    def regression_set(self, rows: list[dict]) -> tuple[list[str], list[str], set[tuple[str, int]]]:
        """(prompts, labels, keys frozen now): the labelled set, or the frozen held-out set (grown from `rows`).

        A query is frozen when its n_votes samples (current weights) agree >=
        gate.min_agreement, or when a user gave one of its answers a thumbs-up.
        At evaluation, ratings override the frozen label (`confirmed_label`).
        """
        if self.labelled is not None:
            return [p.text for p in self.labelled], [str(p.answer) for p in self.labelled], set()
        g, r = self.cfg.serve.gate, self.cfg.rollout
        items = self.store.regression_items()
        need = g.regression_size - len(items)
        frozen: set[tuple[str, int]] = set()
        if need > 0 and rows:
            # Distinct prompts not frozen yet; never more than half of a round's queries.
            seen = {it["prompt"] for it in items}
            distinct = []
            for q in rows:
                if q["prompt"] not in seen:
                    seen.add(q["prompt"])
                    distinct.append(q)
            probe = distinct[:min(need, max(1, len(rows) // 2))]
            outs = self.staging.generate(self._ids([q["prompt"] for q in probe]), r.n_votes, r.temperature,
                                         r.top_p, r.top_k, r.max_new_tokens, g.seed)
            votes = majority_votes([[extract_answer(o["text"], self.opts.extractor, prompt=q["id"]) for o in row]
                                    for q, row in zip(probe, outs)], extractor=self.opts.extractor)
            ratings = self._prompt_ratings([q["prompt"] for q in probe])
            confident = set(freezable([v.ratio for v in votes], [v.label for v in votes], g.min_agreement))
            new = []
            for i, (q, v) in enumerate(zip(probe, votes)):
                ups = [x.answer for x in ratings.get(q["prompt"], []) if x.score >= 0.5 and x.answer is not None]
                if ups:
                    new.append((q["id"], q["idx"], q["prompt"], ups[-1], v.ratio, "feedback"))
                elif i in confident:
                    new.append((q["id"], q["idx"], q["prompt"], v.label, v.ratio, "vote"))
            if new:
                self.store.add_regression(new)
                held = {it[2] for it in new}
                frozen = {(q["id"], q["idx"]) for q in rows if q["prompt"] in held}
                items = self.store.regression_items()
        ratings = self._prompt_ratings([it["prompt"] for it in items])
        prompts, labels = [], []
        for it in items:
            label = confirmed_label(it["label"], ratings.get(it["prompt"], []), self.opts.extractor)
            if label is not None:
                prompts.append(it["prompt"])
                labels.append(label)
        return prompts, labels, frozen

    def _ratings(self, prompts: list[Prompt]) -> dict[str, list[Rating]]:
        """Prompt id -> every rating of any answer the server gave to the same prompt text."""
        by_text = self._prompt_ratings([p.text for p in prompts])
        return {p.id: by_text[p.text] for p in prompts if p.text in by_text}

    def run_round(self, why: str = "manual") -> dict[str, Any]:
        from omegaconf import OmegaConf

        from ttrl.metrics.safety import CollapseDetector

        cfg, ln = self.cfg, self.cfg.serve.learn
        with self.trainer_lock:
            base = self.served()
            rows = self.store.unused_queries(ln.max_buffer)
            if not rows:
                return {"outcome": "skipped", "reasons": ["no new queries"]}
            self.state = "learning"
            round_no = self.store.start_round(base, len(rows))
            t_round = time.time()
            print(f"ttrl-serve: learning round {round_no} ({why}): {len(rows)} queries, on top of v{base}",
                  file=sys.stderr, flush=True)
            try:
                reg_prompts, reg_labels, frozen = self.regression_set(rows)
                train = [q for q in rows if (q["id"], q["idx"]) not in frozen]
                if not train:
                    self.store.finish_round(round_no, "skipped", reasons=["every query went into the regression set"])
                    return {"round": round_no, "outcome": "skipped"}
                current = self.evaluate(reg_prompts, reg_labels)

                # ── TTRL steps on the buffered queries (rollouts on staging) ──
                P = cfg.data.prompts_per_step
                order = list({q["prompt"]: q for q in train}.values())  # each prompt once per pass
                self.rng.shuffle(order)
                # Feedback replaces the vote's rewards on rated prompts by design, so
                # a reward that sides against the vote is the point here, not a collapse.
                safety = OmegaConf.merge(cfg.safety, {"min_vote_alignment": None})
                detector = CollapseDetector(safety)
                events: list[str] = []
                step_rows: list[dict[str, float]] = []
                corrected = 0
                for s in range(ln.steps):
                    if self._stop:
                        raise _Aborted("the server is stopping")
                    self.state = f"learning: step {s + 1}/{ln.steps}"
                    chosen = [order[(s * P + i) % len(order)] for i in range(P)]
                    prompts = [Prompt(id=f"{q['id']}:{q['idx']}", problem=q["prompt"], answer=None, text=q["prompt"])
                               for q in chosen]
                    reward = FeedbackVoteReward(self.base_reward, self._ratings(prompts), self.opts.extractor)
                    ctx = StepContext(self.staging, reward, self.tokenizer, self.opts, self.rng)
                    row = step(ctx, prompts)
                    corrected += reward.corrected
                    step_rows.append(row)
                    if row.get("train/skipped"):
                        events.append(f"step {s + 1}: non-finite loss or gradient norm (update skipped)")
                    events += [f"step {s + 1}: {e.message}" for e in detector.update(row)]

                # Phases are visible in /health (a client can time its load around the swap).
                self.state = "gating"
                candidate = self.evaluate(reg_prompts, reg_labels)
                decision = decide(current, candidate, cfg.serve.gate, events)
                metrics = {"current": current.as_dict(), "candidate": candidate.as_dict(), "steps": len(step_rows),
                           "prompts": len(order),
                           "feedback_corrected_prompts": corrected, "frozen_now": len(frozen),
                           "regression_items": current.n_items,
                           "reward_mean": column_mean(step_rows, "reward/mean", None),
                           "majority_ratio": column_mean(step_rows, "label/majority_ratio", None),
                           "entropy": column_mean(step_rows, "train/entropy", None),
                           "step_s": column_mean(step_rows, "timing/step", None)}
                if decision.promote:
                    self.state = "promoting"
                    version, swap_stats = self._promote(base, round_no, decision, metrics)
                    metrics["swap"] = swap_stats
                    outcome = "promoted"
                else:
                    version = None
                    self._reject(base, round_no, decision, metrics)
                    outcome = "rejected"
                self.store.mark_used([(q["id"], q["idx"]) for q in train], round_no)
                self.store.finish_round(round_no, outcome, version=version, current_score=current.score,
                                        candidate_score=candidate.score, reasons=decision.reasons, metrics=metrics)
                summary = {"round": round_no, "outcome": outcome, "version": version, "base": base,
                           "current_score": current.score, "candidate_score": candidate.score,
                           "reasons": decision.reasons, "wall_s": time.time() - t_round, "metrics": metrics}
                self.rounds_done += 1
                print(f"ttrl-serve: round {round_no}: {outcome}"
                      + (f" v{version}" if version is not None else "")
                      + f" (regression score {current.score:.3f} -> {candidate.score:.3f} on {current.n_items}"
                      f" items; {time.time() - t_round:.1f}s)", file=sys.stderr, flush=True)
                self.on_round(summary)
                return summary
            except _Aborted as err:
                self.store.finish_round(round_no, "aborted", reasons=[str(err)])
                return {"round": round_no, "outcome": "aborted"}
            except BaseException as err:
                self.store.finish_round(round_no, "failed", reasons=[f"{type(err).__name__}: {err}"])
                self.on_round({"round": round_no, "outcome": "failed"})
                self._restore(base)
                raise
            finally:
                self.state = "idle" if not self.disabled else "disabled"

    def _promote(self, base: int, round_no: int, decision: GateDecision, metrics: dict) -> tuple[int, dict]:
        known = [v["version"] for v in self.store.versions()]
        version = max(known + [base]) + 1
        path = self.versions.save(self.rt, version, parent=base, round=round_no, delta=decision.delta)
        # Recorded as served before the swap: a crash from here on restarts on this version.
        self.store.add_version(version, str(path), "promoted", parent=base, round_no=round_no,
                               metrics=metrics, serve=True)
        try:
            stats = self.swap(version)
        except BaseException:
            self.store.set_state("serving_version", base)
            self.store.set_version_status(version, "failed_swap")
            raise
        self.store.add_event("promoted", version=version, round=round_no, parent=base, swap=stats)
        self.prune()
        return version, stats

    def _reject(self, base: int, round_no: int, decision: GateDecision, metrics: dict) -> None:
        self._restore(base)
        msg = f"gate rejected the candidate of round {round_no}; still serving v{base}: " + "; ".join(decision.reasons)
        payload = {"round": round_no, "served": base, "reasons": decision.reasons,
                   "current": metrics["current"], "candidate": metrics["candidate"]}
        self.store.add_event("gate_rejected", **payload)
        self.alert(msg, payload)

    def _restore(self, version: int) -> None:
        """Trainer (weights and optimizer) and staging engine back to a version on disk."""
        self.rt.load(str(self.versions.path(version)))
        self.staging.sync_weights()

    def prune(self) -> list[int]:
        keep_n = self.cfg.serve.keep_versions
        rows = self.store.versions()
        promoted = [v["version"] for v in rows if v["status"] == "promoted"]
        keep = {0, self.served(), *promoted[-keep_n:]}
        removed = []
        for v in promoted:
            if v not in keep:
                self.versions.remove(v)
                self.store.set_version_status(v, "pruned")
                removed.append(v)
        return removed


__all__ = ["Learner", "StagingRuntime"]
