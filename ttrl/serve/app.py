"""The HTTP API: OpenAI-compatible completions, feedback, health, metrics, admin.

    POST /v1/completions         OpenAI completions (`votes` extension: self-consistency)
    POST /v1/chat/completions    OpenAI chat completions
    GET  /v1/models              the one served model
    POST /v1/feedback            {"id": <response id>, "thumbs": "up"|"down" | "score": 0..1 | "rating": ±1}
    GET  /health                 liveness, served version, queue, learner state
    GET  /metrics                Prometheus text
    GET  /admin/tenants          tenants, their adapter ids, adapter loads/unloads  (admin token; serve.tenants)
    GET  /admin/versions         versions on disk, learning rounds, gate events   (admin token; ?tenant=NAME: its own)
    POST /admin/rollback         {"version": N}: serve (and train from) version N (admin token; ?tenant=NAME: its own)
    POST /admin/learn            start a learning round now (?tenant=NAME: that tenant's) (admin token)

Every request first passes `ttrl.serve.guard.Guard` (Host, Origin, API key,
per-identity limits, Content-Type, body size; every answer counted). A
request is answered only after its record (identity, prompt, samples, vote,
answer, version) is committed to the store. `Service` holds the request
path and talks to the engines through an `EnginePool`-like object and to
the learner and versions through a `Controller`; both are plain objects,
so the app runs against fakes in unit tests. With `serve.tenants` a request
is answered with its tenant's adapter (`ttrl.serve.tenants`); a client whose
identity has no tenant is refused (403), never served another model.
"""

from __future__ import annotations

import asyncio
import functools
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.concurrency import run_in_threadpool

from ttrl.labeling.extract import extract_answer
from ttrl.serve import protocol as P
from ttrl.serve.auth import ANONYMOUS, check_admin, is_admin
from ttrl.serve.engines import EngineUnavailable, Overloaded, QueueShare
from ttrl.serve.guard import Guard, GuardPolicy
from ttrl.serve.prom import CONTENT_TYPE, Registry
from ttrl.serve.selection import mean_logprob, select_completion
from ttrl.serve.store import FeedbackRecord, GroupCommitWriter, QueryRecord, Store


class Controller(Protocol):
    def served_version(self) -> int: ...
    def notify(self, n_new: int) -> None: ...
    def status(self) -> dict[str, Any]: ...
    # tenant (serve.tenants): that tenant's versions, rollback, round; called without it when none is asked for.
    def versions(self, tenant: str | None = None) -> dict[str, Any]: ...
    def rollback(self, version: int, tenant: str | None = None) -> dict[str, Any]: ...
    def learn_now(self, tenant: str | None = None) -> dict[str, Any]: ...


