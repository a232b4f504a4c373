"""The durable record of a serving run: queries, responses, votes, feedback, versions, rounds.

One SQLite file in WAL mode with `synchronous=FULL`: a commit returns only
after the write-ahead log is on disk, so a query whose answer left the
server survives a SIGKILL or a power cut (the server writes, then answers).
`GroupCommitWriter` batches the inserts of concurrent requests into one
transaction (one fsync for many answers) on its own thread; each request
waits for the commit of its own rows.

Tables: `queries` (one row per prompt of a request: the client identity,
the prompt and its normalised key, the served text(s), every sample's
answer, the vote, the weights version that answered, which learning round
used it, and whether it was quarantined), `feedback` (one verdict per
identity per returned text: a new rating replaces the old), `versions`
(promoted weights on disk), `rounds` (each learning round: scores, gate
decision, reasons; a round the server died in is marked `interrupted` at
the next start), `regression` (the frozen pseudo-label set; retired items
keep their row), `events` and `state`. A store of an older schema is
migrated in place when opened.

Schema 3 (serve.tenants, issue 32 phase 2) records the tenant of every
query, rating, round, version and regression item (`tenant`, NULL = the
shared version, which is every row of an older store). A tenant's rounds
read and write its own rows only; version numbers stay one sequence over
the shared version and every tenant (`next_version`), and a tenant's served
version is the state key `tenant_version:<name>`.

Pure Python (sqlite3): no torch, ray or vllm.
"""

from __future__ import annotations

import json
import queue
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ttrl.serve.auth import ANONYMOUS
from ttrl.serve.trust import PROMPT_KEY_VERSION, prompt_key

SCHEMA_VERSION = 3

_TABLES = """
CREATE TABLE IF NOT EXISTS queries (
    id TEXT NOT NULL,               -- the response id the client got (cmpl-..., chatcmpl-...)
    idx INTEGER NOT NULL,           -- prompt index within the request
    created REAL NOT NULL,
    endpoint TEXT NOT NULL,
    client TEXT NOT NULL DEFAULT 'anonymous',  -- the API key's name that asked
    prompt TEXT NOT NULL,           -- what the engine saw (template applied)
    prompt_key TEXT,                -- the prompt, case and whitespace normalised (ttrl.serve.trust.prompt_key)
    request TEXT,                   -- the sampling fields the client sent (JSON; first prompt row only)
    version INTEGER NOT NULL,       -- weights version that generated the answer
    votes INTEGER NOT NULL,         -- samples drawn (1 = plain sampling)
    response TEXT NOT NULL,         -- JSON list of the texts returned
    answer TEXT,                    -- extracted answer of the (first) returned text
    agreement REAL,                 -- majority ratio when votes > 1
    samples TEXT,                   -- JSON list of every sample: text, answer, mean logprob
    latency_s REAL,
    heldout INTEGER NOT NULL DEFAULT 0,   -- in the regression set: not trained on while it is
    round INTEGER,                  -- the learning round that used it (NULL = not yet)
    failures INTEGER NOT NULL DEFAULT 0,  -- rounds whose rollout of it failed
    quarantined TEXT,               -- why it is never trained on (NULL = it may be)
    tenant TEXT,                    -- serve.tenants: whose adapter answered (NULL = the shared version)
    PRIMARY KEY (id, idx)
);
CREATE TABLE IF NOT EXISTS feedback (
    fid INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL,
    idx INTEGER NOT NULL,
    choice INTEGER NOT NULL,        -- which of the prompt's returned texts (0 unless n > 1)
    client TEXT NOT NULL DEFAULT 'anonymous',  -- the identity that rated (one verdict per text)
    score REAL NOT NULL,            -- 1 = thumbs up, 0 = thumbs down, or anything between
    comment TEXT,
    created REAL NOT NULL,
    tenant TEXT                     -- the rater's tenant (NULL = the shared version)
);
CREATE TABLE IF NOT EXISTS versions (
    version INTEGER PRIMARY KEY,
    created REAL NOT NULL,
    path TEXT,
    parent INTEGER,
    round INTEGER,
    status TEXT NOT NULL,           -- base | promoted | pruned
    metrics TEXT,
    tenant TEXT                     -- the tenant whose adapter it is (NULL = the shared version)
);
CREATE TABLE IF NOT EXISTS rounds (
    round INTEGER PRIMARY KEY,
    started REAL NOT NULL,
    finished REAL,
    outcome TEXT,                   -- promoted | rejected | skipped | failed
    base_version INTEGER,
    version INTEGER,                -- the promoted version, if any
    n_queries INTEGER,
    current_score REAL,
    candidate_score REAL,
    reasons TEXT,
    metrics TEXT,
    tenant TEXT                     -- the tenant whose adapter it trained (NULL = the shared version)
);
CREATE TABLE IF NOT EXISTS regression (
    id TEXT NOT NULL,
    idx INTEGER NOT NULL,
    prompt TEXT NOT NULL,
    label TEXT NOT NULL,
    agreement REAL NOT NULL,
    source TEXT NOT NULL DEFAULT 'vote',   -- vote (agreement, askers) | feedback (an earned thumbs-up)
    created REAL NOT NULL,
    prompt_key TEXT,
    retired REAL,                   -- when rotation took it out (NULL = in the set)
    tenant TEXT,                    -- whose set it is in (NULL = the shared version's)
    PRIMARY KEY (id, idx)
);
CREATE TABLE IF NOT EXISTS events (
    eid INTEGER PRIMARY KEY AUTOINCREMENT,
    created REAL NOT NULL,
    kind TEXT NOT NULL,
    payload TEXT
);
CREATE TABLE IF NOT EXISTS state (
    key TEXT PRIMARY KEY,
    value TEXT
);
"""

