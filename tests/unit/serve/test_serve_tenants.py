"""A model per tenant, the pure parts: config, who is which tenant, adapters on disk, batches, the API on fakes.

The real engines (vLLM multi-LoRA on CPU) are tests/integration/test_serve_tenants.py.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import httpx
import pytest
import torch

from tests.unit.serve.test_serve_app import MODEL_CFG, FakeController
from tests.unit.serve.test_serve_config import ROOT, compose_serve
from ttrl.config import ConfigError
from ttrl.serve.app import Service, ServiceConfig, build_app
from ttrl.serve.auth import ApiKeys, KeysFileError, load_api_keys, load_tenants
from ttrl.serve.config import validate_serve
from ttrl.serve.engines import EnginePool
from ttrl.serve.guard import GuardPolicy, allowed_host_set
from ttrl.serve.limits import ClientLimits
from ttrl.serve.protocol import Defaults
from ttrl.serve.store import Store
from ttrl.serve.tenants import (
    FIRST_ID,
    RoundQueue,
    TenantLabels,
    Tenants,
    adapter_dir,
    ready_tenants,
    write_adapter,
)
from ttrl.serve.testing import FakeDeath, FakeEngine, FakeTokenizer

pytestmark = pytest.mark.unit

SPEC = {"r": 2, "alpha": 4.0, "dropout": 0.0, "target_modules": ["q_proj"], "init": "default"}
A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


def _keys(tmp_path, text: str):
    f = tmp_path / "keys"
    f.write_text(text)
    f.chmod(0o600)
    return f


# ── config ────────────────────────────────────────────────────────────────
def _tenant_cfg(tmp_path, *overrides: str):
    keys = _keys(tmp_path, "alice:alice-key-0123456789\n")
    return compose_serve("serve.tenants.enabled=true", "model.lora.enabled=true", "serve.learn.enabled=false",
                         f"serve.api_keys_file={keys}", *overrides)


def test_tenants_are_off_by_default_and_validate_when_on(tmp_path):
    cfg = compose_serve()
    assert cfg.serve.tenants.enabled is False and cfg.serve.tenants.max_loaded == 4
    validate_serve(_tenant_cfg(tmp_path))


@pytest.mark.parametrize("override, words", [
    ("serve.tenants.max_loaded=0", "serve.tenants.max_loaded=0 must be between 1 and 64"),
    ("serve.tenants.max_loaded=1000", "serve.tenants.max_loaded=1000"),
    ("model.lora.enabled=false", "serve.tenants.enabled=true needs LoRA serving: set model.lora.enabled=true"),
])
def test_a_misconfigured_tenants_section_is_one_sentence_naming_the_key(tmp_path, override, words):
    with pytest.raises(ConfigError) as err:
        validate_serve(_tenant_cfg(tmp_path, override))
    assert words in str(err.value)
    assert str(err.value).count(". ") == 0, "one sentence"


def test_tenants_learn_per_tenant_so_the_learner_may_be_on(tmp_path):
    validate_serve(_tenant_cfg(tmp_path, "serve.learn.enabled=true"))


def test_tenants_without_an_api_keys_file_are_refused(monkeypatch):
    monkeypatch.delenv("TTRL_API_KEYS_FILE", raising=False)
    cfg = compose_serve("serve.tenants.enabled=true", "model.lora.enabled=true", "serve.learn.enabled=false")
    with pytest.raises(ConfigError, match=r"serve.tenants.enabled=true needs serve.api_keys_file"):
        validate_serve(cfg)


def test_the_command_line_says_why_in_one_sentence_and_exits_2():
    res = subprocess.run([sys.executable, "-m", "ttrl.serve", "serve.tenants.enabled=true"], capture_output=True,
                         text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 2
    assert res.stderr.strip().startswith("ttrl-serve: config error: serve.tenants.enabled=true needs LoRA serving")
    assert len(res.stderr.strip().splitlines()) == 1


# ── who is which tenant ───────────────────────────────────────────────────
def test_a_key_line_names_its_tenant_or_is_its_own_or_none(tmp_path):
    f = _keys(tmp_path, "alice:alice-key-0123456789\nbob:bob-key-0123456789:team-a\n"
                        "carol:carol-key-0123456789:team-a\neval:eval-key-0123456789:-\n")
    assert load_tenants(f) == {"alice": "alice", "bob": "team-a", "carol": "team-a", "eval": None}
    assert load_api_keys(f)["bob"] == "bob-key-0123456789", "the tenant field is not part of the key"
    assert ApiKeys.from_file(f).identify("carol-key-0123456789") == "carol"


@pytest.mark.parametrize("line, words", [
    ("bob:bob-key-0123456789:../etc", "line 1: the tenant '../etc' must be"),
    ("bob:bob-key-0123456789:", "line 1 is not a `name:key` line"),
    ("bob:bob-key-0123456789:a:b", "line 1: the tenant 'a:b' must be"),
])
def test_a_bad_tenant_field_names_the_line_never_the_key(tmp_path, line, words):
    with pytest.raises(KeysFileError) as err:
        load_tenants(_keys(tmp_path, line + "\n"))
    assert words in str(err.value) and "bob-key" not in str(err.value)


# ── adapters on disk ──────────────────────────────────────────────────────
def _served(tmp_path):
    """A served version's adapter folder (as versions/v0/policy), B = 0."""
    from ttrl.rollout.lora import write_adapter as write_peft

    return write_peft(tmp_path / "versions" / "v0" / "policy",
                      {A: torch.randn(2, 64), B: torch.zeros(64, 2)}, SPEC, "base")


