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


def test_the_admin_token_comes_from_the_config_then_the_environment():
    assert resolve_admin_token("configured-token", "T", {"T": "environment-token"}) == "configured-token"
    assert resolve_admin_token(None, "T", {"T": "environment-token"}) == "environment-token"
    assert resolve_admin_token(None, "T", {}) is None
    with pytest.raises(ValueError):
        resolve_admin_token("short", "T", {})


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
