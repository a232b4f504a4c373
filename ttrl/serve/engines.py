"""The serving engines behind the HTTP server: request batching, hot swaps, recovery.

Each rollout engine is a Ray actor whose methods run one at a time, in the
order they were submitted. `EnginePool` (on the server's event loop) keeps
at most one batch in flight per engine: requests that arrive meanwhile wait
in one queue and go out together as the next batch, so the batch grows with
the load. A batch mixes sampling parameters (vLLM takes one set per
prompt), so a client that changes `seed` on every request still shares
batches with everyone; and when more requests wait than a batch holds, the
batch is filled round-robin over the clients' identities, each client's
oldest first: one client's backlog cannot starve another. A batch that
fails (not by an engine's death) is retried one request at a time, so a
bad request fails alone.

With tenants (`max_adapters` > 0, serve.tenants) each request carries its
tenant's adapter (name, int id, folder) or None (the shared version), the
engine call is `generate_tenants`, and a batch holds requests of at most
`max_adapters` distinct tenants: an engine keeps that many tenant adapters
resident, and a batch with more would make vLLM unload one a running
request needs. The others wait for the next batch, their order kept. The
adapter loads and unloads each call reports are summed here.

A hot swap (`swap`) walks the engines one at a time: the engine takes no
new batch, the `load_weights` call is submitted at once and so runs right
after the batch in flight, which finishes on the old weights; every later
batch runs on the new ones. A swap therefore always falls between two
engine calls, never inside a request, and every answer is tagged with the
version that produced it. With several engines the others keep serving;
with one, requests wait in the queue for the length of the load (no request
fails). If any engine fails to load, every engine already swapped is given
the old version back and the swap raises `SwapFailed`: the pool never serves
two versions after a swap. An engine that dies is restarted by Ray; the pool reloads the
served version into it from disk and retries its batch.

Never touches the trainer or the staging engine.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ttrl.serve.auth import ANONYMOUS


class Overloaded(RuntimeError):
    """The request queue is full (HTTP 503)."""


class QueueShare(RuntimeError):
    """One identity has serve.limits.max_queued_prompts prompts waiting already (HTTP 429)."""


class EngineUnavailable(RuntimeError):
    """No engine could run the request (HTTP 503)."""


class SwapFailed(RuntimeError):
    """An engine could not load the new version; every engine is back on the old one."""


@dataclass
class _Req:
    ids: list[int]
    key: tuple  # (n, temperature, top_p, top_k, max_tokens, seed)
    fut: asyncio.Future
    client: str = "anonymous"
    adapter: tuple | None = None  # (tenant, int id, adapter folder) with tenants on; None = the shared version
    attempts: int = 0
    solo: bool = False  # its batch failed: run it alone, so a bad request fails by itself
    t_enqueue: float = field(default_factory=time.perf_counter)


@dataclass
class _Engine:
    handle: Any
    index: int
    version: int
    busy: bool = False
    alive: bool = True
    loading: bool = False
    lost: bool = False  # did not come back from a restart: out of service for good
    restarts: int = 0
    resident: list[int] = field(default_factory=list)  # tenant adapter ids the engine held after its last call


class EnginePool:
    def __init__(self, engines: list[Any], version: int, *, max_batch: int = 64, max_queue: int = 1024,
                 blobs_for: Callable[[int], list[bytes]] | None = None, max_retries: int = 2,
                 recover_timeout_s: float = 600.0, on_batch: Callable[[int, float], None] | None = None,
                 on_event: Callable[..., None] | None = None,
                 death_errors: tuple[type[BaseException], ...] | None = None, max_adapters: int = 0,
                 on_adapters: Callable[[int, int], None] | None = None, max_client_queue: int | None = None):
        if not engines:
            raise ValueError("EnginePool needs at least one engine")
        self.engines = [_Engine(h, i, version) for i, h in enumerate(engines)]
        self.version = version  # the served version: what a restarted engine is given
        self.max_batch, self.max_queue, self.max_retries = max_batch, max_queue, max_retries
        # Prompts one identity may have waiting (None: the whole queue): what keeps two busy keys from filling
        # the queue that every other client is then refused from.
        self.max_client_queue = max_client_queue
        self.recover_timeout_s = recover_timeout_s
        self.blobs_for = blobs_for
        self.on_batch = on_batch
        self.on_event = on_event or (lambda kind, **kw: None)
        # Tenants: distinct tenant adapters per batch (0 = tenants off), and what to tell of (loads, unloads).
        self.max_adapters = max_adapters
        self.on_adapters = on_adapters
        self.adapter_loads = self.adapter_unloads = 0
        self.queue: deque[_Req] = deque()
        if death_errors is None:  # an engine call failing with one of these means the actor died
            from ray.exceptions import RayActorError

            death_errors = (RayActorError,)
        self.death_errors = death_errors
        self.batches = 0
        self.swaps: deque[dict[str, Any]] = deque(maxlen=20)  # the last swaps' stats (/admin/versions shows them)
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()
        self._swap_lock: asyncio.Lock | None = None
        self._stopped = False

    # ── lifecycle ─────────────────────────────────────────────────────────
    async def start(self) -> None:
        self._wake = asyncio.Event()
        self._swap_lock = asyncio.Lock()
        self._task = asyncio.create_task(self._dispatch(), name="ttrl-dispatch")

    async def stop(self) -> None:
        self._stopped = True
        if self._wake:
            self._wake.set()
        if self._task:
            await asyncio.wait([self._task], timeout=5)
        while self.queue:
            r = self.queue.popleft()
            if not r.fut.done():
                r.fut.set_exception(EngineUnavailable("the server is shutting down"))

    def _spawn(self, coro) -> None:
        t = asyncio.create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    # ── requests ──────────────────────────────────────────────────────────
    async def generate(self, ids: list[int], key: tuple, client: str = "anonymous",
                       adapter: tuple | None = None) -> tuple[list[dict], int]:
        """Samples for one prompt ([n] engine dicts) and the weights version that drew them.

        `adapter`: with tenants, the tenant's (name, int id, folder), or None for the shared version.
        """
        if self._stopped:
            raise EngineUnavailable("the server is shutting down")
        if all(e.lost for e in self.engines):
            raise EngineUnavailable("no rollout engine is alive")
        if len(self.queue) >= self.max_queue:
            self._drop_abandoned()  # not held against others until the next batch would drop them
        if len(self.queue) >= self.max_queue:
            raise Overloaded(f"{len(self.queue)} requests are queued (serve.max_queue); retry later")
        share = self.max_client_queue
        # Without API keys every client is the one anonymous identity: a share of the queue would only shrink it.
        if share is not None and client != ANONYMOUS and len(self.queue) >= share and \
                sum(1 for r in self.queue if r.client == client and not r.fut.done()) >= share:
            raise QueueShare(f"{share} of this client's prompts are waiting already "
                             f"(serve.limits.max_queued_prompts={share}); retry later")
        req = _Req(ids, key, asyncio.get_running_loop().create_future(), client, adapter)
        self.queue.append(req)
        assert self._wake is not None, "EnginePool.start() first"
        self._wake.set()
        return await req.fut

    def _free_engine(self) -> _Engine | None:
        free = [e for e in self.engines if e.alive and not e.busy and not e.loading]
        return free[0] if free else None

    def _drop_abandoned(self) -> None:
        """Requests whose callers gave up (cancelled, timed out, left) leave the queue."""
        self.queue = deque(r for r in self.queue if not r.fut.done())

    def _take_batch(self) -> list[_Req]:
        """The next batch: up to max_batch waiting requests, round-robin over clients, each one's oldest first."""
        self._drop_abandoned()
        live = self.queue
        if not live:
            return []
        solo = next((r for r in live if r.solo), None)
        if solo is not None:
            batch = [solo]
        else:
            per_client: dict[str, deque[_Req]] = {}
            for r in live:
                per_client.setdefault(r.client, deque()).append(r)
            batch = []
            tenants: set[int] = set()
            while per_client and len(batch) < self.max_batch:
                for c in list(per_client):
                    r = per_client[c].popleft()
                    if self._fits(r, tenants):
                        batch.append(r)
                    else:  # a tenant beyond max_adapters: this client's later requests wait too (order kept)
                        per_client[c].clear()
                    if not per_client[c]:
                        del per_client[c]
                    if len(batch) >= self.max_batch:
                        break
        taken = {id(r) for r in batch}
        self.queue = deque(r for r in live if id(r) not in taken)
        return batch

    def _fits(self, r: _Req, tenants: set[int]) -> bool:
        """Whether `r` may join a batch whose tenant adapter ids are `tenants` (added when it may)."""
        if not self.max_adapters or r.adapter is None or r.adapter[1] in tenants:
            return True
        if len(tenants) >= self.max_adapters:
            return False
        tenants.add(r.adapter[1])
        return True

    async def _dispatch(self) -> None:
        assert self._wake is not None
        while not self._stopped:
            await self._wake.wait()
            self._wake.clear()
            while self.queue and not self._stopped:
                eng = self._free_engine()
                if eng is None:
                    break
                batch = self._take_batch()
                if not batch:
                    break
                eng.busy = True
                self._spawn(self._run_batch(eng, batch))

    async def _run_batch(self, eng: _Engine, batch: list[_Req]) -> None:
        version = eng.version
        t0 = time.perf_counter()
        try:
            if self.max_adapters:
                res = await eng.handle.generate_tenants.remote([r.ids for r in batch], [r.key for r in batch],
                                                               [r.adapter for r in batch])
                outs = res["outputs"]
                self._count_adapters(eng, res)
            else:
                outs = await eng.handle.generate_each.remote([r.ids for r in batch], [r.key for r in batch])
            self.batches += 1
            if self.on_batch:
                self.on_batch(len(batch), time.perf_counter() - t0)
            for r, o in zip(batch, outs):
                if not r.fut.done():
                    r.fut.set_result((o, version))
        except Exception as err:  # noqa: BLE001 - every waiter gets an answer
            if isinstance(err, self.death_errors):
                eng.alive = False
                eng.restarts += 1
                self.on_event("engine_died", engine=eng.index, error=type(err).__name__)
                print(f"ttrl-serve: rollout engine {eng.index} died ({type(err).__name__}); restarting it and "
                      f"retrying {len(batch)} request(s)", file=sys.stderr, flush=True)
                retry = []
                for r in batch:
                    r.attempts += 1
                    if r.fut.done():
                        continue
                    if r.attempts > self.max_retries:
                        r.fut.set_exception(EngineUnavailable(f"rollout engine failed {r.attempts} times"))
                    else:
                        retry.append(r)
                self.queue.extendleft(reversed(retry))
                self._spawn(self._recover(eng))
            elif len(batch) > 1:
                # Not a death: maybe one request the engine refused. Each goes again alone, so only it fails.
                for r in batch:
                    r.solo = True
                self.queue.extendleft(reversed([r for r in batch if not r.fut.done()]))
            else:
                for r in batch:
                    if not r.fut.done():
                        r.fut.set_exception(err)
        finally:
            eng.busy = False
            if self._wake:
                self._wake.set()

    def _count_adapters(self, eng: _Engine, res: dict[str, Any]) -> None:
        loads, unloads = int(res.get("loads", 0)), int(res.get("unloads", 0))
        self.adapter_loads += loads
        self.adapter_unloads += unloads
        eng.resident = list(res.get("resident", []))
        if self.on_adapters is not None and (loads or unloads):
            self.on_adapters(loads, unloads)

    # ── recovery ──────────────────────────────────────────────────────────
    async def _recover(self, eng: _Engine) -> None:
        """Wait for Ray to restart the engine, give it the served weights, put it back in service."""
        deadline = time.monotonic() + self.recover_timeout_s
        while True:
            try:
                info = await asyncio.wait_for(eng.handle.info.remote(), timeout=30)
                break
            except Exception as err:  # noqa: BLE001
                if time.monotonic() > deadline:
                    eng.lost = True
                    self.on_event("engine_lost", engine=eng.index, error=str(err))
                    print(f"ttrl-serve: rollout engine {eng.index} did not come back: {err}", file=sys.stderr)
                    self._fail_if_none_alive()
                    return
                await asyncio.sleep(1.0)
        try:
            target = self.version
            if info.get("weights_version") != target and self.blobs_for is not None:
                blobs = await asyncio.get_running_loop().run_in_executor(None, self.blobs_for, target)
                await eng.handle.load_weights.remote(blobs, target)
            eng.version = target
            eng.alive = True
            self.on_event("engine_recovered", engine=eng.index, version=target)
            print(f"ttrl-serve: rollout engine {eng.index} is back, serving v{target}", file=sys.stderr, flush=True)
        except Exception as err:  # noqa: BLE001
            eng.lost = True
            self.on_event("engine_lost", engine=eng.index, error=str(err))
            self._fail_if_none_alive()
        finally:
            if self._wake:
                self._wake.set()

    def _fail_if_none_alive(self) -> None:
        if any(e.alive for e in self.engines):
            return
        while self.queue:
            r = self.queue.popleft()
            if not r.fut.done():
                r.fut.set_exception(EngineUnavailable("no rollout engine is alive"))

    # ── hot swap ──────────────────────────────────────────────────────────
    async def swap(self, version: int, blobs: list[bytes]) -> dict[str, Any]:
        """Load `version` into every engine, one engine at a time, between two of its batches.

        If one engine fails to load it, every engine already on `version` gets the
        served version back (from `blobs_for`) and `SwapFailed` is raised.
        """
        assert self._swap_lock is not None
        async with self._swap_lock:
            t_start = time.time()
            old = self.version
            per_engine, done = [], []
            for eng in self.engines:
                if not eng.alive:
                    continue  # it gets self.version when it comes back
                eng.loading = True  # no new batch; the one in flight (if any) runs first, on the old weights
                t0 = time.perf_counter()
                try:
                    res = await eng.handle.load_weights.remote(blobs, version)
                    eng.version = version
                    done.append(eng)
                except Exception as err:  # noqa: BLE001 - undo, then say so
                    await self._roll_back(done + [eng], old)
                    self.on_event("swap_failed", version=version, engine=eng.index, error=f"{type(err).__name__}")
                    raise SwapFailed(f"engine {eng.index} could not load v{version} ({type(err).__name__}: {err}); "
                                     f"every engine serves v{old} again") from err
                finally:
                    eng.loading = False
                    if self._wake:
                        self._wake.set()
                per_engine.append({"engine": eng.index, "pause_s": time.perf_counter() - t0,
                                   "load_s": float(res.get("load_s", 0.0))})
            self.version = version
            stats = {"version": version, "started": t_start, "finished": time.time(), "engines": per_engine,
                     "max_pause_s": max((p["pause_s"] for p in per_engine), default=0.0)}
            self.swaps.append(stats)
            return stats

    async def _roll_back(self, engines: list[_Engine], version: int) -> None:
        """Give `engines` the served `version` again; one that cannot take it is treated as dead (recovered)."""
        if self.blobs_for is None:
            return
        blobs = await asyncio.get_running_loop().run_in_executor(None, self.blobs_for, version)
        for eng in engines:
            eng.loading = True
            try:
                await eng.handle.load_weights.remote(blobs, version)
                eng.version = version
            except Exception:  # noqa: BLE001 - out of service until recovery reloads the served version
                eng.alive = False
                eng.restarts += 1
                self._spawn(self._recover(eng))
            finally:
                eng.loading = False
        if self._wake:
            self._wake.set()

    def stats(self) -> dict[str, Any]:
        out = {"queue": len(self.queue), "batches": self.batches, "version": self.version,
               "engines": [{"index": e.index, "version": e.version, "alive": e.alive, "busy": e.busy,
                            "loading": e.loading, "lost": e.lost, "restarts": e.restarts} for e in self.engines]}
        if self.max_adapters:
            out["tenant_adapters"] = {"max_loaded": self.max_adapters, "loads": self.adapter_loads,
                                      "unloads": self.adapter_unloads,
                                      "resident": {e.index: e.resident for e in self.engines}}
        return out


__all__ = ["EnginePool", "EngineUnavailable", "Overloaded", "SwapFailed"]
