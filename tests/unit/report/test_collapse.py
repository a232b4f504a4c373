"""`ttrl-compare --collapse-step`: the consensus-only replay, the rank correlation, and the report on run dirs."""

from __future__ import annotations

import json
import math

import pytest

from ttrl.compare import main
from ttrl.report.collapse import consensus_collapse, spearman, warm_start

pytestmark = pytest.mark.unit

PROMPTS = ["p0", "p1", "p2", "p3"]


def votes(switch_at: int | None, steps: int) -> list[dict]:
    """Anchor votes "7" (ratio 0.8) on 4 prompts; from step `switch_at` on, 3 of them vote "8"."""
    rows = [{"step": 0, "id": p, "label": "7", "ratio": 0.8, "classes": 2} for p in PROMPTS]
    for s in range(1, steps + 1):
        moved = switch_at is not None and s >= switch_at
        rows += [{"step": s, "id": p, "label": "8" if moved and i < 3 else "7", "ratio": 0.8, "classes": 2}
                 for i, p in enumerate(PROMPTS)]
    return rows


def test_the_collapse_step_is_where_the_votes_drift() -> None:
    # From step 2, 3 of 4 prompts differ from their anchor vote: drift (steps 1, 2, 3) 0, 0.75, 0.75;
    # its 3-step average, full at step 3, (0 + 0.75 + 0.75) / 3 = 0.5 > 0.25 (the default limit) -> step 3.
    # (The flip rate, 0.75 at step 2 and 0 after, starts at step 2: its window is not full before step 4.)
    r = consensus_collapse(votes(2, 6), [], {"window": 3})
    assert r.fired_at == 3 and "label/first_vote_drift" in r.reason
    # From step 4: drift's window at step 4 is (0, 0, 0.75) = 0.25, not above 0.25; but the flip rate
    # over steps 2-4, (0 + 0 + 0.75) / 3 = 0.25, is above its limit 0.2 -> step 4, by the flips.
    r = consensus_collapse(votes(4, 6), [], {"window": 3})
    assert r.fired_at == 4 and r.reason.startswith("label/flip_rate")
    assert consensus_collapse(votes(None, 6), [], {"window": 3}).fired_at is None


def test_only_the_consensus_signals_count() -> None:
    # The run's guard also watched entropy, the majority ratio and the graded eval drop, all of which
    # these rows trip from step 3 on; the collapse step ignores them: the votes held.
    metrics = [{"step": s, "train/entropy": 0.01, "label/majority_ratio": 0.99, "eval/pass@1": 0.9 - 0.2 * s}
               for s in range(1, 7)]
    safety = {"window": 3, "min_entropy": 0.5, "max_majority_ratio": 0.9, "max_eval_drop": 0.05}
    assert consensus_collapse(votes(None, 6), metrics, safety).fired_at is None
    # Reward-vote alignment is a consensus signal: a reward paying dissenters (0.4 < 0.55) fires at step 3.
    aligned = [{"step": s, "label/vote_alignment": 0.4} for s in range(1, 7)]
    r = consensus_collapse(votes(None, 6), aligned, {"window": 3})
    assert r.fired_at == 3 and "label/vote_alignment" in r.reason


def test_spearman_by_hand() -> None:
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [40, 30, 20, 10]) == pytest.approx(-1.0)
    # Ties share ranks: x -> [1.5, 1.5, 3, 4], y -> [1, 2, 3, 4]; deviations from 2.5:
    # dx = [-1, -1, .5, 1.5], dy = [-1.5, -.5, .5, 1.5]: sxy = 4.5, sxx = 4.5, syy = 5 -> 4.5 / sqrt(22.5).
    assert spearman([1, 1, 2, 3], [1, 2, 3, 4]) == pytest.approx(4.5 / math.sqrt(22.5))
    assert spearman([1, 2], [1, 2]) is None          # too few pairs
    assert spearman([1, 1, 1], [1, 2, 3]) is None    # no spread