# After the migration: some index columns are new in schema 2 or 3.
_INDEXES = """
CREATE INDEX IF NOT EXISTS queries_unused ON queries (round, heldout, created);
CREATE INDEX IF NOT EXISTS queries_tenant ON queries (tenant, round);
CREATE INDEX IF NOT EXISTS queries_prompt ON queries (prompt);
CREATE INDEX IF NOT EXISTS queries_prompt_key ON queries (prompt_key);
CREATE INDEX IF NOT EXISTS feedback_query ON feedback (id, idx);
CREATE UNIQUE INDEX IF NOT EXISTS feedback_verdict ON feedback (id, idx, choice, client);
"""

# Columns schema 2 added to schema 1's tables: (table, column, declaration).
_ADDED = [
    ("queries", "client", "TEXT NOT NULL DEFAULT 'anonymous'"),
    ("queries", "prompt_key", "TEXT"),
    ("queries", "failures", "INTEGER NOT NULL DEFAULT 0"),
    ("queries", "quarantined", "TEXT"),
    ("feedback", "client", "TEXT NOT NULL DEFAULT 'anonymous'"),
    ("regression", "prompt_key", "TEXT"),
    ("regression", "retired", "REAL"),
    # schema 3: the tenant of every row (NULL = the shared version: every row of an older store)
    ("queries", "tenant", "TEXT"),
    ("feedback", "tenant", "TEXT"),
    ("versions", "tenant", "TEXT"),
    ("rounds", "tenant", "TEXT"),
    ("regression", "tenant", "TEXT"),
]


@dataclass
class QueryRecord:
    id: str
    idx: int
    endpoint: str
    prompt: str
    version: int
    votes: int
    response: list[str]
    answer: str | None = None
    agreement: float | None = None
    samples: list[dict[str, Any]] = field(default_factory=list)
    request: dict[str, Any] | None = None
    latency_s: float | None = None
    created: float = field(default_factory=time.time)
    client: str = ANONYMOUS
    tenant: str | None = None  # serve.tenants: whose adapter answered; None = the shared version


