"""The server's front door: what a request must be before the API sees it, and a count of every answer.

Pure ASGI middleware around the FastAPI app. In this order, each refusal an
OpenAI-style JSON error that names what to change:

    Host header one of serve.allowed_hosts      else 400 (a DNS-rebinding page reaches
                                                 loopback under its own name)
    Origin, when sent, one of serve.cors_origins else 403 (a page the operator has open
                                                 must not post prompts or ratings)
    /v1/*: a valid API key                        else 401 (when serve.api_keys_file is set)
    /v1/*: the identity's rate and in-flight caps else 429 with Retry-After
    /metrics with API keys on: the admin token    else 401
    a body: Content-Type application/json         else 415 (text/plain needs no CORS preflight)
    a body: at most serve.limits.max_body_bytes   else 413, decided on Content-Length before a
                                                 byte is read (and while reading chunked
                                                 bodies); a refused body is dropped unread
                                                 (up to 64 MiB, so the client sees the 413),
                                                 never stored or parsed
    a body: all there within serve.limits.body_timeout_s
                                                 else 408 and the connection closed (a slow
                                                 sender holds an in-flight slot)

Allowed origins get CORS headers (and their preflights an answer); no other
response carries any. Every answer, refusals made here and 5xx included, is
counted in ttrl_requests_total{endpoint, code}; an exception the app did not
handle becomes a 500 JSON body instead of a dropped connection. The
request's identity is handed to the app in `scope["state"]["identity"]`.

Never reads a body it is about to refuse, never logs a key. Pure Python.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import traceback
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from ttrl.serve.auth import ANONYMOUS, ApiKeys, bearer, is_admin
from ttrl.serve.limits import ClientLimits

# Path -> the `endpoint` label of the request counters (a fixed set: unknown paths are "other").
ENDPOINTS = {"/v1/completions": "completions", "/v1/chat/completions": "chat", "/v1/models": "models",
             "/v1/feedback": "feedback", "/health": "health", "/metrics": "metrics"}
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
_BODY_METHODS = {"POST", "PUT", "PATCH"}


def endpoint_of(path: str) -> str:
    if path in ENDPOINTS:
        return ENDPOINTS[path]
    return "admin" if path.startswith("/admin/") else "other"


def host_name(host_header: str) -> str:
    """The name in a Host header: port dropped, IPv6 brackets dropped, lower case, no trailing dot."""
    h = host_header.strip().lower()
    if h.startswith("["):
        h = h[1:h.find("]")] if "]" in h else h[1:]
    elif h.count(":") == 1:
        h = h.split(":", 1)[0]
    return h.rstrip(".")


def allowed_host_set(configured: Iterable[str], serve_host: str) -> frozenset[str] | None:
    """The Host names answered: loopback names, serve.host and serve.allowed_hosts; None = any."""
    configured = list(configured)
    if "*" in configured:
        return None
    return frozenset(host_name(n) for n in [*LOOPBACK_NAMES, serve_host, *configured] if n)


@dataclass
class GuardPolicy:
    allowed_hosts: frozenset[str] | None  # None: any Host
    cors_origins: frozenset[str]
    max_body_bytes: int
    api_keys: ApiKeys | None  # None: no keys, every client is `anonymous`
    admin_token: str | None
    limits: ClientLimits | None
    body_timeout_s: float = 30.0  # serve.limits.body_timeout_s


@dataclass(frozen=True)
class Refusal:
    status: int
    message: str
    param: str | None = None
    kind: str = "invalid_request_error"
    code: str | None = None
    reason: str = "other"  # the ttrl_refusals_total label
    headers: tuple[tuple[str, str], ...] = ()


def error_body(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
               code: str | None = None) -> bytes:
    return json.dumps({"error": {"message": message, "type": kind, "param": param, "code": code}}).encode()


class Guard:
    def __init__(self, app: Callable[..., Awaitable[None]], policy: GuardPolicy, metrics: Any):
        self.app, self.p, self.m = app, policy, metrics

    # ── the checks ────────────────────────────────────────────────────────
    def _front(self, method: str, path: str, headers: dict[str, str], origin: str | None) -> Refusal | None:
        if self.p.allowed_hosts is not None:
            host = host_name(headers.get("host", ""))
            if host not in self.p.allowed_hosts:
                shown = headers.get("host", "")[:100]
                return Refusal(400, f"Host '{shown}' is not served here (serve.allowed_hosts)", "Host",
                               reason="host")
        if origin is not None and origin not in self.p.cors_origins:
            return Refusal(403, f"requests from the web origin '{origin[:100]}' are refused (serve.cors_origins)",
                           "Origin", "permission_error", reason="origin")
        if path == "/metrics" and self.p.api_keys is not None and not is_admin(headers, self.p.admin_token):
            return Refusal(401, "with API keys on, /metrics needs the admin token: send 'Authorization: Bearer "
                                "<token>'", None, "invalid_request_error", "invalid_api_key", reason="auth")
        return None

    def _identify(self, headers: dict[str, str]) -> tuple[str | None, Refusal | None]:
        if self.p.api_keys is None:
            return ANONYMOUS, None
        name = self.p.api_keys.identify(bearer(headers))
        if name is None:
            missing = bearer(headers) is None
            msg = ("no API key: send 'Authorization: Bearer <key>'" if missing
                   else "the API key is not valid")
            return None, Refusal(401, msg, None, "invalid_request_error", "invalid_api_key", reason="auth",
                                 headers=(("www-authenticate", "Bearer"),))
        return name, None

    def _body_headers(self, method: str, headers: dict[str, str]) -> Refusal | None:
        length = headers.get("content-length")
        has_body = "transfer-encoding" in headers or (length is not None and length.strip() not in ("", "0"))
        if method not in _BODY_METHODS or not has_body:
            return None
        media = headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if media != "application/json":
            return Refusal(415, f"Content-Type '{media or '(none)'}' is not accepted: send application/json",
                           "Content-Type", reason="content_type")
        if length is not None:
            try:
                n = int(length)
            except ValueError:
                return Refusal(400, "Content-Length is not a number", "Content-Length", reason="body_size")
            if n > self.p.max_body_bytes:
                return self._too_large(n)
        return None

    def _too_large(self, n: int | None) -> Refusal:
        size = f"{n} bytes" if n is not None else "more bytes than allowed"
        # Connection: close, since the unread rest of the body must not be taken for the next request.
        return Refusal(413, f"the request body has {size}; serve.limits.max_body_bytes={self.p.max_body_bytes}",
                       "body", "invalid_request_error", "request_too_large", reason="body_size",
                       headers=(("connection", "close"),))

    async def _read(self, receive: Callable[[], Awaitable[dict]]) -> bytes | Refusal:
        """The whole body, or the refusal: over the size limit (what is read past it is dropped, not kept), or
        not all there within serve.limits.body_timeout_s."""
        try:
            got = await asyncio.wait_for(self._read_all(receive), timeout=self.p.body_timeout_s)
        except TimeoutError:
            return Refusal(408, f"the request body did not arrive within serve.limits.body_timeout_s="
                                f"{self.p.body_timeout_s:g}s", "body", "invalid_request_error", "request_timeout",
                           reason="body_timeout", headers=(("connection", "close"),))
        return self._too_large(None) if got is None else got

    async def _read_all(self, receive: Callable[[], Awaitable[dict]]) -> bytes | None:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.p.max_body_bytes:
                await _drain(receive, message)
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)

    # ── ASGI ──────────────────────────────────────────────────────────────
    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        path, method = scope.get("path", ""), scope.get("method", "GET")
        endpoint = endpoint_of(path)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        origin = headers.get("origin")
        cors = origin if origin is not None and origin in self.p.cors_origins else None
        status: dict[str, int | None] = {"code": None}

        async def tracked(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                if cors is not None:
                    message = {**message, "headers": [*message.get("headers", []),
                                                      (b"access-control-allow-origin", cors.encode("latin-1")),
                                                      (b"vary", b"Origin")]}
            await send(message)

        client, admitted = None, False
        try:
            if cors is not None and method == "OPTIONS" and "access-control-request-method" in headers:
                await self._preflight(tracked)
                return
            refusal = self._front(method, path, headers, origin)
            if refusal is None and path.startswith("/v1/"):
                client, refusal = self._identify(headers)
                if refusal is None and self.p.limits is not None:
                    limited = self.p.limits.acquire(client)
                    if limited is None:
                        admitted = True
                    else:
                        refusal = Refusal(429, limited.message, None, "rate_limit_error", "rate_limit_exceeded",
                                          reason=limited.key.rsplit(".", 1)[-1],
                                          headers=(("retry-after", str(limited.retry_after_s)),))
            if refusal is None:
                refusal = self._body_headers(method, headers)
                if refusal is not None and refusal.reason == "body_size" and "100-continue" not in \
                        headers.get("expect", "").lower():
                    # The client is sending it anyway: swallow it unread (bounded in bytes and in time), or it
                    # would see a reset instead of the 413. With Expect: 100-continue it never sends the body.
                    try:
                        await asyncio.wait_for(_drain(receive), timeout=self.p.body_timeout_s)
                    except TimeoutError:
                        pass  # a slow sender: the 413 goes now, and its connection is closed
            body = b""
            if refusal is None:
                got = await self._read(receive)
                if isinstance(got, Refusal):
                    refusal = got
                else:
                    body = got
            if refusal is not None:
                await self._refuse(tracked, refusal)
                return
            scope.setdefault("state", {})["identity"] = client
            await self.app(scope, _replay(body, receive), tracked)
        except Exception as err:  # noqa: BLE001 - the client gets an answer, the operator the traceback
            print(f"ttrl-serve: unhandled error on {method} {path}: {type(err).__name__}: {err}\n"
                  f"{traceback.format_exc()}", file=sys.stderr, flush=True)
            if status["code"] is None:
                try:
                    await self._send(tracked, 500, error_body(500, f"internal error ({type(err).__name__}); the "
                                                                   "server logged it", None, "server_error"))
                except Exception:  # noqa: BLE001 - the client is gone
                    pass
        finally:
            if admitted and self.p.limits is not None:
                self.p.limits.release(client)
            self.m.requests.inc(endpoint=endpoint, code=str(status["code"] or 500))
            self.m.latency.observe(time.perf_counter() - t0, endpoint=endpoint)

    async def _refuse(self, send: Callable, r: Refusal) -> None:
        self.m.refusals.inc(reason=r.reason)
        await self._send(send, r.status, error_body(r.status, r.message, r.param, r.kind, r.code), r.headers)

    async def _preflight(self, send: Callable) -> None:
        await send({"type": "http.response.start", "status": 204, "headers": [
            (b"access-control-allow-methods", b"GET, POST, OPTIONS"),
            (b"access-control-allow-headers", b"Authorization, Content-Type"),
            (b"access-control-max-age", b"600"), (b"content-length", b"0")]})
        await send({"type": "http.response.body", "body": b""})

    @staticmethod
    async def _send(send: Callable, status: int, body: bytes, headers: Iterable[tuple[str, str]] = ()) -> None:
        raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        raw += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers]
        await send({"type": "http.response.start", "status": status, "headers": raw})
        await send({"type": "http.response.body", "body": body})


# Past this many bytes a refused body is no longer drained: the connection is closed under the client.
DRAIN_MAX_BYTES = 64 << 20


async def _drain(receive: Callable[[], Awaitable[dict]], last: dict | None = None) -> None:
    """Receive and drop the rest of a refused body, up to DRAIN_MAX_BYTES."""
    dropped = 0
    while (last is None or last.get("more_body", False)) and dropped < DRAIN_MAX_BYTES:
        last = await receive()
        if last["type"] == "http.disconnect":
            return
        dropped += len(last.get("body", b""))


def _replay(body: bytes, receive: Callable) -> Callable[[], Awaitable[dict]]:
    """A receive() that hands the app the body already read, then waits on the real one (disconnects)."""
    given = False

    async def again() -> dict:
        nonlocal given
        if not given:
            given = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return again


__all__ = ["ENDPOINTS", "Guard", "GuardPolicy", "Refusal", "allowed_host_set", "endpoint_of", "error_body",
           "host_name"]
