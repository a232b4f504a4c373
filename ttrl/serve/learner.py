"""The background learner: TTRL rounds on served queries, behind the safety gate.

Three parties hold weights, and only promotion connects them:

    serving engines   the promoted version, nothing else; they only answer users
    trainer (ZeRO)    the candidate: the served version plus this round's updates
    staging engine    a copy of the trainer's weights: the learner's rollouts and
                      the gate's evaluation run here, never on a serving engine

A round (every `serve.learn.every_queries` queries, or `every_seconds`):

    1. take the unused, trainable queries from the store; quarantine those the
       trainer cannot take (too long), and keep each identity under
       `learn.max_client_share` of the round's prompts
    2. regression set: the user's labelled set, or frozen pseudo-labels: a
       prompt asked by >= gate.min_askers identities whose n_votes samples
       (current weights) agree >= gate.min_agreement, or whose thumbs-up was
       earned (`ttrl.serve.trust`); a full set retires its oldest
       `gate.rotate_share` each round
    3. score the current weights on it (staging holds them at this point)
    4. `learn.steps` TTRL steps with `ttrl.step.step`, the step training runs
       (majority-vote reward, corrected by *earned* user feedback only), on
       `StagingRuntime`: rollouts on staging, synced every step; a step that
       fails counts against its queries (quarantined after
       `learn.max_row_failures`)
    5. score the candidate on the same set, same sampling seed
    6. `gate.decide`: promote (save v<N+1>, fsynced; record it served, its
       queries used and its round promoted in one transaction; hot-swap the
       serving engines from disk) or reject (trainer and staging roll back to
       the served version from disk; an alert is logged, stored and counted)

A crash anywhere leaves the store consistent: before the promotion's
transaction the round is `interrupted` at the next start and its queries
are unused; after it the next start serves the new version. A swap that
fails on any engine puts every engine back on the served version and
removes the failed version's folder.

Serving never waits for the learner; the learner never touches a serving
engine except through `EnginePool.swap`. One lock (`trainer_lock`) orders
rounds, admin rollbacks and restarts on the trainer.

With `serve.tenants` every round is one tenant's (issue 32 phase 2): the
tenants whose queries make a round due take turns (`RoundQueue`); the round
first loads the tenant's served version into the trainer and staging (its
last promoted version, else the shared version its adapter was copied
from), reads only that tenant's queries, ratings and regression set, and a
promotion writes `tenants/<name>/versions/v<N>/` and points that tenant
alone at it (`Tenants.serve_version`). The serving engines' base and every
other adapter are untouched. A tenant's own identities are its only
clients, so `learn.max_client_share` and `gate.min_askers` do not apply
within it (its keys share one model by the operator's choice). The shared
version does not learn while tenants are on.
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
from ttrl.serve.auth import ANONYMOUS
from ttrl.serve.engines import SwapFailed
from ttrl.serve.faults import crash_point
from ttrl.serve.feedback import FeedbackVoteReward, confirmed_label
from ttrl.serve.gate import EvalResult, GateDecision, decide, freezable, score_samples
from ttrl.serve.store import Store
from ttrl.serve.trust import Rating, capped, earned, prompt_key, trusted_names
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
                 on_round: Callable[[dict], None] | None = None, alert: Callable[[str, dict], None] | None = None,
                 tenants: Any = None):
        from ttrl.serve.tenants import RoundQueue

        self.cfg, self.rt, self.store, self.versions, self.tokenizer = cfg, rt, store, versions, tokenizer
        # serve.tenants: ttrl.serve.tenants.Tenants; every round is then one tenant's.
        self.tenants = tenants
        self.queue = RoundQueue()
        self._seen: dict[str, int] = {}  # tenant -> its unused queries right after its last round
        self._manual_tenant: str | None = None
        self._next_tenant: str | None = None
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

    def trigger(self, tenant: str | None = None) -> None:
        """A round now (with tenants: `tenant`'s, or the next ready tenant's)."""
        with self._cond:
            self._manual = True
            self._manual_tenant = tenant
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

    def _due(self, unused: Any = None) -> str | None:
        """Why a round is due now, or None. With tenants `unused` is `store.unused_by_tenant()`, read by the
        caller outside `_cond`."""
        ln = self.cfg.serve.learn
        if self.tenants is not None:
            return self._tenant_due(unused)
        if self._manual:
            return "manual"
        if ln.every_queries and self._new >= ln.every_queries:
            return f"{self._new} new queries"
        if ln.every_seconds and self._new >= ln.min_queries and \
                time.monotonic() - self._last_round >= ln.every_seconds:
            return f"{time.monotonic() - self._last_round:.0f}s since the last round"
        return None

    def _tenant_due(self, unused: Any) -> str | None:
        """Whether a tenant's round is due, and whose (`_next_tenant`): the asked tenant on a manual trigger
        that names one, else the next ready tenant in round-robin order."""
        from ttrl.serve.tenants import ready_tenants

        ln = self.cfg.serve.learn
        if self._manual and self._manual_tenant is not None:
            self._next_tenant = self._manual_tenant
            return f"manual, tenant {self._manual_tenant!r}"
        timely = bool(ln.every_seconds) and time.monotonic() - self._last_round >= ln.every_seconds
        ready = ready_tenants(unused, self._seen, int(ln.every_queries),
                              int(ln.min_queries), manual=self._manual, timely=timely)
        self._next_tenant = self.queue.pick(ready)
        if self._next_tenant is None:
            if self._manual:
                self._manual = False
                print(f"ttrl-serve: no learning round: no tenant has serve.learn.min_queries={ln.min_queries} "
                      "unused queries", file=sys.stderr, flush=True)
            return None
        return "manual" if self._manual else f"tenant {self._next_tenant!r}: its queries made a round due"

    def _loop(self) -> None:
        while True:
            with self._cond:
                if self.tenants is None:
                    while not self._stop and self._due() is None:
                        self._cond.wait(timeout=1.0)
                else:
                    # The tenants' tally is a store query: read once a second (or on a trigger), and outside
                    # `_cond`, which every answered request's notify() takes on the event loop.
                    self._cond.wait_for(lambda: self._stop or self._manual, timeout=1.0)
            unused = self.store.unused_by_tenant() if self.tenants is not None and not self._stop else None
            with self._cond:
                if self._stop:
                    return
                why = self._due(unused)  # the state only grew since the wait: still due without tenants
                if why is None:
                    continue
                tenant = self._next_tenant if self.tenants is not None else None
                self._manual, self._manual_tenant = False, None
                self._new = 0
            if self.disabled:
                continue
            try:
                self.run_round(why or "", tenant=tenant)
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

    # ── who is believed ───────────────────────────────────────────────────
    @property
    def quorum(self) -> int:
        return int(self.cfg.serve.learn.feedback_quorum)

    def _trusted(self) -> set[str]:
        s = self.cfg.serve
        return trusted_names(s.trusted_raters, s.single_user, ANONYMOUS)

    def _prompt_ratings(self, keys: list[str], tenant: str | None = None) -> dict[str, list[Rating]]:
        """Prompt key -> every identity's verdicts on answers the server (`tenant`'s adapter) gave to it,
        oldest first."""
        if not self.cfg.serve.learn.feedback:
            return {}
        trusted = self._trusted()
        fb = self.store.feedback_by_prompt(keys, tenant)
        return {k: [Rating(extract_answer(f["rated"], self.opts.extractor) if f["rated"] is not None else None,
                           float(f["score"]), f["client"], f["client"] in trusted) for f in rows]
                for k, rows in fb.items()}

    def regression_set(self, rows: list[dict], tenant: str | None = None
                       ) -> tuple[list[str], list[str], set[tuple[str, int]], dict]:
        """(prompts, labels, keys frozen now, what changed): the labelled set, or the frozen held-out set.

        A full frozen set first retires its oldest `gate.rotate_share`. Then it
        grows from `rows`: a prompt joins when it was asked by at least
        `gate.min_askers` identities and its n_votes samples (current weights)
        agree >= gate.min_agreement, or when a thumbs-up on one of its answers
        was earned (quorum or trusted rater). At evaluation, earned ratings
        override the frozen label (`confirmed_label`). With tenants, each
        tenant has a set of its own, grown from its own queries and ratings.
        """
        if self.labelled is not None:
            return [p.text for p in self.labelled], [str(p.answer) for p in self.labelled], set(), {}
        g, r, s = self.cfg.serve.gate, self.cfg.rollout, self.cfg.serve
        items = self.store.regression_items(tenant)
        retired: list[dict] = []
        if items and len(items) >= g.regression_size and g.rotate_share > 0:
            retired = self.store.retire_regression(max(1, round(g.rotate_share * len(items))), tenant)
            items = self.store.regression_items(tenant)
        need = g.regression_size - len(items)
        frozen: set[tuple[str, int]] = set()
        added: list[tuple] = []
        if need > 0 and rows:
            # Distinct prompts not in the set (nor just retired from it); never more than half of a round's queries.
            seen = {it["prompt_key"] for it in items} | {it["prompt_key"] for it in retired}
            distinct = []
            for q in rows:
                if q["prompt_key"] not in seen:
                    seen.add(q["prompt_key"])
                    distinct.append(q)
            keys = [q["prompt_key"] for q in distinct]
            ratings = self._prompt_ratings(keys, tenant)
            askers = self.store.askers(keys, tenant)
            min_askers = 1 if s.single_user or tenant is not None else g.min_askers
            eligible = [q for q in distinct if askers.get(q["prompt_key"], 0) >= min_askers
                        or earned(ratings.get(q["prompt_key"], []), self.quorum, self.opts.extractor).label]
            probe = eligible[:min(need, max(1, len(rows) // 2))]
            if probe:
                outs = self.staging.generate(self._ids([q["prompt"] for q in probe]), r.n_votes, r.temperature,
                                             r.top_p, r.top_k, r.max_new_tokens, g.seed)
                votes = majority_votes([[extract_answer(o["text"], self.opts.extractor, prompt=q["id"]) for o in row]
                                        for q, row in zip(probe, outs)], extractor=self.opts.extractor)
                confident = set(freezable([v.ratio for v in votes], [v.label for v in votes], g.min_agreement))
                for i, (q, v) in enumerate(zip(probe, votes)):
                    up = earned(ratings.get(q["prompt_key"], []), self.quorum, self.opts.extractor).label
                    if up is not None:
                        added.append((q["id"], q["idx"], q["prompt"], up, v.ratio, "feedback"))
                    elif i in confident and askers.get(q["prompt_key"], 0) >= min_askers:
                        added.append((q["id"], q["idx"], q["prompt"], v.label, v.ratio, "vote"))
            if added:
                self.store.add_regression(added, tenant)
                held = {prompt_key(it[2]) for it in added}
                frozen = {(q["id"], q["idx"]) for q in rows if q["prompt_key"] in held}
                items = self.store.regression_items(tenant)
        ratings = self._prompt_ratings([it["prompt_key"] for it in items], tenant)
        prompts, labels = [], []
        for it in items:
            label = confirmed_label(it["label"], ratings.get(it["prompt_key"], []), self.opts.extractor, self.quorum)
            if label is not None:
                prompts.append(it["prompt"])
                labels.append(label)
        changes = {"retired": len(retired), "added": len(added),
                   "added_by_source": {src: sum(a[5] == src for a in added) for src in ("vote", "feedback")}}
        return prompts, labels, frozen, changes

    def split_round(self, rows: list[dict], share: float, tenant: str | None = None
                    ) -> tuple[list[dict], dict[str, int], set[tuple[str, int]], tuple[list[str], list[str], dict]]:
        """A round's capped `rows` into (rows to train, own prompts per identity, rows frozen into the regression
        set, (the set's prompts, labels, what changed)).

        The set freezes prompts that several identities asked, the very ones
        that kept one identity's share of the round down; so the share is taken
        again over what is left to train (the rest waits for a later round).
        """
        reg_prompts, reg_labels, frozen, reg_changes = self.regression_set(rows, tenant)
        train = [q for q in rows if (q["id"], q["idx"]) not in frozen]
        train, per_client = capped(train, share)
        return train, per_client, frozen, (reg_prompts, reg_labels, reg_changes)

    def _ratings(self, prompts: list[Prompt], tenant: str | None = None) -> dict[str, list[Rating]]:
        """Prompt id -> every verdict on any answer the server (`tenant`'s adapter) gave to the same prompt."""
        by_key = self._prompt_ratings([prompt_key(p.text) for p in prompts], tenant)
        return {p.id: by_key[prompt_key(p.text)] for p in prompts if prompt_key(p.text) in by_key}

    def _trainable(self, rows: list[dict]) -> tuple[list[dict], list[tuple[str, int]]]:
        """The rows the trainer can take; quarantines the rest (a prompt too long for a rollout)."""
        r, limit = self.cfg.rollout, int(self.cfg.model.max_model_len)
        lengths = [len(ids) for ids in self._ids([q["prompt"] for q in rows])]
        bad = [(q["id"], q["idx"]) for q, n in zip(rows, lengths) if n + int(r.max_new_tokens) > limit]
        if bad:
            self.store.quarantine(bad, f"prompt + rollout.max_new_tokens={r.max_new_tokens} exceeds "
                                       f"model.max_model_len={limit}")
        skip = set(bad)
        return [q for q in rows if (q["id"], q["idx"]) not in skip], bad

    def run_round(self, why: str = "manual", tenant: str | None = None) -> dict[str, Any]:
        """One round: of the shared version, or (serve.tenants) of `tenant`'s adapter."""
        from omegaconf import OmegaConf

        from ttrl.metrics.safety import CollapseDetector

        cfg, ln = self.cfg, self.cfg.serve.learn
        if self.tenants is not None and tenant is None:
            return {"outcome": "skipped", "reasons": ["with serve.tenants every round is a tenant's"]}
        with self.trainer_lock:
            # A tenant's base: its last promoted version (None: the adapter it was created with).
            base = self.served() if tenant is None else self.store.serving_version(tenant)
            rows = self.store.unused_queries(ln.max_buffer, tenant)
            if tenant is not None:
                self.queue.done(tenant)
                self._seen[tenant] = len(rows)
            if not rows:
                return {"outcome": "skipped", "reasons": ["no new queries"], "tenant": tenant}
            self.state = "learning" if tenant is None else f"learning: tenant {tenant}"
            round_no = self.store.start_round(base, len(rows), tenant)
            t_round = time.time()
            whose = "" if tenant is None else f" of tenant {tenant!r}"
            print(f"ttrl-serve: learning round {round_no}{whose} ({why}): {len(rows)} queries, on top of "
                  f"{'its first adapter' if base is None else f'v{base}'}", file=sys.stderr, flush=True)
            chosen: list[dict] = []
            try:
                if tenant is not None:
                    try:
                        start = self._state_dir(tenant, base)
                    except (ValueError, FileNotFoundError) as err:
                        self.store.finish_round(round_no, "skipped", reasons=[str(err)])
                        self._seen[tenant] = len(rows)
                        return {"round": round_no, "outcome": "skipped", "reasons": [str(err)], "tenant": tenant}
                    # Trainer and staging hold this tenant's adapter from here on (another tenant's, before).
                    self._load(start)
                rows, too_long = self._trainable(rows)
                share = 1.0 if cfg.serve.single_user or tenant is not None else float(ln.max_client_share)
                trainable = len(rows)
                rows, per_client = capped(rows, share)
                if not rows:
                    reason = (f"the unused queries come from one identity; serve.learn.max_client_share={share:g} "
                              "needs queries of others too" if trainable else "no trainable query")
                    self.store.finish_round(round_no, "skipped", reasons=[reason],
                                            metrics={"quarantined_now": len(too_long)})
                    return {"round": round_no, "outcome": "skipped", "reasons": [reason], "tenant": tenant}
                train, per_client, frozen, (reg_prompts, reg_labels, reg_changes) = \
                    self.split_round(rows, share, tenant)
                used = [(q["id"], q["idx"]) for q in train]
                if not train:
                    reason = ("every query went into the regression set" if len(frozen) >= len(rows) else
                              f"the queries left after the regression set took its own come from one identity; "
                              f"serve.learn.max_client_share={share:g} needs queries of others too")
                    self.store.finish_round(round_no, "skipped", reasons=[reason])
                    return {"round": round_no, "outcome": "skipped", "reasons": [reason], "tenant": tenant}
                current = self.evaluate(reg_prompts, reg_labels)

                # ── TTRL steps on the buffered queries (rollouts on staging) ──
                P = cfg.data.prompts_per_step
                order = list({q["prompt_key"]: q for q in train}.values())  # each prompt once per pass
                self.rng.shuffle(order)
                # Feedback replaces the vote's rewards on rated prompts by design, so
                # a reward that sides against the vote is the point here, not a collapse.
                safety = OmegaConf.merge(cfg.safety, {"min_vote_alignment": None})
                detector = CollapseDetector(safety)
                events: list[str] = []
                step_rows: list[dict[str, float]] = []
                corrected = 0
                feedback_labels: dict[str, dict] = {}
                for s in range(ln.steps):
                    if self._stop:
                        raise _Aborted("the server is stopping")
                    self.state = f"learning: step {s + 1}/{ln.steps}"
                    chosen = [order[(s * P + i) % len(order)] for i in range(P)]
                    prompts = [Prompt(id=f"{q['id']}:{q['idx']}", problem=q["prompt"], answer=None, text=q["prompt"])
                               for q in chosen]
                    reward = FeedbackVoteReward(self.base_reward, self._ratings(prompts, tenant), self.opts.extractor,
                                                self.quorum)
                    ctx = StepContext(self.staging, reward, self.tokenizer, self.opts, self.rng)
                    row = step(ctx, prompts)
                    corrected += reward.corrected
                    # By prompt: what the round taught on each prompt whose verdict was earned, and why.
                    feedback_labels.update({p.text: reward.labels[p.id] for p in prompts if p.id in reward.labels})
                    step_rows.append(row)
                    if row.get("train/skipped"):
                        events.append(f"step {s + 1}: non-finite loss or gradient norm (update skipped)")
                    events += [f"step {s + 1}: {e.message}" for e in detector.update(row)]
                    crash_point("round_step")
                chosen = []

                # Phases are visible in /health (a client can time its load around the swap).
                self.state = "gating"
                candidate = self.evaluate(reg_prompts, reg_labels)
                decision = decide(current, candidate, cfg.serve.gate, events)
                metrics = {"current": current.as_dict(), "candidate": candidate.as_dict(), "steps": len(step_rows),
                           "prompts": len(order), "trained": [list(k) for k in used],
                           "prompts_per_client": per_client, "quarantined_now": len(too_long),
                           "feedback_corrected_prompts": corrected, "feedback_labels": feedback_labels,
                           "frozen_now": len(frozen), "regression": reg_changes,
                           "regression_items": current.n_items,
                           "reward_mean": column_mean(step_rows, "reward/mean", None),
                           "majority_ratio": column_mean(step_rows, "label/majority_ratio", None),
                           "entropy": column_mean(step_rows, "train/entropy", None),
                           "step_s": column_mean(step_rows, "timing/step", None)}
                if decision.promote:
                    self.state = "promoting"
                    version, swap_stats = self._promote(base, round_no, decision, metrics, used, current, candidate,
                                                        tenant)
                    metrics["swap"] = swap_stats
                    outcome = "promoted" if version is not None else "failed_swap"
                else:
                    version = None
                    self._reject(base, round_no, decision, metrics, tenant)
                    self.store.finish_round(round_no, "rejected", current_score=current.score,
                                            candidate_score=candidate.score, reasons=decision.reasons,
                                            metrics=metrics, used=used)
                    outcome = "rejected"
                if tenant is not None:
                    self._seen[tenant] = self.store.count_unused(tenant)
                summary = {"round": round_no, "outcome": outcome, "version": version, "base": base, "tenant": tenant,
                           "current_score": current.score, "candidate_score": candidate.score,
                           "reasons": decision.reasons, "wall_s": time.time() - t_round, "metrics": metrics}
                self.rounds_done += 1
                print(f"ttrl-serve: round {round_no}{whose}: {outcome}"
                      + (f" v{version}" if version is not None else "")
                      + f" (regression score {current.score:.3f} -> {candidate.score:.3f} on {current.n_items}"
                      f" items; {time.time() - t_round:.1f}s)", file=sys.stderr, flush=True)
                self.on_round(summary)
                return summary
            except _Aborted as err:
                self.store.finish_round(round_no, "aborted", reasons=[str(err)])
                return {"round": round_no, "outcome": "aborted", "tenant": tenant}
            except BaseException as err:
                reasons = [f"{type(err).__name__}: {err}"]
                if chosen:
                    # The step's own queries carry the failure: one that fails again is quarantined.
                    n = self.store.add_failures({(q["id"], q["idx"]) for q in chosen}, int(ln.max_row_failures),
                                                f"its rollout failed {ln.max_row_failures} rounds: {reasons[0][:200]}")
                    if n:
                        reasons.append(f"{n} queries quarantined after {ln.max_row_failures} failed rounds")
                self.store.finish_round(round_no, "failed", reasons=reasons)
                self.on_round({"round": round_no, "outcome": "failed", "tenant": tenant})
                self._restore(base, tenant)
                raise
            finally:
                self.state = "idle" if not self.disabled else "disabled"

    def _promote(self, base: int | None, round_no: int, decision: GateDecision, metrics: dict,
                 used: list[tuple[str, int]], current: EvalResult, candidate: EvalResult,
                 tenant: str | None = None) -> tuple[int | None, dict]:
        """Save, record and swap in the candidate; (version, swap stats), or (None, why) when the swap failed."""
        # One sequence of numbers over the shared version and every tenant's: a number names one folder.
        version = self.store.next_version()
        if tenant is not None:
            return self._promote_tenant(tenant, version, base, round_no, decision, metrics, used, current, candidate)
        path = self.versions.save(self.rt, version, parent=base, round=round_no, delta=decision.delta)
        crash_point("version_saved")
        # Recorded as served (with its queries used) before the swap: a crash from here on restarts on it.
        self.store.commit_promotion(round_no, version, str(path), base, used=used, current_score=current.score,
                                    candidate_score=candidate.score, metrics=metrics)
        crash_point("promotion_committed")
        try:
            stats = self.swap(version)
        except SwapFailed as err:
            # Every engine is back on `base`: so is the store, the trainer and staging; the folder goes.
            self.store.set_state("serving_version", base)
            self.store.set_version_status(version, "failed_swap")
            self.versions.remove(version)
            self.store.finish_round(round_no, "failed_swap", version=version, current_score=current.score,
                                    candidate_score=candidate.score, reasons=[str(err)], metrics=metrics, used=used)
            self._restore(base)
            self.store.add_event("swap_failed", version=version, round=round_no, error=str(err))
            self.alert(f"round {round_no}: {err}", {"round": round_no, "version": version})
            return None, {"error": str(err)}
        self.store.add_event("promoted", version=version, round=round_no, parent=base, swap=stats)
        self.prune()
        return version, stats

    def _promote_tenant(self, tenant: str, version: int, base: int | None, round_no: int, decision: GateDecision,
                        metrics: dict, used: list[tuple[str, int]], current: EvalResult, candidate: EvalResult
                        ) -> tuple[int, dict]:
        """A tenant's candidate: saved as tenants/<name>/versions/v<N>/, recorded, and served to that tenant
        alone (the engines read the new folder on its next request; no other adapter or the base moves)."""
        path = self.tenants.versions(tenant).save(self.rt, version, parent=base, round=round_no,
                                                   delta=decision.delta, tenant=tenant)
        crash_point("version_saved")
        self.store.commit_promotion(round_no, version, str(path), base, used=used, current_score=current.score,
                                    candidate_score=candidate.score, metrics=metrics, tenant=tenant)
        crash_point("promotion_committed")
        stats = self.tenants.serve_version(tenant, version)
        self.store.add_event("promoted", version=version, round=round_no, parent=base, tenant=tenant)
        print(f"ttrl-serve: tenant {tenant!r} is now served v{version}", file=sys.stderr, flush=True)
        self.prune_tenant(tenant)
        return version, stats

    def _reject(self, base: int | None, round_no: int, decision: GateDecision, metrics: dict,
                tenant: str | None = None) -> None:
        self._restore(base, tenant)
        served = f"v{base}" if base is not None else "its first adapter"
        whose = "" if tenant is None else f" of tenant {tenant!r}"
        msg = (f"gate rejected the candidate of round {round_no}{whose}; still serving {served}: "
               + "; ".join(decision.reasons))
        payload = {"round": round_no, "served": base, "tenant": tenant, "reasons": decision.reasons,
                   "current": metrics["current"], "candidate": metrics["candidate"]}
        self.store.add_event("gate_rejected", **payload)
        self.alert(msg, payload)

    def _restore(self, version: int | None, tenant: str | None = None) -> None:
        """Trainer (weights and optimizer) and staging engine back to a version on disk (a tenant's: its
        served one)."""
        self._load(self.versions.path(version) if tenant is None else self._state_dir(tenant, version))

    def _load(self, path: Any) -> None:
        self.rt.load(str(path))
        self.staging.sync_weights()

    def _state_dir(self, tenant: str, version: int | None) -> Any:
        """The trainer state a round of `tenant` starts from: its promoted `version`, or (None) the shared
        version its adapter was copied from. ValueError for an adapter placed by hand (no trainer state)."""
        if version is not None:
            path = self.tenants.versions(tenant).path(version)
        else:
            origin = self.tenants.origin(tenant)
            if origin is None:
                raise ValueError(f"tenant {tenant!r}'s adapter was placed in its folder, not copied from a version: "
                                 "there is no trainer state to learn from (per-tenant learning starts from a version)")
            path = self.versions.path(origin)
        if not (path / "manifest.json").is_file():
            raise FileNotFoundError(f"tenant {tenant!r}: no trainer state at {path}")
        return path

    def prune_tenant(self, tenant: str) -> list[int]:
        """Keep a tenant's last serve.keep_versions promoted versions (and the one it is served)."""
        rows = self.store.versions(tenant)
        promoted = [v["version"] for v in rows if v["status"] == "promoted"]
        keep = {self.store.serving_version(tenant), *promoted[-self.cfg.serve.keep_versions:]}
        disk, removed = self.tenants.versions(tenant), []
        for v in promoted:
            if v not in keep:
                disk.remove(v)
                self.store.set_version_status(v, "pruned")
                removed.append(v)
        return removed

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