class ServeMetrics:
    def __init__(self, queue_depth: Callable[[], float], served_version: Callable[[], float]):
        r = self.registry = Registry()
        self.requests = r.counter("ttrl_requests_total", "HTTP requests by endpoint and status code (every one)",
                                  ["endpoint", "code"])
        self.refusals = r.counter("ttrl_refusals_total", "Requests refused at the door, by reason "
                                  "(host, origin, auth, content_type, body_size, body_timeout, requests_per_minute, "
                                  "max_in_flight)",
                                  ["reason"])
        self.latency = r.histogram("ttrl_request_seconds", "Request latency, arrival to answer (store commit included)",
                                   ["endpoint"])
        self.prompt_tokens = r.counter("ttrl_prompt_tokens_total", "Prompt tokens of answered requests")
        self.generated_tokens = r.counter("ttrl_generated_tokens_total", "Tokens sampled (all votes included)")
        self.answered = r.counter("ttrl_answered_queries_total", "Prompts answered and committed to the store")
        self.feedback = r.counter("ttrl_feedback_total", "Feedback received (a replaced verdict counts again)",
                                  ["verdict"])
        self.agreement = r.histogram("ttrl_vote_agreement", "Self-consistency: share of samples in the winning class",
                                     buckets=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0))
        self.batch_size = r.histogram("ttrl_engine_batch_size", "Prompts per engine call",
                                      buckets=(1, 2, 4, 8, 16, 32, 64, 128))
        self.engine_seconds = r.histogram("ttrl_engine_call_seconds", "Duration of one engine generate call")
        self.rounds = r.counter("ttrl_learning_rounds_total", "Learning rounds by outcome", ["outcome"])
        self.rejections = r.counter("ttrl_gate_rejections_total", "Candidates the safety gate rejected")
        self.swaps = r.counter("ttrl_swaps_total", "Hot swaps of the serving engines (promotions and rollbacks)")
        self.swap_pause = r.gauge("ttrl_last_swap_pause_seconds", "Longest engine pause of the last hot swap")
        self.rollbacks = r.counter("ttrl_rollbacks_total", "Admin rollbacks")
        # serve.tenants: the same by tenant (the first serve.tenants.metrics_max_tenants by name, then _other).
        self.tenant_rounds = r.counter("ttrl_tenant_learning_rounds_total", "Tenants' learning rounds by tenant "
                                       "and outcome (serve.tenants)", ["tenant", "outcome"])
        self.tenant_rejections = r.counter("ttrl_tenant_gate_rejections_total",
                                           "Tenants' candidates the safety gate rejected, by tenant", ["tenant"])
        self.engine_events = r.counter("ttrl_engine_events_total", "Engine deaths and recoveries", ["kind"])
        self.tenant_loads = r.counter("ttrl_tenant_adapter_loads_total",
                                      "Tenant adapters read from disk into a serving engine (serve.tenants)")
        self.tenant_unloads = r.counter("ttrl_tenant_adapter_unloads_total",
                                        "Tenant adapters a serving engine dropped, least recently used first")
        self.tenants_created = r.counter("ttrl_tenants_created_total",
                                         "Tenants created on their first request (adapter copied from the served "
                                         "version)")
        r.gauge("ttrl_queue_depth", "Requests waiting for an engine", fn=queue_depth)
        r.gauge("ttrl_serving_version", "Weights version being served", fn=served_version)


@dataclass
class ServiceConfig:
    model_name: str
    defaults: P.Defaults
    request_timeout_s: float
    admin_token: str | None
    # label.extractor: how a served answer is read, for the vote and the stored record, as the learner reads it.
    extractor: str = "boxed"
    limits: P.RequestLimits = P.RequestLimits()


