"""`ttrl-serve` for real: Ray, vLLM (CPU) serving + staging engines, DeepSpeed, HTTP on loopback.

The demo's tiny model (`experiment=demo`) serves the demo task's test
prompts to real HTTP clients (the `openai` package and httpx). Ground truth
is read here, by the tests, to grade what was served and to play a user who
rates answers; the server never sees it.

Starting a server costs minutes on a 2-core CI box, so the file runs ONE
server life story, in order, and the tests check its chapters:

    server 1 (fresh serve dir, API keys for four honest users, trusted raters,
              and two attackers; TTRL + earned user feedback as reward)
      before: the test prompts, plain (each asked by several users, who rate
              their own answers truthfully) and by self-consistency;
              mallory rates wrong answers up on 16 of them, again and again;
              mallory and mallet, two identities, agree on a wrong answer
              for two other prompts
      one learning round  ──  an 8-client load test from the gate's evaluation
                              until after the hot swap
      after: the same prompts on the promoted version
      traffic, then SIGKILL of the whole process group mid-traffic
    server 2 (same serve dir; restarted with a harmful reward: TTRL inverted)
      the store has every answered request; the promoted version is served
      a learning round with the harmful reward: the gate rejects it
      rollback to v0: one call

Module-scoped fixtures run the chapters, the tests assert on what they saw,
so a test run alone (-k) still runs the chapters it needs. Every wait is
bounded; no assertion is about time (timings are printed as SERVE REPORT).

`TTRL_SERVE_TEST_ARGS` adds overrides to every server of this file (and to
the config the prompts are rendered with), e.g. to try a candidate demo
model: TTRL_SERVE_TEST_ARGS="model.path=/path/to/model rollout.max_new_tokens=40".
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from tests.conftest import compose_config
from tests.integration.serving import AUTH, WARM, Server, write_keys

# The first test also builds its warm start on a fresh machine (serving.WARM: 100-115 s on a 2-core Intel Xeon).
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(2700)]

EXTRA = os.environ.get("TTRL_SERVE_TEST_ARGS", "").split()
# One trainer rank leaves the two cores to the engines; rounds only when the test asks
# (serve.learn.every_queries=0), so what each round learns from is known.
# No per-identity rate limit: these clients are honest and fast (the limits are tested in test_serve_hostile.py).
BASE = ["experiment=demo", *WARM, "serve.port=0", "trainer.num_workers=1", "logger.progress=false",
        "serve.learn.every_queries=0", "serve.limits.requests_per_minute=0", *EXTRA]
N_PROMPTS, REPS = 64, 8  # 512 graded plain answers per measurement: s.e. about 0.022 at accuracy 0.5
# Chapter 1 learns with TTRL + feedback; the gate's frozen set is grown from the first queries.
# The gate judges about 20 held-out prompts x 16 samples (paired s.e. of the difference about 0.04),
# prompts the round does not train on: what it must show is that learning does not hurt them.
# Measured on three warm starts of the earlier recipe (300 steps of AdamW-256, seeds 0, 1, 2; one round each):
#   trainer.lr=1e-4, 8 steps:   gate -0.031, 0.000, +0.005 (and -0.079 on CI's machine: rejected)
#   trainer.lr=3e-5, 16 steps:  gate +0.020, +0.043, -0.005
# and the served prompts (which the round trains on) +0.05..+0.10 either way. Again on serving.WARM's
# builds of seeds 0, 1, 2 (Intel Xeon, every test of this file and of test_serve_tenant_learning.py
# passed on seed 0, chapter 1 on all three): gate -0.048, -0.003, +0.017; served +0.09, +0.18, +0.16. So the demo's
# learning rate for twice the steps, and a tolerance of 2 s.e.: a round that does no harm on
# the held-out prompts is rejected only if sampling puts it 2 s.e. under (three warm starts
# measured, not every machine's).
LEARN_STEPS = 16
LEARN = ["trainer.lr=3e-5", f"serve.learn.steps={LEARN_STEPS}", "serve.gate.regression_size=24",
         "serve.gate.tolerance=0.08"]
# Chapter 2: TTRL's reward inverted, feedback off (it would correct the inverted labels),
# judged on a small labelled regression set the user gives. (The learning rate is chapter 1's:
# a restart resumes the trainer's optimizer and schedule from the served version; as many
# steps as chapter 1, so the harm is measured at the same dose as the good round's gain.)
HARMFUL = ["reward=custom", "reward.fn=ttrl.serve.testing:contrarian_reward", "serve.learn.feedback=false",
           f"serve.learn.steps={LEARN_STEPS}"]
# Honest users ask every prompt (REPS times in all, spread over them) and rate the answers they get;
# mallory floods ratings of wrong answers on POISONED prompts; mallory and mallet collude on COLLUDED ones.
USERS = ["user0", "user1", "user2", "user3"]
NAMES = [*USERS, "mallory", "mallet", "loader"]
POISONED = slice(16, 32)  # 16 of the 64 measured prompts
COLLUDED = slice(N_PROMPTS, N_PROMPTS + 2)  # two prompts outside them, so the measurement stays clean


def _grade(text: str | None, answer: str) -> bool:
    from ttrl.labeling.extract import extract_answer
    from ttrl.labeling.grade import is_equivalent

    pred = extract_answer(text or "")
    return pred is not None and is_equivalent(pred, answer)


async def _ask_all(url: str, prompts, keys: dict, reps: int = 1, votes: int | None = None, feedback: bool = False,
                   concurrency: int = 8, users=tuple(USERS)) -> list[tuple]:
    """Each prompt `reps` times through the openai client, the reps spread over `users` (each with its own
    API key): (prompt, response, correct); optionally each user rates the answer it got, truthfully."""
    import openai

    async with httpx.AsyncClient(timeout=300) as http:
        clients = {u: openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=keys[u], http_client=http, max_retries=0)
                   for u in users}
        sem = asyncio.Semaphore(concurrency)

        async def one(p, rep):
            user = users[rep % len(users)]
            async with sem:
                # No max_tokens: the server's default (serve.max_tokens, else rollout.max_new_tokens) applies.
                r = await clients[user].completions.create(model="tiny-arith", prompt=p.text,
                                                           extra_body={"votes": votes} if votes else None)
                ok = _grade(r.choices[0].text, p.answer)
                if feedback:  # the user: thumbs up when right, down when wrong
                    fb = await http.post(f"{url}/v1/feedback", json={"id": r.id, "thumbs": "up" if ok else "down"},
                                         headers=_bearer(keys[user]))
                    assert fb.status_code == 200, fb.text
                return p, r, ok

        return await asyncio.gather(*(one(p, rep) for p in prompts for rep in range(reps)))


def _bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


async def _poison(url: str, prompts, keys: dict, asks: int = 4, repeats: int = 5) -> dict[str, set[str]]:
    """mallory: asks each prompt `asks` times, rates every wrong answer she gets up, `repeats` times over.
    Returns prompt text -> the wrong answers she rated up."""
    from ttrl.labeling.extract import extract_answer

    pushed: dict[str, set[str]] = {}
    async with httpx.AsyncClient(base_url=url, timeout=300, headers=_bearer(keys["mallory"])) as c:
        for p in prompts:
            for _ in range(asks):
                r = (await c.post("/v1/completions", json={"prompt": p.text})).json()
                answer = extract_answer(r["choices"][0]["text"])
                if answer is not None and not _grade(r["choices"][0]["text"], p.answer):
                    pushed.setdefault(p.text, set()).add(answer)
                    for _ in range(repeats):
                        fb = await c.post("/v1/feedback", json={"id": r["id"], "thumbs": "up"})
                        assert fb.status_code == 200, fb.text
    return pushed


async def _collude(url: str, prompts, keys: dict) -> dict[str, str]:
    """mallory and mallet ask with the same seed until that seed draws a wrong answer, then both rate it up.
    Returns prompt text -> the wrong answer both rated up."""
    from ttrl.labeling.extract import extract_answer

    agreed: dict[str, str] = {}
    async with httpx.AsyncClient(base_url=url, timeout=300) as c:
        for p in prompts:
            for seed in range(64):
                rs = [(await c.post("/v1/completions", json={"prompt": p.text, "seed": seed},
                                    headers=_bearer(keys[name]))).json() for name in ("mallory", "mallet")]
                answer = extract_answer(rs[0]["choices"][0]["text"])
                if answer is None or _grade(rs[0]["choices"][0]["text"], p.answer):
                    continue
                assert rs[1]["choices"][0]["text"] == rs[0]["choices"][0]["text"], "same seed, same sample"
                for name, r in zip(("mallory", "mallet"), rs):
                    fb = await c.post("/v1/feedback", json={"id": r["id"], "thumbs": "up"}, headers=_bearer(keys[name]))
                    assert fb.status_code == 200, fb.text
                agreed[p.text] = answer
                break
    return agreed


def _share(rows, answers_by_prompt: dict[str, set[str]]) -> float:
    """Share of the answers to the given prompts that are one of the given answers."""
    from ttrl.labeling.extract import extract_answer
    from ttrl.labeling.grade import is_equivalent

    hits = [any(is_equivalent(extract_answer(r.choices[0].text) or "", a) for a in answers_by_prompt[p.text])
            for p, r, _ in rows if p.text in answers_by_prompt]
    return sum(hits) / max(len(hits), 1)


def _version(r) -> int:
    return int(r.system_fingerprint[len("ttrl-v"):])


def _acc(rows) -> float:
    return sum(ok for *_, ok in rows) / max(len(rows), 1)


def _store_ids(serve_dir: Path) -> set[str]:
    db = sqlite3.connect(f"file:{serve_dir / 'store.sqlite'}?mode=ro", uri=True)
    try:
        return {r[0] for r in db.execute("SELECT DISTINCT id FROM queries")}
    finally:
        db.close()


def _labelled_set(path: Path, n: int = 24) -> Path:
    """A small labelled regression set: sums of the demo's shape, drawn apart from its test split."""
    from ttrl.data.synthetic import arithmetic_problems

    with path.open("w") as fh:
        for p in arithmetic_problems(n, terms=3, digits=2, seed=777):
            fh.write(json.dumps({"id": p.id, "problem": p.problem, "answer": p.answer}) + "\n")
    return path


