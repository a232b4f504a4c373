"""Serve-test helpers: the test servers' admin token, `ask_each`, and the served samples of responses.

The server process itself is `ttrl.serve.process.Server` (shared with the
experiments); this module fixes its admin token for the tests. Test helpers
only; no assertion here is about a server's answers.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path

import httpx

from ttrl.serve.process import Server as _Server
from ttrl.serve.process import write_keys

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "integration-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
# The serve tests' warm start: 300 steps of the demo's earlier recipe (AdamW, batches of 256), on which
# their gate figures and tolerances were measured; a model that gets about half its samples right (room
# to learn and to be harmed), at under half the demo's build. No check that it reached its teacher
# (it is meant not to). One recipe, so every serve test file finds the one cached build.
WARM = ["model.warmstart.steps=300", "model.warmstart.target_maj=null",
        "model.warmstart.optimizer=adamw", "model.warmstart.batch_size=256"]

__all__ = ["AUTH", "ROOT", "TOKEN", "WARM", "Server", "ask_each", "same_tokens", "served_samples", "write_keys"]


class Server(_Server):
    """A `ttrl-serve` of a test: run from the repository root, with the tests' admin token."""

    def __init__(self, serve_dir: Path, base: list[str], *overrides: str, env: dict[str, str] | None = None):
        super().__init__(serve_dir, base, *overrides, env=env, token=TOKEN)
        self.cwd = ROOT


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


def served_samples(serve_dir: Path, bodies: list[dict]) -> list[tuple[str, float, int]]:
    """(text, mean log-prob, tokens) of the one sample behind each response, read from the server's store."""
    db = sqlite3.connect(f"file:{serve_dir / 'store.sqlite'}?mode=ro", uri=True)
    try:
        out = []
        for b in bodies:
            (samples,) = db.execute("SELECT samples FROM queries WHERE id=?", (b["id"],)).fetchone()
            (s,) = json.loads(samples)
            out.append((s["text"], s["mean_logprob"], s["tokens"]))
        return out
    finally:
        db.close()


def same_tokens(a: tuple, b: tuple) -> bool:
    """Two `served_samples` entries are the same tokens: same text and length, and per-token log-probs that
    agree (a batch of another size may round their last bits otherwise on CPU)."""
    return a[0] == b[0] and a[2] == b[2] and abs(a[1] - b[1]) < 1e-4
