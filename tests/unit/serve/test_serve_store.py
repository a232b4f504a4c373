"""The serving store: durable (WAL + synchronous=FULL), complete, and what the learner reads from it."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from ttrl.serve.store import FeedbackRecord, GroupCommitWriter, QueryRecord, Store


def _q(i: int, idx: int = 0, answer: str = "42", created: float | None = None) -> QueryRecord:
    rec = QueryRecord(id=f"cmpl-{i}", idx=idx, endpoint="completions", prompt=f"{i}+{i}=", version=0, votes=1,
                      response=[f"\\boxed{{{answer}}}"], answer=answer,
                      samples=[{"text": "x", "answer": answer}])
    if created is not None:
        rec.created = created
    return rec


def test_the_store_is_durable_by_construction(tmp_path):
    s = Store(tmp_path / "s.sqlite")
    assert s.pragma("journal_mode") == "wal"
    assert s.pragma("synchronous") == 2  # FULL: the WAL is fsynced at every commit


def test_queries_round_trip_and_the_learner_sees_each_once(tmp_path):
    s = Store(tmp_path / "s.sqlite")
    s.add_queries([_q(i, created=1000.0 + i) for i in range(5)] + [_q(0, idx=1, created=1000.5)])
    got = s.get_query("cmpl-3")
    assert got["prompt"] == "3+3=" and got["response"] == ["\\boxed{42}"] and got["samples"][0]["answer"] == "42"
    assert [r["idx"] for r in s.get_request("cmpl-0")] == [0, 1]
    assert s.count_queries() == 6 and s.query_ids() == {f"cmpl-{i}" for i in range(5)}
    unused = s.unused_queries(limit=10)
    assert [(r["id"], r["idx"]) for r in unused][:3] == [("cmpl-0", 0), ("cmpl-0", 1), ("cmpl-1", 0)]
    # The newest `limit`, oldest first.
    assert [r["id"] for r in s.unused_queries(limit=2)] == ["cmpl-3", "cmpl-4"]
    s.mark_used([("cmpl-0", 0), ("cmpl-1", 0)], round_no=1)
    s.add_regression([("cmpl-2", 0, "2+2=", "4", 0.9)])
    left = {(r["id"], r["idx"]) for r in s.unused_queries(limit=10)}
    assert left == {("cmpl-0", 1), ("cmpl-3", 0), ("cmpl-4", 0)}, "used and held-out queries are not handed out"
    assert s.count_unused() == 3
    s.add_queries([_q(2, idx=5)])  # the frozen prompt asked again later: still never trained on
    assert s.count_unused() == 3 and ("cmpl-2", 5) not in {(r["id"], r["idx"]) for r in s.unused_queries(10)}
    assert [(r["id"], r["label"]) for r in s.regression_items()] == [("cmpl-2", "4")]


def test_feedback_versions_rounds_events_and_state(tmp_path):
    s = Store(tmp_path / "s.sqlite")
    s.add_queries([_q(1), _q(2)])
    assert s.add_feedback(FeedbackRecord("cmpl-1", 0, 0, 1.0))[1] is False
    fid, replaced = s.add_feedback(FeedbackRecord("cmpl-1", 0, 0, 0.0, comment="changed my mind"))
    assert replaced, "one verdict per identity per text: the new one replaces the old"
    s.add_feedback(FeedbackRecord("cmpl-1", 0, 0, 1.0, client="bob"))
    fb = s.feedback_for([("cmpl-1", 0), ("cmpl-2", 0)])
    assert [(f["client"], f["score"]) for f in fb[("cmpl-1", 0)]] == [("anonymous", 0.0), ("bob", 1.0)]
    assert ("cmpl-2", 0) not in fb and s.count_feedback() == 2
    s.add_queries([_q(3, idx=0)])
    s.add_queries([QueryRecord(id="cmpl-9", idx=0, endpoint="chat", prompt=" 1+1= ", version=0, votes=1,
                               response=["\\boxed{5}"], client="carol")])  # cmpl-1's prompt, other spacing
    s.add_feedback(FeedbackRecord("cmpl-9", 0, 0, 1.0, client="carol"))
    by_prompt = s.feedback_by_prompt(["1+1=", "3+3="])
    assert [(f["id"], f["client"], f["score"], f["rated"]) for f in by_prompt["1+1="]] == [
        ("cmpl-1", "anonymous", 0.0, "\\boxed{42}"), ("cmpl-1", "bob", 1.0, "\\boxed{42}"),
        ("cmpl-9", "carol", 1.0, "\\boxed{5}")]
    assert "3+3=" not in by_prompt
    assert s.askers(["1+1=", "3+3="]) == {"1+1=": 2, "3+3=": 1}

    assert s.serving_version() is None
    s.add_version(0, "/v0", "base", serve=True)
    s.add_version(1, "/v1", "promoted", parent=0, round_no=1, metrics={"score": 0.5})
    assert s.serving_version() == 0, "recording a version does not serve it"
    s.add_version(2, "/v2", "promoted", parent=1, serve=True)
    assert s.serving_version() == 2
    s.set_version_status(1, "pruned")
    assert [(v["version"], v["status"]) for v in s.versions()] == [(0, "base"), (1, "pruned"), (2, "promoted")]
    assert s.versions()[1]["metrics"] == {"score": 0.5}

    r = s.start_round(base_version=2, n_queries=10)
    s.finish_round(r, "rejected", current_score=0.5, candidate_score=0.1, reasons=["worse"], metrics={"a": 1})
    (row,) = s.rounds()
    assert row["outcome"] == "rejected" and row["reasons"] == ["worse"] and row["metrics"] == {"a": 1}
    s.add_event("gate_rejected", round=r, reasons=["worse"])
    assert s.events("gate_rejected")[0]["payload"]["round"] == r
    s.set_state("k", {"x": [1, 2]})
    assert s.get_state("k") == {"x": [1, 2]}


def test_group_commit_writes_every_record_from_many_threads(tmp_path):
    s = Store(tmp_path / "s.sqlite")
    w = GroupCommitWriter(s)
    futs = []
    lock = threading.Lock()

    def client(c):
        for i in range(50):
            f = w.submit([_q(c * 1000 + i)])
            with lock:
                futs.append(f)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for f in futs:
        f.result(timeout=30)
    assert s.count_queries() == 400
    assert w.rows == 400 and w.commits <= 400
    w.close()


def test_a_duplicate_fails_its_own_waiters_and_the_writer_keeps_going(tmp_path):
    s = Store(tmp_path / "s.sqlite")
    w = GroupCommitWriter(s)
    w.submit([_q(1)]).result(timeout=10)
    bad = w.submit([_q(1)])
    try:
        bad.result(timeout=10)
        raise AssertionError("a duplicate id was accepted")
    except Exception as err:  # noqa: BLE001
        assert "UNIQUE" in str(err)
    w.submit([_q(2)]).result(timeout=10)
    assert s.count_queries() == 2
    w.close()


CRASH = r"""
import os, signal, sys
from ttrl.serve.store import GroupCommitWriter, QueryRecord, Store
w = GroupCommitWriter(Store(sys.argv[1]))
for i in range(200):
    w.submit([QueryRecord(id=f"cmpl-{i}", idx=0, endpoint="completions", prompt="p", version=0, votes=1,
                          response=["r"])]).result()
    print(f"cmpl-{i}", flush=True)   # "answered": only after the commit returned
    if i == 150:
        os.kill(os.getpid(), signal.SIGKILL)