# ── the chapters ──────────────────────────────────────────────────────────────


@pytest.fixture(scope="module")
def demo():
    """The demo's test prompts (as the model sees them), with answers (for grading here only)."""
    from ttrl.data.loader import load_prompts
    from ttrl.data.templates import render_prompt
    from ttrl.types import Prompt

    cfg = compose_config("experiment=demo", *WARM, *(a for a in EXTRA if not a.startswith("serve.")))
    # Build (or find) the warm start here, where it may take its ~3 minutes on a
    # fresh machine, rather than inside the server's start-up deadline.
    from ttrl.models.resolve import resolve_model_path

    resolve_model_path(cfg.model, cfg.data)
    # The measured prompts, then the colluders' (never measured).
    prompts = load_prompts(cfg.data)[:N_PROMPTS + 2]
    return [Prompt(p.id, p.problem, p.answer, render_prompt(p.problem, cfg.model)) for p in prompts]


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    path = tmp_path_factory.mktemp("keys") / "keys"
    headers = write_keys(path, NAMES)
    return path, {n: h["Authorization"][len("Bearer "):] for n, h in headers.items()}


@pytest.fixture(scope="module")
def server(tmp_path_factory, keys):
    # The honest users are the operator's graders (trusted raters): each one's truthful rating of its own
    # answers teaches, as one user's did before identities existed (the round measured on three warm starts).
    srv = Server(tmp_path_factory.mktemp("serve") / "serve", [*BASE, f"serve.api_keys_file={keys[0]}",
                                                              f"serve.trusted_raters=[{','.join(USERS)}]"])
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def learned(server, demo, keys):
    """Chapter 1: serve, learn one round, hot-swap under an 8-client load, serve again."""
    from ttrl.serve.loadtest import run_load

    _, key = keys
    srv = server.start(*LEARN)
    t0 = time.monotonic()
    measured = demo[:N_PROMPTS]
    # ── before: v0, by self-consistency and plain; the users rate every plain answer they get ──
    sc = asyncio.run(_ask_all(srv.url, measured, key, votes=8))
    plain = asyncio.run(_ask_all(srv.url, measured, key, reps=REPS, feedback=True))
    # ── the attackers: one identity's flood, two identities' agreement ──
    pushed = asyncio.run(_poison(srv.url, measured[POISONED], key))
    agreed = asyncio.run(_collude(srv.url, demo[COLLUDED], key))
    regression_before = _regression(srv.dir)
    srv.learn()

    # ── load: 8 clients from the round's last training step until 5 s after the swap (>= 30 s) ──
    # (Not the whole round: on 2 cores the clients would slow the learner down for nothing.)
    deadline = time.monotonic() + 900
    late = (f"learning: step {LEARN_STEPS}/{LEARN_STEPS}", "gating", "promoting", "idle")
    while srv.learner()["state"] not in late or not srv.versions()["rounds"]:
        assert time.monotonic() < deadline, f"the round did not reach the gate: {srv.tail()}"
        time.sleep(0.5)
    mark: dict = {}

    def swapped() -> bool:
        if "seen" not in mark:
            v = srv.versions()
            if v["current"] >= 1:
                mark["seen"] = time.time()
            elif any(r["finished"] for r in v["rounds"]):
                return True  # the round ended without a promotion: stop, the tests say so
        return "seen" in mark and time.time() - mark["seen"] > 5

    results, wall = asyncio.run(run_load(srv.url, [p.text for p in measured], clients=8, seconds=30,
                                         until=swapped, max_seconds=600,
                                         headers=[_bearer(key[u]) for u in USERS]))
    (r1,) = srv.wait_rounds(1)

    # ── after: the same prompts, the same way, on what is served now ──
    after = asyncio.run(_ask_all(srv.url, measured, key, reps=REPS))
    return SimpleNamespace(sc=sc, plain=plain, after=after, results=results, wall=wall, round=r1,
                           versions=srv.versions(), metrics=httpx.get(f"{srv.url}/metrics", headers=AUTH).text,
                           seconds=time.monotonic() - t0, pushed=pushed, agreed=agreed,
                           regression_before=regression_before, regression_after=_regression(srv.dir))


