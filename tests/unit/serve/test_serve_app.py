"""The HTTP API on fake engines: the openai client works, answers are stored first, admin needs the token."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import httpx
import pytest
from omegaconf import OmegaConf

from ttrl.serve.app import Service, ServiceConfig, build_app
from ttrl.serve.engines import EnginePool
from ttrl.serve.protocol import Defaults, RequestError
from ttrl.serve.store import Store
from ttrl.serve.testing import FakeDeath, FakeEngine, FakeTokenizer, boxed

TOKEN = "unit-test-token"
MODEL_CFG = OmegaConf.create({"template": "plain", "prompt_template": "Q: {problem}\nA:", "system_prompt": None})


class FakeController:
    def __init__(self):
        self.version, self.new, self.rolled, self.learned = 0, 0, [], 0

    def served_version(self) -> int:
        return self.version

    def notify(self, n_new: int) -> None:
        self.new += n_new

    def status(self) -> dict[str, Any]:
        return {"enabled": True, "state": "idle"}

    def versions(self, tenant: str | None = None) -> dict[str, Any]:
        return {"current": self.version, "versions": [{"version": 0, "status": "base"}]}

    def rollback(self, version: int, tenant: str | None = None) -> dict[str, Any]:
        if version != 0:
            raise RequestError(f"version {version} is not kept", "version", status=404, kind="not_found")
        self.rolled.append(version)
        return {"ok": True, "current": version}

    def learn_now(self, tenant: str | None = None) -> dict[str, Any]:
        self.learned += 1
        return {"ok": True}


def _answers(ids, version, j):
    # Votes of a prompt: 7, 5, 7, 7, ... (the majority is 7); the first sample says 7 too.
    return boxed("5", (-0.01,)) if j == 1 else boxed("7", (-0.5, -0.5 - 0.1 * j))


async def _client(tmp_path, admin_token=TOKEN, votes=1, answers=_answers, extractor="boxed"):
    store = Store(tmp_path / "store.sqlite")
    pool = EnginePool([FakeEngine(answers, delay=0.005)], 0, death_errors=(FakeDeath,))
    await pool.start()
    ctl = FakeController()
    defaults = Defaults(temperature=1.0, top_p=1.0, max_tokens=16, votes=votes, max_model_len=256)
    svc = Service(ServiceConfig("tiny-arith", defaults, 30.0, admin_token, extractor), FakeTokenizer(), MODEL_CFG,
                  pool, store, ctl)
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=build_app(svc)), base_url="http://localhost")
    return client, svc, ctl, store, pool


def run(coro):
    return asyncio.run(coro)


def test_the_openai_client_gets_completions_and_chat_and_every_answer_is_stored(tmp_path):
    openai = pytest.importorskip("openai")

    async def main():
        client, svc, ctl, store, pool = await _client(tmp_path)
        oa = openai.AsyncOpenAI(base_url="http://localhost/v1", api_key="none", http_client=client, max_retries=0)
        c = await oa.completions.create(model="tiny-arith", prompt="12+30=", max_tokens=8)
        ch = await oa.chat.completions.create(model="tiny-arith", messages=[{"role": "user", "content": "1+1="}])
        sc = await oa.completions.create(model="tiny-arith", prompt="3+4=", extra_body={"votes": 5})
        multi = await oa.completions.create(model="tiny-arith", prompt=["1+2=", "2+3="], n=2)
        models = await oa.models.list()
        await pool.stop()
        svc.close()
        return c, ch, sc, multi, models, store, ctl

    c, ch, sc, multi, models, store, ctl = run(main())
    assert c.choices[0].text == "The answer is \\boxed{7}" and c.system_fingerprint == "ttrl-v0"
    assert c.usage.prompt_tokens == len("12+30="), "completions take the prompt as it is (no template)"
    assert ch.choices[0].message.content == "The answer is \\boxed{7}" and ch.id.startswith("chatcmpl-")
    assert sc.choices[0].text.endswith("\\boxed{7}"), "self-consistency: the majority, not the confident 5"
    assert sc.model_extra["ttrl"]["agreement"] == pytest.approx(0.8) and sc.model_extra["ttrl"]["votes"] == 5
    assert len(multi.choices) == 4 and [ch.index for ch in multi.choices] == [0, 1, 2, 3]
    assert [m.id for m in models.data] == ["tiny-arith"]
    # Every answer is in the store, with what the learner and the audit need.
    row = store.get_query(sc.id)
    assert row["votes"] == 5 and row["answer"] == "7" and row["agreement"] == pytest.approx(0.8)
    assert [s["answer"] for s in row["samples"]] == ["7", "5", "7", "7", "7"]
    assert sum(s["chosen"] for s in row["samples"]) == 1 and row["samples"][0]["chosen"]
    assert store.get_query(ch.id)["prompt"] == "Q: 1+1=\nA:", "chat on a plain model: the template is applied"
    assert [r["idx"] for r in store.get_request(multi.id)] == [0, 1]
    assert store.count_queries() == 5 and ctl.new == 5


def _boxed_then_number(ids, version, j):
    # boxed reads 1, 1, 2, 2, 2 (label 2); the last number reads 7, 7, 7, 9, 9 (label 7).
    text = ["\\boxed{1} 7", "\\boxed{1} 7", "\\boxed{2} 7", "\\boxed{2} 9", "\\boxed{2} 9"][j]
    return {"text": text, "token_ids": [7], "logprobs": [-0.5], "finish_reason": "stop"}


@pytest.mark.parametrize("extractor, answer, answers, chosen", [
    ("boxed", "2", ["1", "1", "2", "2", "2"], {2, 3, 4}),
    ("_fake_last_number", "7", ["7", "7", "7", "9", "9"], {0, 1, 2}),
])
def test_the_served_vote_reads_answers_with_the_configured_extractor(tmp_path, monkeypatch, extractor, answer,
                                                                   answers, chosen):
    from ttrl.labeling.extract import EXTRACTORS

    # A test-only extractor, out of the registry again when the test ends.
    monkeypatch.setitem(EXTRACTORS._items, "_fake_last_number", lambda text: re.findall(r"\d+", text)[-1])

    async def main():
        client, svc, _, store, pool = await _client(tmp_path, votes=5, answers=_boxed_then_number,
                                                    extractor=extractor)
        r = await client.post("/v1/completions", json={"model": "tiny-arith", "prompt": "1+6="})
        await pool.stop()
        svc.close()
        return r.json(), store

    body, store = run(main())
    row = store.get_query(body["id"])
    assert row["answer"] == answer and [s["answer"] for s in row["samples"]] == answers
    picked = [i for i, s in enumerate(row["samples"]) if s["chosen"]]
    assert len(picked) == 1 and picked[0] in chosen, "the served completion is one of the winning class"


def test_bad_requests_get_openai_errors_naming_the_parameter(tmp_path):
    async def main():
        client, svc, *_ , pool = await _client(tmp_path)
        out = {}
        for name, body in {
            "stream": {"prompt": "1+1=", "stream": True},
            "max_tokens": {"prompt": "1+1=", "max_tokens": 0},
            "temperature": {"prompt": "1+1=", "temperature": 3},
            "prompt": {"prompt": ""},
            "n": {"prompt": "1+1=", "votes": 3, "n": 2},
            "long": {"prompt": "9" * 250, "max_tokens": 16},
            "too long": {"prompt": "9" * 300, "max_tokens": 16},
            "null max_completion_tokens": {"prompt": "1+1=", "max_completion_tokens": None, "max_tokens": 0},
            "max_completion_tokens": {"prompt": "1+1=", "max_completion_tokens": 0, "max_tokens": 8},
        }.items():
            out[name] = await client.post("/v1/completions", json=body)
        raw = {"json": b"{not json",
               "huge seed": b'{"prompt": "1+1=", "seed": ' + b"9" * 5000 + b"}",
               # One long key over a long list, a NaN at its end: the path is spelled once, not per element.
               "long key": b'{"prompt": "1+1=", "x": {"' + b"K" * 20000 + b'": [' + b"0," * 20000 + b"NaN]}}"}
        for name, content in raw.items():
            out[name] = await client.post("/v1/completions", content=content,
                                          headers={"Content-Type": "application/json"})
        out["chat"] = await client.post("/v1/chat/completions", json={"messages": [{"role": "system", "content": "x"}]})
        await pool.stop()
        svc.close()
        return out

    out = run(main())
    for name, resp in out.items():
        assert resp.status_code == 400, (name, resp.text)
        assert resp.json()["error"]["type"] == "invalid_request_error"
    params = {name: resp.json()["error"]["param"] for name, resp in out.items()}
    assert params["stream"] == "stream" and params["json"] is None
    assert params["long"] == "max_tokens" and "context" in out["long"].json()["error"]["message"]
    assert params["too long"] == "prompt", "a prompt that leaves no room for one token is the prompt's fault"
    assert params["null max_completion_tokens"] == "max_tokens" and params["max_completion_tokens"] == \
        "max_completion_tokens", "a null field is not sent: the other one is read, and named"
    assert params["huge seed"] == "seed" and "5000 digits" in out["huge seed"].json()["error"]["message"]
    assert params["long key"] == "x" and out["long key"].json()["error"]["message"].endswith(
        "[20000]': NaN is not a number JSON allows")


def test_a_body_under_the_size_limit_cannot_make_the_parser_spell_a_path_per_element():
    import tracemalloc

    from ttrl.serve.protocol import parse_body

    body = b'{"prompt": "1+1=", "x": {"' + b"K" * 100_000 + b'": [' + b"0," * 100_000 + b"0]}}"  # 0.3 MB
    tracemalloc.start()
    try:
        parse_body(body)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # A path per element was 100k strings of 100k characters: 10 GB.
    assert peak < 50e6, f"parsing a {len(body) / 1e6:.1f} MB body took {peak / 1e6:.0f} MB"


def test_a_bad_value_past_the_parsers_walk_is_still_refused_for_the_whole_body():
    from ttrl.serve.protocol import FIND_BAD_BUDGET, parse_body

    n = FIND_BAD_BUDGET + 10
    cases = {  # body: (param, message end)
        b'{"x": [' + b"[0]," * n + b"NaN]}": ("body", "NaN is not a number JSON allows"),
        b'{"x": [' + b"[0]," * n + b'"\\udc00"]}': ("body", "a string with a lone surrogate (not valid Unicode text)"),
        b'{"x": [' + b"0," * (10 * n) + b"NaN]}": ("x", "NaN is not a number JSON allows"),  # numbers cost no visit
        b'{"x": [' + b'"\\ud83d\\ude00",' * n + b"0]}": (None, None),  # escaped pairs are an emoji, not an error
    }
    for body, (param, end) in cases.items():
        if param is None:
            assert parse_body(body)["x"][0] == "\U0001F600"
            continue
        with pytest.raises(RequestError) as err:
            parse_body(body)
        assert (err.value.param, err.value.message.endswith(end)) == (param, True), err.value.message


class _ShortVocabTokenizer(FakeTokenizer):
    """FakeTokenizer whose ids from 200 up are embedding rows past the tokenizer's own: they decode to nothing."""

    def decode(self, ids) -> str:
        return super().decode([i for i in ids if i < 200])