def _run(d, *, ws: int, reward: str, seed: int, vote_rows: list[dict], gain: float | None = None) -> None:
    d.mkdir(parents=True)
    cfg = {"seed": seed, "experiment": "demo_hard", "algorithm": {"name": "dr_grpo"}, "reward": {"name": reward},
           "model": {"path": "tiny-arith", "tiny": {"seed": ws}, "warmstart": {"seed": ws, "slip": 0.3}},
           "data": {"synthetic": {"terms": 3, "digits": 2}}, "safety": {"window": 3}}
    (d / "config.yaml").write_text(json.dumps(cfg))
    steps = max(r["step"] for r in vote_rows)
    rows = [{"step": s, "timing/step": 3.0} for s in range(1, steps + 1)]
    if gain is not None:
        rows = [{"step": 0, "eval/pass@1": 0.5}, *rows[:-1], rows[-1] | {"eval/pass@1": 0.5 + gain}]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "votes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in vote_rows))


def test_the_report_ranks_warm_starts_by_collapse_step_against_their_gain(tmp_path, capsys) -> None:
    # Probes: warm start 0 collapses at 3, 1 at 4 (above), 2 holds all 6 steps (ranked as 7).
    # Full TTRL runs (two seeds each): median gains -0.1, 0.0, +0.05: the later the collapse, the larger
    # the gain, rho = +1.
    for ws, switch in ((0, 2), (1, 4), (2, None)):
        _run(tmp_path / "probes" / f"ws{ws}", ws=ws, reward="token_entropy", seed=0, vote_rows=votes(switch, 6))
        for seed, gain in enumerate({0: (-0.12, -0.08), 1: (-0.02, 0.02), 2: (0.04, 0.06)}[ws]):
            _run(tmp_path / "full" / f"ws{ws}_s{seed}", ws=ws, reward="majority_vote", seed=seed,
                 vote_rows=votes(None, 8), gain=gain)
    out = tmp_path / "report"
    main([str(tmp_path / "probes"), "--collapse-step", "--against", str(tmp_path / "full"), "--out", str(out)])
    md = capsys.readouterr().out
    assert "| `ws0` | dr_grpo/token_entropy |" in md and "held 6" in md
    report = json.loads((out / "collapse.json").read_text())
    assert [r["collapse_step"] for r in report["runs"]] == [3, 4, None]
    assert [r["minutes"] for r in report["runs"]] == [pytest.approx(0.3)] * 3  # 6 steps of 3 s
    per_ws = report["warm_starts"]
    assert [w["collapse_step"] for w in per_ws] == [3, 4, 7]
    assert [w["median_gain"] for w in per_ws] == pytest.approx([-0.1, 0.0, 0.05])
    assert report["spearman"] == pytest.approx(1.0)
    assert "Spearman rank correlation of the collapse step with the gain over 3 warm starts: +1.00" in md


def test_warm_starts_differ_by_seed_and_by_recipe() -> None:
    base = {"model": {"path": "tiny-arith", "tiny": {"seed": 0}, "warmstart": {"seed": 0, "slip": 0.2}},
            "data": {"synthetic": {"terms": 3, "digits": 2}}}
    weaker = json.loads(json.dumps(base))
    weaker["model"]["warmstart"]["slip"] = 0.3
    assert warm_start(base).startswith("tiny-arith 0:0 #") and warm_start(base) != warm_start(weaker)
    assert warm_start({"model": {"path": "Qwen/Qwen2.5-Math-1.5B"}}) == "Qwen/Qwen2.5-Math-1.5B"


def test_untrained_tiny_models_are_told_apart_by_seed_and_shape() -> None:
    # Reports group runs by warm start: two seeds of the untrained tiny model are two starting models.
    def tiny(**kw) -> dict:
        return {"model": {"path": "tiny", "tiny": {"seed": 0, "hidden_size": 128, "num_layers": 2} | kw}}

    assert warm_start(tiny()).startswith("tiny 0 #")
    assert warm_start(tiny()) == warm_start(tiny())
    assert len({warm_start(tiny()), warm_start(tiny(seed=1)), warm_start(tiny(hidden_size=256))}) == 3
    assert warm_start(tiny(seed=1)).split(" #")[1] == warm_start(tiny()).split(" #")[1]  # the same shape


def test_a_run_without_votes_is_one_line_and_exit_2(tmp_path, capsys) -> None:
    d = tmp_path / "r"
    d.mkdir()
    (d / "config.yaml").write_text("{}")
    (d / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(SystemExit) as err:
        main([str(d), "--collapse-step", "--out", str(tmp_path / "o")])
    assert err.value.code == 2 and "no votes.jsonl" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(d), "--against", str(d)])  # --against without --collapse-step: a usage error