def test_a_new_tenant_starts_from_the_served_adapter_with_a_stable_id(tmp_path):
    from ttrl.rollout.lora import read_spec, read_tensors

    served = _served(tmp_path)
    root = tmp_path / "tenants"
    t = Tenants(root, lambda: served, {"alice": "alice", "bob": "team", "eval": None})
    a = t.get(t.tenant_of("alice"))
    b = t.get(t.tenant_of("bob"))
    assert (a.id, b.id) == (FIRST_ID, FIRST_ID + 1) and t.get("alice") == a and t.created == 2
    assert a.path == str(adapter_dir(root, "alice"))
    got, want = read_tensors(a.path), read_tensors(served)
    assert set(got) == set(want) and all(torch.equal(got[n], want[n]) for n in want)
    assert not got[B].any(), "a new tenant's B is zero: it answers as the base"
    assert read_spec(a.path) == read_spec(served)
    assert json.loads((root / "alice" / "tenant.json").read_text())["from_version"] == "v0"
    assert t.tenant_of("eval") is None
    with pytest.raises(KeyError):
        t.tenant_of("anonymous")
    # A restart finds the same ids; a new tenant gets the next one.
    again = Tenants(root, lambda: served, {"carol": "carol"})
    assert again.get("team") == b and again.get("carol").id == FIRST_ID + 2 and again.created == 1


def test_a_tenant_killed_as_its_adapter_lands_still_knows_where_it_came_from(tmp_path, monkeypatch):
    import ttrl.serve.tenants as T

    class Killed(BaseException):
        pass

    served = _served(tmp_path)
    root = tmp_path / "tenants"
    real = T._install_dir

    def install_then_die(tmp, final):
        real(tmp, final)
        raise Killed  # SIGKILL right after the copied adapter is renamed into place

    monkeypatch.setattr(T, "_install_dir", install_then_die)
    with pytest.raises(Killed):
        Tenants(root, lambda: served, {"alice": "alice"}).get("alice")
    monkeypatch.setattr(T, "_install_dir", real)
    # The restart sees a copy of v0 (its learner may train it), not an adapter placed by hand.
    again = Tenants(root, lambda: served, {"alice": "alice"})
    assert again.get("alice").id == FIRST_ID and again.origin("alice") == 0