def _regression(serve_dir: Path) -> list[dict]:
    db = sqlite3.connect(f"file:{serve_dir / 'store.sqlite'}?mode=ro", uri=True)
    try:
        cols = ("prompt", "label", "source", "retired")
        return [dict(zip(cols, r)) for r in db.execute(f"SELECT {', '.join(cols)} FROM regression ORDER BY created")]
    finally:
        db.close()


@pytest.fixture(scope="module")
def restarted(server, demo, learned, tmp_path_factory, keys):
    """Chapter 2: traffic, SIGKILL mid-traffic, restart on the same serve dir (with the harmful reward)."""
    from ttrl.serve.loadtest import run_load

    srv, key = server, keys[1]
    kill_at: dict = {}

    async def traffic_then_kill():
        async def killer():
            await asyncio.sleep(4)  # let 8 clients get going
            kill_at["t"] = time.time()
            await asyncio.to_thread(srv.kill)

        k = asyncio.ensure_future(killer())
        results, _ = await run_load(srv.url, [p.text for p in demo[:N_PROMPTS]], clients=8, seconds=0,
                                    until=k.done, max_seconds=120, headers=[_bearer(key[u]) for u in USERS])
        await k
        return results

    results = asyncio.run(traffic_then_kill())
    regression = _labelled_set(tmp_path_factory.mktemp("regression") / "regression.jsonl")
    srv.start(*HARMFUL, f"serve.gate.regression_set={regression}")
    return SimpleNamespace(results=results, kill_at=kill_at["t"], store_ids=_store_ids(srv.dir),
                           versions=srv.versions(), startup_s=srv.startup_s[-1], key=key)


