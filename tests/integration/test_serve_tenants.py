"""A model per tenant, for real: a live `ttrl-serve` (Ray, vLLM CPU with multi-LoRA, DeepSpeed, HTTP on loopback).

The debug model serves with model.lora on and serve.tenants on. Four API
keys: alice, bob and carol are tenants of their own, `eval` (tenant field
`-`) is answered by the shared version (v0: the starting adapter, B = 0,
i.e. the base). Every request names a seed, so answers are comparable:

- a new tenant answers token for token as the base does (same texts, same
  per-token log-probs in the store);
- a tenant whose adapter was written on disk before its first request (B
  not zero) answers otherwise, while another tenant, asked concurrently in
  the same batches, still answers as the base;
- restarted with serve.tenants.max_loaded=1, the tenants keep their ids and
  adapters, requests alternating between three tenants all succeed, and
  each switch reads an adapter from disk again (the load count grows).

Figures are printed as TENANTS REPORT lines; no assertion is about time.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest

from tests.conftest import compose_config
from tests.integration.serving import AUTH, Server, ask_each, same_tokens, served_samples, write_keys

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1800)]

NAMES = ["alice", "bob", "carol", "eval"]
LORA = ["model.lora.enabled=true", "model.lora.r=8"]
BASE = ["experiment=debug", "serve.port=0", "trainer.num_workers=1", "logger.progress=false",
        "serve.learn.enabled=false", "serve.tenants.enabled=true", *LORA]
PROMPTS = ["12+34=", "7+8=", "25+61+17=", "3+4="]
TOKENS = 8


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    return d / "keys", write_keys(d / "keys", NAMES, tenants={"eval": "-"})


@pytest.fixture(scope="module")
def server(tmp_path_factory, keys):
    path, _ = keys
    srv = Server(tmp_path_factory.mktemp("tenants") / "serve", BASE, f"serve.api_keys_file={path}",
                 "serve.tenants.max_loaded=2")
    srv.start()
    print(f"\nTENANTS REPORT start-up {srv.startup_s[-1]:.0f} s")
    yield srv
    srv.stop()


def _ask(url: str, headers: dict, who: list[str]):
    return ask_each(url, headers, PROMPTS, who, TOKENS, 1000)


def _tenants(srv: Server) -> dict:
    r = httpx.get(f"{srv.url}/admin/tenants", headers=AUTH, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def _metric(srv: Server, name: str) -> float:
    text = httpx.get(f"{srv.url}/metrics", headers=AUTH, timeout=30).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + " "))


def _bob_adapter(serve_dir) -> None:
    """bob's adapter on disk before his first request: model.lora's shapes, B not zero."""
    import torch

    from ttrl.models import resolve_model_path
    from ttrl.rollout.lora import adapter_shapes, lora_spec
    from ttrl.rollout.weights import checkpoint_shapes
    from ttrl.serve.tenants import write_adapter

    cfg = compose_config("experiment=debug", *LORA)
    base = resolve_model_path(cfg.model)
    spec = lora_spec(cfg.model.lora)
    g = torch.Generator().manual_seed(7)
    tensors = {n: torch.randn(shape, generator=g) * 0.3
               for n, shape in adapter_shapes(checkpoint_shapes(base), spec["target_modules"], spec["r"]).items()}
    write_adapter(serve_dir / "tenants", "bob", tensors, spec, base)


def test_a_new_tenant_answers_token_for_token_as_the_base(server, keys):
    _, h = keys
    got = asyncio.run(_ask(server.url, h, ["eval", "alice"]))
    base = served_samples(server.dir, got["eval"])
    alice = served_samples(server.dir, got["alice"])
    print(f"TENANTS REPORT base vs new tenant: {sum(map(same_tokens, alice, base))}/{len(PROMPTS)} identical, max "
          f"|mean log-prob diff| {max(abs(a[1] - b[1]) for a, b in zip(alice, base)):.1e} (texts {[s[0] for s in base]})")
    assert [b["ttrl"]["tenant"] for b in got["alice"]] == ["alice"] * len(PROMPTS)
    assert [b["ttrl"]["tenant"] for b in got["eval"]] == [None] * len(PROMPTS)
    assert all(map(same_tokens, alice, base)), "a new tenant (B = 0) must answer exactly as the base"
    listing = _tenants(server)
    assert [(t["name"], t["id"]) for t in listing["tenants"]] == [("alice", 2)]
    assert listing["loads"] == 1 and _metric(server, "ttrl_tenants_created_total") == 1


def test_two_tenants_asked_together_answer_with_their_own_adapters(server, keys):
    _, h = keys
    _bob_adapter(server.dir)
    batches0 = _metric(server, "ttrl_engine_batch_size_count")
    got = asyncio.run(_ask(server.url, h, ["alice", "bob", "eval"]))
    base = served_samples(server.dir, got["eval"])
    alice = served_samples(server.dir, got["alice"])
    bob = served_samples(server.dir, got["bob"])
    batches = _metric(server, "ttrl_engine_batch_size_count") - batches0
    differ = sum(not same_tokens(b, x) for b, x in zip(bob, base))
    print(f"TENANTS REPORT interleaved: bob differs from the base on {differ}/{len(PROMPTS)} prompts (in the text "
          f"on {sum(b[0] != x[0] for b, x in zip(bob, base))}), alice on "
          f"{sum(not same_tokens(a, x) for a, x in zip(alice, base))}; "
          f"{3 * len(PROMPTS)} requests in {batches:.0f} engine calls")
    assert all(map(same_tokens, alice, base)), "alice's answers changed while bob's adapter served beside it"
    assert differ == len(PROMPTS), "bob's adapter (B != 0) did not change his answers"
    assert batches < 3 * len(PROMPTS), "the tenants' requests never shared an engine call"
    assert {t["name"] for t in _tenants(server)["tenants"]} == {"alice", "bob"}


def test_one_resident_adapter_three_tenants_alternating_reload_from_disk(server, keys):
    _, h = keys
    before = asyncio.run(_ask(server.url, h, ["bob"]))["bob"]
    ids = {t["name"]: t["id"] for t in _tenants(server)["tenants"]}
    server.stop()
    server.start(f"serve.api_keys_file={keys[0]}", "serve.tenants.max_loaded=1")
    print(f"TENANTS REPORT restart with max_loaded=1: {server.startup_s[-1]:.0f} s")
    assert {t["name"]: t["id"] for t in _tenants(server)["tenants"]} == ids, "tenant ids changed across a restart"
    codes = []
    with httpx.Client(timeout=300) as http:
        for rep in range(2):
            for name in ("alice", "bob", "carol"):
                r = http.post(f"{server.url}/v1/completions", headers=h[name],
                              json={"prompt": PROMPTS[0], "max_tokens": TOKENS, "temperature": 1.0, "seed": 1000})
                codes.append(r.status_code)
                if name == "bob" and rep == 0:
                    now, then = served_samples(server.dir, [r.json(), before[0]])
                    assert same_tokens(now, then), "bob's adapter was not reread"
    st = _tenants(server)
    print(f"TENANTS REPORT max_loaded=1, 6 alternating requests of 3 tenants: codes {codes}, loads {st['loads']}, "
          f"unloads {st['unloads']}, resident {st['resident']}")
    assert codes == [200] * 6
    assert st["loads"] == 6 and st["unloads"] == 5, "each switch of tenant reads its adapter from disk again"
    assert _metric(server, "ttrl_tenant_adapter_loads_total") == 6
    assert _metric(server, "ttrl_tenant_adapter_unloads_total") == 5
    assert [len(r) for r in st["resident"].values()] == [1]
    assert {t["name"]: t["id"] for t in st["tenants"]} == {**ids, "carol": 4}