@dataclass
class FeedbackRecord:
    id: str
    idx: int
    choice: int
    score: float
    comment: str | None = None
    created: float = field(default_factory=time.time)
    client: str = ANONYMOUS
    tenant: str | None = None  # the rater's tenant


# Unused, trainable queries: not used by a round, not held out, not quarantined, and not of a prompt
# that is in the regression set of the same tenant (or of the shared version) now.
_TRAINABLE = ("round IS NULL AND heldout=0 AND quarantined IS NULL AND prompt_key NOT IN"
              " (SELECT r.prompt_key FROM regression r WHERE r.retired IS NULL AND r.prompt_key IS NOT NULL"
              " AND r.tenant IS queries.tenant)")


class Store:
    """Thread-safe access to the serving database (one connection, one lock)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None, timeout=30)
        self._db.row_factory = sqlite3.Row
        mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise RuntimeError(f"store {self.path}: SQLite refused WAL mode ({mode}); is it on a network file system?")
        # FULL: the WAL is fsynced at every commit; a committed answer survives a crash.
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_TABLES)
        self._migrate()
        self._rekey()
        self._db.executescript(_INDEXES)
        if self.get_state("schema_version") != SCHEMA_VERSION:
            self.set_state("schema_version", SCHEMA_VERSION)

    def _migrate(self) -> None:
        """Bring an older store up to schema 3 in one transaction: new columns (schema 2: prompt keys, which
        `_rekey` fills next, and one verdict per rater; schema 3: the tenant of each row, NULL for every
        existing one)."""
        missing = [(t, c, decl) for t, c, decl in _ADDED
                   if c not in {r[1] for r in self._db.execute(f"PRAGMA table_info({t})")}]
        if not missing:
            return

        def write():
            for table, column, decl in missing:
                self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {decl}")
            # Schema 1 kept every rating; schema 2 keeps each identity's newest verdict per text.
            self._db.execute("DELETE FROM feedback WHERE fid NOT IN (SELECT MAX(fid) FROM feedback"
                             " GROUP BY id, idx, choice, client)")

        self._tx(write)

    def _rekey(self) -> None:
        """Recompute every row's prompt key when `prompt_key` changed since the store was written (once), and
        which queries the regression set holds out by the new keys."""
        if self.get_state("prompt_key_version") == PROMPT_KEY_VERSION:
            return

        def write():
            self._db.create_function("ttrl_prompt_key", 1, prompt_key, deterministic=True)
            self._db.execute("UPDATE queries SET prompt_key=ttrl_prompt_key(prompt)")
            self._db.execute("UPDATE regression SET prompt_key=ttrl_prompt_key(prompt)")
            self._db.execute("UPDATE queries SET heldout=(prompt_key IN (SELECT r.prompt_key FROM regression r"
                             " WHERE r.retired IS NULL AND r.tenant IS queries.tenant))")
            self._set_state(("prompt_key_version", PROMPT_KEY_VERSION))

        self._tx(write)

    # ── plumbing ──────────────────────────────────────────────────────────
    def _tx(self, fn, *args):
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                out = fn(*args)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
            return out

    def _rows(self, sql: str, args: Sequence[Any] = ()) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(r) for r in self._db.execute(sql, args).fetchall()]

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def pragma(self, name: str) -> Any:
        with self._lock:
            return self._db.execute(f"PRAGMA {name}").fetchone()[0]

    # ── queries ───────────────────────────────────────────────────────────
    def add_queries(self, records: Iterable[QueryRecord]) -> int:
        rows = [(r.id, r.idx, r.created, r.endpoint, r.client, r.prompt, prompt_key(r.prompt),
                 json.dumps(r.request) if r.request is not None else None, r.version, r.votes,
                 json.dumps(r.response), r.answer, r.agreement, json.dumps(r.samples), r.latency_s, r.tenant)
                for r in records]

        def write():
            self._db.executemany(
                "INSERT INTO queries (id, idx, created, endpoint, client, prompt, prompt_key, request, version, votes,"
                " response, answer, agreement, samples, latency_s, tenant) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                rows)
            return len(rows)

        return self._tx(write)

    def get_query(self, qid: str, idx: int = 0) -> dict[str, Any] | None:
        rows = self._rows("SELECT * FROM queries WHERE id=? AND idx=?", (qid, idx))
        return _decode_query(rows[0]) if rows else None

    def get_request(self, qid: str) -> list[dict[str, Any]]:
        """Every prompt row of one request, in prompt order."""
        return [_decode_query(r) for r in self._rows("SELECT * FROM queries WHERE id=? ORDER BY idx", (qid,))]

    def query_ids(self) -> set[str]:
        return {r["id"] for r in self._rows("SELECT DISTINCT id FROM queries")}

    def count_queries(self) -> int:
        return self._rows("SELECT COUNT(*) AS n FROM queries")[0]["n"]

    def unused_queries(self, limit: int, tenant: str | None = None) -> list[dict[str, Any]]:
        """The newest `limit` trainable queries of `tenant` (None: the shared version's) no round has used,
        oldest first."""
        rows = self._rows(f"SELECT * FROM queries WHERE {_TRAINABLE} AND tenant IS ? ORDER BY created DESC LIMIT ?",
                          (tenant, limit))
        return [_decode_query(r) for r in reversed(rows)]

    def count_unused(self, tenant: str | None = None) -> int:
        return self._rows(f"SELECT COUNT(*) AS n FROM queries WHERE {_TRAINABLE} AND tenant IS ?",
                          (tenant,))[0]["n"]

    def unused_by_tenant(self) -> dict[str, int]:
        """Tenant -> its unused, trainable queries (tenants with none are absent; the shared version too)."""
        return {r["tenant"]: r["n"] for r in self._rows(
            f"SELECT tenant, COUNT(*) AS n FROM queries WHERE {_TRAINABLE} AND tenant IS NOT NULL GROUP BY tenant")}

    def mark_used(self, keys: Iterable[tuple[str, int]], round_no: int) -> None:
        keys = list(keys)
        self._tx(self._mark_used, keys, round_no)

    def _mark_used(self, keys: list[tuple[str, int]], round_no: int) -> None:
        self._db.executemany("UPDATE queries SET round=? WHERE id=? AND idx=?", [(round_no, i, x) for i, x in keys])

    def askers(self, keys: Iterable[str], tenant: str | None = None) -> dict[str, int]:
        """Prompt key -> distinct identities that ever asked it (of `tenant`; None: of the shared version)."""
        out: dict[str, int] = {}
        keys = list(dict.fromkeys(keys))
        for i in range(0, len(keys), 400):
            chunk = keys[i:i + 400]
            marks = ",".join("?" * len(chunk))
            for r in self._rows(f"SELECT prompt_key, COUNT(DISTINCT client) AS n FROM queries WHERE prompt_key IN"
                                f" ({marks}) AND tenant IS ? GROUP BY prompt_key", [*chunk, tenant]):
                out[r["prompt_key"]] = r["n"]
        return out

    def add_failures(self, keys: Iterable[tuple[str, int]], max_failures: int, reason: str) -> int:
        """Count one failed rollout for each query; quarantine those at `max_failures`. Returns how many now are."""
        keys = list(keys)

        def write():
            self._db.executemany("UPDATE queries SET failures=failures+1 WHERE id=? AND idx=?", keys)
            cur = self._db.executemany("UPDATE queries SET quarantined=? WHERE id=? AND idx=? AND failures>=?"
                                       " AND quarantined IS NULL", [(reason, i, x, max_failures) for i, x in keys])
            return cur.rowcount

        return self._tx(write)

    def quarantine(self, keys: Iterable[tuple[str, int]], reason: str) -> None:
        keys = list(keys)
        self._tx(lambda: self._db.executemany("UPDATE queries SET quarantined=? WHERE id=? AND idx=?",
                                              [(reason, i, x) for i, x in keys]))

    def quarantined(self) -> list[dict[str, Any]]:
        return [_decode_query(r) for r in self._rows("SELECT * FROM queries WHERE quarantined IS NOT NULL"
                                                     " ORDER BY created")]

    # ── feedback ──────────────────────────────────────────────────────────
    def add_feedback(self, fb: FeedbackRecord) -> tuple[int, bool]:
        """Store a verdict: (feedback id, whether it replaced this identity's earlier verdict on the text)."""
        def write():
            old = self._db.execute("SELECT fid FROM feedback WHERE id=? AND idx=? AND choice=? AND client=?",
                                   (fb.id, fb.idx, fb.choice, fb.client)).fetchone()
            if old is not None:
                self._db.execute("DELETE FROM feedback WHERE fid=?", (old[0],))
            # A new row (not an update): its fid orders it after every verdict already given.
            cur = self._db.execute("INSERT INTO feedback (id, idx, choice, client, score, comment, created, tenant)"
                                   " VALUES (?,?,?,?,?,?,?,?)",
                                   (fb.id, fb.idx, fb.choice, fb.client, fb.score, fb.comment, fb.created,
                                    fb.tenant))
            return int(cur.lastrowid), old is not None

        return self._tx(write)

    def feedback_for(self, keys: Iterable[tuple[str, int]]) -> dict[tuple[str, int], list[dict[str, Any]]]:
        """Feedback rows of the given queries, oldest first."""
        out: dict[tuple[str, int], list[dict[str, Any]]] = {}
        keys = list(keys)
        for i in range(0, len(keys), 400):
            chunk = keys[i:i + 400]
            where = " OR ".join("(id=? AND idx=?)" for _ in chunk)
            args = [v for k in chunk for v in k]
            for r in self._rows(f"SELECT * FROM feedback WHERE {where} ORDER BY fid", args):
                out.setdefault((r["id"], r["idx"]), []).append(r)
        return out

    def feedback_by_prompt(self, keys: Iterable[str], tenant: str | None = None) -> dict[str, list[dict[str, Any]]]:
        """Every verdict on any response to these prompt keys (all requests, all rounds) that `tenant`'s
        adapter (None: the shared version) gave, oldest first, each with the rated text (`rated`) and the
        rater (`client`)."""
        out: dict[str, list[dict[str, Any]]] = {}
        keys = list(dict.fromkeys(keys))
        for i in range(0, len(keys), 400):
            chunk = keys[i:i + 400]
            marks = ",".join("?" * len(chunk))
            rows = self._rows(f"SELECT f.*, q.prompt_key AS prompt_key, q.response AS response FROM feedback f"
                              f" JOIN queries q ON f.id = q.id AND f.idx = q.idx WHERE q.prompt_key IN ({marks})"
                              f" AND q.tenant IS ? ORDER BY f.fid", [*chunk, tenant])
            for r in rows:
                texts = json.loads(r.pop("response"))
                r["rated"] = texts[r["choice"]] if 0 <= r["choice"] < len(texts) else None
                out.setdefault(r["prompt_key"], []).append(r)
        return out

    def count_feedback(self) -> int:
        return self._rows("SELECT COUNT(*) AS n FROM feedback")[0]["n"]

    # ── regression set (frozen pseudo-labels) ─────────────────────────────
    def add_regression(self, items: Iterable[tuple], tenant: str | None = None) -> None:
        """Freeze (id, idx, prompt, label, agreement[, source]) items into `tenant`'s set (None: the shared
        version's); every query of theirs with the same prompt (by key) is held out of training while they are."""
        items = [tuple(it) if len(it) == 6 else (*it, "vote") for it in items]
        now = time.time()

        def write():
            # A row frozen before and retired since is frozen again (its queries are held out below): ignoring
            # it left them held out with no item in the set to release them.
            self._db.executemany("INSERT INTO regression (id, idx, prompt, label, agreement, source, created,"
                                 " prompt_key, tenant) VALUES (?,?,?,?,?,?,?,?,?) ON CONFLICT (id, idx) DO UPDATE"
                                 " SET label=excluded.label, agreement=excluded.agreement, source=excluded.source,"
                                 " created=excluded.created, prompt_key=excluded.prompt_key, tenant=excluded.tenant,"
                                 " retired=NULL",
                                 [(*it, now, prompt_key(it[2]), tenant) for it in items])
            self._db.executemany("UPDATE queries SET heldout=1 WHERE prompt_key=? AND tenant IS ?",
                                 [(prompt_key(it[2]), tenant) for it in items])

        self._tx(write)

    def regression_items(self, tenant: str | None = None) -> list[dict[str, Any]]:
        """The items in `tenant`'s set (None: the shared version's) now, oldest first."""
        return self._rows("SELECT * FROM regression WHERE retired IS NULL AND tenant IS ? ORDER BY created, id, idx",
                          (tenant,))

    def retire_regression(self, n: int, tenant: str | None = None) -> list[dict[str, Any]]:
        """Take the `n` oldest items out of `tenant`'s set; their prompts may be trained on again."""
        def write():
            rows = [dict(r) for r in self._db.execute(
                "SELECT * FROM regression WHERE retired IS NULL AND tenant IS ? ORDER BY created, id, idx LIMIT ?",
                (tenant, n))]
            now = time.time()
            self._db.executemany("UPDATE regression SET retired=? WHERE id=? AND idx=?",
                                 [(now, r["id"], r["idx"]) for r in rows])
            self._db.executemany("UPDATE queries SET heldout=0 WHERE prompt_key=? AND tenant IS ? AND prompt_key"
                                 " NOT IN (SELECT prompt_key FROM regression WHERE retired IS NULL AND tenant IS ?)",
                                 [(r["prompt_key"], tenant, tenant) for r in rows])
            return rows

        return self._tx(write) if n > 0 else []

    # ── versions ──────────────────────────────────────────────────────────
    def add_version(self, version: int, path: str, status: str, parent: int | None = None,
                    round_no: int | None = None, metrics: dict | None = None, serve: bool = False,
                    tenant: str | None = None) -> None:
        """Record a version (of `tenant`; None: the shared version); with serve=True it also becomes the one
        served (to that tenant), in the same transaction."""
        self._tx(self._add_version, version, path, status, parent, round_no, metrics, serve, tenant)

    def _add_version(self, version, path, status, parent, round_no, metrics, serve, tenant=None) -> None:
        self._db.execute("INSERT OR REPLACE INTO versions (version, created, path, parent, round, status, metrics,"
                         " tenant) VALUES (?,?,?,?,?,?,?,?)", (version, time.time(), path, parent, round_no, status,
                                                               json.dumps(metrics or {}), tenant))
        if serve:
            self._set_state((serving_key(tenant), version))

    def next_version(self) -> int:
        """The next version number: one sequence over the shared version and every tenant's."""
        return int(self._rows("SELECT COALESCE(MAX(version), -1) + 1 AS n FROM versions")[0]["n"])

    def set_version_status(self, version: int, status: str) -> None:
        self._tx(lambda: self._db.execute("UPDATE versions SET status=? WHERE version=?", (status, version)))

    def versions(self, tenant: str | None = None) -> list[dict[str, Any]]:
        """The versions of `tenant` (None: the shared version's), oldest first."""
        rows = self._rows("SELECT * FROM versions WHERE tenant IS ? ORDER BY version", (tenant,))
        for r in rows:
            r["metrics"] = json.loads(r["metrics"] or "{}")
        return rows

    def serving_version(self, tenant: str | None = None) -> int | None:
        """The version served (to `tenant`; None: the shared one); None when none was recorded (a tenant
        that never promoted one is served the adapter it was created with)."""
        v = self.get_state(serving_key(tenant))
        return None if v is None else int(v)

    def tenant_versions(self) -> dict[str, int]:
        """Tenant -> the version it is served, for every tenant that promoted one."""
        return {r["key"][len(TENANT_KEY):]: int(json.loads(r["value"]))
                for r in self._rows("SELECT key, value FROM state WHERE key LIKE ?", (TENANT_KEY + "%",))}

    # ── rounds ────────────────────────────────────────────────────────────
    def start_round(self, base_version: int | None, n_queries: int, tenant: str | None = None) -> int:
        def write():
            cur = self._db.execute("INSERT INTO rounds (started, base_version, n_queries, tenant) VALUES (?,?,?,?)",
                                   (time.time(), base_version, n_queries, tenant))
            return int(cur.lastrowid)

        return self._tx(write)

    def _finish_round(self, round_no: int, outcome: str, version: int | None, current_score: float | None,
                      candidate_score: float | None, reasons: Sequence[str], metrics: dict | None) -> None:
        self._db.execute(
            "UPDATE rounds SET finished=?, outcome=?, version=?, current_score=?, candidate_score=?, reasons=?,"
            " metrics=? WHERE round=?", (time.time(), outcome, version, current_score, candidate_score,
                                         json.dumps(list(reasons)), json.dumps(metrics or {}, default=str), round_no))

    def finish_round(self, round_no: int, outcome: str, *, version: int | None = None,
                     current_score: float | None = None, candidate_score: float | None = None,
                     reasons: Sequence[str] = (), metrics: dict | None = None,
                     used: Iterable[tuple[str, int]] = ()) -> None:
        """Record a round's outcome and mark the queries it trained on used, in one transaction."""
        used = list(used)

        def write():
            self._mark_used(used, round_no)
            self._finish_round(round_no, outcome, version, current_score, candidate_score, reasons, metrics)

        self._tx(write)

    def commit_promotion(self, round_no: int, version: int, path: str, parent: int | None, *,
                         used: Iterable[tuple[str, int]], current_score: float | None,
                         candidate_score: float | None, metrics: dict | None, tenant: str | None = None) -> None:
        """One transaction: the new version recorded and served, its queries used, its round promoted.

        A crash before it leaves the round without an outcome (`interrupted` at
        the next start) and its queries unused; after it, the next start serves
        the version, whose folder is complete on disk (written and fsynced first).
        """
        used = list(used)

        def write():
            self._add_version(version, path, "promoted", parent, round_no, metrics, True, tenant)
            self._mark_used(used, round_no)
            self._finish_round(round_no, "promoted", version, current_score, candidate_score, (), metrics)

        self._tx(write)

    def interrupt_unfinished(self) -> list[int]:
        """Mark rounds without an outcome (the server died in them) `interrupted`; returns their numbers."""
        def write():
            rows = [r[0] for r in self._db.execute("SELECT round FROM rounds WHERE outcome IS NULL")]
            self._db.execute("UPDATE rounds SET outcome='interrupted', finished=?,"
                             " reasons='[\"the server stopped during the round\"]' WHERE outcome IS NULL",
                             (time.time(),))
            return rows

        return self._tx(write)

    def rounds(self, limit: int = 50) -> list[dict[str, Any]]:
        """The last `limit` rounds of the shared version and every tenant, oldest first."""
        return self._decode_rounds(self._rows("SELECT * FROM rounds ORDER BY round DESC LIMIT ?", (limit,)))

    def tenant_rounds(self, tenant: str, limit: int = 50) -> list[dict[str, Any]]:
        """The last `limit` rounds of one tenant, oldest first."""
        return self._decode_rounds(self._rows("SELECT * FROM rounds WHERE tenant=? ORDER BY round DESC LIMIT ?",
                                              (tenant, limit)))

    @staticmethod
    def _decode_rounds(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for r in rows:
            r["reasons"] = json.loads(r["reasons"] or "[]")
            r["metrics"] = json.loads(r["metrics"] or "{}")
        return list(reversed(rows))

    # ── events and state ──────────────────────────────────────────────────
    def add_event(self, kind: str, **payload: Any) -> None:
        self._tx(lambda: self._db.execute("INSERT INTO events (created, kind, payload) VALUES (?,?,?)",
                                          (time.time(), kind, json.dumps(payload, default=str))))

    def events(self, kind: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        if kind is None:
            rows = self._rows("SELECT * FROM events ORDER BY eid DESC LIMIT ?", (limit,))
        else:
            rows = self._rows("SELECT * FROM events WHERE kind=? ORDER BY eid DESC LIMIT ?", (kind, limit))
        for r in rows:
            r["payload"] = json.loads(r["payload"] or "{}")
        return list(reversed(rows))

    def _set_state(self, kv: tuple[str, Any]) -> None:
        self._db.execute("INSERT OR REPLACE INTO state (key, value) VALUES (?, ?)", (kv[0], json.dumps(kv[1])))

    def set_state(self, key: str, value: Any) -> None:
        self._tx(self._set_state, (key, value))

    def get_state(self, key: str) -> Any:
        rows = self._rows("SELECT value FROM state WHERE key=?", (key,))
        return json.loads(rows[0]["value"]) if rows else None


TENANT_KEY = "tenant_version:"


def serving_key(tenant: str | None) -> str:
    """The state key of the version served to `tenant` (None: the shared version)."""
    return "serving_version" if tenant is None else TENANT_KEY + tenant


def _decode_query(row: dict[str, Any]) -> dict[str, Any]:
    row = dict(row)
    row["response"] = json.loads(row["response"])
    row["samples"] = json.loads(row["samples"] or "[]")
    row["request"] = json.loads(row["request"]) if row.get("request") else None
    return row


class GroupCommitWriter:
    """Writes query records on one thread, many requests per transaction.

    `submit(records)` returns a Future that resolves once those rows are
    committed (durable) or fails with the database error. Whatever is queued
    when the thread wakes goes into one transaction: under load, one fsync
    covers many answers. If that transaction fails, each request is retried
    in its own, so a bad row fails only the request it came from.
    """

    def __init__(self, store: Store, max_batch: int = 512):
        self.store = store
        self.max_batch = max_batch
        self._q: queue.Queue[tuple[list[QueryRecord], Future] | None] = queue.Queue()
        self.commits = 0
        self.rows = 0
        self.fallbacks = 0  # group transactions that failed and were retried request by request
        self._thread = threading.Thread(target=self._run, name="ttrl-store-writer", daemon=True)
        self._thread.start()

    def submit(self, records: list[QueryRecord]) -> Future:
        fut: Future = Future()
        self._q.put((records, fut))
        return fut

    def _run(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            batch = [item]
            stop = False
            while len(batch) < self.max_batch:
                try:
                    nxt = self._q.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                batch.append(nxt)
            records = [r for recs, _ in batch for r in recs]
            try:
                self.store.add_queries(records)
                self.commits += 1
                self.rows += len(records)
                for _, fut in batch:
                    fut.set_result(len(records))
            except BaseException:  # noqa: BLE001 - one request's bad rows must not fail its batch-mates
                self._one_by_one(batch)
            if stop:
                return

    def _one_by_one(self, batch: list[tuple[list[QueryRecord], Future]]) -> None:
        """The group transaction failed: commit each request alone, so only the request at fault fails."""
        self.fallbacks += 1
        for recs, fut in batch:
            try:
                self.store.add_queries(recs)
                self.commits += 1
                self.rows += len(recs)
                fut.set_result(len(recs))
            except BaseException as err:  # noqa: BLE001 - handed to its own waiter
                fut.set_exception(err)

    def close(self) -> None:
        self._q.put(None)
        self._thread.join(timeout=30)


__all__ = ["FeedbackRecord", "GroupCommitWriter", "QueryRecord", "Store"]