def test_an_adapter_written_before_the_first_request_is_the_one_served(tmp_path):
    from ttrl.rollout.lora import read_tensors

    served = _served(tmp_path)
    root = tmp_path / "tenants"
    hot = {A: torch.randn(2, 64), B: torch.ones(64, 2)}
    write_adapter(root, "bob", hot, SPEC, "base")
    write_adapter(root, "bob", hot, SPEC, "base")  # replaced in place, atomically
    assert sorted(p.name for p in (root / "bob").iterdir()) == ["adapter"]
    b = Tenants(root, lambda: served, {"bob": "bob"}).get("bob")
    assert torch.equal(read_tensors(b.path)[B], hot[B])
    assert json.loads((root / "bob" / "tenant.json").read_text())["from_version"] is None


def test_an_adapter_of_another_shape_in_a_tenant_folder_is_refused_naming_it(tmp_path):
    served = _served(tmp_path)
    root = tmp_path / "tenants"
    write_adapter(root, "bob", {A: torch.randn(4, 64), B: torch.ones(64, 4)}, {**SPEC, "r": 4}, "base")
    t = Tenants(root, lambda: served, {"bob": "bob"})
    with pytest.raises(ValueError, match=r"tenants/bob/adapter has r=4, the served adapter \(model.lora\) r=2"):
        t.get("bob")
    assert t.listing() == [], "a refused adapter is no tenant"


# ── batches ───────────────────────────────────────────────────────────────
def test_a_batch_holds_at_most_max_loaded_tenants_and_the_loads_are_counted():
    async def main():
        eng = FakeEngine(delay=0.02, tenant_slots=2)
        seen = []
        pool = EnginePool([eng], 0, death_errors=(FakeDeath,), max_adapters=2,
                          on_adapters=lambda lo, un: seen.append((lo, un)))
        await pool.start()
        key = (1, 1.0, 1.0, -1, 4, None)
        ads = {n: (n, i, f"/t/{n}") for i, n in enumerate(["a", "b", "c"], FIRST_ID)}
        # Busy the engine, then queue: 3 tenants and the shared version, several requests each.
        first = asyncio.create_task(pool.generate([1], key, "x", ads["a"]))
        await asyncio.sleep(0.005)
        jobs = [pool.generate([i], key, f"client-{n}", ads[n]) for i, n in enumerate("abcabc")]
        jobs += [pool.generate([9], key, "shared-user", None)]
        await asyncio.gather(first, *jobs)
        calls = [entry for entry in eng.log if entry[0] == "generate"]
        for entry in calls:
            assert len({t for t in entry[-1] if t is not None}) <= 2, entry
        assert sum(len(entry[-1]) for entry in calls) == 8
        assert pool.adapter_loads == eng.loads >= 3 and pool.adapter_unloads == eng.unloads >= 1
        assert sum(lo for lo, _ in seen) == eng.loads
        st = pool.stats()["tenant_adapters"]
        assert st["max_loaded"] == 2 and st["loads"] == eng.loads and len(st["resident"][0]) == 2
        await pool.stop()

    asyncio.run(main())