class Service:
    def __init__(self, scfg: ServiceConfig, tokenizer: Any, model_cfg: Any, pool: Any, store: Store,
                 controller: Controller, tenants: Any = None):
        self.scfg, self.tokenizer, self.model_cfg = scfg, tokenizer, model_cfg
        self.pool, self.store, self.controller = pool, store, controller
        self.tenants = tenants  # ttrl.serve.tenants.Tenants with serve.tenants, else None
        self.max_prompt_chars = prompt_char_bound(tokenizer, scfg.defaults.max_model_len)
        if tenants is not None:
            tenants.on_create = lambda name: self.metrics.tenants_created.inc()
        self.writer = GroupCommitWriter(store)
        self.metrics = ServeMetrics(lambda: len(getattr(pool, "queue", ())), lambda: controller.served_version())
        self.started = time.time()

    def close(self) -> None:
        self.writer.close()

    # ── the request path ──────────────────────────────────────────────────
    def _tokens(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    async def tokens(self, texts: list[str], field: str = "prompt") -> list[list[int]]:
        """The prompts' token ids, off the event loop (a long prompt takes the tokenizer a while), after a
        character limit (`max_prompt_chars`), so a body of long prompts is refused before it costs the
        tokenizer anything. `field`: the request's field the texts came from, named by a refusal."""
        limit = self.max_prompt_chars
        if limit is not None:
            for t in texts:
                if len(t) > limit:
                    raise P.RequestError(
                        f"a prompt of {len(t)} characters is over this server's {limit} (model.max_model_len="
                        f"{self.scfg.defaults.max_model_len} x {limit // self.scfg.defaults.max_model_len}, the "
                        "characters of the vocabulary's longest token)", field)
        return await run_in_threadpool(lambda: [self._tokens(t) for t in texts])

    def _check_length(self, ids: list[int], s: P.Sampling, field: str = "prompt") -> None:
        limit = self.scfg.defaults.max_model_len
        if len(ids) + s.max_tokens > limit:
            # The prompt's fault when it leaves no room for one new token; max_tokens' otherwise.
            raise P.RequestError(f"the prompt has {len(ids)} tokens; with max_tokens={s.max_tokens} that exceeds the "
                                 f"model's context of {limit}", field if len(ids) >= limit else "max_tokens")
        if not ids:
            raise P.RequestError("the prompt is empty after tokenisation", field)

    async def _adapter(self, client: str) -> tuple[str | None, tuple | None]:
        """With tenants: (tenant, its adapter for the engine), the tenant created on its first request;
        (None, None) for a key marked to be served the shared version. Tenants off: (None, None)."""
        if self.tenants is None:
            return None, None
        try:
            name = self.tenants.tenant_of(client)
        except KeyError:
            raise P.RequestError(f"the identity {client!r} has no tenant: with serve.tenants every request needs "
                                 "an API key of serve.api_keys_file", status=403, kind="permission_error") from None
        if name is None:
            return None, None
        try:
            adapter = await run_in_threadpool(self.tenants.get, name)
        except (OSError, ValueError) as err:
            # The operator's to fix (the log says what); the client is not shown the server's paths.
            print(f"ttrl-serve: tenant {name!r} cannot be served: {err}", file=sys.stderr, flush=True)
            raise P.RequestError(f"the adapter of tenant {name!r} cannot be served (the server log says why)",
                                 status=500, kind="server_error") from None
        return name, adapter.wire()

    async def _answer_one(self, ids: list[int], s: P.Sampling, client: str, adapter: tuple | None = None
                          ) -> tuple[list[dict], list[dict], int, Any]:
        """(returned choices, all samples, version, selection or None) for one prompt."""
        if adapter is None:
            samples, version = await self.pool.generate(ids, s.engine_key(), client)
        else:
            samples, version = await self.pool.generate(ids, s.engine_key(), client, adapter)
        self.metrics.generated_tokens.inc(sum(len(o["token_ids"]) for o in samples))
        selection = None
        if s.votes > 1:
            # Grading equivalent answers can take a while (math-verify): off the event loop.
            pick = functools.partial(select_completion, samples, extractor=self.scfg.extractor)
            selection = await asyncio.get_running_loop().run_in_executor(None, pick)
            picked = [samples[selection.index]]
            self.metrics.agreement.observe(selection.agreement)
        else:
            picked = samples[:s.n]
        choices = []
        for o in picked:
            text, stopped = P.apply_stop(o["text"], s.stop)
            choices.append({"text": text, "finish_reason": P.finish_reason(o.get("finish_reason"), stopped),
                            "tokens": len(o["token_ids"])})
        return choices, samples, version, selection

    async def complete(self, endpoint: str, prompts: list[str], prompt_ids: list[list[int]], s: P.Sampling,
                       request: dict, t0: float, client: str = ANONYMOUS) -> dict[str, Any]:
        prefix = "chatcmpl" if endpoint == "chat" else "cmpl"
        rid = P.new_id(prefix)
        for ids in prompt_ids:
            self._check_length(ids, s, "messages" if endpoint == "chat" else "prompt")
        tenant, adapter = await self._adapter(client)
        tasks = [asyncio.ensure_future(self._answer_one(ids, s, client, adapter)) for ids in prompt_ids]
        try:
            results = await asyncio.wait_for(asyncio.gather(*tasks), timeout=self.scfg.request_timeout_s)
        except TimeoutError:
            raise P.RequestError(f"no answer within serve.request_timeout_s={self.scfg.request_timeout_s:g}s",
                                 status=504, kind="timeout") from None
        except Overloaded as err:
            raise P.RequestError(str(err), status=503, kind="overloaded") from None
        except QueueShare as err:
            raise P.RequestError(str(err), status=429, kind="rate_limit_error") from None
        except EngineUnavailable as err:
            raise P.RequestError(str(err), status=503, kind="engine_unavailable") from None
        finally:
            # A refused request's other prompts leave the queue with it (gather would let them run, unanswered
            # and unstored, in slots its client's in-flight cap no longer counts). No-op for finished ones.
            for t in tasks:
                t.cancel()
        records, choices, extras = [], [], []
        version = min(v for _, _, v, _ in results)
        for i, (text, (picked, samples, v, sel)) in enumerate(zip(prompts, results)):
            answers = (sel.answers if sel is not None
                       else [extract_answer(o["text"], self.scfg.extractor) for o in samples])
            records.append(QueryRecord(
                id=rid, idx=i, endpoint=endpoint, prompt=text, version=v, votes=s.votes,
                response=[c["text"] for c in picked],
                answer=sel.answer if sel is not None else extract_answer(picked[0]["text"], self.scfg.extractor),
                agreement=sel.agreement if sel is not None else None,
                samples=[{"text": o["text"], "answer": a, "mean_logprob": _finite(mean_logprob(o)),
                          "tokens": len(o["token_ids"]), "chosen": sel is not None and j == sel.index}
                         for j, (o, a) in enumerate(zip(samples, answers))],
                request=stored_request(request) if i == 0 else None, latency_s=time.perf_counter() - t0,
                client=client, tenant=tenant))
            choices.extend(picked)
            extras.append({"version": v, "votes": s.votes, "answer": records[-1].answer,
                           "agreement": records[-1].agreement})
            if self.tenants is not None:
                extras[-1]["tenant"] = tenant  # None: the shared version answered
        # Durable before the answer leaves: a crash after this line loses no answered query.
        await asyncio.wrap_future(self.writer.submit(records))
        self.metrics.answered.inc(len(records))
        self.controller.notify(len(records))
        usage = {"prompt_tokens": sum(len(ids) for ids in prompt_ids),
                 "completion_tokens": sum(c["tokens"] for c in choices)}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        self.metrics.prompt_tokens.inc(usage["prompt_tokens"])
        extra = extras[0] if len(extras) == 1 else {"version": version, "prompts": extras}
        build = P.chat_body if endpoint == "chat" else P.completion_body
        return build(rid, self.scfg.model_name, choices, usage, version, extra)

    def feedback(self, body: Any, client: str = ANONYMOUS) -> dict[str, Any]:
        """Store one identity's verdict on a text it was served; its earlier verdict on that text is replaced."""
        rid, index, score, comment = P.parse_feedback(body, self.scfg.limits)
        rows = self.store.get_request(rid)
        # Only the identity that got a response may rate it; to anyone else it does not exist.
        if not rows or rows[0].get("client", ANONYMOUS) != client:
            raise P.RequestError(f"no response with id {rid!r} was given to this client", "id", status=404,
                                 kind="not_found")
        # Choice `index` counts across the prompts of the request, as in the response.
        for r in rows:
            if index < len(r["response"]):
                fid, replaced = self.store.add_feedback(
                    FeedbackRecord(rid, r["idx"], index, score, comment, client=client, tenant=r.get("tenant")))
                self.metrics.feedback.inc(verdict="up" if score >= 0.5 else "down")
                return {"ok": True, "feedback_id": fid, "id": rid, "index": body.get("index", 0), "score": score,
                        "replaced": replaced}
            index -= len(r["response"])
        raise P.RequestError(f"response {rid!r} has no choice {body.get('index')}", "index", status=404,
                             kind="not_found")


# The request fields a stored query keeps beside its prompt (the sampling the client asked for); the rest of a
# body (its prompts, which each row holds already, and any field the server ignores) is not written to disk.
STORED_FIELDS = ("model", "temperature", "top_p", "max_tokens", "max_completion_tokens", "n", "votes", "seed",
                 "stop", "user")


def stored_request(body: Any) -> dict[str, Any] | None:
    """What of a request body its first query row stores: the sampling fields that are scalars or lists of
    strings (`stop`), each string cut to 200 characters; anything else (an object under `model`) is left out."""
    if not isinstance(body, dict):
        return None

    def small(v: Any) -> Any:
        return v[:200] if isinstance(v, str) else v

    kept = {}
    for k in STORED_FIELDS:
        v = body.get(k)
        if v is None or isinstance(v, (str, int, float)):
            if k in body:
                kept[k] = small(v)
        elif isinstance(v, list) and len(v) <= 4 and all(isinstance(x, str) for x in v):
            kept[k] = [small(x) for x in v]
    return kept


def prompt_char_bound(tokenizer: Any, max_model_len: int) -> int | None:
    """The most characters a prompt may have: `max_model_len` tokens of the vocabulary's longest string.

    Above it a prompt would not fit the context with ordinary tokenizers; one whose added tokens swallow
    whitespace or whose normalizer drops characters could still fit, and is refused by this limit all the
    same (it names itself). None when the tokenizer does not list its vocabulary."""
    try:
        longest = max(len(t) for t in tokenizer.get_vocab())
    except Exception:  # noqa: BLE001 - a tokenizer without a vocabulary list: no bound, the token count decides
        return None
    return max_model_len * max(1, longest)


def _finite(x: float) -> float | None:
    return x if x == x and abs(x) != float("inf") else None


def build_app(service: Service, policy: GuardPolicy | None = None) -> Guard:
    """The API behind its guard (`policy` None: loopback names, no keys, serve.limits' defaults)."""
    from ttrl.serve.guard import allowed_host_set
    from ttrl.serve.limits import ClientLimits

    app = FastAPI(title="ttrl-serve", docs_url=None, redoc_url=None, openapi_url=None)
    m = service.metrics
    if policy is None:
        policy = GuardPolicy(allowed_hosts=allowed_host_set([], "127.0.0.1"), cors_origins=frozenset(),
                             max_body_bytes=1 << 20, api_keys=None, admin_token=service.scfg.admin_token,
                             limits=ClientLimits(600.0, 60, 16))

    async def crashed(request: Request, exc: Exception) -> JSONResponse:
        # An OpenAI-style body for a bug's 500 too (Starlette re-raises it after: the guard logs the traceback).
        return JSONResponse({"error": {"message": f"internal error ({type(exc).__name__}); the server logged it",
                                       "type": "server_error", "param": None, "code": None}}, status_code=500)

    app.add_exception_handler(Exception, crashed)

    def error(err: P.RequestError) -> JSONResponse:
        headers = {"Retry-After": "1"} if err.status in (429, 503) else None
        return JSONResponse(err.body(), status_code=err.status, headers=headers)

    async def body_of(request: Request) -> Any:
        return P.parse_body(await request.body())

    def identity(request: Request) -> str:
        return getattr(request.state, "identity", None) or ANONYMOUS

    @app.post("/v1/completions")
    async def completions(request: Request):
        t0 = time.perf_counter()
        try:
            body = await body_of(request)
            req = P.parse_completion(body, service.scfg.defaults, service.scfg.limits)
            if req.prompt_ids is not None:
                texts = [service.tokenizer.decode(ids) for ids in req.prompt_ids]
                ids = req.prompt_ids
                # The store and the learner keep prompts as text: ids that decode to none (ids past the
                # tokenizer's own, within the embedding's rows) would be stored as "" and trained on as [].
                empty = next((i for i, t in enumerate(texts) if not t), None)
                if empty is not None:
                    raise P.RequestError(f"the token ids of prompt {empty} decode to no text", "prompt")
            else:
                texts = req.prompts
                ids = await service.tokens(texts)
            return JSONResponse(await service.complete("completions", texts, ids, req.sampling, body, t0,
                                                       identity(request)))
        except P.RequestError as err:
            return error(err)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        t0 = time.perf_counter()
        try:
            body = await body_of(request)
            messages, sampling, _ = P.parse_chat(body, service.scfg.defaults, service.scfg.limits)
            text = P.render_chat(messages, service.model_cfg, service.tokenizer)
            ids = await service.tokens([text], "messages")
            return JSONResponse(await service.complete("chat", [text], ids, sampling, body, t0, identity(request)))
        except P.RequestError as err:
            return error(err)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": service.scfg.model_name, "object": "model",
                                            "created": int(service.started), "owned_by": "ttrl"}]}

    @app.post("/v1/feedback")
    async def feedback(request: Request):
        try:
            body = await body_of(request)
            return JSONResponse(await run_in_threadpool(service.feedback, body, identity(request)))
        except P.RequestError as err:
            return error(err)

    @app.get("/health")
    async def health(request: Request):
        # Liveness for anyone who reaches the door; the details (versions, learner, alerts) for the admin.
        if not is_admin(dict(request.headers), service.scfg.admin_token):
            return {"status": "ok"}
        return {"status": "ok", "model": service.scfg.model_name, "version": service.controller.served_version(),
                "uptime_s": time.time() - service.started,
                "engines": service.pool.stats() if hasattr(service.pool, "stats") else None,
                "learner": service.controller.status()}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(m.registry.render(), media_type=CONTENT_TYPE)

    def admin_denied(request: Request) -> JSONResponse | None:
        denied = check_admin(dict(request.headers), service.scfg.admin_token)
        if denied is None:
            return None
        return error(P.RequestError(denied.message, status=denied.status,
                                    kind="authentication_error" if denied.status == 401 else "permission_error"))

    @app.get("/admin/versions")
    async def versions(request: Request):
        if (resp := admin_denied(request)) is not None:
            return resp
        tenant = request.query_params.get("tenant")
        try:
            return JSONResponse(await run_in_threadpool(service.controller.versions, tenant=tenant))
        except P.RequestError as err:
            return error(err)

    @app.post("/admin/rollback")
    async def rollback(request: Request):
        if (resp := admin_denied(request)) is not None:
            return resp
        try:
            body = await body_of(request)
            v = body.get("version") if isinstance(body, dict) else None
            if isinstance(v, bool) or not isinstance(v, int):
                raise P.RequestError("send {\"version\": N}, N a kept version (see /admin/versions)", "version")
            tenant = request.query_params.get("tenant")
            return JSONResponse(await run_in_threadpool(service.controller.rollback, v, tenant=tenant))
        except P.RequestError as err:
            return error(err)

    @app.get("/admin/tenants")
    async def tenants(request: Request):
        if (resp := admin_denied(request)) is not None:
            return resp
        if service.tenants is None:
            return error(P.RequestError("tenants are off (serve.tenants.enabled=false)", status=409,
                                        kind="conflict"))
        stats = service.pool.stats().get("tenant_adapters", {}) if hasattr(service.pool, "stats") else {}
        return JSONResponse({"tenants": await run_in_threadpool(service.tenants.listing), **stats})

    @app.post("/admin/learn")
    async def learn_now(request: Request):
        if (resp := admin_denied(request)) is not None:
            return resp
        tenant = request.query_params.get("tenant")
        try:
            return JSONResponse(await run_in_threadpool(service.controller.learn_now, tenant=tenant))
        except P.RequestError as err:
            return error(err)

    return Guard(app, policy, m)


__all__ = ["Controller", "Service", "ServiceConfig", "build_app"]