"""


def test_every_answered_query_survives_a_sigkill(tmp_path):
    db = tmp_path / "crash.sqlite"
    proc = subprocess.run([sys.executable, "-c", CRASH, str(db)], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).parents[3], env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[3])})
    assert proc.returncode == -9, proc.stderr[-2000:]
    answered = set(proc.stdout.split())
    assert len(answered) == 151
    assert answered <= Store(db).query_ids()


def test_a_bad_record_in_a_group_commit_fails_only_its_own_request(tmp_path):
    s = Store(tmp_path / "s.sqlite")
    s.add_queries([_q(1)])
    w = GroupCommitWriter(s)
    # While the writer waits on the store for a first request, three more queue up: they go out as one
    # group transaction, with a duplicate in the middle.
    with s._lock:
        first = w.submit([_q(9)])
        time.sleep(0.3)
        futs = [w.submit([_q(10)]), w.submit([_q(1)]), w.submit([_q(11), _q(11, idx=1)])]
    assert first.result(timeout=10)
    assert futs[0].result(timeout=10) and futs[2].result(timeout=10)
    try:
        futs[1].result(timeout=10)
        raise AssertionError("the duplicate was accepted")
    except Exception as err:  # noqa: BLE001
        assert "UNIQUE" in str(err)
    assert s.query_ids() == {"cmpl-1", "cmpl-9", "cmpl-10", "cmpl-11"} and w.fallbacks == 1
    w.close()


V1_SCHEMA = """
CREATE TABLE queries (id TEXT NOT NULL, idx INTEGER NOT NULL, created REAL NOT NULL, endpoint TEXT NOT NULL,
    prompt TEXT NOT NULL, request TEXT, version INTEGER NOT NULL, votes INTEGER NOT NULL, response TEXT NOT NULL,
    answer TEXT, agreement REAL, samples TEXT, latency_s REAL, heldout INTEGER NOT NULL DEFAULT 0, round INTEGER,
    PRIMARY KEY (id, idx));
