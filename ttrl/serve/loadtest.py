"""A bounded load test of a local `ttrl-serve`: N concurrent clients for T seconds.

    python -m ttrl.serve.loadtest --url http://127.0.0.1:8000 --clients 8 --seconds 30

Each client sends one request at a time (completions, cycling through the
prompts) until the time is up, then stops; the report gives requests/s,
failures and latency percentiles (overall and per served version). Only
loopback URLs are accepted: this is a tool for testing your own server.
A server with API keys takes the key from $TTRL_API_KEY (never the command
line, where `ps` shows it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from ttrl.serve.config import is_loopback


@dataclass
class Result:
    client: int
    prompt: str
    t_start: float  # time.time()
    t_end: float
    status: int  # HTTP status; 0 = no response (connection error, timeout)
    id: str | None = None
    version: int | None = None
    text: str | None = None
    error: str | None = None

    @property
    def latency(self) -> float:
        return self.t_end - self.t_start

    @property
    def ok(self) -> bool:
        return self.status == 200


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), nearest-rank; NaN for no values."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = max(0, min(len(s) - 1, int(round(q / 100 * len(s) + 0.5)) - 1))
    return s[k]


def summarize(results: Sequence[Result], wall_s: float) -> dict[str, Any]:
    lat = [r.latency for r in results if r.ok]
    out: dict[str, Any] = {
        "requests": len(results), "ok": len(lat), "failed": sum(not r.ok for r in results),
        "wall_s": wall_s, "rps": len(lat) / wall_s if wall_s > 0 else float("nan"),
        "p50_s": percentile(lat, 50), "p90_s": percentile(lat, 90), "p99_s": percentile(lat, 99),
        "max_s": max(lat, default=float("nan")),
        "errors": sorted({f"{r.status} {r.error}" for r in results if not r.ok})[:10],
    }
    by_version: dict[str, Any] = {}
    for v in sorted({r.version for r in results if r.ok and r.version is not None}):
        lv = [r.latency for r in results if r.ok and r.version == v]
        by_version[f"v{v}"] = {"ok": len(lv), "p50_s": percentile(lv, 50), "p99_s": percentile(lv, 99)}
    out["by_version"] = by_version
    return out


def _version(body: dict) -> int | None:
    fp = body.get("system_fingerprint") or ""
    return int(fp[6:]) if fp.startswith("ttrl-v") and fp[6:].isdigit() else None


async def one_request(client: Any, url: str, prompt: str, cid: int = 0, extra: dict | None = None,
                      timeout: float = 120.0, headers: dict | None = None) -> Result:
    t0 = time.time()
    try:
        resp = await client.post(f"{url}/v1/completions", json={"prompt": prompt, **(extra or {})}, timeout=timeout,
                                 headers=headers)
        t1 = time.time()
        if resp.status_code != 200:
            return Result(cid, prompt, t0, t1, resp.status_code, error=resp.text[:200])
        body = resp.json()
        return Result(cid, prompt, t0, t1, 200, body["id"], _version(body), body["choices"][0]["text"])
    except Exception as err:  # noqa: BLE001 - a failed request is a result too
        return Result(cid, prompt, t0, time.time(), 0, error=f"{type(err).__name__}: {err}")


async def run_load(url: str, prompts: Sequence[str], clients: int = 8, seconds: float = 30.0,
                   extra: dict | None = None, until: Callable[[], bool] | None = None,
                   max_seconds: float | None = None,
                   headers: Sequence[dict] | dict | None = None) -> tuple[list[Result], float]:
    """Clients send requests back to back for `seconds` (and, if given, until `until()` is true,
    but never past `max_seconds`). `headers`: every client's, or one dict per client (its API key).
    Returns every result and the wall time."""
    import httpx

    if not is_loopback(urlparse(url).hostname or ""):
        raise ValueError(f"{url} is not a loopback address; the load test only targets a local server")
    results: list[Result] = []
    start = hard = 0.0  # set once the HTTP client is up (below)

    def done() -> bool:
        now = time.monotonic()
        if now >= hard:
            return True
        return now - start >= seconds and (until is None or until())

    def headers_of(cid: int) -> dict | None:
        if headers is None or isinstance(headers, dict):
            return headers
        return headers[cid % len(headers)]

    async def client(cid: int, http: Any) -> None:
        i = cid
        while not done():
            results.append(await one_request(http, url, prompts[i % len(prompts)], cid, extra,
                                             headers=headers_of(cid)))
            i += clients

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(limits=limits) as http:
        # The window opens once the client exists, just before the clients start: with the clock started
        # before the set-up, a 1-second window on a loaded 2-core box (CI) once closed before any request
        # was sent (the bench's serve_guard test: no latency to report). Set-up is 45 ms on an idle box.
        start = time.monotonic()
        hard = start + (max_seconds if max_seconds is not None else seconds)
        await asyncio.gather(*(client(c, http) for c in range(clients)))
    return results, time.monotonic() - start


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m ttrl.serve.loadtest", description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--votes", type=int, default=None)
    ap.add_argument("--prompt", action="append", help="a prompt (repeatable); default: arithmetic sums")
    ap.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = ap.parse_args(argv)
    prompts = args.prompt or [f"{a}+{b}+{c}=" for a, b, c in zip(range(10, 90, 7), range(13, 99, 5), range(21, 99, 3))]
    extra = {"votes": args.votes} if args.votes else None
    key = os.environ.get("TTRL_API_KEY")
    results, wall = asyncio.run(run_load(args.url.rstrip("/"), prompts, args.clients, args.seconds, extra,
                                         headers={"Authorization": f"Bearer {key}"} if key else None))
    s = summarize(results, wall)
    if args.json:
        print(json.dumps(s, indent=1))
    else:
        print(f"{s['ok']}/{s['requests']} ok in {wall:.1f}s: {s['rps']:.1f} req/s, p50 {s['p50_s'] * 1e3:.0f} ms, "
              f"p90 {s['p90_s'] * 1e3:.0f} ms, p99 {s['p99_s'] * 1e3:.0f} ms, max {s['max_s'] * 1e3:.0f} ms; "
              f"failed {s['failed']} {s['errors']}")
    if any(e.startswith("429") for e in s["errors"]):
        print("(429: the server's per-identity limits, serve.limits.requests_per_minute and max_in_flight, "
              "apply to a load test too: raise them on the server, or give clients their own keys)")
    sys.exit(0 if s["failed"] == 0 else 1)


if __name__ == "__main__":
    main()
