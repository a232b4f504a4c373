"""Replaying the guard's vote signals on a finished run's votes.jsonl (pure Python, no engine)."""

from __future__ import annotations

import json
import re

import pytest

from ttrl.metrics.replay import main, replay_run


def _write_run(d, steps, safety=None):
    """A run dir: anchor votes (step 0) then one vote per prompt and step, ratios as given."""
    d.mkdir()
    rows = []
    for step, votes in steps.items():
        rows += [{"step": step, "id": pid, "label": label, "ratio": ratio, "classes": 3}
                 for pid, (label, ratio) in votes.items()]
    (d / "votes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if safety is not None:
        (d / "config.yaml").write_text(json.dumps({"safety": safety}))
    return d


def _spreading(n_steps):
    """Votes that keep their labels while their consensus thins by 0.05 a step: what a random reward does."""
    anchor = {f"p{i}": ("7", 0.8) for i in range(4)}
    return {0: anchor, **{s: {f"p{i}": ("7", 0.8 - 0.05 * s) for i in range(4)} for s in range(1, n_steps + 1)}}


def test_replay_fires_where_the_consensus_thins_and_drift_sees_nothing(tmp_path):
    run = _write_run(tmp_path / "r", _spreading(6), safety={"window": 3, "max_consensus_drop": 0.08})
    r = replay_run(run)
    assert r.anchored == 4
    # Changes -0.05, -0.10, -0.15: the first full window averages -0.10, below -0.08.
    assert r.fired_at == 3 and "label/consensus_change" in r.reason
    assert all(row["label/first_vote_drift"] == 0.0 for row in r.rows)
    # The run's own limits are overridden by keyword, as a user tries a new limit.
    assert replay_run(run, max_consensus_drop=0.17).fired_at == 5  # -0.20 at step 5
    assert replay_run(run, max_consensus_drop=None).fired_at is None


def test_replay_names_what_is_missing_or_wrong(tmp_path):
    with pytest.raises(FileNotFoundError, match="votes.jsonl"):
        replay_run(tmp_path)
    run = _write_run(tmp_path / "r", _spreading(2))
    with pytest.raises(ValueError, match="^max_consensus: not a safety key"):
        replay_run(run, max_consensus=0.1)
    with pytest.raises(ValueError, match="^max_consensus_drop: 'x' is not a value"):
        replay_run(run, max_consensus_drop="x")
    # A run's own config with a value of the wrong type (an edited or foreign config.yaml): named with its file.
    bad = _write_run(tmp_path / "bad", _spreading(2), safety={"window": "three"})
    with pytest.raises(ValueError, match=r"^safety\.window: 'three' is not a value for it .*bad/config\.yaml"):
        replay_run(bad)
    good = '{"step": 0, "id": "a", "label": "1", "ratio": 0.5}\n'
    # A torn last line is what a killed run leaves: skipped. A bad line before it is damage, named.
    (run / "votes.jsonl").write_text(good + '{"step": 1, "id": "a", "lab')
    assert replay_run(run).anchored == 1
    (run / "votes.jsonl").write_text(good + "{oops\n" + good)
    with pytest.raises(ValueError, match="votes.jsonl:2"):
        replay_run(run)


def test_replay_command_prints_one_verdict_per_run(tmp_path, capsys):
    run = _write_run(tmp_path / "r", _spreading(6))
    assert main([str(run), "safety.max_consensus_drop=0.08", "window=3"]) == 0
    assert "fired at step 3" in capsys.readouterr().out
    assert main([str(run), "max_consensus_drop=null"]) == 0
    assert "quiet" in capsys.readouterr().out


def test_an_archived_run_replays_from_its_gzipped_votes(tmp_path):
    import gzip

    run = _write_run(tmp_path / "r", _spreading(6), safety={"window": 3, "max_consensus_drop": 0.08})
    live = replay_run(run)
    votes = run / "votes.jsonl"
    (run / "votes.jsonl.gz").write_bytes(gzip.compress(votes.read_bytes()))
    votes.unlink()
    archived = replay_run(run)
    assert (archived.fired_at, archived.reason, archived.rows) == (live.fired_at, live.reason, live.rows)


def test_replay_command_names_a_bad_limit_and_runs_nothing(tmp_path, capsys):
    run = _write_run(tmp_path / "r", _spreading(6))
    assert main([str(run), "max_drift=0.1"]) == 2
    captured = capsys.readouterr()
    assert "max_drift: not a safety key" in captured.err and captured.out == ""
    assert main([str(run), "=0.1"]) == 2
    assert "give KEY=VALUE" in capsys.readouterr().err


def test_limits_given_on_the_command_line_are_read_as_the_config_reads_them():
    from ttrl.metrics.replay import parse_limits

    assert parse_limits(["safety.max_excess_flip_rate=1e-3", "max_flip_rate=None", "window=5",
                         "max_consensus_drop=null"]) == {"max_excess_flip_rate": 0.001, "max_flip_rate": None,
                                                         "window": 5, "max_consensus_drop": None}
    # Each bad value: one error naming its key; an empty value is not "off" (that is null).
    for bad, says in [("max_flip_rate=", "give KEY=VALUE"), ("max_flip_rate=[0.1", "max_flip_rate: '[0.1'"),
                      ("window=abc", "window: 'abc'"), ("max_flip_rate=nan", "max_flip_rate: 'nan'"),
                      ("max_drift=0.1", "max_drift: not a safety key")]:
        with pytest.raises(ValueError, match=re.escape(says)):
            parse_limits([bad])


def test_replay_command_takes_a_run_dir_with_an_equals_sign_in_its_name(tmp_path, capsys):
    run = _write_run(tmp_path / "0_algorithm=grpo,seed=0", _spreading(6))
    assert main([str(run), "max_consensus_drop=0.08", "window=3"]) == 0
    assert "fired at step 3" in capsys.readouterr().out