CREATE TABLE feedback (fid INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL, idx INTEGER NOT NULL,
    choice INTEGER NOT NULL, score REAL NOT NULL, comment TEXT, created REAL NOT NULL);
CREATE TABLE regression (id TEXT NOT NULL, idx INTEGER NOT NULL, prompt TEXT NOT NULL, label TEXT NOT NULL,
    agreement REAL NOT NULL, source TEXT NOT NULL DEFAULT 'vote', created REAL NOT NULL, PRIMARY KEY (id, idx));
CREATE TABLE state (key TEXT PRIMARY KEY, value TEXT);
INSERT INTO state VALUES ('schema_version', '1');
INSERT INTO queries (id, idx, created, endpoint, prompt, version, votes, response) VALUES
    ('cmpl-a', 0, 1.0, 'completions', ' 2+2= ', 0, 1, '["x"]'), ('cmpl-b', 0, 2.0, 'completions', '3+3=', 0, 1, '["y"]');
INSERT INTO feedback (id, idx, choice, score, created) VALUES ('cmpl-a', 0, 0, 1.0, 1.0), ('cmpl-a', 0, 0, 0.0, 2.0);
INSERT INTO regression VALUES ('cmpl-b', 0, '3+3=', '6', 0.9, 'vote', 3.0);
"""


def test_a_store_of_the_first_schema_is_migrated_in_place(tmp_path):
    import sqlite3

    db = tmp_path / "old.sqlite"
    con = sqlite3.connect(db)
    con.executescript(V1_SCHEMA)
    con.close()
    s = Store(db)
    assert s.get_state("schema_version") == 3
    assert s.get_query("cmpl-a")["client"] == "anonymous" and s.get_query("cmpl-a")["prompt_key"] == "2+2="
    assert [f["score"] for f in s.feedback_for([("cmpl-a", 0)])[("cmpl-a", 0)]] == [0.0], "the newest verdict kept"
    assert [it["prompt_key"] for it in s.regression_items()] == ["3+3="]
    assert [q["id"] for q in s.unused_queries(10)] == ["cmpl-a"], "the frozen prompt stays held out"
    s.close()
    assert Store(db).get_state("schema_version") == 3, "a migrated store opens again"


def test_the_frozen_set_rotates_and_a_retired_prompt_may_be_trained_on_again(tmp_path):
    s = Store(tmp_path / "s.sqlite")
    s.add_queries([_q(i, created=1000.0 + i) for i in range(4)])
    s.add_regression([("cmpl-0", 0, "0+0=", "0", 0.9), ("cmpl-1", 0, "1+1=", "2", 0.9)])
    assert {q["id"] for q in s.unused_queries(10)} == {"cmpl-2", "cmpl-3"}
    retired = s.retire_regression(1)
    assert [r["id"] for r in retired] == ["cmpl-0"] and [r["id"] for r in s.regression_items()] == ["cmpl-1"]
    assert {q["id"] for q in s.unused_queries(10)} == {"cmpl-0", "cmpl-2", "cmpl-3"}


def test_a_retired_item_frozen_again_is_back_in_the_set_and_holds_its_prompt_out(tmp_path):
    s = Store(tmp_path / "s.sqlite")
    s.add_queries([_q(i, created=1000.0 + i) for i in range(3)])
    s.add_regression([("cmpl-0", 0, "0+0=", "0", 0.9), ("cmpl-1", 0, "1+1=", "2", 0.9)])
    s.retire_regression(1)
    s.add_regression([("cmpl-0", 0, "0+0=", "0", 0.8)])  # a later round picks the same row again
    # Ignored before: the item stayed retired while its prompt's queries were held out, by nothing, for good.
    assert sorted(r["id"] for r in s.regression_items()) == ["cmpl-0", "cmpl-1"]
    assert {q["id"] for q in s.unused_queries(10)} == {"cmpl-2"}
    s.retire_regression(2)
    assert {q["id"] for q in s.unused_queries(10)} == {"cmpl-0", "cmpl-1", "cmpl-2"}


def test_a_store_keyed_by_an_older_prompt_key_is_rekeyed_once_when_opened(tmp_path):
    import sqlite3

    db = tmp_path / "s.sqlite"
    s = Store(db)
    s.add_queries([QueryRecord(id="cmpl-a", idx=0, endpoint="completions", prompt="2³=", version=0, votes=1,
                               response=["x"]),
                   QueryRecord(id="cmpl-b", idx=0, endpoint="completions", prompt="23=", version=0, votes=1,
                               response=["x"])])
    s.add_regression([("cmpl-a", 0, "2³=", "8", 0.9)])
    s.close()
    # What the NFKC key of before wrote: both rows keyed "23=", both held out by the one item.
    con = sqlite3.connect(db)
    con.execute("UPDATE queries SET prompt_key='23=', heldout=1")
    con.execute("UPDATE regression SET prompt_key='23='")
    con.execute("UPDATE state SET value='1' WHERE key='prompt_key_version'")
    con.commit()
    con.close()
    s = Store(db)
    assert {q["id"]: q["prompt_key"] for q in s.unused_queries(10)} == {"cmpl-b": "23="}, \
        "rekeyed: 23= is its own prompt again, and no longer held out by 2³='s item"
    assert [it["prompt_key"] for it in s.regression_items()] == ["2³="]
    assert s.get_state("prompt_key_version") == 2


def test_a_promotion_is_one_transaction_and_an_unfinished_round_is_interrupted_at_restart(tmp_path):
    s = Store(tmp_path / "s.sqlite")
    s.add_queries([_q(i) for i in range(3)])
    s.add_version(0, "/v0", "base", serve=True)
    r1 = s.start_round(0, 3)
    s.commit_promotion(r1, 1, "/v1", 0, used=[("cmpl-0", 0), ("cmpl-1", 0)], current_score=0.5,
                       candidate_score=0.6, metrics={"x": 1})
    assert s.serving_version() == 1 and s.rounds()[0]["outcome"] == "promoted"
    assert [q["id"] for q in s.unused_queries(10)] == ["cmpl-2"]
    r2 = s.start_round(1, 1)  # the server dies here
    s.close()
    s = Store(tmp_path / "s.sqlite")
    assert s.interrupt_unfinished() == [r2]
    assert [r["outcome"] for r in s.rounds()] == ["promoted", "interrupted"]
    assert s.interrupt_unfinished() == []
    assert [q["id"] for q in s.unused_queries(10)] == ["cmpl-2"], "its query goes into a later round"


def test_a_query_that_fails_twice_is_quarantined_and_no_longer_handed_out(tmp_path):
    s = Store(tmp_path / "s.sqlite")
    s.add_queries([_q(i) for i in range(3)])
    assert s.add_failures([("cmpl-0", 0), ("cmpl-1", 0)], 2, "boom") == 0
    assert s.add_failures([("cmpl-0", 0)], 2, "boom") == 1
    assert [q["id"] for q in s.unused_queries(10)] == ["cmpl-1", "cmpl-2"]
    s.quarantine([("cmpl-2", 0)], "too long")
    assert [(q["id"], q["quarantined"]) for q in s.quarantined()] == [("cmpl-0", "boom"), ("cmpl-2", "too long")]
    assert s.count_queries() == 3, "quarantined queries stay in the store"


V2_SCHEMA = """
CREATE TABLE queries (id TEXT NOT NULL, idx INTEGER NOT NULL, created REAL NOT NULL, endpoint TEXT NOT NULL,
    client TEXT NOT NULL DEFAULT 'anonymous', prompt TEXT NOT NULL, prompt_key TEXT, request TEXT,
    version INTEGER NOT NULL, votes INTEGER NOT NULL, response TEXT NOT NULL, answer TEXT, agreement REAL,
    samples TEXT, latency_s REAL, heldout INTEGER NOT NULL DEFAULT 0, round INTEGER,
    failures INTEGER NOT NULL DEFAULT 0, quarantined TEXT, PRIMARY KEY (id, idx));