# ── the tests ─────────────────────────────────────────────────────────────────


def test_one_identitys_ratings_teach_nothing_and_two_agreeing_identities_change_the_label(learned):
    from ttrl.labeling.grade import is_equivalent

    taught = learned.round["metrics"]["feedback_labels"]  # prompt -> what the round rewarded, and why
    pushed, agreed = learned.pushed, learned.agreed
    assert len(pushed) >= 8, f"mallory found wrong answers on only {len(pushed)} of 16 prompts"
    for prompt, answers in pushed.items():
        t = taught.get(prompt, {})
        # Her thumbs-up never became an earned verdict (the one way a rating makes an answer the label) ...
        assert not any(is_equivalent(up, a) for up, _ in t.get("ups", ()) for a in answers), (prompt, t)
        # ... so a label equal to one of her answers can only be the model's own: with no earned thumbs-up,
        # the largest class of its samples the honest users' thumbs-down left (seen once:
        # the vote said 208 on 85+73+30=, the answer she had pushed).
        label = t.get("label")
        if label is not None and any(is_equivalent(label, a) for a in answers):
            assert not t.get("ups"), (prompt, t)
    # The frozen set: nothing mallory said entered it or changed it. An item is the model's own consensus
    # (source "vote") or an earned thumbs-up (source "feedback"); one of hers could only come from the latter.
    for item in learned.regression_after:
        for a in pushed.get(item["prompt"], ()):
            assert item["source"] == "vote" or not is_equivalent(item["label"], a), item
    # (An item of her prompts may still come from feedback: the honest users' earned verdict, the true sum.)
    share_before, share_after = _share(learned.plain, pushed), _share(learned.after, pushed)
    # Two identities that agree are a quorum (serve.learn.feedback_quorum=2): their answer is the label.
    assert agreed, "the colluders never drew a wrong answer with a shared seed"
    for prompt, answer in agreed.items():
        assert prompt in taught and is_equivalent(taught[prompt]["label"], answer), (prompt, taught.get(prompt))
        assert taught[prompt]["ups"][0][1] == "quorum of 2"
    print(f"\nSERVE REPORT poisoning: mallory rated {sum(len(a) for a in pushed.values())} wrong answers up on "
          f"{len(pushed)} prompts (x5 each): the round's labels took none of them; her answers' share of the "
          f"served answers on those prompts v0 {share_before:.3f} -> v1 {share_after:.3f}; regression set "
          f"{len(learned.regression_before)} -> {len(learned.regression_after)} items, none of hers; two colluding "
          f"identities changed the label of {len(agreed)} of {len(agreed)} prompts")
    # Served answers: the round did not move the model toward her answers (2 s.e. of the share, 128 answers).
    assert share_after <= share_before + 2 * (share_before * (1 - share_before) / 128) ** 0.5 + 0.01