def test_rows_without_class_sizes_get_a_floor_from_ratio_margin_and_class_count() -> None:
    from ttrl.metrics.replay import _sizes

    # 5 of 16 won, the runner-up had 4 (margin 1/16), 7 classes: the other 7 answers over 5 classes, none above 4.
    sizes = _sizes(0.3125, 0.0625, 7, 16)
    assert sizes[:2] == [5, 4] and len(sizes) == 7 and sum(sizes) == 16 and max(sizes[2:]) <= 4
    assert _sizes(1.0, 1.0, 1, 16) == [16]
    assert _sizes(0.5, None, 3, 16) is None  # no margin recorded: no floor


def test_limit_overrides_judge_old_runs_by_a_new_limit(tmp_path, capsys) -> None:
    # Split votes (ratio 0.375 of 16, margin 1/16) whose winner changes on half the prompts every step:
    # the raw drift (0.5) is over its 0.25 limit from the first full window, but sampling alone moves
    # votes this split about half the time, so the excess drift stays near 0 and never fires.
    rows = [{"step": 0, "id": p, "label": "7", "ratio": 0.375, "margin": 0.0625, "classes": 4} for p in PROMPTS]
    for s in range(1, 7):
        rows += [{"step": s, "id": p, "label": "8" if (i + s) % 2 else "7", "ratio": 0.375, "margin": 0.0625,
                  "classes": 4} for i, p in enumerate(PROMPTS)]
    raw = consensus_collapse(rows, [], {"window": 3, "max_flip_rate": None})
    assert raw.fired_at == 3 and "first_vote_drift" in raw.reason
    floored = consensus_collapse(rows, [], {"window": 3, "max_flip_rate": None},
                                 {"max_first_vote_drift": None, "max_excess_drift": 0.15}, n_votes=16)
    assert floored.fired_at is None
    assert 0.3 < floored.rows[-1]["label/drift_floor"] < 0.7
    # Without n_votes an old row has no floor, so the excess-drift limit has nothing to fire on.
    assert "label/excess_drift" not in consensus_collapse(rows, [], {}, {"max_excess_drift": 0.15}).rows[-1]
    # The same through the command line, on a run dir whose config says how many votes a prompt got.
    d = tmp_path / "split"
    _run(d, ws=0, reward="majority_vote", seed=0, vote_rows=rows)
    cfg = json.loads((d / "config.yaml").read_text())
    (d / "config.yaml").write_text(json.dumps(cfg | {"rollout": {"n_votes": 16}}))
    main([str(d), "--collapse-step", "--out", str(tmp_path / "raw")])
    assert json.loads((tmp_path / "raw" / "collapse.json").read_text())["runs"][0]["collapse_step"] == 3
    main([str(d), "--collapse-step", "--out", str(tmp_path / "new"), "--limit", "max_first_vote_drift=null",
          "--limit", "safety.max_excess_drift=0.15", "--limit", "max_flip_rate=null"])
    assert json.loads((tmp_path / "new" / "collapse.json").read_text())["runs"][0]["collapse_step"] is None
    capsys.readouterr()
    with pytest.raises(SystemExit) as err:
        main([str(d), "--collapse-step", "--limit", "max_drift=0.1", "--out", str(tmp_path / "o")])
    assert err.value.code == 2 and "--limit max_drift: not a safety key" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(d), "--limit", "max_excess_drift=0.1"])  # --limit without --collapse-step or --arms


def test_a_warm_start_is_named_by_its_build_across_config_versions() -> None:
    from omegaconf import OmegaConf

    from tests.conftest import compose_config
    from ttrl.models.tiny import spec_hash
    from ttrl.models.warmstart import warmstart_spec

    cfg = compose_config("experiment=demo_hard")
    new = OmegaConf.to_container(cfg, resolve=True)
    # The same run as written before the warm start's check existed: its config lacks those keys, and the
    # hard bed's build (check off) is step for step the same model, so the report must call it the same.
    old = json.loads(json.dumps(new))
    for key in ("target_maj", "check_every", "check_from", "check_prompts", "check_votes", "extend_steps"):
        old["model"]["warmstart"].pop(key, None)
    assert warm_start(old) == warm_start(new)
    assert warm_start(new) == f"tiny-arith 0:0 #{spec_hash(warmstart_spec(cfg.model, cfg.data.synthetic))[:6]}"