# ── the API ───────────────────────────────────────────────────────────────
def test_each_key_is_answered_by_its_tenant_and_a_client_without_one_is_refused(tmp_path):
    served = _served(tmp_path)
    f = _keys(tmp_path, "alice:alice-key-0123456789\nbob:bob-key-0123456789:team\neval:eval-key-0123456789:-\n"
                        "dave:dave-key-0123456789\nerin:erin-key-0123456789\n")
    headers = {n: {"Authorization": f"Bearer {n}-key-0123456789"} for n in ("alice", "bob", "eval", "dave", "erin")}
    write_adapter(tmp_path / "tenants", "erin", {A: torch.randn(4, 64), B: torch.ones(64, 4)}, {**SPEC, "r": 4})

    async def main():
        eng = FakeEngine(delay=0.002, tenant_slots=2)
        pool = EnginePool([eng], 0, death_errors=(FakeDeath,), max_adapters=2)
        await pool.start()
        tenants = Tenants(tmp_path / "tenants", lambda: served, load_tenants(f))
        defaults = Defaults(temperature=1.0, top_p=1.0, max_tokens=8, votes=1, max_model_len=256)
        svc = Service(ServiceConfig("tiny", defaults, 30.0, "admin-token-123"), FakeTokenizer(), MODEL_CFG, pool,
                      Store(tmp_path / "store.sqlite"), FakeController(), tenants)
        policy = GuardPolicy(allowed_hosts=allowed_host_set([], "127.0.0.1"), cors_origins=frozenset(),
                             max_body_bytes=1 << 20, api_keys=ApiKeys.from_file(f), admin_token="admin-token-123",
                             limits=ClientLimits(0.0, 100, 16))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=build_app(svc, policy)),
                                     base_url="http://localhost") as c:
            got = {}
            for n in ("alice", "bob", "eval", "alice"):
                r = await c.post("/v1/completions", json={"prompt": "1+1="}, headers=headers[n])
                assert r.status_code == 200, r.text
                got[n] = r.json()["ttrl"]["tenant"]
            assert got == {"alice": "alice", "bob": "team", "eval": None}
            assert [e[-1] for e in eng.log] == [["alice"], ["team"], [None], ["alice"]]
            assert (await c.post("/v1/completions", json={"prompt": "1+1="})).status_code == 401
            # An identity the guard let in but with no tenant (not from the keys file) is refused, never served.
            svc.tenants.key_tenants.pop("alice")
            r = await c.post("/v1/completions", json={"prompt": "1+1="}, headers=headers["alice"])
            assert r.status_code == 403 and "has no tenant" in r.json()["error"]["message"]
            listing = (await c.get("/admin/tenants", headers={"Authorization": "Bearer admin-token-123"})).json()
            assert [t["name"] for t in listing["tenants"]] == ["alice", "team"] and listing["loads"] == 2
            # A new tenant's first requests, all at once: one tenant created, counted once.
            rs = await asyncio.gather(*(c.post("/v1/completions", json={"prompt": "1+1="}, headers=headers["dave"])
                                        for _ in range(4)))
            assert [r.status_code for r in rs] == [200] * 4
            metrics = (await c.get("/metrics", headers={"Authorization": "Bearer admin-token-123"})).text
            assert "ttrl_tenants_created_total 3" in metrics
            # An adapter the engines cannot serve: a 500 for its tenant, the server's paths kept from the client.
            r = await c.post("/v1/completions", json={"prompt": "1+1="}, headers=headers["erin"])
            assert r.status_code == 500 and "tenant 'erin' cannot be served" in r.json()["error"]["message"]
            assert str(tmp_path) not in r.text
        await pool.stop()
        svc.close()

    asyncio.run(main())


# ── per-tenant learning: whose round, version folders (phase 2) ─────────────
def test_a_tenant_below_min_queries_waits_and_only_new_queries_make_a_round_due():
    unused = {"alice": 10, "bob": 3, "carol": 12}
    assert ready_tenants(unused, {}, every_queries=8, min_queries=4) == ["alice", "carol"]
    # carol's last round left 10 of hers unused (quarantined, say): 2 new ones are not 8.
    assert ready_tenants(unused, {"carol": 10}, every_queries=8, min_queries=4) == ["alice"]
    assert ready_tenants(unused, {}, every_queries=0, min_queries=4) == [], "no count trigger, no time trigger"
    assert ready_tenants(unused, {}, every_queries=0, min_queries=4, timely=True) == ["alice", "carol"]
    assert ready_tenants(unused, {}, every_queries=0, min_queries=4, manual=True) == ["alice", "carol"], \
        "a manual trigger without a name does not lift min_queries"
    assert ready_tenants({"bob": 1}, {}, every_queries=1, min_queries=0) == ["bob"]
    assert ready_tenants({}, {}, every_queries=1, min_queries=0) == []