CREATE TABLE feedback (fid INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL, idx INTEGER NOT NULL,
    choice INTEGER NOT NULL, client TEXT NOT NULL DEFAULT 'anonymous', score REAL NOT NULL, comment TEXT,
    created REAL NOT NULL);
CREATE TABLE versions (version INTEGER PRIMARY KEY, created REAL NOT NULL, path TEXT, parent INTEGER,
    round INTEGER, status TEXT NOT NULL, metrics TEXT);
CREATE TABLE rounds (round INTEGER PRIMARY KEY, started REAL NOT NULL, finished REAL, outcome TEXT,
    base_version INTEGER, version INTEGER, n_queries INTEGER, current_score REAL, candidate_score REAL,
    reasons TEXT, metrics TEXT);
CREATE TABLE regression (id TEXT NOT NULL, idx INTEGER NOT NULL, prompt TEXT NOT NULL, label TEXT NOT NULL,
    agreement REAL NOT NULL, source TEXT NOT NULL DEFAULT 'vote', created REAL NOT NULL, prompt_key TEXT,
    retired REAL, PRIMARY KEY (id, idx));
CREATE TABLE state (key TEXT PRIMARY KEY, value TEXT);
INSERT INTO state VALUES ('schema_version', '2'), ('serving_version', '1');
INSERT INTO queries (id, idx, created, endpoint, client, prompt, prompt_key, version, votes, response) VALUES
    ('cmpl-a', 0, 1.0, 'completions', 'u1', '2+2=', '2+2=', 1, 1, '["x"]'),
    ('cmpl-b', 0, 2.0, 'completions', 'u2', '3+3=', '3+3=', 1, 1, '["y"]');
