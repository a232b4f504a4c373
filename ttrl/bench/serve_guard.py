"""`make bench` section serve_guard: what the serving front door costs a request.

One uvicorn server on loopback runs the real HTTP app (`ttrl.serve.app`)
twice over, in the same process: behind the full guard (API keys, Host
check, per-identity rate and in-flight limits, strict JSON) and behind a
guard that checks nothing (no keys, any Host, no limits). The engine is
the stand-in of `ttrl.serve.testing` answering at once, so what is measured
is the HTTP path itself, the part the guard adds to; the load is the
project's load test (`ttrl.serve.loadtest.run_load`), alternating the two
setups so that drift on a shared machine hits both. It also times the
guard alone on one request, in process (microseconds, no network). Never
used by the server; never starts Ray or vLLM.
"""

from __future__ import annotations

import asyncio
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from ttrl.distributed.ports import free_port


def bench_serve_guard(seconds: float = 5.0, clients: int = 8, rounds: int = 2) -> dict[str, Any]:
    import uvicorn
    from omegaconf import OmegaConf

    from ttrl.serve.app import Service, ServiceConfig, build_app
    from ttrl.serve.auth import ApiKeys
    from ttrl.serve.engines import EnginePool
    from ttrl.serve.guard import GuardPolicy, allowed_host_set
    from ttrl.serve.limits import ClientLimits
    from ttrl.serve.loadtest import run_load, summarize
    from ttrl.serve.protocol import Defaults
    from ttrl.serve.store import Store
    from ttrl.serve.testing import FakeDeath, FakeEngine, FakeTokenizer, boxed

    class _Controller:
        def served_version(self) -> int:
            return 0

        def notify(self, n_new: int) -> None:
            pass

    keys = {f"client{i}": f"client{i}-bench-key-0123456789" for i in range(clients)}
    headers = [{"Authorization": f"Bearer {k}"} for k in keys.values()]
    policies = {
        "on": GuardPolicy(allowed_hosts=allowed_host_set([], "127.0.0.1"), cors_origins=frozenset(),
                          max_body_bytes=1 << 20, api_keys=ApiKeys(keys), admin_token=None,
                          limits=ClientLimits(1e9, 10**9, 64)),
        "off": GuardPolicy(allowed_hosts=None, cors_origins=frozenset(), max_body_bytes=1 << 30, api_keys=None,
                           admin_token=None, limits=None),
    }
    prompts = [f"{a}+{b}=" for a, b in zip(range(10, 60), range(20, 70))]
    out: dict[str, list] = {"on": [], "off": []}

    async def main(tmp: Path) -> None:
        for r in range(rounds):
            for mode in ("off", "on") if r % 2 == 0 else ("on", "off"):
                store = Store(tmp / f"{mode}{r}.sqlite")
                pool = EnginePool([FakeEngine(lambda ids, v, j: boxed("7"), delay=0.0)], 0,
                                  death_errors=(FakeDeath,))
                await pool.start()
                defaults = Defaults(temperature=1.0, top_p=1.0, max_tokens=16, votes=1, max_model_len=256,
                                    vocab_size=300)
                model_cfg = OmegaConf.create({"template": "plain", "prompt_template": "{problem}",
                                              "system_prompt": None})
                svc = Service(ServiceConfig("bench", defaults, 30.0, None), FakeTokenizer(), model_cfg, pool, store,
                              _Controller())
                port = free_port()
                server = uvicorn.Server(uvicorn.Config(build_app(svc, policies[mode]), host="127.0.0.1", port=port,
                                                       log_level="warning", access_log=False, lifespan="off"))
                task = asyncio.create_task(server.serve())
                while not server.started:
                    await asyncio.sleep(0.02)
                results, wall = await run_load(f"http://127.0.0.1:{port}", prompts, clients=clients,
                                               seconds=seconds, headers=headers if mode == "on" else None)
                out[mode].append(summarize(results, wall))
                server.should_exit = True
                await task
                await pool.stop()
                svc.close()
                store.close()

    # The server and the clients share this event loop, as they would share a 2-core box.
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        thread = threading.Thread(target=lambda: asyncio.run(main(Path(tmp))))
        thread.start()
        thread.join()
    res: dict[str, Any] = {"serve_guard.wall_s": time.perf_counter() - t0, "serve_guard.clients": clients}
    for mode, runs in out.items():
        res[f"serve_guard.rps_{mode}"] = sum(s["rps"] for s in runs) / len(runs)
        res[f"serve_guard.p99_ms_{mode}"] = 1e3 * sum(s["p99_s"] for s in runs) / len(runs)
        res[f"serve_guard.failed_{mode}"] = sum(s["failed"] for s in runs)
    res["serve_guard_overhead"] = res["serve_guard.rps_off"] / res["serve_guard.rps_on"] - 1
    res |= _per_request(policies, keys)
    return res


def _per_request(policies: dict[str, Any], keys: dict[str, str], n: int = 20000) -> dict[str, float]:
    """Microseconds the guard itself spends on one admitted request (no network, an app that answers at once)."""
    from ttrl.serve.app import ServeMetrics
    from ttrl.serve.guard import Guard

    body = b'{"prompt": "12+34=", "max_tokens": 16}'
    key = next(iter(keys.values()))
    headers = [(b"host", b"127.0.0.1:8000"), (b"content-type", b"application/json"),
               (b"content-length", str(len(body)).encode()), (b"authorization", f"Bearer {key}".encode()),
               (b"user-agent", b"bench"), (b"accept", b"*/*")]

    async def app(scope, receive, send):
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        pass

    async def timed(guard) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            await guard({"type": "http", "path": "/v1/completions", "method": "POST", "headers": headers},
                        receive, send)
        return (time.perf_counter() - t0) / n * 1e6

    out: dict[str, list[float]] = {"on": [], "off": []}
    for mode in ("off", "on", "off", "on"):
        out[mode].append(asyncio.run(timed(Guard(app, policies[mode], ServeMetrics(lambda: 0, lambda: 0)))))
    return {f"serve_guard.us_per_request_{m}": min(v) for m, v in out.items()}


__all__ = ["bench_serve_guard"]