def test_defaults_bend_to_the_client_and_the_store_keeps_only_the_sampling_it_asked_for(tmp_path):
    async def main():
        client, svc, ctl, store, pool = await _client(tmp_path, votes=3)
        svc.tokenizer = _ShortVocabTokenizer()
        out = {
            # serve.votes=3 is the server's default, not the client's ask: n choices, or a greedy answer.
            "n": await client.post("/v1/completions", json={"prompt": "1+1=", "n": 2}),
            "greedy": await client.post("/v1/completions", json={"prompt": "1+1=", "temperature": 0}),
            "junk": await client.post("/v1/completions", json={
                "prompt": ["1+1=", "2+2=", "3+3="], "temperature": 0.5, "junk": "J" * 100_000}),
            "no text": await client.post("/v1/completions", json={"prompt": [[50, 51], [250, 251]]}),
        }
        await pool.stop()
        svc.close()
        return out, store

    out, store = run(main())
    assert out["n"].status_code == 200 and len(out["n"].json()["choices"]) == 2
    assert out["n"].json()["ttrl"]["votes"] == 1
    assert out["greedy"].status_code == 200 and out["greedy"].json()["ttrl"]["votes"] == 1
    assert out["no text"].status_code == 400 and out["no text"].json()["error"]["param"] == "prompt"
    assert "prompt 1 decode to no text" in out["no text"].json()["error"]["message"]
    rows = store.get_request(out["junk"].json()["id"])
    assert [r["request"] for r in rows] == [{"temperature": 0.5}, None, None], \
        "the body once per request, its sampling fields alone (not its prompts, not a junk field per prompt)"