def test_rounds_go_round_robin_so_a_busy_tenant_cannot_starve_a_quiet_one():
    q = RoundQueue()
    order = []
    for _ in range(7):
        # alice always has queries; bob and carol too, dave only from the fourth round on.
        ready = ["alice", "bob", "carol"] + (["dave"] if len(order) >= 3 else [])
        pick = q.pick(ready)
        q.done(pick)
        order.append(pick)
    assert order == ["alice", "bob", "carol", "dave", "alice", "bob", "carol"]
    assert q.pick([]) is None
    q.done("zed")
    assert q.pick(["alice", "bob"]) == "alice", "after the last name, back to the first"
    assert q.pick(["bob", "bob"]) == "bob"


def test_a_promoted_version_is_a_new_folder_served_to_its_tenant_alone_with_the_same_id(tmp_path):
    served = tmp_path / "versions" / "v0" / "policy"
    write_adapter(tmp_path / "seed", "x", {A: torch.zeros(2, 16), B: torch.zeros(16, 2)}, SPEC)
    served.parent.mkdir(parents=True)
    (tmp_path / "seed" / "x" / "adapter").rename(served)
    t = Tenants(tmp_path / "tenants", lambda: served, {"alice": "alice", "bob": "bob"})
    alice, bob = t.get("alice"), t.get("bob")
    assert t.origin("alice") == 0, "copied from v0: a round starts from v0's trainer state"
    with pytest.raises(FileNotFoundError, match="v7"):
        t.serve_version("alice", 7)
    v7 = t.versions("alice").path(7) / "policy"
    write_adapter(tmp_path / "tmp", "a", {A: torch.ones(2, 16), B: torch.ones(16, 2)}, SPEC)
    v7.parent.mkdir(parents=True)
    (tmp_path / "tmp" / "a" / "adapter").rename(v7)
    info = t.serve_version("alice", 7)
    assert info["previous"] == alice.path and info["path"] == str(v7)
    assert t.get("alice") == type(alice)("alice", alice.id, str(v7)), "same id, new folder"
    assert t.get("bob") == bob, "another tenant is untouched"
    assert str(v7) == str(tmp_path / "tenants" / "alice" / "versions" / "v7" / "policy")
    assert {r["name"]: r["version"] for r in t.listing()} == {"alice": 7, "bob": None}
    # A restart reads tenant.json again: the version comes back from the store (server._resume_tenants).
    again = Tenants(tmp_path / "tenants", lambda: served, {"alice": "alice"})
    assert again.get("alice").path == alice.path and again.get("alice").id == alice.id
    write_adapter(tmp_path / "tenants", "carol", {A: torch.ones(2, 16), B: torch.ones(16, 2)}, SPEC)
    t.get("carol")
    assert t.origin("carol") is None, "an adapter placed by hand has no trainer state to learn from"


def test_tenant_labels_on_metrics_are_capped():
    labels = TenantLabels(2)
    assert [labels.label(n) for n in ("a", "b", "c", "a", "d", "b")] == ["a", "b", "_other", "a", "_other", "b"]
    assert TenantLabels(0).label("a") == "_other"


def _promoted(t: Tenants, store: Store, name: str, version: int, ones: float) -> None:
    """A promoted version of `name` as a learning round leaves it: a folder with policy/ and manifest.json,
    and its row in the store."""
    d = t.versions(name).path(version)
    write_adapter(d.parent / ".w", "x", {A: torch.full((2, 16), ones), B: torch.full((16, 2), ones)}, SPEC)
    d.mkdir(parents=True)
    (d.parent / ".w" / "x" / "adapter").rename(d / "policy")
    (d / "manifest.json").write_text("{}")
    r = store.start_round(store.serving_version(name), 1, name)
    store.commit_promotion(r, version, str(d), store.serving_version(name), used=[], current_score=0.5,
                           candidate_score=0.5, metrics={}, tenant=name)
    t.serve_version(name, version)