def test_the_learner_promotes_a_version_that_answers_better_than_the_one_before(learned):
    v, r1 = learned.versions, learned.round
    assert r1["outcome"] == "promoted", r1
    assert v["current"] == r1["version"] == 1
    assert [x["version"] for x in v["versions"] if x["status"] == "promoted"] == [1]
    assert {_version(r) for _, r, _ in learned.sc + learned.plain} == {0}
    assert {_version(r) for _, r, _ in learned.after} == {1}
    acc_before, acc_after, acc_sc = _acc(learned.plain), _acc(learned.after), _acc(learned.sc)
    print(f"\nSERVE REPORT accuracy on {N_PROMPTS} demo test prompts x {REPS}: v0 {acc_before:.3f} -> "
          f"v1 {acc_after:.3f}; self-consistency (votes=8) on v0 {acc_sc:.3f} vs plain {acc_before:.3f}; "
          f"round 1 gate score {r1['current_score']:.3f} -> {r1['candidate_score']:.3f} "
          f"({json.dumps(r1['metrics'].get('current'))} -> {json.dumps(r1['metrics'].get('candidate'))}); "
          f"chapter 1 took {learned.seconds:.0f}s")
    assert acc_after > acc_before
    assert "ttrl_swaps_total 1" in learned.metrics
    assert 'ttrl_learning_rounds_total{outcome="promoted"} 1' in learned.metrics


