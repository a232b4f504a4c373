"""Per-tenant learning, for real: a live `ttrl-serve` (Ray, vLLM CPU multi-LoRA, DeepSpeed, HTTP on loopback).

The serve tests' warm start (serving.WARM, the one test_serve.py uses, cached after its
first build) serves with model.lora and serve.tenants on, and the learner on
(rounds only when the test asks). Two tenants, alice and bob, ask the same
demo prompts with the same seeds. Then one round of alice's alone, with
TTRL's reward inverted (`contrarian_reward`: a harmful update) and the gate
made unable to refuse (tolerance 1, collapse signals off, a small labelled
set), so that it promotes: the point is what a promotion touches, not the
gate (test_serve.py shows the gate refusing this reward).

- bob's answers after alice's round: token for token his answers before;
- alice's answers: changed (she is served her new version's folder);
- the store records the round, its version and every query with its tenant;
- after a restart, alice is still served her promoted version (same answers
  as before the restart) and bob still the adapter he started with;
- a second round of alice's (her first version resident in the engine) is
  served at once, and `/admin/rollback?tenant=alice` back to her first
  version answers as it did; bob's answers never move;
- with the gate on and rounds due by count: a tenant's round killed after
  its first step is marked interrupted, the rounds started by count after
  the restart are refused (harmful reward), and neither tenant's answers
  move.

Figures are printed as TENANT LEARNING REPORT lines; no assertion is about time.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3

import httpx
import pytest

from tests.conftest import compose_config
from tests.integration.serving import AUTH, WARM, Server, ask_each, same_tokens, served_samples, write_keys

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(2400)]

LORA = ["model.lora.enabled=true", "model.lora.r=8"]
# Small rounds: 2 steps of 4 prompts x 8 samples, at a learning rate at which 2 LoRA steps change the texts
# (measured: 3 of 4 texts changed, the gate's score 0.500 -> 0.125; at 1e-3 the log-probs moved, no text).
ROUND = ["serve.learn.every_queries=0", "serve.learn.min_queries=1", "serve.learn.steps=2",
         "data.prompts_per_step=4", "rollout.n_votes=8", "rollout.n_train=8", "trainer.micro_batch_size=32",
         "trainer.lr=5e-3"]
HARMFUL = ["reward=custom", "reward.fn=ttrl.serve.testing:contrarian_reward", "serve.learn.feedback=false"]
GATE_OFF = ["serve.gate.tolerance=1.0", "serve.gate.max_entropy_drop=null", "serve.gate.max_answer_rate_drop=null",
            "serve.gate.max_length_change=null", "serve.gate.n_samples=2"]
BASE = ["experiment=demo", *WARM, *LORA, "serve.port=0", "trainer.num_workers=1", "logger.progress=false",
        "serve.limits.requests_per_minute=0", "serve.tenants.enabled=true", "serve.tenants.max_loaded=2",
        *ROUND, *HARMFUL]
# What the first test saw, for the second: tenant -> its served samples (alice at her v1, bob as created).
SEEN: dict[str, list] = {}
N_PROMPTS = 4
TOKENS = 24


@pytest.fixture(scope="module")
def prompts():
    from ttrl.data.loader import load_prompts
    from ttrl.data.templates import render_prompt
    from ttrl.models.resolve import resolve_model_path

    cfg = compose_config("experiment=demo", *WARM, *LORA)
    resolve_model_path(cfg.model, cfg.data)  # the warm start, outside the server's start-up deadline
    return [render_prompt(p.problem, cfg.model) for p in load_prompts(cfg.data)[:N_PROMPTS]]


@pytest.fixture(scope="module")
def server(tmp_path_factory, prompts):
    from ttrl.data.synthetic import arithmetic_problems

    d = tmp_path_factory.mktemp("tenant-learning")
    headers = write_keys(d / "keys", ["alice", "bob"])
    regression = d / "regression.jsonl"
    with regression.open("w") as fh:
        for p in arithmetic_problems(4, terms=3, digits=2, seed=777):
            fh.write(json.dumps({"id": p.id, "problem": p.problem, "answer": p.answer}) + "\n")
    # The gate's settings are this start's overrides (GATE_OFF first); a later start may replace them.
    srv = Server(d / "serve", [*BASE, f"serve.api_keys_file={d / 'keys'}", f"serve.gate.regression_set={regression}"],
                 *GATE_OFF)
    srv.start()
    print(f"\nTENANT LEARNING REPORT start-up {srv.startup_s[-1]:.0f} s")
    yield srv, headers
    srv.stop()


def _ask(url: str, headers: dict, prompts: list[str], who: list[str]):
    return ask_each(url, headers, prompts, who, TOKENS, 500)


def _db(srv: Server) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{srv.dir / 'store.sqlite'}?mode=ro", uri=True)


def test_one_tenants_harmful_round_changes_its_answers_and_no_other_tenants(server, prompts):
    srv, h = server
    before = asyncio.run(_ask(srv.url, h, prompts, ["alice", "bob"]))
    bob0, alice0 = served_samples(srv.dir, before["bob"]), served_samples(srv.dir, before["alice"])
    assert all(map(same_tokens, alice0, bob0)), "two new tenants (B = 0) answer alike"

    r = httpx.post(f"{srv.url}/admin/learn", params={"tenant": "alice"}, headers=AUTH, timeout=30)
    assert r.status_code == 200 and r.json()["tenant"] == "alice", r.text
    (rnd,) = srv.wait_rounds(1)
    print(f"TENANT LEARNING REPORT alice's round: {rnd['outcome']} v{rnd['version']}, gate "
          f"{rnd['current_score']} -> {rnd['candidate_score']}, reasons {rnd['reasons']}, reward mean "
          f"{rnd['metrics'].get('reward_mean')}, {rnd['finished'] - rnd['started']:.0f} s")
    assert rnd["tenant"] == "alice" and rnd["outcome"] == "promoted", srv.tail()
    version = rnd["version"]

    after = asyncio.run(_ask(srv.url, h, prompts, ["alice", "bob"]))
    bob1, alice1 = served_samples(srv.dir, after["bob"]), served_samples(srv.dir, after["alice"])
    changed = sum(not same_tokens(a, b) for a, b in zip(alice1, alice0))
    print(f"TENANT LEARNING REPORT after alice's round: bob identical on "
          f"{sum(map(same_tokens, bob1, bob0))}/{N_PROMPTS}, "
          f"alice changed on {changed}/{N_PROMPTS} (text on {sum(a[0] != b[0] for a, b in zip(alice1, alice0))}), "
          f"max |mean log-prob diff| alice {max(abs(a[1] - b[1]) for a, b in zip(alice1, alice0)):.2e}, "
          f"bob {max(abs(a[1] - b[1]) for a, b in zip(bob1, bob0)):.2e}")
    assert all(map(same_tokens, bob1, bob0)), "bob's answers moved when only alice's adapter was trained"
    assert changed == N_PROMPTS, "alice is not served her new version"
    assert any(a[0] != b[0] for a, b in zip(alice1, alice0)), "alice's new version changed no text"

    listing = {t["name"]: t for t in httpx.get(f"{srv.url}/admin/tenants", headers=AUTH, timeout=30).json()["tenants"]}
    assert listing["alice"]["version"] == version and listing["bob"]["version"] is None
    assert listing["alice"]["path"] == str(srv.dir / "tenants" / "alice" / "versions" / f"v{version}" / "policy")
    db = _db(srv)
    try:
        tenants = dict(db.execute("SELECT id, tenant FROM queries").fetchall())
        vrow = db.execute("SELECT tenant, status FROM versions WHERE version=?", (version,)).fetchone()
        used = db.execute("SELECT tenant, COUNT(*) FROM queries WHERE round IS NOT NULL GROUP BY tenant").fetchall()
    finally:
        db.close()
    assert {tenants[b["id"]] for b in before["alice"] + after["alice"]} == {"alice"}
    assert {tenants[b["id"]] for b in before["bob"] + after["bob"]} == {"bob"}
    assert vrow == ("alice", "promoted") and used == [("alice", N_PROMPTS)], "only alice's queries were trained on"
    assert srv.versions()["current"] == 0, "the shared version did not move"

    # ── a restart serves each tenant its last promoted version ──
    srv.stop()
    srv.start()
    print(f"TENANT LEARNING REPORT restart: {srv.startup_s[-1]:.0f} s")
    again = asyncio.run(_ask(srv.url, h, prompts, ["alice", "bob"]))
    assert all(map(same_tokens, served_samples(srv.dir, again["alice"]), alice1)), \
        "alice's promoted version was not served again"
    assert all(map(same_tokens, served_samples(srv.dir, again["bob"]), bob0)), \
        "bob's adapter changed across the restart"

    # ── a second round of alice's (her v1 is resident in the engine), then her rollback to v1 ──
    httpx.post(f"{srv.url}/admin/learn", params={"tenant": "alice"}, headers=AUTH, timeout=30).raise_for_status()
    rnd2 = srv.wait_rounds(2)[-1]
    assert rnd2["tenant"] == "alice" and rnd2["outcome"] == "promoted" and rnd2["base_version"] == version, srv.tail()
    v2 = asyncio.run(_ask(srv.url, h, prompts, ["alice", "bob"]))
    alice2 = served_samples(srv.dir, v2["alice"])
    assert not any(map(same_tokens, alice2, alice1)), "alice's second version was not served (a stale adapter?)"
    assert all(map(same_tokens, served_samples(srv.dir, v2["bob"]), bob0))
    r = httpx.post(f"{srv.url}/admin/rollback", params={"tenant": "alice"}, json={"version": version}, headers=AUTH,
                   timeout=30)
    assert r.status_code == 200 and r.json()["previous"] == rnd2["version"], r.text
    back = asyncio.run(_ask(srv.url, h, prompts, ["alice", "bob"]))
    assert all(map(same_tokens, served_samples(srv.dir, back["alice"]), alice1)), \
        "the rollback did not serve alice's v1 again"
    assert all(map(same_tokens, served_samples(srv.dir, back["bob"]), bob0))
    tv = httpx.get(f"{srv.url}/admin/versions", params={"tenant": "alice"}, headers=AUTH, timeout=30).json()
    assert tv["current"] == version and [v["version"] for v in tv["versions"]] == [version, rnd2["version"]]
    SEEN.update(alice=alice1, bob=bob0, alice_version=version)
    metrics = httpx.get(f"{srv.url}/metrics", headers=AUTH, timeout=30).text
    assert 'ttrl_tenant_learning_rounds_total{tenant="alice",outcome="promoted"} 1' in metrics
    print(f"TENANT LEARNING REPORT second round of alice's: v{rnd2['version']}, changed on "
          f"{sum(not same_tokens(a, b) for a, b in zip(alice2, alice1))}/{N_PROMPTS}; rollback to v{version}: "
          f"alice as "
          f"at v{version} on {N_PROMPTS}/{N_PROMPTS}, bob as at the start throughout")


def test_a_tenants_round_killed_midway_then_rounds_by_count_that_the_gate_refuses_change_no_answer(server, prompts):
    """Restarted with the gate on (its defaults, the labelled set), rounds of 4 steps due every 4 queries: both
    tenants have unused queries, so rounds start by themselves. The first is killed after its first step (a power
    cut); after the next restart both tenants' rounds run again, by count, and the gate refuses both (the reward is
    harmful). Through all of it alice is served her v1 and bob his first adapter, token for token."""
    srv, h = server
    if not SEEN:
        pytest.skip("needs the first test's answers (it failed or did not run)")
    # 4 steps, not the first test's 2: at 2 one tenant's harmful round once moved the gate's score by a single
    # sample of 64 (0.375 -> 0.359, under its 0.03 tolerance) and was promoted; the refusal must not hang on one.
    auto = ["serve.learn.every_queries=4", "serve.learn.steps=4"]
    srv.stop()
    srv.start(*auto, env={"TTRL_SERVE_CRASH_AT": "round_step"})
    assert srv.wait_exit(900) != 0, "the crash point did not fire: no round started by count"
    srv.start(*auto)
    print(f"TENANT LEARNING REPORT killed mid-round, restarted with the gate on: {srv.startup_s[-1]:.0f} s")
    db = _db(srv)
    try:
        (cut,) = db.execute("SELECT tenant FROM rounds WHERE outcome='interrupted'").fetchone()
    finally:
        db.close()
    rounds = srv.wait_rounds(5)  # 2 of the first test, the interrupted one, one per tenant now
    now = {r["tenant"]: r for r in rounds[3:]}
    print(f"TENANT LEARNING REPORT by count after the kill (of {cut}'s round): "
          + "; ".join(f"{t}: {r['outcome']} {r['current_score']} -> {r['candidate_score']} {r['reasons']}"
                      for t, r in sorted(now.items())))
    assert set(now) == {"alice", "bob"}, f"a round per tenant, by count: {rounds}"
    assert all(r["outcome"] == "rejected" for r in now.values()), now
    assert "its queries made a round due" in srv.tail(20000), "the rounds were not started by count"
    tv = httpx.get(f"{srv.url}/admin/versions", params={"tenant": "alice"}, headers=AUTH, timeout=30).json()
    assert tv["current"] == SEEN["alice_version"]
    metrics = httpx.get(f"{srv.url}/metrics", headers=AUTH, timeout=30).text
    for t in ("alice", "bob"):
        assert f'ttrl_tenant_learning_rounds_total{{tenant="{t}",outcome="rejected"}} 1' in metrics, metrics[-3000:]
    # (these 4 queries a tenant make its next round due: asked last, after the counters are read)
    got = asyncio.run(_ask(srv.url, h, prompts, ["alice", "bob"]))
    assert all(map(same_tokens, served_samples(srv.dir, got["alice"]), SEEN["alice"])), \
        "a refused or killed round changed what alice is served"
    assert all(map(same_tokens, served_samples(srv.dir, got["bob"]), SEEN["bob"])), \
        "a refused or killed round changed what bob is served"