INSERT INTO feedback (id, idx, choice, client, score, created) VALUES ('cmpl-a', 0, 0, 'u1', 1.0, 1.0);
INSERT INTO versions VALUES (0, 1.0, '/v0', NULL, NULL, 'base', '{}'), (1, 2.0, '/v1', 0, 1, 'promoted', '{}');
INSERT INTO rounds (round, started, finished, outcome, base_version, version) VALUES (1, 1.5, 2.0, 'promoted', 0, 1);
"""


def test_a_store_of_the_second_schema_gets_tenants_and_keeps_every_row_the_shared_versions(tmp_path):
    import sqlite3

    db = tmp_path / "v2.sqlite"
    con = sqlite3.connect(db)
    con.executescript(V2_SCHEMA)
    con.close()
    s = Store(db)
    assert s.get_state("schema_version") == 3 and s.serving_version() == 1
    assert [v["version"] for v in s.versions()] == [0, 1] and s.versions("alice") == []
    assert [q["id"] for q in s.unused_queries(10)] == ["cmpl-a", "cmpl-b"] and s.unused_by_tenant() == {}
    assert s.get_query("cmpl-a")["tenant"] is None and s.rounds()[0]["tenant"] is None
    assert list(s.feedback_by_prompt(["2+2="])) == ["2+2="]
    assert s.next_version() == 2
    s.close()
    assert Store(db).get_state("schema_version") == 3, "a migrated store opens again"


def test_each_tenant_has_its_own_queries_ratings_regression_set_rounds_and_versions(tmp_path):
    s = Store(tmp_path / "s.sqlite")
    s.add_version(0, "/v0", "base", serve=True)
    recs = [QueryRecord(id=f"cmpl-{t}{i}", idx=0, endpoint="completions", prompt=f"{i}+{i}=", version=0, votes=1,
                        response=["x"], client=t, tenant=t, created=1000.0 + i) for t in ("alice", "bob")
            for i in range(3)]
    s.add_queries([*recs, _q(9)])
    assert s.unused_by_tenant() == {"alice": 3, "bob": 3}
    assert [q["id"] for q in s.unused_queries(10, "alice")] == ["cmpl-alice0", "cmpl-alice1", "cmpl-alice2"]
    assert [q["id"] for q in s.unused_queries(10)] == ["cmpl-9"], "the shared version's queries are its own"
    s.add_feedback(FeedbackRecord("cmpl-bob1", 0, 0, 1.0, client="bob", tenant="bob"))
    assert s.feedback_by_prompt(["1+1="], "alice") == {} and len(s.feedback_by_prompt(["1+1="], "bob")["1+1="]) == 1
    # The same prompt frozen in alice's set holds out alice's queries of it, never bob's.
    s.add_regression([("cmpl-alice0", 0, "0+0=", "0", 0.9)], "alice")
    assert s.unused_by_tenant() == {"alice": 2, "bob": 3}
    assert s.regression_items("bob") == [] and [it["id"] for it in s.regression_items("alice")] == ["cmpl-alice0"]
    assert s.askers(["0+0="], "bob") == {"0+0=": 1} and s.askers(["0+0="]) == {}
    r = s.start_round(None, 2, "alice")
    s.commit_promotion(r, s.next_version(), "/tenants/alice/versions/v1", None, used=[("cmpl-alice1", 0)],
                       current_score=0.5, candidate_score=0.5, metrics={}, tenant="alice")
    assert s.serving_version("alice") == 1 and s.serving_version() == 0 and s.serving_version("bob") is None
    assert s.tenant_versions() == {"alice": 1}
    assert [v["version"] for v in s.versions()] == [0] and [v["version"] for v in s.versions("alice")] == [1]
    assert s.next_version() == 2, "one sequence of numbers over every tenant"
    assert s.rounds()[-1]["tenant"] == "alice" and s.unused_by_tenant() == {"alice": 1, "bob": 3}
    s.retire_regression(1, "alice")
    assert s.unused_by_tenant() == {"alice": 2, "bob": 3}