def test_the_admin_api_gives_each_tenant_its_versions_rounds_and_rollback_and_metrics_by_tenant(tmp_path):
    import threading

    from ttrl.serve.server import ServeController, _resume_tenants
    from ttrl.serve.versions import Versions

    served = _served(tmp_path)
    store = Store(tmp_path / "store.sqlite")
    store.add_version(0, str(served.parent), "base", serve=True)
    f = _keys(tmp_path, "alice:alice-key-0123456789\nbob:bob-key-0123456789\n")
    tenants = Tenants(tmp_path / "tenants", lambda: served, load_tenants(f))
    tenants.get("alice"), tenants.get("bob")
    _promoted(tenants, store, "alice", 1, 0.1)
    _promoted(tenants, store, "alice", 2, 0.2)
    ctl = ServeController(None, store, Versions(tmp_path / "versions"), None, 0, threading.Lock())
    ctl.tenants, ctl.tenant_labels = tenants, TenantLabels(1)
    svc = Service(ServiceConfig("tiny", Defaults(1.0, 1.0, 8, 1, 256), 30.0, "admin-token-123"), FakeTokenizer(),
                  MODEL_CFG, None, store, ctl, tenants)
    ctl.metrics = svc.metrics
    admin = {"Authorization": "Bearer admin-token-123"}

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=build_app(svc)),
                                     base_url="http://localhost") as c:
            v = (await c.get("/admin/versions", params={"tenant": "alice"}, headers=admin)).json()
            assert v["tenant"] == "alice" and v["current"] == 2
            assert [r["version"] for r in v["versions"]] == [1, 2] and len(v["rounds"]) == 2
            assert (await c.get("/admin/versions", params={"tenant": "bob"}, headers=admin)).json()["versions"] == []
            r = await c.get("/admin/versions", params={"tenant": "zed"}, headers=admin)
            assert r.status_code == 404 and "no tenant 'zed'" in r.json()["error"]["message"]
            r = await c.post("/admin/rollback", params={"tenant": "alice"}, json={"version": 0}, headers=admin)
            assert r.status_code == 404 and "kept versions: [1, 2]" in r.json()["error"]["message"]
            r = await c.post("/admin/rollback", params={"tenant": "bob"}, json={"version": 1}, headers=admin)
            assert r.status_code == 404, "alice's version is not bob's"
            r = await c.post("/admin/rollback", params={"tenant": "alice"}, json={"version": 1}, headers=admin)
            assert r.status_code == 200 and r.json()["previous"] == 2, r.text
            assert tenants.get("alice").path == str(tenants.versions("alice").hf_dir(1))
            assert store.serving_version("alice") == 1 and store.serving_version() == 0
            r = await c.post("/admin/learn", params={"tenant": "alice"}, headers=admin)
            assert r.status_code == 409 and "learner is off" in r.json()["error"]["message"]
        ctl.on_round({"round": 3, "outcome": "rejected", "tenant": "alice"})
        ctl.on_round({"round": 4, "outcome": "promoted", "tenant": "bob"})
        ctl.on_round({"round": 5, "outcome": "promoted"})
        text = svc.metrics.registry.render()
        assert 'ttrl_tenant_learning_rounds_total{tenant="alice",outcome="rejected"} 1' in text
        assert 'ttrl_tenant_learning_rounds_total{tenant="_other",outcome="promoted"} 1' in text, "capped at 1"
        assert 'ttrl_tenant_gate_rejections_total{tenant="alice"} 1' in text
        assert "ttrl_learning_rounds_total{outcome=\"promoted\"} 2" in text, "the totals count every round"

    asyncio.run(main())
    # A restart serves alice the version the store names (the rollback's), and removes unrecorded folders.
    (tenants.versions("alice").path(9) / "policy").mkdir(parents=True)
    (tenants.versions("alice").path(9) / "manifest.json").write_text("{}")
    again = Tenants(tmp_path / "tenants", lambda: served, load_tenants(f))
    _resume_tenants(store, again)
    assert again.get("alice").path == str(again.versions("alice").hf_dir(1)) and again.version_of("bob") is None
    assert again.versions("alice").on_disk() == [1, 2], "v9 was never recorded"
    svc.close()