def test_feedback_is_stored_against_the_response_and_its_choice(tmp_path):
    async def main():
        client, svc, ctl, store, pool = await _client(tmp_path)
        r = (await client.post("/v1/completions", json={"prompt": ["1+1=", "2+2="], "n": 2})).json()
        ok = await client.post("/v1/feedback", json={"id": r["id"], "index": 3, "thumbs": "down"})
        ok2 = await client.post("/v1/feedback", json={"id": r["id"], "score": 0.75, "comment": "close"})
        missing = await client.post("/v1/feedback", json={"id": "cmpl-nope", "thumbs": "up"})
        no_choice = await client.post("/v1/feedback", json={"id": r["id"], "index": 4, "rating": 1})
        both = await client.post("/v1/feedback", json={"id": r["id"], "thumbs": "up", "score": 1})
        metrics = (await client.get("/metrics")).text
        await pool.stop()
        svc.close()
        return r, ok, ok2, missing, no_choice, both, store, metrics

    r, ok, ok2, missing, no_choice, both, store, metrics = run(main())
    assert ok.status_code == 200 and ok2.status_code == 200
    fb = store.feedback_for([(r["id"], 0), (r["id"], 1)])
    assert [(f["choice"], f["score"]) for f in fb[(r["id"], 1)]] == [(1, 0.0)], "choice 3 = prompt 1, its sample 1"
    assert [(f["score"], f["comment"]) for f in fb[(r["id"], 0)]] == [(0.75, "close")]
    assert missing.status_code == 404 and no_choice.status_code == 404 and both.status_code == 400
    assert 'ttrl_feedback_total{verdict="down"} 1' in metrics and 'ttrl_feedback_total{verdict="up"} 1' in metrics


