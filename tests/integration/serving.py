"""A `ttrl-serve` process for the serve tests: start it, talk to its admin API, stop or kill it.

Every serve test runs the server as a user does (`python -m ttrl.serve`, in
its own process group, admin token in the environment) and must leave
nothing running: `stop` ends the whole group even if the server hangs.
`write_keys` writes an API keys file for tests that play several clients.
Test helpers only; no assertion here is about a server's answers.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "integration-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


class Server:
    """One `ttrl-serve` process of a test, in its own process group: started, waited on, stopped."""

    def __init__(self, serve_dir: Path, base: list[str], *overrides: str, env: dict[str, str] | None = None):
        # `base`: the overrides of every start; `overrides`: this start's, replaced by `start(...)`.
        self.dir, self.base, self.overrides = serve_dir, list(base), list(overrides)
        self.env = dict(env or {})
        self.proc: subprocess.Popen | None = None
        self.url = ""
        self.log = serve_dir.parent / f"{serve_dir.name}.log"
        self.startup_s: list[float] = []

    def start(self, *overrides: str, timeout: float = 900, env: dict[str, str] | None = None) -> Server:
        """Start (again); `env` adds to the environment of this start only (e.g. TTRL_SERVE_CRASH_AT)."""
        if overrides:
            self.overrides = list(overrides)
        (self.dir / "server.json").unlink(missing_ok=True)
        t0 = time.monotonic()
        fh = self.log.open("a")
        self.proc = subprocess.Popen([sys.executable, "-m", "ttrl.serve", *self.base, f"serve.dir={self.dir}",
                                      *self.overrides], stdout=fh, stderr=fh, cwd=ROOT, start_new_session=True,
                                     env={**os.environ, "TTRL_ADMIN_TOKEN": TOKEN, **self.env, **(env or {})})
        deadline = time.monotonic() + timeout
        while not (self.dir / "server.json").exists():
            assert self.proc.poll() is None, f"ttrl-serve exited: {self.tail()}"
            assert time.monotonic() < deadline, f"ttrl-serve not up within {timeout}s: {self.tail()}"
            time.sleep(0.5)
        self.url = json.loads((self.dir / "server.json").read_text())["url"]
        assert httpx.get(f"{self.url}/health", timeout=10).json()["status"] == "ok"
        self.startup_s.append(time.monotonic() - t0)
        return self

    def tail(self, n: int = 4000) -> str:
        return self.log.read_text()[-n:] if self.log.exists() else ""

    def kill(self) -> None:
        """SIGKILL the server and everything it started (Ray, engines, trainer): a crash."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(60)

    def stop(self) -> None:
        """SIGTERM to the server alone (it stops its learner, then Ray); SIGKILL the group if it hangs."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # whatever is left of its process group
        except ProcessLookupError:
            pass
        self.proc.wait(60)

    def versions(self) -> dict:
        r = httpx.get(f"{self.url}/admin/versions", headers=AUTH, timeout=30)
        assert r.status_code == 200, r.text
        return r.json()

    def learner(self) -> dict:
        return httpx.get(f"{self.url}/health", headers=AUTH, timeout=30).json()["learner"]

    def wait_exit(self, timeout: float = 900) -> int:
        """Wait for the server to end by itself (a crash point killed it); its exit code."""
        return self.proc.wait(timeout)

    def learn(self) -> None:
        httpx.post(f"{self.url}/admin/learn", headers=AUTH, timeout=30).raise_for_status()

    def wait_rounds(self, n: int, timeout: float = 900) -> list[dict]:
        """The finished learning rounds, in order, once there are `n`; fails if the server dies first."""
        deadline = time.monotonic() + timeout
        while True:
            done = [r for r in self.versions()["rounds"] if r["finished"]]
            if len(done) >= n:
                return sorted(done, key=lambda r: r["round"])
            assert self.proc.poll() is None, f"ttrl-serve exited: {self.tail()}"
            assert time.monotonic() < deadline, f"no {n} finished learning rounds in {timeout}s: {self.tail()}"
            time.sleep(1.0)


def write_keys(path: Path, names: list[str], tenants: dict[str, str] | None = None) -> dict[str, dict[str, str]]:
    """An API keys file (mode 600) for `names`; name -> the Authorization header of its key.

    `tenants`: name -> the tenant field of its line (serve.tenants; `-` = the shared version)."""
    keys = {n: f"{n}-test-key-{i:04d}-0123456789" for i, n in enumerate(names)}
    tenants = tenants or {}
    path.write_text("".join(f"{n}:{k}{':' + tenants[n] if n in tenants else ''}\n" for n, k in keys.items()))
    path.chmod(0o600)
    return {n: {"Authorization": f"Bearer {k}"} for n, k in keys.items()}


async def ask_each(url: str, headers: dict, prompts: list[str], who: list[str], max_tokens: int,
                   seed0: int) -> dict[str, list[dict]]:
    """Every prompt once per name of `who`, all at once (so tenants share engine batches), prompt i with seed
    seed0 + i: name -> its response bodies, in prompt order."""
    async with httpx.AsyncClient(timeout=300) as http:
        async def one(name: str, i: int, prompt: str) -> tuple[str, int, dict]:
            r = await http.post(f"{url}/v1/completions", headers=headers[name],
                                json={"prompt": prompt, "max_tokens": max_tokens, "temperature": 1.0,
                                      "seed": seed0 + i})
            assert r.status_code == 200, (name, r.text)
            return name, i, r.json()

        done = await asyncio.gather(*(one(n, i, p) for i, p in enumerate(prompts) for n in who))
    out: dict[str, list[dict]] = {n: [None] * len(prompts) for n in who}
    for name, i, body in done:
        out[name][i] = body
    return out
