"""Per-identity request limits: a rate (token bucket) and a cap on requests in flight.

Each identity (an API key's name, or "anonymous") gets a bucket of
`serve.limits.burst` requests that refills at `requests_per_minute`; a
request that finds it empty is refused with the seconds until the next
token (HTTP 429 with Retry-After). At most `max_in_flight` requests of one
identity run at once. One client hammering the server therefore cannot
take the others' share; what it can still send is bounded.

Runs on the server's event loop only (no locks needed). Pure Python: the
clock is injectable so tests need no sleeps.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Refusal:
    key: str  # the serve.limits.* key that refused
    message: str
    retry_after_s: int


class _Bucket:
    __slots__ = ("tokens", "t")

    def __init__(self, tokens: float, t: float):
        self.tokens, self.t = tokens, t


class ClientLimits:
    def __init__(self, requests_per_minute: float, burst: int, max_in_flight: int,
                 clock: Callable[[], float] = time.monotonic, max_clients: int = 100_000):
        self.rate = requests_per_minute / 60.0  # tokens per second; 0 = no rate limit
        self.burst, self.max_in_flight = burst, max_in_flight
        self.clock = clock
        self.max_clients = max_clients
        self._buckets: dict[str, _Bucket] = {}
        self.in_flight: dict[str, int] = {}

    def acquire(self, client: str) -> Refusal | None:
        """Admit one request of `client` (call `release` when it ends), or say why not."""
        if self.in_flight.get(client, 0) >= self.max_in_flight:
            return Refusal("serve.limits.max_in_flight",
                           f"{self.max_in_flight} requests of this client are already in flight "
                           "(serve.limits.max_in_flight); wait for one to finish", 1)
        if self.rate > 0:
            now = self.clock()
            b = self._buckets.get(client)
            if b is None:
                if len(self._buckets) >= self.max_clients:
                    self._forget_full(now)
                b = self._buckets[client] = _Bucket(float(self.burst), now)
            b.tokens = min(float(self.burst), b.tokens + (now - b.t) * self.rate)
            b.t = now
            if b.tokens < 1.0:
                wait = math.ceil((1.0 - b.tokens) / self.rate)
                return Refusal("serve.limits.requests_per_minute",
                               f"more than serve.limits.requests_per_minute={self.rate * 60:g} requests a minute "
                               f"(bursts of serve.limits.burst={self.burst}); retry in {wait} s", max(1, wait))
            b.tokens -= 1.0
        self.in_flight[client] = self.in_flight.get(client, 0) + 1
        return None

    def release(self, client: str) -> None:
        n = self.in_flight.get(client, 0) - 1
        if n > 0:
            self.in_flight[client] = n
        else:
            self.in_flight.pop(client, None)

    def _forget_full(self, now: float) -> None:
        # Buckets that have refilled say nothing a fresh bucket would not: drop them.
        full = [c for c, b in self._buckets.items() if b.tokens + (now - b.t) * self.rate >= self.burst]
        for c in full:
            del self._buckets[c]


__all__ = ["ClientLimits", "Refusal"]