def test_health_metrics_and_the_admin_api(tmp_path):
    async def main():
        client, svc, ctl, store, pool = await _client(tmp_path)
        await client.post("/v1/completions", json={"prompt": "1+1="})
        h = await client.get("/health", headers={"Authorization": f"Bearer {TOKEN}"})
        h_anon = await client.get("/health")
        text = (await client.get("/metrics")).text
        out = {
            "no_token": await client.get("/admin/versions"),
            "wrong": await client.get("/admin/versions", headers={"Authorization": "Bearer nope-nope"}),
            "ok": await client.get("/admin/versions", headers={"Authorization": f"Bearer {TOKEN}"}),
            "rollback": await client.post("/admin/rollback", json={"version": 0}, headers={"X-Admin-Token": TOKEN}),
            "rollback_unknown": await client.post("/admin/rollback", json={"version": 9},
                                                  headers={"X-Admin-Token": TOKEN}),
            "rollback_bad": await client.post("/admin/rollback", json={"version": "x"},
                                              headers={"X-Admin-Token": TOKEN}),
            "rollback_anon": await client.post("/admin/rollback", json={"version": 0}),
            "learn": await client.post("/admin/learn", headers={"X-Admin-Token": TOKEN}),
        }
        await pool.stop()
        svc.close()
        client2, svc2, *_, pool2 = await _client(tmp_path / "off", admin_token=None)
        out["off"] = await client2.get("/admin/versions", headers={"Authorization": f"Bearer {TOKEN}"})
        await pool2.stop()
        svc2.close()
        return h, h_anon, text, out, ctl

    h, h_anon, text, out, ctl = run(main())
    assert h.status_code == 200 and h.json()["version"] == 0 and h.json()["engines"]["queue"] == 0
    assert h_anon.json() == {"status": "ok"}, "without the admin token /health says only that it is up"
    assert 'ttrl_requests_total{endpoint="completions",code="200"} 1' in text
    assert "ttrl_serving_version 0" in text and "ttrl_request_seconds_bucket" in text
    assert out["no_token"].status_code == 401 and out["wrong"].status_code == 401
    assert out["ok"].status_code == 200 and out["ok"].json()["current"] == 0
    assert out["rollback"].status_code == 200 and ctl.rolled == [0]
    assert out["rollback_unknown"].status_code == 404 and out["rollback_bad"].status_code == 400
    assert out["rollback_anon"].status_code == 401
    assert out["learn"].status_code == 200 and ctl.learned == 1
    assert out["off"].status_code == 403 and "admin API is off" in out["off"].json()["error"]["message"]


