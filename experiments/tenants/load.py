"""Load over tenants: 8 clients on 4 tenants' adapters, against 8 clients on the one shared model, same server.

    python experiments/tenants/load.py --out runs/tenants/load [--max-loaded 4]

One live `ttrl-serve` (Ray, vLLM CPU multi-LoRA, DeepSpeed) on the demo's
warm start, with tenants and the learner on. Three phases of `--seconds`
each, back to back on the same server, every client one request at a time:

1. single model: 8 clients with keys of no tenant (the shared version);
2. tenants: 8 clients, 2 per tenant, over 4 tenants (one adapter each);
3. tenants across two swaps: as 2, while a learning round of tenant t1 and
   then one of t2 run and promote (the gate is told to accept: the point is
   the swap under load, not the gate), until both are served and at least
   `--seconds` have passed.

Reports failures and latency percentiles per phase, the adapter loads and
unloads of each phase (`GET /admin/tenants`), and the version each tenant
was served. Writes <out>/result.json. Nothing here judges the answers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import time
from pathlib import Path

import httpx

from ttrl.cli import compose
from ttrl.data.synthetic import arithmetic_problems
from ttrl.data.templates import render_prompt
from ttrl.models.resolve import resolve_model_path
from ttrl.serve.loadtest import run_load, summarize
from ttrl.serve.process import Server, write_keys

TENANTS = ["t1", "t2", "t3", "t4"]
GATE_ACCEPTS = ["serve.gate.tolerance=1.0", "serve.gate.max_entropy_drop=null",
                "serve.gate.max_answer_rate_drop=null", "serve.gate.max_length_change=null",
                "serve.gate.n_samples=2", "serve.gate.regression_size=8"]


def adapter_counts(srv: Server) -> dict:
    body = httpx.get(f"{srv.url}/admin/tenants", headers=srv.auth, timeout=30).json()
    return {"loads": body.get("loads"), "unloads": body.get("unloads"),
            "versions": {t["name"]: t["version"] for t in body.get("tenants", [])}, "raw": body}


def phase(srv: Server, prompts: list[str], headers: list[dict], seconds: float, max_tokens: int,
          until=None) -> dict:
    before = adapter_counts(srv)
    results, wall = asyncio.run(run_load(srv.url, prompts, len(headers), seconds,
                                         extra={"max_tokens": max_tokens}, until=until, max_seconds=900,
                                         headers=headers))
    after = adapter_counts(srv)
    s = summarize(results, wall)
    s["adapter_loads"] = _delta(after["loads"], before["loads"])
    s["adapter_unloads"] = _delta(after["unloads"], before["unloads"])
    s["versions"] = after["versions"]
    return s


def _delta(a, b):
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a - b
    return {"after": a, "before": b}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/tenants/load"))
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--max-loaded", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("override", nargs="*", help="extra ttrl-serve overrides")
    args = ap.parse_args(argv)

    if args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True)
    overrides = ["experiment=demo", "model.lora.enabled=true", "model.lora.r=16", "model.lora.alpha=32",
                 "serve.port=0", "trainer.num_workers=1", "logger.progress=false",
                 "serve.limits.requests_per_minute=0", "serve.tenants.enabled=true",
                 f"serve.tenants.max_loaded={args.max_loaded}", "serve.learn.every_queries=0",
                 "serve.learn.min_queries=1", "serve.learn.steps=2", "data.prompts_per_step=8",
                 "trainer.lr=1e-3", *GATE_ACCEPTS, *args.override]
    cfg = compose([o for o in overrides if o.startswith(("experiment=", "model.", "seed="))])
    resolve_model_path(cfg.model, cfg.data)
    prompts = [render_prompt(p.problem, cfg.model) for p in arithmetic_problems(96, 3, 2, seed=20_000)]

    names = [f"{t}-{i}" for t in TENANTS for i in range(2)] + [f"shared-{i}" for i in range(8)]
    tenant_of = {n: n.split("-")[0] if not n.startswith("shared") else "-" for n in names}
    keys = write_keys(args.out / "keys", names, tenant_of)
    srv = Server(args.out / "serve", overrides, f"serve.api_keys_file={args.out / 'keys'}")
    result: dict = {"args": {k: str(v) for k, v in vars(args).items()}}

    def save() -> None:
        (args.out / "result.json").write_text(json.dumps(result, indent=1, default=str))

    srv.start()
    result["startup_s"] = srv.startup_s[-1]
    print(f"tenant load: server up in {srv.startup_s[-1]:.0f} s", flush=True)
    try:
        shared = [keys[f"shared-{i}"] for i in range(8)]
        tenants = [keys[f"{t}-{i}"] for i in range(2) for t in TENANTS]  # client c -> tenant c % 4
        # Warm-up: every key once (creates the tenants, compiles nothing further), not measured.
        asyncio.run(run_load(srv.url, prompts, 16, 1.0, extra={"max_tokens": args.max_tokens},
                             headers=shared + tenants))
        for name, hdrs in (("single_model", shared), ("tenants", tenants)):
            result[name] = phase(srv, prompts, hdrs, args.seconds, args.max_tokens)
            save()
            print(f"  {name}: {json.dumps({k: v for k, v in result[name].items() if k != 'versions'})}", flush=True)

        # Phase 3: two rounds (t1's, then t2's) start now; the load runs until both are served.
        n0 = len([r for r in srv.versions()["rounds"] if r["finished"]])
        for t in ("t1", "t2"):
            httpx.post(f"{srv.url}/admin/learn", params={"tenant": t}, headers=srv.auth, timeout=30).raise_for_status()

        def swapped() -> bool:
            rounds = [r for r in srv.versions()["rounds"] if r["finished"]]
            return len(rounds) >= n0 + 2

        t0 = time.time()
        result["tenants_two_swaps"] = phase(srv, prompts, tenants, args.seconds, args.max_tokens, until=swapped)
        rounds = sorted((r for r in srv.versions()["rounds"] if r["finished"]), key=lambda r: r["round"])[n0:]
        result["tenants_two_swaps"]["rounds"] = [
            {"tenant": r["tenant"], "outcome": r["outcome"], "version": r["version"],
             "started_s": r["started"] - t0, "finished_s": r["finished"] - t0} for r in rounds]
        save()
        print(f"  tenants_two_swaps: {json.dumps(result['tenants_two_swaps'])}", flush=True)
    finally:
        srv.stop()
    failed = sum(result.get(p, {}).get("failed", 1) for p in ("single_model", "tenants", "tenants_two_swaps"))
    sys.exit(0 if failed == 0 else 1)


if __name__ == "__main__":
    main()
