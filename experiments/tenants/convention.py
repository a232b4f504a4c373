"""Learning by convention: two tenants rate the same prompts by different rules, each adapter learns its own.

    python experiments/tenants/convention.py --out runs/tenants/convention --seed 0

One live `ttrl-serve` (Ray, vLLM CPU multi-LoRA, DeepSpeed) on the demo's
warm start, tenants and the learner on, rounds started here. Tenant A's rater
calls an answer right when it is the true sum; tenant B's when it is the sum
plus 10 (what the warm start writes when it slips a carry). Both tenants ask
the same training prompts (n samples each) and rate every sample they got
up or down by their rule (each tenant's identity is one of
serve.trusted_raters: a customer's own rater, whose word is enough).
Each round trains one tenant's adapter on its own queries and ratings.

Measured on held-out prompts (never asked before the end, never trained on),
`n` samples each: the share of the true sum and of sum + 10 in the answers
of the base (the shared version, which every new tenant starts as) and of
each tenant's adapter after its rounds. The claim under test: each share
rises for the tenant whose rule it is and not for the other tenant.

Writes <out>/seed<S>/result.json (every round and every share) and prints
one line per phase. Resumable only by starting over: the serve dir is new.
Never reads a ground-truth label inside the server: the rules are applied
here, by the clients, as a customer's rater would.
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
from ttrl.labeling.extract import extract_answer
from ttrl.models.resolve import resolve_model_path
from ttrl.serve.process import Server, write_keys

RULES = {"A": lambda true: true, "B": lambda true: str(int(true) + 10)}


def rule_answers(problems, tenant: str) -> list[str]:
    return [RULES[tenant](p.answer) for p in problems]


async def ask(url: str, header: dict, prompts: list[str], n: int, max_tokens: int, seed: int) -> list[dict]:
    """Each prompt once with `n` samples, all requests at once; the response bodies in prompt order."""
    async with httpx.AsyncClient(timeout=600) as http:
        sem = asyncio.Semaphore(16)

        async def one(i: int, prompt: str) -> dict:
            async with sem:
                r = await http.post(f"{url}/v1/completions", headers=header,
                                    json={"prompt": prompt, "n": n, "max_tokens": max_tokens, "temperature": 1.0,
                                          "seed": seed + i})
            if r.status_code != 200:
                raise RuntimeError(f"request {i}: {r.status_code} {r.text[:300]}")
            return r.json()

        return list(await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts))))


async def rate(url: str, header: dict, bodies: list[dict], wanted: list[str]) -> tuple[int, int]:
    """Thumbs-up on every sample whose answer is the wanted one, thumbs-down on the rest; (ups, downs)."""
    ups = downs = 0
    async with httpx.AsyncClient(timeout=120) as http:
        sem = asyncio.Semaphore(16)

        async def one(rid: str, index: int, up: bool) -> None:
            async with sem:
                r = await http.post(f"{url}/v1/feedback", headers=header,
                                    json={"id": rid, "index": index, "thumbs": "up" if up else "down"})
            r.raise_for_status()

        jobs = []
        for body, want in zip(bodies, wanted):
            for ch in body["choices"]:
                up = extract_answer(ch["text"]) == want
                ups, downs = ups + up, downs + (not up)
                jobs.append(one(body["id"], ch["index"], up))
        await asyncio.gather(*jobs)
    return ups, downs


def shares(bodies: list[dict], problems) -> dict[str, float]:
    """Share of all samples whose answer is the true sum, the sum + 10, the sum - 10; and how many samples."""
    n = sum(len(b["choices"]) for b in bodies)
    out = {"samples": n}
    for name, delta in (("true", 0), ("plus10", 10), ("minus10", -10)):
        hit = sum(extract_answer(ch["text"]) == str(int(p.answer) + delta)
                  for b, p in zip(bodies, problems) for ch in b["choices"])
        out[name] = hit / n
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/tenants/convention"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=4, help="rounds per tenant")
    ap.add_argument("--train-prompts", type=int, default=32, help="new prompts asked per round (both tenants)")
    ap.add_argument("--n", type=int, default=8, help="samples per training request (each rated)")
    ap.add_argument("--heldout", type=int, default=64)
    ap.add_argument("--heldout-n", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10, help="serve.learn.steps")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("override", nargs="*", help="extra ttrl-serve overrides")
    args = ap.parse_args(argv)

    run = args.out / f"seed{args.seed}"
    if run.exists():
        shutil.rmtree(run)
    run.mkdir(parents=True)
    overrides = ["experiment=demo", "model.lora.enabled=true", "model.lora.r=16", "model.lora.alpha=32",
                 "serve.port=0", "trainer.num_workers=1", "logger.progress=false", f"seed={args.seed}",
                 "serve.limits.requests_per_minute=0", "serve.tenants.enabled=true", "serve.tenants.max_loaded=2",
                 "serve.learn.every_queries=0", "serve.learn.min_queries=1", f"serve.learn.steps={args.steps}",
                 "data.prompts_per_step=8", f"trainer.lr={args.lr}", "trainer.micro_batch_size=64",
                 "serve.trusted_raters=[a,b]", *args.override]
    cfg = compose([o for o in overrides if o.startswith(("experiment=", "model.", "seed="))])
    resolve_model_path(cfg.model, cfg.data)  # build the warm start (if not cached) before the server's deadline
    render = lambda ps: [render_prompt(p.problem, cfg.model) for p in ps]  # noqa: E731
    max_tokens = int(cfg.rollout.max_new_tokens)

    # Held-out and training prompts: disjoint from each other and from the demo's test split (seed 1234).
    pool = arithmetic_problems(args.heldout + args.rounds * args.train_prompts, 3, 2, seed=10_000 + args.seed)
    heldout, train = pool[:args.heldout], pool[args.heldout:]
    headers = write_keys(run / "keys", ["a", "b", "base"], {"a": "A", "b": "B", "base": "-"})
    srv = Server(run / "serve", overrides, f"serve.api_keys_file={run / 'keys'}")
    result: dict = {"seed": args.seed, "args": {k: str(v) for k, v in vars(args).items()}, "rounds": []}

    def save() -> None:
        (run / "result.json").write_text(json.dumps(result, indent=1))

    t0 = time.time()
    srv.start()
    print(f"convention seed {args.seed}: server up in {srv.startup_s[-1]:.0f} s", flush=True)
    try:
        base = asyncio.run(ask(srv.url, headers["base"], render(heldout), args.heldout_n, max_tokens, 50_000))
        result["before"] = shares(base, heldout)
        print(f"  before (base): {result['before']}", flush=True)
        save()
        done = 0
        for r in range(args.rounds):
            batch = train[r * args.train_prompts:(r + 1) * args.train_prompts]
            for t in ("A", "B"):
                bodies = asyncio.run(ask(srv.url, headers[t.lower()], render(batch), args.n, max_tokens,
                                         1_000 * (r + 1)))
                ups, downs = asyncio.run(rate(srv.url, headers[t.lower()], bodies,
                                              rule_answers(batch, t)))
                asked = shares(bodies, batch)
                httpx.post(f"{srv.url}/admin/learn", params={"tenant": t}, headers=srv.auth,
                           timeout=30).raise_for_status()
                done += 1
                rnd = srv.wait_rounds(done, timeout=1800)[-1]
                row = {"round": r + 1, "tenant": t, "outcome": rnd["outcome"], "version": rnd["version"],
                       "gate": [rnd["current_score"], rnd["candidate_score"]], "reasons": rnd["reasons"],
                       "ups": ups, "downs": downs, "asked_shares": asked,
                       "reward_mean": rnd["metrics"].get("reward_mean"),
                       "wall_s": rnd["finished"] - rnd["started"]}
                result["rounds"].append(row)
                save()
                print(f"  round {r + 1} tenant {t}: asked true {asked['true']:.3f} plus10 {asked['plus10']:.3f}; "
                      f"{ups} up / {downs} down; {rnd['outcome']} v{rnd['version']} gate {rnd['current_score']} -> "
                      f"{rnd['candidate_score']} {rnd['reasons']} ({row['wall_s']:.0f} s)", flush=True)
        result["after"] = {}
        for t in ("A", "B"):
            bodies = asyncio.run(ask(srv.url, headers[t.lower()], render(heldout), args.heldout_n,
                                     max_tokens, 50_000))
            result["after"][t] = shares(bodies, heldout)
            print(f"  after, tenant {t}'s adapter: {result['after'][t]}", flush=True)
        b, a = result["before"], result["after"]
        result["summary"] = {"A_true_gain": a["A"]["true"] - b["true"], "B_true_gain": a["B"]["true"] - b["true"],
                             "B_plus10_gain": a["B"]["plus10"] - b["plus10"],
                             "A_plus10_gain": a["A"]["plus10"] - b["plus10"],
                             "promoted": {t: sum(x["outcome"] == "promoted" for x in result["rounds"] if x["tenant"] == t)
                                          for t in ("A", "B")},
                             "wall_s": time.time() - t0}
        save()
        print(f"convention seed {args.seed}: {json.dumps(result['summary'])}", flush=True)
    finally:
        srv.stop()


if __name__ == "__main__":
    sys.exit(main())
