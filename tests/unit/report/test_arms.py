"""`ttrl-compare --arms` on hand-made run dirs: maj@N change, label accuracy, the collapse step, the guard's record."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from ttrl.compare import main
from ttrl.report.arms import arms_report

pytestmark = pytest.mark.unit


def make_run(root: Path, name: str, arm: str, seed: int, evals: list[tuple[int, float, float]],
             labels: list[float], fired: int | None = None, drift_from: int | None = None,
             fingerprint: str | None = None, tiny_seed: int = 0) -> Path:
    """A finished run: evals (step, pass@1, maj@16), one label accuracy per step, the guard's firing step,
    and votes on 4 prompts that move off their first vote from step `drift_from` on (None: they hold)."""
    d = root / name
    d.mkdir(parents=True)
    steps = len(labels)
    cfg = {"seed": seed, "trainer": {"total_steps": steps}, "logger": {"wandb": {"job_type": arm}},
           "model": {"path": "tiny-arith", "tiny": {"seed": tiny_seed}, "warmstart": {"seed": 0}},
           "safety": {"window": 3}}
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    rows = [{"step": s, "label/accuracy": a} for s, a in enumerate(labels, start=1)]
    if fired is not None:
        rows[fired - 1]["safety/collapse_step"] = fired
    if fingerprint is not None:  # the run logs its starting weights' fingerprint with its first step
        rows[0]["model/fingerprint"] = fingerprint
    rows += [{"step": s, "eval/pass@1": p, "eval/maj@16": m} for s, p, m in evals]
    (d / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    votes = [{"step": 0, "id": f"p{i}", "label": "7", "ratio": 0.8, "classes": 2} for i in range(4)]
    for s in range(1, steps + 1):
        moved = drift_from is not None and s >= drift_from
        votes += [{"step": s, "id": f"p{i}", "label": "8" if moved and i < 3 else "7", "ratio": 0.8,
                   "classes": 2} for i in range(4)]
    (d / "votes.jsonl").write_text("\n".join(json.dumps(v) for v in votes) + "\n")
    return d


def test_the_arms_table_has_the_hard_regimes_columns(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    labels = [0.6] * 5 + [0.7] * 10 + [0.9] * 5  # 20 steps: first 5 average 0.6, last 5 average 0.9
    # TTRL, seed 0: the guard fires at step 3 (the votes drift from step 2 on), maj@16 falls 0.75 -> 0.69 at
    # step 10 (a fall of 0.06 >= 0.05): lead 10 - 3 = 7; pass@1 0.40 -> 0.30 (-0.10).
    make_run(sweep, "majority_vote_s0", "majority_vote", 0, [(0, 0.40, 0.75), (10, 0.35, 0.69), (20, 0.30, 0.60)],
             labels, fired=3, drift_from=2)
    # TTRL, seed 1: the guard fires at step 4 and the run gains (0.40 -> 0.80, above its start maj@16 0.75)
    # with maj@16 0.75 -> 0.78: a false alarm. Its votes hold: collapse step "held".
    make_run(sweep, "majority_vote_s1", "majority_vote", 1, [(0, 0.40, 0.75), (10, 0.60, 0.76), (20, 0.80, 0.78)],
             labels, fired=4)
    # The oracle: quiet guard, maj@16 0.75 -> 0.70 at step 20 only (0.05: counts as a fall); missed by the guard.
    make_run(sweep, "ground_truth_s0", "ground_truth", 0, [(0, 0.40, 0.75), (10, 0.50, 0.74), (20, 0.70, 0.70)],
             [0.5] * 20)
    md = arms_report([sweep], tmp_path / "report").read_text()
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[1:-1]] for line in md.splitlines()
            if line.startswith("| ") and not line.startswith(("| arm ", "| run "))}
    ttrl = rows["majority_vote"]
    # Gains -0.10 and +0.40: median +0.150, worst -0.100; maj@16 change -0.15 and +0.03: median -0.060 (worst -0.150).
    assert ttrl[4:6] == ["+0.150", "-0.100"]
    assert ttrl[7] == "-0.060 (-0.150)"
    assert ttrl[8] == "0.600 -> 0.900"
    assert ttrl[9] == "1 of 2"  # only seed 1 ends above its start maj@16 (0.80 > 0.75)
    assert ttrl[11] == "2 of 2"
    assert ttrl[12] == "3 (held in 1)"  # seed 0's votes collapse at step 3 (replayed); seed 1's held
    oracle = rows["ground_truth"]
    assert oracle[7] == "-0.050 (-0.050)" and oracle[9] == "0 of 1" and oracle[11] == "0 of 1"
    assert oracle[12] == "held in 1"
    guard = {r[0].strip("`"): r for r in rows.values() if r[0].startswith("`")}
    assert guard["majority_vote_s0"][2:5] == ["3", "10", "7"] and guard["majority_vote_s0"][7] == "no"
    assert guard["majority_vote_s1"][2:5] == ["4", "–", "–"] and guard["majority_vote_s1"][7] == "yes"
    assert guard["ground_truth_s0"][2:5] == ["–", "20", "–"]
    assert "Fired on 2 runs (1 false alarms" in md and "ahead by 7 steps" in md and "silent on 1" in md
    summary = json.loads((tmp_path / "report" / "arms.json").read_text())["arms"]
    assert summary["majority_vote"]["above_start_maj"] == 1


def test_runs_without_votes_or_maj_still_make_a_table(tmp_path: Path) -> None:
    # Older runs wrote no votes.jsonl and some no maj@N: the new columns show "–", nothing fails.
    d = make_run(tmp_path / "sweep", "grpo_s0", "grpo", 0, [(0, 0.4, 0.7), (20, 0.5, 0.7)], [0.5] * 20)
    (d / "votes.jsonl").unlink()
    rows = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
    (d / "metrics.jsonl").write_text("\n".join(json.dumps({k: v for k, v in r.items() if "maj" not in k})
                                               for r in rows) + "\n")
    main([str(tmp_path / "sweep"), "--arms", "--out", str(tmp_path / "r")])
    md = (tmp_path / "r" / "arms.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| grpo |")).split("|")
    assert row[8].strip() == "– (–)" and row[10].strip() == "–" and row[13].strip() == "–"
    assert "The guard:" not in md


def test_an_archived_run_with_gzipped_jsonl_reads_the_same(tmp_path: Path) -> None:
    # experiments/results/ keeps runs with metrics.jsonl.gz and votes.jsonl.gz: the tables must not change.
    import gzip

    plain, packed = tmp_path / "plain", tmp_path / "packed"
    for root in (plain, packed):
        make_run(root, "majority_vote_s0", "majority_vote", 0, [(0, 0.40, 0.75), (10, 0.35, 0.69), (20, 0.3, 0.6)],
                 [0.6] * 20, fired=3, drift_from=2)
    for name in ("metrics.jsonl", "votes.jsonl"):
        f = packed / "majority_vote_s0" / name
        f.with_suffix(".jsonl.gz").write_bytes(gzip.compress(f.read_bytes()))
        f.unlink()
    a = arms_report([plain], tmp_path / "a").read_text()
    b = arms_report([packed], tmp_path / "b").read_text()
    assert a.replace(str(plain), "X") == b.replace(str(packed), "X") and "3 (held" not in a and "| 3 |" in a


def test_runs_of_one_warm_start_from_different_weights_are_refused_in_one_line(tmp_path: Path, capsys) -> None:
    from ttrl.report.collapse import collapse_report
    from ttrl.report.runs import CompareError

    evals, labels = [(0, 0.4, 0.7), (20, 0.5, 0.7)], [0.5] * 20
    ok, mixed = tmp_path / "ok", tmp_path / "mixed"
    # One warm start (0:0) twice from the same weights, a run from before fingerprints, and another warm start
    # (1:0) from other weights: one table.
    make_run(ok, "majority_vote_s0", "majority_vote", 0, evals, labels, fingerprint="aaaa")
    make_run(ok, "random_s0", "random", 0, evals, labels, fingerprint="aaaa")
    make_run(ok, "ground_truth_s0", "ground_truth", 0, evals, labels)
    make_run(ok, "majority_vote_ws1_s0", "majority_vote", 0, evals, labels, fingerprint="cccc", tiny_seed=1)
    assert "4 runs" in arms_report([ok], tmp_path / "r1").read_text()
    # The same warm start's name over two sets of weights (a sweep continued on another CPU): refused.
    make_run(mixed, "majority_vote_s0", "majority_vote", 0, evals, labels, fingerprint="aaaa")
    make_run(mixed, "majority_vote_s1", "majority_vote", 1, evals, labels, fingerprint="bbbb")
    for report in (lambda: arms_report([mixed], tmp_path / "r2"),
                   lambda: collapse_report([mixed / "majority_vote_s0"], tmp_path / "r3",
                                           against=[mixed / "majority_vote_s1"])):
        with pytest.raises(CompareError, match="different weights") as err:
            report()
        assert "aaaa" in str(err.value) and "bbbb" in str(err.value) and "majority_vote_s" in str(err.value)
    assert not (tmp_path / "r2").exists()  # nothing written
    # The command says it in one line and exits 2.
    with pytest.raises(SystemExit) as code:
        main([str(mixed), "--arms", "--out", str(tmp_path / "r4")])
    assert code.value.code == 2 and "different weights" in capsys.readouterr().err


def test_untrained_tiny_models_of_other_seeds_are_other_models() -> None:
    from ttrl.report.collapse import one_weights_per_warm_start
    from ttrl.report.runs import CompareError

    def run(name: str, seed: int, fp: str) -> dict:
        return {"dir": name, "rows": [{"step": 1, "model/fingerprint": fp}],
                "config": {"model": {"path": "tiny", "tiny": {"seed": seed, "hidden_size": 128}}}}

    one_weights_per_warm_start([run("a", 0, "aaaa"), run("b", 1, "bbbb"), run("c", 0, "aaaa")])
    with pytest.raises(CompareError, match="different weights"):
        one_weights_per_warm_start([run("a", 0, "aaaa"), run("c", 0, "cccc")])
