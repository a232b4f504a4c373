"""A `ttrl-serve` process, started as a user starts it, for tests and experiments: start, admin calls, stop.

The server runs as `python -m ttrl.serve` in its own process group, with the
admin token in its environment, and `stop` ends the whole group even if the
server hangs: nothing it started (Ray, engines, trainer) is left running.
`write_keys` writes an API keys file for runs that play several clients.
Helpers only: nothing here judges a server's answers, and nothing here may
be used to reach a server that is not on this machine.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx


class Server:
    """One `ttrl-serve` process of a test or an experiment, in its own process group: started, waited on, stopped."""

    def __init__(self, serve_dir: Path, base: list[str], *overrides: str, env: dict[str, str] | None = None,
                 token: str = "change-me-admin-token"):
        # `base`: the overrides of every start; `overrides`: this start's, replaced by `start(...)`.
        self.dir, self.base, self.overrides = serve_dir, list(base), list(overrides)
        self.env = dict(env or {})
        self.auth = {"Authorization": f"Bearer {token}"}
        self.token = token
        self.proc: subprocess.Popen | None = None
        self.url = ""
        self.log = serve_dir.parent / f"{serve_dir.name}.log"
        self.startup_s: list[float] = []
        self.cwd = Path.cwd()

    def start(self, *overrides: str, timeout: float = 900, env: dict[str, str] | None = None) -> Server:
        """Start (again); `env` adds to the environment of this start only (e.g. TTRL_SERVE_CRASH_AT)."""
        if overrides:
            self.overrides = list(overrides)
        (self.dir / "server.json").unlink(missing_ok=True)
        t0 = time.monotonic()
        fh = self.log.open("a")
        self.proc = subprocess.Popen([sys.executable, "-m", "ttrl.serve", *self.base, f"serve.dir={self.dir}",
                                      *self.overrides], stdout=fh, stderr=fh, cwd=self.cwd, start_new_session=True,
                                     env={**os.environ, "TTRL_ADMIN_TOKEN": self.token, **self.env, **(env or {})})
        deadline = time.monotonic() + timeout
        while not (self.dir / "server.json").exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"ttrl-serve exited: {self.tail()}")
            if not (time.monotonic() < deadline):
                raise RuntimeError(f"ttrl-serve not up within {timeout}s: {self.tail()}")
            time.sleep(0.5)
        self.url = json.loads((self.dir / "server.json").read_text())["url"]
        health = httpx.get(f"{self.url}/health", timeout=10).json()
        if health.get("status") != "ok":
            raise RuntimeError(f"ttrl-serve is up but not healthy: {health}")
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
        r = httpx.get(f"{self.url}/admin/versions", headers=self.auth, timeout=30)
        if r.status_code != 200:
            raise RuntimeError(r.text)
        return r.json()

    def learner(self) -> dict:
        return httpx.get(f"{self.url}/health", headers=self.auth, timeout=30).json()["learner"]

    def wait_exit(self, timeout: float = 900) -> int:
        """Wait for the server to end by itself (a crash point killed it); its exit code."""
        return self.proc.wait(timeout)

    def learn(self) -> None:
        httpx.post(f"{self.url}/admin/learn", headers=self.auth, timeout=30).raise_for_status()

    def wait_rounds(self, n: int, timeout: float = 900) -> list[dict]:
        """The finished learning rounds, in order, once there are `n`; fails if the server dies first."""
        deadline = time.monotonic() + timeout
        while True:
            done = [r for r in self.versions()["rounds"] if r["finished"]]
            if len(done) >= n:
                return sorted(done, key=lambda r: r["round"])
            if self.proc.poll() is not None:
                raise RuntimeError(f"ttrl-serve exited: {self.tail()}")
            if not (time.monotonic() < deadline):
                raise RuntimeError(f"no {n} finished learning rounds in {timeout}s: {self.tail()}")
            time.sleep(1.0)


def write_keys(path: Path, names: list[str], tenants: dict[str, str] | None = None) -> dict[str, dict[str, str]]:
    """An API keys file (mode 600) for `names`; name -> the Authorization header of its key.

    `tenants`: name -> the tenant field of its line (serve.tenants; `-` = the shared version)."""
    keys = {n: f"{n}-test-key-{i:04d}-0123456789" for i, n in enumerate(names)}
    tenants = tenants or {}
    path.write_text("".join(f"{n}:{k}{':' + tenants[n] if n in tenants else ''}\n" for n, k in keys.items()))
    path.chmod(0o600)
    return {n: {"Authorization": f"Bearer {k}"} for n, k in keys.items()}
