"""Start everything `ttrl-serve` runs, and stop it again.

    Ray ─┬─ serving engine(s)  rollout.num_engines vLLM actors: answer users, promoted weights only
         ├─ staging engine     one more vLLM actor: learner rollouts and gate evaluation
         └─ trainer            DeepSpeed ZeRO ranks holding the candidate
    this process: HTTP (uvicorn, asyncio) · EnginePool · store writer thread · learner thread

Startup resumes from `serve.dir`: the store says which version is served;
the trainer loads its state, every engine loads its weights from disk.
The first start writes v0 (the starting weights). With `serve.tenants` the
serving engines also hold `serve.tenants.max_loaded` tenant adapters each,
read from `<serve.dir>/tenants/` (`ttrl.serve.tenants`). When the server is
listening, `<serve.dir>/server.json` holds its address (with `serve.port=0`
that is how a caller learns the port).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from ttrl.rundir import write_atomic
from ttrl.serve.auth import ApiKeys, load_tenants, loosely_readable, resolve_admin_token
from ttrl.serve.config import api_keys_path
from ttrl.serve.engines import SwapFailed
from ttrl.serve.protocol import Defaults, RequestError, RequestLimits
from ttrl.serve.store import Store, serving_key
from ttrl.serve.versions import Versions


class ServeController:
    """What the admin API and the learner do to versions: serve, roll back, report."""

    def __init__(self, cfg: Any, store: Store, versions: Versions, rt: Any, served: int, trainer_lock: threading.Lock):
        self.cfg, self.store, self.disk, self.rt = cfg, store, versions, rt
        self._served = served
        self.trainer_lock = trainer_lock
        self.pool: Any = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.learner: Any = None
        self.metrics: Any = None
        self.last_alert: dict[str, Any] | None = None
        self.tenants: Any = None  # serve.tenants: ttrl.serve.tenants.Tenants
        self.tenant_labels: Any = None  # its /metrics labels (ttrl.serve.tenants.TenantLabels)

    def served_version(self) -> int:
        return self._served

    def notify(self, n_new: int) -> None:
        if self.learner is not None:
            self.learner.notify(n_new)

    def status(self) -> dict[str, Any]:
        ln = self.learner
        return {"enabled": ln is not None, "state": ln.state if ln else "off",
                "rounds": ln.rounds_done if ln else 0, "last_error": ln.last_error if ln else None,
                "disabled": ln.disabled if ln else None,
                "last_alert": self.last_alert}

    def _tenant(self, tenant: str) -> str:
        """`tenant`, a known one: else the one error saying why (tenants off 409, unknown 404)."""
        if self.tenants is None:
            raise RequestError("tenant=... needs serve.tenants.enabled=true", "tenant", status=409, kind="conflict")
        if tenant not in {t["name"] for t in self.tenants.listing()}:
            raise RequestError(f"no tenant {tenant!r} (a tenant exists after its first request)", "tenant",
                               status=404, kind="not_found")
        return tenant

    def versions(self, tenant: str | None = None) -> dict[str, Any]:
        if tenant is not None:
            name = self._tenant(tenant)
            return {"tenant": name, "current": self.store.serving_version(name), "versions": self.store.versions(name),
                    "rounds": self.store.tenant_rounds(name, 50),
                    "events": [e for e in self.store.events(limit=500) if e["payload"].get("tenant") == name][-100:]}
        return {"current": self._served, "versions": self.store.versions(), "rounds": self.store.rounds(50),
                "events": self.store.events(limit=100), "swaps": list(self.pool.swaps) if self.pool else []}

    # ── swaps (called from the learner and admin threads, never the event loop) ──
    def swap(self, version: int) -> dict[str, Any]:
        """Hot-swap the serving engines to `version` (from disk); blocks until every engine has it.

        Raises `SwapFailed` when an engine could not load it (every engine is back on what it served).
        """
        assert self.loop is not None and self.pool is not None
        blobs = self.disk.blobs(version, self.rt.engine_dtype)
        stats = asyncio.run_coroutine_threadsafe(self.pool.swap(version, blobs), self.loop).result()
        self._served = version
        if self.metrics is not None:
            self.metrics.swaps.inc()
            self.metrics.swap_pause.set(stats["max_pause_s"])
        print(f"ttrl-serve: now serving v{version} (longest engine pause {stats['max_pause_s'] * 1e3:.0f} ms)",
              file=sys.stderr, flush=True)
        return stats

    def rollback(self, version: int, tenant: str | None = None) -> dict[str, Any]:
        if tenant is not None:
            return self._rollback_tenant(self._tenant(tenant), version)
        def check() -> None:
            known = {v["version"]: v for v in self.store.versions()}
            kept = sorted(v for v, row in known.items() if row["status"] in ("base", "promoted")
                          and self.disk.exists(v))
            if version not in kept:
                raise RequestError(f"version {version} is not kept; kept versions: {kept}", "version", status=404,
                                   kind="not_found")

        check()  # at once, without waiting for a round
        with self.trainer_lock:  # after any learning round in progress, which may have pruned it meanwhile
            check()
            before = self._served
            # Engines first: a swap that fails leaves them (and the store) on `before`.
            try:
                stats = self.swap(version)
            except SwapFailed as err:
                raise RequestError(str(err), "version", status=503, kind="swap_failed") from None
            self.store.set_state("serving_version", version)
            self.rt.load(str(self.disk.path(version)))
            if self.learner is not None:
                self.learner.staging.sync_weights()
            self.store.add_event("rollback", version=version, previous=before, swap=stats)
        if self.metrics is not None:
            self.metrics.rollbacks.inc()
        return {"ok": True, "current": version, "previous": before, "swap": stats}

    def _rollback_tenant(self, tenant: str, version: int) -> dict[str, Any]:
        """Serve `tenant` one of its kept versions again (and its next round trains from it); nothing else moves.

        No engine call: the engines read the version's folder on the
        tenant's next request, dropping the adapter they held for it.
        """
        with self.trainer_lock:  # after any learning round in progress (which may prune a version)
            known = {v["version"]: v for v in self.store.versions(tenant)}
            disk = self.tenants.versions(tenant)
            kept = sorted(v for v, row in known.items() if row["status"] == "promoted" and disk.exists(v))
            if version not in kept:
                raise RequestError(f"version {version} is not a kept version of tenant {tenant!r}; its kept "
                                   f"versions: {kept}", "version", status=404, kind="not_found")
            before = self.store.serving_version(tenant)
            self.tenants.serve_version(tenant, version)
            self.store.set_state(serving_key(tenant), version)
            self.store.add_event("rollback", version=version, previous=before, tenant=tenant)
        if self.metrics is not None:
            self.metrics.rollbacks.inc()
        return {"ok": True, "tenant": tenant, "current": version, "previous": before}

    def learn_now(self, tenant: str | None = None) -> dict[str, Any]:
        """Start a round now; with tenants, `tenant`'s (None: the next ready tenant's)."""
        if self.learner is None:
            raise RequestError("the learner is off (serve.learn.enabled=false)", status=409, kind="conflict")
        if tenant is not None:
            self._tenant(tenant)
        self.learner.trigger(tenant)
        return {"ok": True, "triggered": True, "state": self.learner.state, "tenant": tenant}

    def on_round(self, summary: dict[str, Any]) -> None:
        if self.metrics is not None:
            self.metrics.rounds.inc(outcome=summary.get("outcome", "unknown"))
            if summary.get("outcome") == "rejected":
                self.metrics.rejections.inc()
            if summary.get("tenant") is not None and self.tenant_labels is not None:
                label = self.tenant_labels.label(summary["tenant"])
                self.metrics.tenant_rounds.inc(tenant=label, outcome=summary.get("outcome", "unknown"))
                if summary.get("outcome") == "rejected":
                    self.metrics.tenant_rejections.inc(tenant=label)

    def on_alert(self, message: str, payload: dict[str, Any]) -> None:
        self.last_alert = {"time": time.time(), "message": message}
        print(f"ttrl-serve: ALERT: {message}", file=sys.stderr, flush=True)


def _setup(cfg: Any):
    """The run's parts, built by `ttrl.parts.build_parts` exactly as a training run builds them
    (grading bound, model resolution, every reward including `reward_model`), without its data."""
    from ttrl.parts import build_parts

    return build_parts(cfg, with_prompts=False)


def _labelled_set(cfg: Any, tokenizer: Any):
    from ttrl.data.loader import load_file
    from ttrl.data.templates import render_prompt
    from ttrl.types import Prompt

    path = cfg.serve.gate.regression_set
    if not path:
        return None
    d = cfg.data
    rows = load_file(path, d.id_key, d.problem_key, d.answer_key)
    return [Prompt(p.id, p.problem, p.answer, render_prompt(p.problem, cfg.model, tokenizer)) for p in rows]


def write_server_file(serve_dir: Path, info: dict[str, Any]) -> Path:
    return write_atomic(serve_dir / "server.json", json.dumps(info, indent=1))


def run_server(cfg: Any, serve_dir: Path) -> None:
    import ray

    from ttrl.serve.learner import Learner

    s = cfg.serve
    quiet = not cfg.logger.progress
    admin_token = resolve_admin_token(s.admin_token_env)
    keys_file = api_keys_path(s)
    api_keys = ApiKeys.from_file(keys_file) if keys_file is not None else None
    if keys_file is not None and loosely_readable(keys_file):
        print(f"ttrl-serve: WARNING: the API keys file {keys_file} is readable by other users (chmod 600 it)",
              file=sys.stderr, flush=True)
    if api_keys is None and not s.single_user and s.learn.enabled and s.gate.regression_set is None:
        print("ttrl-serve: note: without API keys every client is one identity, 'anonymous', and the learner "
              "needs two (a round takes prompts of several identities, serve.learn.max_client_share; the gate's "
              "set takes prompts two identities asked, serve.gate.min_askers): for a server of your own, set "
              "serve.single_user=true; for several clients, serve.api_keys_file", file=sys.stderr, flush=True)
    if api_keys is None and s.allow_unauthenticated:
        print(f"ttrl-serve: WARNING: no API keys and serve.allow_unauthenticated=true on {s.host}: anyone who "
              "reaches the server is the same identity, 'anonymous'", file=sys.stderr, flush=True)
    parts = _setup(cfg)
    model_path, tokenizer, reward = parts.model_path, parts.tokenizer, parts.reward
    labelled = _labelled_set(cfg, tokenizer)
    store = Store(s.store or serve_dir / "store.sqlite")
    versions = Versions(serve_dir / "versions")
    if not quiet:
        print(f"ttrl-serve: starting Ray, {cfg.rollout.num_engines} serving + 1 staging vLLM engine(s), "
              f"{cfg.trainer.num_workers} DeepSpeed rank(s) ...", file=sys.stderr, flush=True)
    # One more engine than asked for: the staging engine (learner rollouts, gate). Versions reach
    # the engines from disk and staging through push_weights: no NCCL weight group.
    rt = parts.start_runtime(int(cfg.trainer.total_steps or 1_000_000),
                             overrides={"rollout": {"num_engines": cfg.rollout.num_engines + 1, "weight_sync": "ray"}},
                             tenant_slots=s.tenants.max_loaded if s.tenants.enabled else 0)
    serving, staging = rt.engines[:-1], rt.engines[-1]
    learner = None
    try:
        # ── which version to serve ─────────────────────────────────────────
        known = {v["version"]: v for v in store.versions()}
        if 0 not in known or not versions.exists(0):
            path = versions.save(rt, 0, note="the starting weights")
            store.add_version(0, str(path), "base", metrics={"model_path": model_path},
                              serve=store.serving_version() is None)
            known = {v["version"]: v for v in store.versions()}
        served = store.serving_version() or 0
        if not versions.exists(served):
            kept = [v for v, row in sorted(known.items()) if row["status"] in ("base", "promoted")
                    and versions.exists(v)]
            print(f"ttrl-serve: WARNING: the store serves v{served} but {versions.path(served)} is missing; "
                  f"serving v{kept[-1]}", file=sys.stderr, flush=True)
            served = kept[-1]
            store.set_state("serving_version", served)
        removed = versions.cleanup({v for v, row in known.items() if row["status"] in ("base", "promoted")})
        if removed:
            print(f"ttrl-serve: removed unrecorded version dirs {removed}", file=sys.stderr)
        if served != 0:
            rt.load(str(versions.path(served)))
            blobs = versions.blobs(served, rt.engine_dtype)
            ray.get([e.load_weights.remote(blobs, served) for e in rt.engines])
        interrupted = store.interrupt_unfinished()
        if interrupted:
            print(f"ttrl-serve: learning round(s) {interrupted} were cut short by the last stop: marked "
                  "interrupted (their queries are unused and go into a later round)", file=sys.stderr, flush=True)
        store.add_event("started", version=served, pid=os.getpid(), interrupted=interrupted,
                        identities=len(api_keys.names) if api_keys else 0)

        trainer_lock = threading.Lock()
        controller = ServeController(cfg, store, versions, rt, served, trainer_lock)
        tenants = None
        if s.tenants.enabled:
            from ttrl.serve.tenants import TenantLabels, Tenants

            # A new tenant starts from the version served when it first asks (validation made keys_file exist).
            tenants = Tenants(serve_dir / "tenants", lambda: versions.hf_dir(controller.served_version()),
                              load_tenants(keys_file))
            _resume_tenants(store, tenants)
            controller.tenants, controller.tenant_labels = tenants, TenantLabels(int(s.tenants.metrics_max_tenants))
        if s.learn.enabled:
            learner = Learner(cfg, rt, staging, store, versions, tokenizer, reward, swap=controller.swap,
                              served=controller.served_version, trainer_lock=trainer_lock, labelled=labelled,
                              on_round=controller.on_round, alert=controller.on_alert, tenants=tenants)
            controller.learner = learner
        asyncio.run(_serve(cfg, serve_dir, tokenizer, serving, versions, rt, store, controller, admin_token,
                           served, rt.startup_s, api_keys, _vocab_size(tokenizer), tenants))
    finally:
        if learner is not None:
            learner.stop()
        store.add_event("stopped", pid=os.getpid())
        store.close()
        parts.close()  # the reward (reward_model's actor), then the runtime
        print("ttrl-serve: stopped", file=sys.stderr, flush=True)


def _resume_tenants(store: Store, tenants: Any) -> None:
    """Each tenant served its last promoted version (the store's record); version folders a crash left
    unrecorded (saved, never committed) are removed, as the shared version's are."""
    served = store.tenant_versions()
    for d in sorted(p for p in tenants.root.iterdir() if (p / "versions").is_dir()):
        keep = {v["version"] for v in store.versions(d.name) if v["status"] == "promoted"}
        removed = tenants.versions(d.name).cleanup(keep)
        if removed:
            print(f"ttrl-serve: tenant {d.name!r}: removed unrecorded version dirs {removed}", file=sys.stderr)
    for name, version in sorted(served.items()):
        try:
            tenants.serve_version(name, version)
        except (KeyError, FileNotFoundError) as err:
            print(f"ttrl-serve: WARNING: tenant {name!r} should be served v{version} but cannot be ({err}); "
                  "it is served its first adapter", file=sys.stderr, flush=True)


def _vocab_size(tokenizer: Any) -> int:
    """The token ids a prompt may hold: the tokenizer's. An embedding row past them (vLLM would take its id) has
    no text, and the store and the learner keep prompts as text: what was answered must be what is trained on."""
    return len(tokenizer)


async def _serve(cfg, serve_dir, tokenizer, serving, versions, rt, store, controller, admin_token, served,
                 startup_s, api_keys, vocab_size, tenants=None) -> None:
    import uvicorn

    from ttrl.labeling.extract import configured_extractor
    from ttrl.serve.app import Service, ServiceConfig, build_app
    from ttrl.serve.engines import EnginePool
    from ttrl.serve.guard import GuardPolicy, allowed_host_set
    from ttrl.serve.limits import ClientLimits

    s, r = cfg.serve, cfg.rollout
    loop = asyncio.get_running_loop()
    pool = EnginePool(serving, served, max_batch=s.max_batch, max_queue=s.max_queue,
                      blobs_for=lambda v: versions.blobs(v, rt.engine_dtype), max_retries=r.max_retries,
                      max_adapters=s.tenants.max_loaded if tenants is not None else 0,
                      max_client_queue=int(s.limits.max_queued_prompts))
    defaults = Defaults(temperature=float(s.temperature if s.temperature is not None else r.temperature),
                        top_p=float(s.top_p if s.top_p is not None else r.top_p),
                        max_tokens=int(s.max_tokens or r.max_new_tokens), votes=int(s.votes),
                        max_model_len=int(cfg.model.max_model_len), vocab_size=int(vocab_size))
    lim = s.limits
    scfg = ServiceConfig(model_name=s.model_name or cfg.model.name, defaults=defaults,
                         request_timeout_s=float(s.request_timeout_s), admin_token=admin_token,
                         extractor=configured_extractor(cfg.label),
                         limits=RequestLimits(int(lim.max_prompts), int(lim.max_samples), int(lim.max_comment_chars)))
    service = Service(scfg, tokenizer, cfg.model, pool, store, controller, tenants)
    m = service.metrics
    policy = GuardPolicy(allowed_hosts=allowed_host_set(s.allowed_hosts, s.host),
                         cors_origins=frozenset(str(o).rstrip("/") for o in s.cors_origins),
                         max_body_bytes=int(lim.max_body_bytes), api_keys=api_keys, admin_token=admin_token,
                         limits=ClientLimits(float(lim.requests_per_minute), int(lim.burst), int(lim.max_in_flight)),
                         body_timeout_s=float(lim.body_timeout_s))

    def on_batch(size: int, seconds: float) -> None:
        m.batch_size.observe(size)
        m.engine_seconds.observe(seconds)

    def on_event(kind: str, **payload: Any) -> None:
        m.engine_events.inc(kind=kind)
        store.add_event(kind, **payload)

    def on_adapters(loads: int, unloads: int) -> None:
        m.tenant_loads.inc(loads)
        m.tenant_unloads.inc(unloads)

    pool.on_batch, pool.on_event, pool.on_adapters = on_batch, on_event, on_adapters
    controller.pool, controller.loop, controller.metrics = pool, loop, m
    await pool.start()
    if controller.learner is not None:
        controller.learner.start()

    server = uvicorn.Server(uvicorn.Config(build_app(service, policy), host=s.host, port=s.port, log_level="warning",
                                           access_log=False, lifespan="off", timeout_graceful_shutdown=10))

    # uvicorn shuts down gracefully on SIGINT/SIGTERM, then re-raises the signal with
    # the handlers it found: make those no-ops, so that the clean-up below runs.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: None)
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            await task  # raises why it could not start (port in use, ...)
            raise RuntimeError(f"ttrl-serve: the HTTP server did not start on {s.host}:{s.port}")
        await asyncio.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    url = f"http://{'[' + s.host + ']' if ':' in s.host else s.host}:{port}"
    write_server_file(serve_dir, {"host": s.host, "port": port, "url": url, "pid": os.getpid(), "version": served,
                                  "model": scfg.model_name, "started": time.time(), "startup_s": startup_s})
    who = (f"API keys for {len(api_keys.names)} identities" if api_keys else
           "single user (trusted), no keys" if s.single_user else "no API keys (every client is 'anonymous')")
    print(f"ttrl-serve: serving v{served} of {scfg.model_name} at {url}/v1 (OpenAI API), votes={s.votes}; {who}; "
          f"learner {('on, per tenant' if tenants else 'on') if controller.learner else 'off'}; "
          f"{f'tenants on ({s.tenants.max_loaded} adapters resident per engine)' if tenants else 'tenants off'}; admin API {'on' if admin_token else 'off'}; "
          f"store {store.path}; started in {startup_s:.0f} s ({rt.phases.line()})", file=sys.stderr, flush=True)
    try:
        await task
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        service.close()
        await pool.stop()