def test_load_across_the_hot_swap_loses_no_request(server, learned):
    from ttrl.serve.loadtest import summarize

    results, v = learned.results, learned.versions
    load = summarize(results, learned.wall)
    swaps = [s for s in v["swaps"] if s["version"] >= 1]
    assert swaps, f"no swap: {json.dumps(v['rounds'])}"
    swap = swaps[0]
    during = [r for r in results if r.t_end >= swap["started"] and r.t_start <= swap["finished"]]
    print(f"\nSERVE REPORT load test, 8 clients, {load['wall_s']:.0f}s across the swap: {load['ok']} ok / "
          f"{load['requests']}, {load['rps']:.1f} req/s, p50 {load['p50_s'] * 1e3:.0f} ms, "
          f"p99 {load['p99_s'] * 1e3:.0f} ms, max {load['max_s'] * 1e3:.0f} ms; by version "
          f"{json.dumps(load['by_version'], default=float)}; {len(during)} requests overlapped the swap "
          f"(engine pause {swap['max_pause_s'] * 1e3:.0f} ms)")
    assert load["failed"] == 0, load["errors"]
    assert during, "no request was in flight during the swap"
    assert {0, 1} <= {r.version for r in results}, "the load saw both versions"
    answered = {r.id for _, r, _ in learned.sc + learned.plain + learned.after} | {r.id for r in results}
    assert answered <= _store_ids(server.dir), "an answered request is not stored"


def test_sigkill_mid_traffic_then_restart_keeps_every_answer_and_serves_the_last_promoted_version(
        server, restarted, demo):
    answered = [r for r in restarted.results if r.ok]
    cut = [r for r in restarted.results if not r.ok]
    assert answered and cut, "the kill did not land during traffic"
    assert all(r.t_end >= restarted.kill_at for r in cut), "a request failed before the kill"
    assert {r.version for r in answered} == {1}
    assert {r.id for r in answered} <= restarted.store_ids, "an answered query was lost in the crash"
    v = restarted.versions
    assert v["current"] == 1 and [x["version"] for x in v["versions"] if x["status"] == "promoted"] == [1]
    r = httpx.post(f"{server.url}/v1/completions", json={"prompt": demo[0].text}, timeout=120,
                   headers=_bearer(restarted.key["user0"])).json()
    assert r["system_fingerprint"] == "ttrl-v1"
    print(f"\nSERVE REPORT kill: {len(answered)} answered before SIGKILL (all in the store), {len(cut)} cut off; "
          f"restart in {restarted.startup_s:.0f}s serves v{v['current']}")


def test_a_harmful_update_is_rejected_and_the_served_version_does_not_change(server, restarted, demo):
    srv = server
    rounds_before = len(restarted.versions["rounds"])
    srv.learn()  # on the queries of the load test and of the killed traffic, with the inverted reward
    r = srv.wait_rounds(rounds_before + 1)[-1]
    print(f"\nSERVE REPORT harmful update (inverted TTRL reward): gate score {r['current_score']:.3f} -> "
          f"{r['candidate_score']:.3f}, {r['outcome']}: {r['reasons']}")
    assert r["outcome"] == "rejected", r
    assert r["reasons"]
    v = srv.versions()
    assert v["current"] == 1 and [x["version"] for x in v["versions"]] == [0, 1]
    assert any(e["kind"] == "gate_rejected" for e in v["events"])
    after = asyncio.run(_ask_all(srv.url, demo[:16], restarted.key))
    assert {_version(x) for _, x, _ in after} == {1}
    assert "gate rejected" in srv.learner()["last_alert"]["message"]
    metrics = httpx.get(f"{srv.url}/metrics", headers=AUTH).text
    assert "ttrl_gate_rejections_total 1" in metrics and "ttrl_serving_version 1" in metrics

    # Rollback to any kept version is one call (with the token).
    assert httpx.post(f"{srv.url}/admin/rollback", json={"version": 0}, timeout=30).status_code == 401
    rb = httpx.post(f"{srv.url}/admin/rollback", json={"version": 0}, headers=AUTH, timeout=300)
    assert rb.status_code == 200, rb.text
    assert srv.versions()["current"] == 0
    r = httpx.post(f"{srv.url}/v1/completions", json={"prompt": demo[1].text}, timeout=120,
                   headers=_bearer(restarted.key["user1"])).json()
    assert r["system_fingerprint"] == "ttrl-v0"