def test_a_request_refused_as_overloaded_takes_its_queued_prompts_with_it(tmp_path):
    async def main():
        store = Store(tmp_path / "store.sqlite")
        eng = FakeEngine(_answers, delay=0.3)
        pool = EnginePool([eng], 0, death_errors=(FakeDeath,), max_queue=4, max_batch=1)
        await pool.start()
        defaults = Defaults(temperature=1.0, top_p=1.0, max_tokens=16, votes=1, max_model_len=256)
        svc = Service(ServiceConfig("tiny-arith", defaults, 30.0, TOKEN), FakeTokenizer(), MODEL_CFG, pool, store,
                      FakeController())
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=build_app(svc)), base_url="http://localhost")
        # 8 prompts into a queue of 4: the fifth is refused, and the request with it.
        r = await client.post("/v1/completions", json={"prompt": [f"{i}+1=" for i in range(8)]})
        # At once, while the engine still draws the batch it took: the cancelled prompts hold no queue slot.
        now = await client.post("/v1/completions", json={"prompt": ["5+5=", "6+6="]})
        await asyncio.sleep(0.5)  # what the engine would still have drawn for nobody
        drawn = sum(n for kind, n, *_ in eng.log if kind == "generate")
        ok = await client.post("/v1/completions", json={"prompt": "1+1="})
        await pool.stop()
        svc.close()
        return r, drawn, ok, store, now

    r, drawn, ok, store, now = run(main())
    assert r.status_code == 503 and r.json()["error"]["type"] == "overloaded"
    assert now.status_code == 200, now.text
    # At most the one batch (serve.max_batch=1) the engine had taken before the refusal.
    assert drawn <= 1 + 2, f"{drawn - 2} prompts of the refused request were generated"
    assert ok.status_code == 200 and store.count_queries() == 3


class _VocabTokenizer(FakeTokenizer):
    """FakeTokenizer that lists its vocabulary: one character per token, so no prompt of 256 tokens is longer."""

    def get_vocab(self) -> dict[str, int]:
        return {chr(i): i + 1 for i in range(200)}


def test_a_prompt_over_the_character_limit_is_refused_before_it_is_tokenised(tmp_path):
    async def main():
        client, svc, ctl, store, pool = await _client(tmp_path)
        svc.tokenizer = _VocabTokenizer()
        svc.max_prompt_chars = 256  # what Service computes from such a tokenizer (below)
        calls = []
        svc._tokens = lambda t: calls.append(t) or FakeTokenizer()(t)["input_ids"]
        out = {"completions": await client.post("/v1/completions", json={"prompt": ["1+1=", "9" * 257]}),
               "chat": await client.post("/v1/chat/completions",
                                         json={"messages": [{"role": "user", "content": "9" * 300}]}),
               "fits": await client.post("/v1/completions", json={"prompt": "9" * 200, "max_tokens": 8})}
        await pool.stop()
        svc.close()
        return out, calls

    from ttrl.serve.app import prompt_char_bound

    assert prompt_char_bound(_VocabTokenizer(), 256) == 256 and prompt_char_bound(FakeTokenizer(), 256) is None
    out, calls = run(main())
    for name, param in (("completions", "prompt"), ("chat", "messages")):
        err = out[name].json()["error"]
        assert out[name].status_code == 400 and err["param"] == param, (name, err)
        assert "characters" in err["message"] and "model.max_model_len=256" in err["message"], err
    assert out["fits"].status_code == 200
    assert calls == ["9" * 200], "only the prompt within the limit reached the tokenizer"
