"""The front door on fake engines: hosts, origins, keys, limits, strict bodies, and every answer counted.

Each hostile request expects its own 4xx naming what to change, and the
store must not grow by it; the real server is attacked the same way in
tests/integration/test_serve_hostile.py.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from tests.unit.serve.test_serve_app import MODEL_CFG, TOKEN, FakeController
from ttrl.serve.app import Service, ServiceConfig, build_app
from ttrl.serve.auth import ApiKeys
from ttrl.serve.engines import EnginePool
from ttrl.serve.guard import GuardPolicy, allowed_host_set, host_name
from ttrl.serve.limits import ClientLimits
from ttrl.serve.protocol import Defaults, RequestLimits
from ttrl.serve.store import Store
from ttrl.serve.testing import FakeDeath, FakeEngine, FakeTokenizer, boxed

KEYS = {"alice": "alice-key-0123456789", "bob": "bob-key-0123456789ab"}
A = {"Authorization": f"Bearer {KEYS['alice']}"}
B = {"Authorization": f"Bearer {KEYS['bob']}"}
VOCAB = 300


def run(coro):
    return asyncio.run(coro)


async def _server(tmp_path, *, keys=None, rpm=0.0, burst=60, in_flight=16, max_body=4096, origins=(),
                  hosts=(), delay=0.005, refuse=None, body_timeout=30.0, queue_share=None, limits=RequestLimits(max_prompts=8, max_samples=32,
                                                                           max_comment_chars=50)):
    store = Store(tmp_path / "store.sqlite")
    eng = FakeEngine(lambda ids, v, j: boxed("7"), delay=delay, refuse=refuse)
    pool = EnginePool([eng], 0, death_errors=(FakeDeath,), max_batch=1, max_client_queue=queue_share)
    await pool.start()
    defaults = Defaults(temperature=1.0, top_p=1.0, max_tokens=16, votes=1, max_model_len=256, vocab_size=VOCAB)
    svc = Service(ServiceConfig("tiny-arith", defaults, 30.0, TOKEN, limits=limits), FakeTokenizer(), MODEL_CFG,
                  pool, store, FakeController())
    policy = GuardPolicy(allowed_hosts=allowed_host_set(hosts, "127.0.0.1"), cors_origins=frozenset(origins),
                         max_body_bytes=max_body, api_keys=ApiKeys(keys) if keys else None, admin_token=TOKEN,
                         limits=ClientLimits(rpm, burst, in_flight), body_timeout_s=body_timeout)
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=build_app(svc, policy)),
                               base_url="http://127.0.0.1:8000")

    async def close():
        await client.aclose()
        await pool.stop()
        svc.close()

    return client, store, eng, svc, close


def _metric(text: str, line_start: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(line_start))


def test_host_names_are_parsed_as_browsers_send_them():
    assert host_name("LocalHost:8000") == "localhost" and host_name("[::1]:8000") == "::1"
    assert host_name("example.com.") == "example.com" and host_name("127.0.0.1") == "127.0.0.1"
    assert allowed_host_set([], "10.0.0.5") == {"localhost", "127.0.0.1", "::1", "10.0.0.5"}
    assert allowed_host_set(["LLM.lab:443"], "127.0.0.1") == {"localhost", "127.0.0.1", "::1", "llm.lab"}
    assert allowed_host_set(["*"], "0.0.0.0") is None


def test_a_foreign_host_or_origin_a_wrong_content_type_and_an_unknown_path_are_refused_and_counted(tmp_path):
    async def main():
        c, store, _, svc, close = await _server(tmp_path, origins={"https://app.example"})
        out = {
            "rebinding": await c.post("/v1/completions", json={"prompt": "1+1="}, headers={"Host": "evil.example"}),
            "rebinding_health": await c.get("/health", headers={"Host": "evil.example:8000"}),
            "page": await c.post("/v1/completions", json={"prompt": "1+1="},
                                 headers={"Origin": "https://evil.example"}),
            "text_plain": await c.post("/v1/completions", content=b'{"prompt": "1+1="}',
                                       headers={"Content-Type": "text/plain"}),
            "form": await c.post("/v1/feedback", content=b"id=x&thumbs=up",
                                 headers={"Content-Type": "application/x-www-form-urlencoded"}),
            "unknown": await c.get("/v2/secret"),
            "ok": await c.post("/v1/completions", json={"prompt": "1+1="}, headers={"Host": "localhost:8000"}),
            "cors": await c.post("/v1/completions", json={"prompt": "1+1="}, headers={"Origin": "https://app.example"}),
            "preflight": await c.request("OPTIONS", "/v1/completions", headers={
                "Origin": "https://app.example", "Access-Control-Request-Method": "POST"}),
            "no_body_post": await c.post("/admin/learn", headers={"X-Admin-Token": TOKEN}),
        }
        metrics = (await c.get("/metrics")).text
        n = store.count_queries()
        await close()
        return out, metrics, n

    out, metrics, n = run(main())
    assert out["rebinding"].status_code == 400 and out["rebinding"].json()["error"]["param"] == "Host"
    assert out["rebinding_health"].status_code == 400, "DNS rebinding cannot read /health either"
    assert out["page"].status_code == 403 and out["page"].json()["error"]["param"] == "Origin"
    assert out["text_plain"].status_code == 415 and out["text_plain"].json()["error"]["param"] == "Content-Type"
    assert out["form"].status_code == 415
    assert out["unknown"].status_code == 404
    assert out["ok"].status_code == 200 and "access-control-allow-origin" not in out["ok"].headers
    assert out["cors"].status_code == 200 and out["cors"].headers["access-control-allow-origin"] == "https://app.example"
    assert out["preflight"].status_code == 204 and "POST" in out["preflight"].headers["access-control-allow-methods"]
    assert out["no_body_post"].status_code == 200, "a POST without a body needs no Content-Type"
    assert n == 2, "only the two admitted requests were stored"
    for code, endpoint, count in [("400", "completions", 1), ("400", "health", 1), ("403", "completions", 1),
                                  ("415", "completions", 1), ("415", "feedback", 1), ("404", "other", 1)]:
        assert _metric(metrics, f'ttrl_requests_total{{endpoint="{endpoint}",code="{code}"}}') == count, code
    assert _metric(metrics, 'ttrl_refusals_total{reason="host"}') == 2


def test_without_a_valid_api_key_every_v1_request_gets_401_and_the_key_name_is_the_identity(tmp_path):
    async def main():
        c, store, _, svc, close = await _server(tmp_path, keys=KEYS)
        out = {
            "none": await c.post("/v1/completions", json={"prompt": "1+1="}),
            "wrong": await c.post("/v1/completions", json={"prompt": "1+1="},
                                  headers={"Authorization": "Bearer alice-key-0123456788"}),
            "models": await c.get("/v1/models"),
            "metrics_anon": await c.get("/metrics"),
            "metrics_admin": await c.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"}),
            "alice": await c.post("/v1/completions", json={"prompt": "1+1="}, headers=A),
            "models_alice": await c.get("/v1/models", headers=A),
        }
        rid = out["alice"].json()["id"]
        out["bob_rates_alices"] = await c.post("/v1/feedback", json={"id": rid, "thumbs": "up"}, headers=B)
        out["alice_rates"] = await c.post("/v1/feedback", json={"id": rid, "thumbs": "up"}, headers=A)
        row = store.get_query(rid)
        fb = store.feedback_for([(rid, 0)])
        await close()
        return out, row, fb

    out, row, fb = run(main())
    for name in ("none", "wrong", "models", "metrics_anon"):
        assert out[name].status_code == 401, name
    assert out["none"].json()["error"]["code"] == "invalid_api_key"
    assert out["none"].headers["www-authenticate"] == "Bearer"
    assert out["metrics_admin"].status_code == 200 and out["models_alice"].status_code == 200
    assert row["client"] == "alice"
    assert out["bob_rates_alices"].status_code == 404, "only the identity that got a response may rate it"
    assert out["alice_rates"].status_code == 200
    assert [f["client"] for f in fb[(row["id"], 0)]] == ["alice"]


@pytest.mark.parametrize("body, param", [
    (b'{"prompt": "1+1=", "temperature": NaN}', "temperature"),
    (b'{"prompt": "1+1=", "top_p": Infinity}', "top_p"),
    (b'{"prompt": "1+1=", "temperature": 1e999}', "temperature"),
    (b'{"prompt": "1+1=", "temperature": true}', "temperature"),
    (b'{"prompt": "1+1\\ud800="}', "prompt"),
    (b'{"prompt": [-1, 5]}', "prompt"),
    (b'{"prompt": [4294967296]}', "prompt"),
    (b'{"prompt": [[5, 100000000]]}', "prompt"),
    (b'{"prompt": [[true, 5]]}', "prompt"),
    (b'{"prompt": "x", "seed": 18446744073709551616}', "seed"),
    (b'{"prompt": "1+1=", "max_tokens": 1.5}', "max_tokens"),
    (b'[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[' + b"[" * 3000, None),
    (b'\xff\xfe{"prompt": "x"}', None),
])
def test_bad_values_get_400_naming_the_parameter_and_never_reach_the_engine(tmp_path, body, param):
    async def main():
        c, store, eng, svc, close = await _server(tmp_path)
        r = await c.post("/v1/completions", content=body, headers={"Content-Type": "application/json"})
        calls = len(eng.log)
        n = store.count_queries()
        await close()
        return r, calls, n

    r, calls, n = run(main())
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    assert calls == 0 and n == 0


def test_nan_scores_and_surrogate_comments_in_feedback_are_400(tmp_path):
    async def main():
        c, store, _, svc, close = await _server(tmp_path)
        rid = (await c.post("/v1/completions", json={"prompt": "1+1="})).json()["id"]
        h = {"Content-Type": "application/json"}
        out = [await c.post("/v1/feedback", content=f'{{"id": "{rid}", "score": NaN}}'.encode(), headers=h),
               await c.post("/v1/feedback", content=f'{{"id": "{rid}", "thumbs": "up", "comment": "\\udfff"}}'.encode(),
                            headers=h),
               await c.post("/v1/feedback", json={"id": rid, "rating": True})]
        n = store.count_feedback()
        await close()
        return out, n

    out, n = run(main())
    assert [r.status_code for r in out] == [400, 400, 400]
    assert [r.json()["error"]["param"] for r in out] == ["score", "comment", "rating"]
    assert n == 0


def test_limits_answer_413_and_429_naming_their_key(tmp_path):
    async def main():
        c, store, eng, svc, close = await _server(tmp_path, max_body=2048)
        out = {
            "body_declared": await c.post("/v1/completions", json={"prompt": "x" * 3000}),
            "prompts": await c.post("/v1/completions", json={"prompt": ["1+1="] * 9}),
            "samples": await c.post("/v1/completions", json={"prompt": ["1+1="] * 4, "votes": 9}),
            "chat_samples": await c.post("/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "1+1="}], "votes": 33}),
        }

        async def chunks():
            for _ in range(10):
                yield b" " * 512
        out["body_chunked"] = await c.post("/v1/completions", content=chunks(),
                                           headers={"Content-Type": "application/json"})
        rid = (await c.post("/v1/completions", json={"prompt": "1+1="})).json()["id"]
        out["comment"] = await c.post("/v1/feedback", json={"id": rid, "thumbs": "up", "comment": "y" * 51})
        n = store.count_queries()
        await close()
        return out, n

    out, n = run(main())
    for name, key in [("body_declared", "serve.limits.max_body_bytes"), ("body_chunked", "serve.limits.max_body_bytes"),
                      ("prompts", "serve.limits.max_prompts"), ("samples", "serve.limits.max_samples"),
                      ("chat_samples", "serve.limits.max_samples"), ("comment", "serve.limits.max_comment_chars")]:
        assert out[name].status_code == 413, (name, out[name].text)
        assert key in out[name].json()["error"]["message"], name
    assert n == 1, "nothing refused was stored"


def test_rate_and_in_flight_limits_per_identity(tmp_path):
    async def main():
        c, store, eng, svc, close = await _server(tmp_path, keys=KEYS, rpm=60.0, burst=2)
        burst = [await c.post("/v1/completions", json={"prompt": "1+1="}, headers=A) for _ in range(3)]
        other = await c.post("/v1/completions", json={"prompt": "1+1="}, headers=B)
        await close()
        c, store, eng, svc, close = await _server(tmp_path / "slow", in_flight=2, delay=0.2)
        together = await asyncio.gather(*(c.post("/v1/completions", json={"prompt": f"{i}+1="}) for i in range(4)))
        metrics = (await c.get("/metrics")).text
        await close()
        return burst, other, together, metrics

    burst, other, together, metrics = run(main())
    assert [r.status_code for r in burst] == [200, 200, 429]
    assert int(burst[2].headers["retry-after"]) >= 1
    assert "serve.limits.requests_per_minute" in burst[2].json()["error"]["message"]
    assert other.status_code == 200, "one identity's limit is not another's"
    codes = sorted(r.status_code for r in together)
    assert codes == [200, 200, 429, 429]
    refused = [r for r in together if r.status_code == 429]
    assert all("serve.limits.max_in_flight" in r.json()["error"]["message"] for r in refused)
    assert _metric(metrics, 'ttrl_requests_total{endpoint="completions",code="429"}') == 2


def test_a_prompt_the_engine_refuses_fails_alone_and_a_crash_is_a_counted_500(tmp_path):
    async def main():
        c, store, eng, svc, close = await _server(tmp_path, refuse=lambda ids: ids[0] == ord("!") + 1, delay=0.05)
        good = [c.post("/v1/completions", json={"prompt": f"{i}+{i}="}) for i in range(5)]
        bad = c.post("/v1/completions", json={"prompt": "!boom"})
        results = await asyncio.gather(*good, bad)
        metrics = (await c.get("/metrics")).text
        n = store.count_queries()
        await close()
        return results, metrics, n, eng

    results, metrics, n, eng = run(main())
    assert [r.status_code for r in results] == [200] * 5 + [500]
    assert results[-1].json()["error"]["type"] == "server_error"
    assert n == 5
    assert _metric(metrics, 'ttrl_requests_total{endpoint="completions",code="500"}') == 1


def test_a_second_rating_by_the_same_identity_replaces_the_first(tmp_path):
    async def main():
        c, store, _, svc, close = await _server(tmp_path)
        rid = (await c.post("/v1/completions", json={"prompt": "1+1="})).json()["id"]
        out = [await c.post("/v1/feedback", json={"id": rid, "thumbs": "up"}) for _ in range(20)]
        out.append(await c.post("/v1/feedback", json={"id": rid, "thumbs": "down"}))
        fb = store.feedback_for([(rid, 0)])
        await close()
        return out, fb, rid

    out, fb, rid = run(main())
    assert all(r.status_code == 200 for r in out)
    assert [r.json()["replaced"] for r in out[:2]] == [False, True]
    assert [f["score"] for f in fb[(rid, 0)]] == [0.0], "a flood of ratings is one verdict, the newest"


def test_a_body_that_does_not_arrive_in_time_is_a_408_and_frees_the_clients_slot(tmp_path):
    async def main():
        c, store, eng, svc, close = await _server(tmp_path, in_flight=1, body_timeout=0.3)

        async def slow():
            yield b'{"prompt": '
            await asyncio.sleep(5)  # the rest never comes in time
            yield b'"1+1="}'
        t0 = time.perf_counter()
        late = await c.post("/v1/completions", content=slow(), headers={"Content-Type": "application/json"})
        waited = time.perf_counter() - t0
        after = await c.post("/v1/completions", json={"prompt": "1+1="})  # the one in-flight slot is free again

        async def trickle():
            for _ in range(50):
                yield b" "
                await asyncio.sleep(0.2)
        # Declared over max_body_bytes (4096), sent a byte at a time: the 413 may not wait for the whole drain.
        t0 = time.perf_counter()
        big = await c.post("/v1/completions", content=trickle(),
                           headers={"Content-Type": "application/json", "Content-Length": "100000"})
        big_waited = time.perf_counter() - t0
        again = await c.post("/v1/completions", json={"prompt": "2+2="})
        n = store.count_queries()
        await close()
        return late, waited, after, n, big, big_waited, again

    late, waited, after, n, big, big_waited, again = run(main())
    assert big.status_code == 413 and big.json()["error"]["param"] == "body"
    assert big_waited < 5, "the drain of a refused body is bounded in time too (50 bytes x 0.2 s = 10 s)"
    assert again.status_code == 200
    n -= 1
    assert late.status_code == 408 and late.headers.get("connection") == "close"
    err = late.json()["error"]
    assert err["param"] == "body" and "serve.limits.body_timeout_s=0.3s" in err["message"]
    assert waited < 4, "refused when the timeout passed, not when the body ended"
    assert after.status_code == 200 and n == 1


def test_an_identity_over_its_share_of_the_queue_gets_429_and_the_others_are_answered(tmp_path):
    async def main():
        c, store, eng, svc, close = await _server(tmp_path, keys=KEYS, delay=0.05, queue_share=4)
        # 8 prompts of alice's at once: past her 4 waiting, the request is a 429; bob's, at the same moment, fine.
        alice, bob = await asyncio.gather(
            c.post("/v1/completions", json={"prompt": [f"{i}+1=" for i in range(8)]}, headers=A),
            c.post("/v1/completions", json={"prompt": ["2+2=", "3+3="]}, headers=B))
        await close()
        return alice, bob

    alice, bob = run(main())
    assert alice.status_code == 429 and alice.headers["retry-after"] == "1"
    assert "serve.limits.max_queued_prompts=4" in alice.json()["error"]["message"]
    assert bob.status_code == 200
