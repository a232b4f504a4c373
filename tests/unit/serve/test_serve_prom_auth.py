"""Prometheus text that a Prometheus parser reads back, and the admin token check."""

from __future__ import annotations

import math
import threading

import pytest

from ttrl.serve.auth import check_admin, presented_token, resolve_admin_token
from ttrl.serve.prom import Registry, escape_label_value, format_value


def test_rendered_text_parses_back_with_the_same_values():
    parser = pytest.importorskip("prometheus_client.parser")
    r = Registry()
    c = r.counter("ttrl_requests_total", "Requests\nby code", ["endpoint", "code"])
    c.inc(endpoint="completions", code="200")
    c.inc(2, endpoint="completions", code="200")
    c.inc(endpoint='we"ird\\', code="503")
    g = r.gauge("ttrl_version", "Served version")
    g.set(3)
    r.gauge("ttrl_queue_depth", "Queue", fn=lambda: 7)
    r.gauge("ttrl_broken", "A failing callback", fn=lambda: 1 / 0)
    h = r.histogram("ttrl_request_seconds", "Latency", ["endpoint"], buckets=(0.1, 1.0))
    for v in (0.05, 0.5, 5.0):
        h.observe(v, endpoint="chat")
    text = r.render()
    assert text.endswith("\n")
    fams = {f.name: f for f in parser.text_string_to_metric_families(text)}
    reqs = {(s.labels["endpoint"], s.labels["code"]): s.value for s in fams["ttrl_requests"].samples
            if s.name == "ttrl_requests_total"}
    assert reqs == {("completions", "200"): 3.0, ('we"ird\\', "503"): 1.0}
    assert fams["ttrl_version"].samples[0].value == 3.0
    assert fams["ttrl_queue_depth"].samples[0].value == 7.0
    assert math.isnan(fams["ttrl_broken"].samples[0].value)
    hs = {(s.name, s.labels.get("le")): s.value for s in fams["ttrl_request_seconds"].samples}
    assert hs[("ttrl_request_seconds_bucket", "0.1")] == 1
    assert hs[("ttrl_request_seconds_bucket", "1.0")] == 2
    assert hs[("ttrl_request_seconds_bucket", "+Inf")] == 3
    assert hs[("ttrl_request_seconds_count", None)] == 3
    assert hs[("ttrl_request_seconds_sum", None)] == pytest.approx(5.55)
    assert "# TYPE ttrl_request_seconds histogram" in text and "# HELP ttrl_requests_total Requests\\nby code" in text


def test_metric_rules():
    r = Registry()
    with pytest.raises(ValueError):
        r.counter("requests", "a counter must end in _total")
    with pytest.raises(ValueError):
        r.gauge("bad-name", "x")
    c = r.counter("x_total", "x", ["a"])
    with pytest.raises(ValueError):
        c.inc(a="1", b="2")
    with pytest.raises(ValueError):
        c.inc(-1, a="1")
    with pytest.raises(ValueError):
        r.counter("x_total", "twice")
    assert escape_label_value('a"b\\c\nd') == 'a\\"b\\\\c\\nd'
    assert [format_value(v) for v in (3.0, 0.25, float("inf"), float("nan"))] == ["3", "0.25", "+Inf", "NaN"]


def test_counters_are_thread_safe():
    r = Registry()
    c = r.counter("n_total", "n")
    threads = [threading.Thread(target=lambda: [c.inc() for _ in range(10_000)]) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert c.value() == 40_000


def test_the_admin_token_comes_from_the_environment_only():
    assert resolve_admin_token("T", {"T": "environment-token"}) == "environment-token"
    assert resolve_admin_token("T", {}) is None
    with pytest.raises(ValueError):
        resolve_admin_token("T", {"T": "short"})


def test_admin_requests_need_the_exact_token():
    token = "s3cret-token"
    assert check_admin({"Authorization": f"Bearer {token}"}, token) is None
    assert check_admin({"authorization": f"bearer {token}"}, token) is None
    assert check_admin({"X-Admin-Token": token}, token) is None
    assert check_admin({}, token).status == 401
    assert check_admin({"Authorization": "Bearer wrong-token"}, token).status == 401
    assert check_admin({"Authorization": f"Basic {token}"}, token).status == 401
    assert check_admin({"Authorization": f"Bearer {token}"}, None).status == 403, "no token configured: API off"
    assert presented_token({"Authorization": "Bearer "}) is None


# ── API keys and per-identity limits ──────────────────────────────────────────


def test_a_keys_file_maps_keys_to_identities_and_bad_lines_name_their_line(tmp_path):
    from ttrl.serve.auth import ApiKeys, KeysFileError, load_api_keys

    f = tmp_path / "keys"
    f.write_text("# who may ask\n\nalice:alice-key-0123456789\n bob : bob-key-0123456789ab \n")
    keys = ApiKeys.from_file(f)
    assert keys.names == ["alice", "bob"]
    assert keys.identify("alice-key-0123456789") == "alice" and keys.identify("bob-key-0123456789ab") == "bob"
    assert keys.identify("alice-key-012345678") is None and keys.identify(None) is None
    bad = {
        "carol\n": "line 1 is not a `name:key` line",
        "carol:short\n": "line 1: the key of 'carol' must be at least 16",
        "anonymous:a-long-enough-key-000\n": "reserved",
        "al ice:a-long-enough-key-000\n": "the name",
        "a:a-long-enough-key-000\na:another-long-key-0000\n": "line 2: the name 'a' is already on line 1",
        "a:a-long-enough-key-000\nb:a-long-enough-key-000\n": "line 2: the key of 'b' is also another name's key",
        "# nothing\n": "holds no",
    }
    for text, words in bad.items():
        f.write_text(text)
        with pytest.raises(KeysFileError) as err:
            load_api_keys(f)
        assert words in str(err.value) and str(f) in str(err.value)
        assert "a-long-enough-key" not in str(err.value), "an error never shows a key"


def test_the_rate_limit_is_a_token_bucket_per_identity_and_in_flight_is_capped():
    from ttrl.serve.limits import ClientLimits

    now = [0.0]
    lim = ClientLimits(requests_per_minute=60, burst=3, max_in_flight=100, clock=lambda: now[0])
    assert [lim.acquire("a") is None for _ in range(4)] == [True, True, True, False]
    refusal = lim.acquire("a")
    assert refusal.key == "serve.limits.requests_per_minute" and refusal.retry_after_s == 1
    assert lim.acquire("b") is None, "another identity has its own bucket"
    now[0] = 2.0  # two tokens back at one a second
    assert [lim.acquire("a") is None for _ in range(3)] == [True, True, False]
    flight = ClientLimits(requests_per_minute=0, burst=1, max_in_flight=2)
    assert flight.acquire("a") is None and flight.acquire("a") is None
    assert flight.acquire("a").key == "serve.limits.max_in_flight"
    flight.release("a")
    assert flight.acquire("a") is None and flight.in_flight == {"a": 2}