def test_the_learner_gives_due_tenants_rounds_in_turn_and_a_manual_trigger_may_name_one(tmp_path):
    import threading
    import time
    from types import SimpleNamespace

    from ttrl.serve.learner import Learner
    from ttrl.serve.store import QueryRecord

    store = Store(tmp_path / "store.sqlite")
    store.add_queries([QueryRecord(id=f"cmpl-{t}{i}", idx=0, endpoint="completions", prompt=f"{t} {i}", version=0,
                                   votes=1, response=["x"], client=t, tenant=t)
                       for t, n in (("alice", 3), ("bob", 3), ("carol", 1)) for i in range(n)])
    # The learner's trigger logic alone (no trainer, no engines): what `_loop` asks before each round.
    ln = Learner.__new__(Learner)
    ln.cfg = SimpleNamespace(serve=SimpleNamespace(learn=SimpleNamespace(every_queries=2, every_seconds=0,
                                                                         min_queries=2)))
    ln.store, ln.tenants, ln.queue, ln._seen = store, object(), RoundQueue(), {}
    ln._manual, ln._manual_tenant, ln._next_tenant, ln._last_round = False, None, None, time.monotonic()
    ln._cond = threading.Condition()
    picked = []
    for _ in range(3):
        if ln._due(store.unused_by_tenant()) is None:
            picked.append(None)
            continue
        picked.append(ln._next_tenant)
        ln.queue.done(ln._next_tenant)  # as run_round does; none of its queries got used here
        ln._seen[ln._next_tenant] = store.count_unused(ln._next_tenant)
    assert picked == ["alice", "bob", None], "carol (1 query < min_queries=2) waits; no new queries, no round"
    ln.trigger("carol")
    assert ln._due(store.unused_by_tenant()) == "manual, tenant 'carol'" and ln._next_tenant == "carol", "the admin named her"
    ln._manual, ln._manual_tenant = True, None
    assert ln._due(store.unused_by_tenant()) == "manual" and ln._next_tenant == "alice", "a manual trigger without a name: the next in turn"


def test_the_learner_reads_the_tenants_tally_outside_the_lock_every_answer_takes(tmp_path):
    import threading
    import time
    from types import SimpleNamespace

    from ttrl.serve.learner import Learner
    from ttrl.serve.store import QueryRecord

    store = Store(tmp_path / "store.sqlite")
    store.add_queries([QueryRecord(id=f"cmpl-a{i}", idx=0, endpoint="completions", prompt=f"a {i}", version=0,
                                   votes=1, response=["x"], client="alice", tenant="alice") for i in range(3)])
    ln = Learner.__new__(Learner)
    ln.cfg = SimpleNamespace(serve=SimpleNamespace(learn=SimpleNamespace(every_queries=2, every_seconds=0,
                                                                         min_queries=2)))
    ln.tenants, ln.queue, ln._seen, ln.disabled, ln._stop, ln._new = object(), RoundQueue(), {}, None, False, 0
    ln._manual, ln._manual_tenant, ln._next_tenant, ln._last_round = False, None, None, time.monotonic()
    ln._cond = threading.Condition()
    held, rounds = [], []

    class WatchedStore:
        """The real store; records whether the learner's lock was held when the tally was read."""

        def unused_by_tenant(self):
            held.append(ln._cond._is_owned())
            return store.unused_by_tenant()

    def run_round(why, tenant=None):
        rounds.append(tenant)
        ln.queue.done(tenant)
        ln._seen[tenant] = store.count_unused(tenant)
        with ln._cond:  # what stop() sets (stop() itself joins the thread, which this is)
            ln._stop = True

    ln.store, ln.run_round = WatchedStore(), run_round
    ln._thread = threading.Thread(target=ln._loop, daemon=True)
    ln._thread.start()
    ln._thread.join(10)
    assert rounds == ["alice"] and held and not any(held), (rounds, held)


