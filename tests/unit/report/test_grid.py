"""The demo grid's report (`ttrl-compare --grid`) and the run plot, on hand-made run dirs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from ttrl.compare import main
from ttrl.metrics.plot import collapse_step, plot_run

pytestmark = pytest.mark.unit


def _run(root: Path, name: str, reward: str, ws: tuple[int, int], seed: int, before: tuple[float, float],
         after: tuple[float, float], fired: int | None = None) -> Path:
    d = root / name
    d.mkdir(parents=True)
    cfg = {"seed": seed, "reward": {"name": reward},
           "model": {"tiny": {"seed": ws[0]}, "warmstart": {"seed": ws[1]}}}
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    rows = [{"step": 0, "eval/pass@1": before[0], "eval/maj@16": before[1]}]
    for s in range(1, 9):
        row = {"step": s, "label/accuracy": 0.8 if s < 5 else 0.9, "label/majority_ratio": 0.5}
        if s == fired:
            row |= {"safety/collapse_step": s, "safety/reason": "label/flip_rate averaged 0.4"}
        rows.append(row)
    rows[-1] |= {"eval/pass@1": after[0], "eval/maj@16": after[1]}
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def test_grid_report_scores_every_run_against_the_bar_and_the_oracle(tmp_path):
    sweep = tmp_path / "grid"
    _run(sweep, "ttrl_ws0-0_s0", "majority_vote", (0, 0), 0, (0.46, 0.80), (0.66, 0.85))   # +0.20: meets
    _run(sweep, "ttrl_ws0-0_s1", "majority_vote", (0, 0), 1, (0.46, 0.80), (0.55, 0.85))   # +0.09: short
    _run(sweep, "ttrl_ws1-1_s0", "majority_vote", (1, 1), 0, (0.47, 0.78), (0.60, 0.75), fired=6)  # maj -0.03
    _run(sweep, "oracle_ws0-0_s0", "ground_truth", (0, 0), 0, (0.46, 0.80), (0.86, 1.0))
    _run(sweep, "random_ws0-0_s0", "random", (0, 0), 0, (0.46, 0.80), (0.45, 0.79))
    main([str(sweep), "--grid", "--out", str(tmp_path / "report")])
    data = json.loads((tmp_path / "report" / "grid.json").read_text())
    runs = {Path(r["dir"]).name: r for r in data["runs"]}
    assert runs["ttrl_ws0-0_s0"]["meets_bar"] and runs["ttrl_ws0-0_s0"]["gain"] == pytest.approx(0.20)
    assert not runs["ttrl_ws0-0_s1"]["meets_bar"]
    assert not runs["ttrl_ws1-1_s0"]["meets_bar"] and runs["ttrl_ws1-1_s0"]["guard_step"] == 6
    assert runs["ttrl_ws0-0_s0"]["share_of_oracle"] == pytest.approx(0.5)
    assert runs["ttrl_ws1-1_s0"]["share_of_oracle"] is None  # no oracle run from that warm start
    assert runs["ttrl_ws0-0_s0"]["label_acc_first"] == pytest.approx(0.8)
    s = data["summary"]["ttrl"]
    assert s["runs"] == 3 and s["meets_bar"] == 1 and s["guard_fired"] == 1
    assert s["min_gain"] == pytest.approx(0.09) and s["median_gain"] == pytest.approx(0.13)
    assert s["worst_run"].endswith("ttrl_ws0-0_s1")
    assert data["summary"]["random"]["median_gain"] == pytest.approx(-0.01)
    md = (tmp_path / "report" / "grid.md").read_text()
    assert "| ttrl | 1:1 | 0 |" in md and "fired at 6" in md and "**no**" in md
    assert (tmp_path / "report" / "grid.png").stat().st_size > 0


def test_run_plot_marks_the_guard_and_gives_each_signal_a_panel(tmp_path):
    rows = [{"step": 0, "eval/pass@1": 0.4, "eval/maj@16": 0.8}] + [
        {"step": s, "train/pass@1": 0.4, "label/accuracy": 0.8, "label/majority_ratio": 0.5 + s / 100,
         "reward/mean": 0.5 + s / 100, "label/flip_rate": 0.1, "train/entropy": 3.0 - s / 10}
        for s in range(1, 11)]
    rows[6]["safety/collapse_step"] = 6
    assert collapse_step(rows) == 6 and collapse_step(rows[:5]) is None
    out = plot_run(rows, tmp_path / "training.png", title="t")
    assert out.exists() and out.read_bytes()[:4] == b"\x89PNG"


def test_grid_report_can_judge_old_runs_by_todays_guard(tmp_path):
    # A random-reward run whose logged guard stayed quiet, but whose votes thin
    # out (ratio 0.8 -> 0.5 with the same labels): today's consensus signal fires.
    sweep = tmp_path / "grid"
    run = _run(sweep, "random_ws0-0_s0", "random", (0, 0), 0, (0.46, 0.80), (0.40, 0.70))
    votes = [{"step": 0, "id": f"p{i}", "label": "7", "ratio": 0.8, "classes": 2} for i in range(4)]
    votes += [{"step": s, "id": f"p{i}", "label": "7", "ratio": 0.8 - 0.04 * s, "classes": 3}
              for s in range(1, 9) for i in range(4)]
    (run / "votes.jsonl").write_text("".join(json.dumps(v) + "\n" for v in votes))
    _run(sweep, "oracle_ws0-0_s0", "ground_truth", (0, 0), 0, (0.46, 0.80), (0.86, 1.0))
    main([str(sweep), "--grid", "--out", str(tmp_path / "logged")])
    assert "fired at" not in (tmp_path / "logged" / "grid.md").read_text()
    main([str(sweep), "--grid", "--replay-guard", "--out", str(tmp_path / "replayed")])
    runs = {Path(r["dir"]).name: r for r in json.loads((tmp_path / "replayed" / "grid.json").read_text())["runs"]}
    # Changes -0.04, -0.08, -0.12: the first full 3-step window averages -0.08, below the default -0.03.
    assert runs["random_ws0-0_s0"]["guard_step"] == 3
    assert "consensus_change" in runs["random_ws0-0_s0"]["guard_reason"]
    assert runs["oracle_ws0-0_s0"]["guard_step"] is None  # a graded reward is never replayed
    assert "fired at 3 (replayed)" in (tmp_path / "replayed" / "grid.md").read_text()