def test_pruning_keeps_a_tenants_newest_versions_and_the_one_it_is_served_and_no_other_tenants(tmp_path):
    from types import SimpleNamespace

    from ttrl.serve.learner import Learner

    served = _served(tmp_path)
    t = Tenants(tmp_path / "tenants", lambda: served, {"alice": "alice", "bob": "bob"})
    store = Store(tmp_path / "store.sqlite")
    # alice promoted v1, v3, v4, v6 and was rolled back to v3; bob promoted v2 and v5.
    for v, who in ((1, "alice"), (2, "bob"), (3, "alice"), (4, "alice"), (5, "bob"), (6, "alice")):
        d = t.versions(who).path(v)
        d.mkdir(parents=True)
        (d / "manifest.json").write_text("{}")
        store.add_version(v, str(d), "promoted", serve=True, tenant=who)
    store.add_version(3, str(t.versions("alice").path(3)), "promoted", serve=True, tenant="alice")
    ln = Learner.__new__(Learner)
    ln.cfg = SimpleNamespace(serve=SimpleNamespace(keep_versions=2))
    ln.store, ln.tenants = store, t
    assert ln.prune_tenant("alice") == [1], "v4 and v6 are the newest two, v3 is served: only v1 goes"
    assert sorted(p.name for p in (tmp_path / "tenants" / "alice" / "versions").iterdir()) == ["v3", "v4", "v6"]
    assert {v["version"]: v["status"] for v in store.versions("alice")} == {1: "pruned", 3: "promoted",
                                                                             4: "promoted", 6: "promoted"}
    assert [v["status"] for v in store.versions("bob")] == ["promoted", "promoted"], "bob's versions untouched"
    assert (tmp_path / "tenants" / "bob" / "versions" / "v2").is_dir()
    assert ln.prune_tenant("bob") == [] and store.serving_version("alice") == 3


@pytest.mark.parametrize("spoil, words", [
    (lambda d: (d / "adapter_model.safetensors").write_bytes(b"\x00" * 40), "adapter_model.safetensors cannot be read"),
    (lambda d: (d / "adapter_model.safetensors").write_bytes(
        (d / "adapter_model.safetensors").read_bytes()[:-64]), "cannot be read"),
    (lambda d: (d / "adapter_config.json").write_text("{not json"), "cannot be read"),
    ("nan", "non-finite"),
    ("shape", "has shape (2, 32)"),
    ("names", "missing"),
])
def test_a_corrupt_adapter_in_a_tenant_folder_is_refused_naming_it_and_other_tenants_are_served(
        tmp_path, spoil, words):
    from safetensors.torch import save_file

    served = _served(tmp_path)
    root = tmp_path / "tenants"
    good = {A: torch.randn(2, 64), B: torch.ones(64, 2)}
    d = write_adapter(root, "bob", good, SPEC, "base")
    if spoil == "nan":
        save_file({A: good[A], B: torch.full((64, 2), float("nan"))}, str(d / "adapter_model.safetensors"))
    elif spoil == "shape":
        save_file({A: torch.randn(2, 32), B: good[B]}, str(d / "adapter_model.safetensors"))
    elif spoil == "names":
        save_file({A: good[A]}, str(d / "adapter_model.safetensors"))
    else:
        spoil(d)
    t = Tenants(root, lambda: served, {"bob": "bob", "alice": "alice"})
    with pytest.raises(ValueError, match="tenants/bob/adapter") as err:
        t.get("bob")
    assert words in str(err.value), str(err.value)
    assert t.get("alice").name == "alice", "another tenant is created and served as before"
    assert [r["name"] for r in t.listing()] == ["alice"], "a refused adapter is no tenant"
