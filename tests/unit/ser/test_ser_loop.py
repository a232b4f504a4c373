"""The SER rounds' bookkeeping with a fake reward model (no Ray, no DeepSpeed, seconds).

The fake RM "knows" the sums of a share of the problems that grows with its training
set and is unsure (score 0, p = 0.5) of the rest, so the rounds are predictable: each
round keeps the pairs it became sure of, the pool shrinks, held-out accuracy rises,
and the loop stops when nothing new passes the filter; the best round is saved.
"""

from __future__ import annotations

import json
import zlib
from types import SimpleNamespace

import pytest

from tests.conftest import compose_config
from ttrl.data.preferences import synthetic_preferences
from ttrl.ser.loop import _Pairwise, _Pointwise, build_task, ser_round_loop
from ttrl.trainer.reward_model import FitStats

pytestmark = pytest.mark.unit


def _correct(prompt: str, response: str) -> bool:
    nums = [int(x) for x in prompt.rstrip("=").split("+")]
    return int(response[len("\\boxed{"):-1]) == sum(nums)


class FakeRM:
    def __init__(self, per_known: int, cap: int = 10, wrong_bucket: int | None = None):
        self.per_known, self.cap, self.wrong_bucket = per_known, cap, wrong_bucket
        self.known = 0
        self.fits: list[int] = []
        self.saves: list[dict] = []
        self.resets = 0

    def fit(self, rows, seed):
        self.fits.append(len(rows))
        self.known = min(self.cap, len(rows) // self.per_known)
        return FitStats(loss=0.5, accuracy=0.8, steps=3, seconds=0.0, grad_norm=1.0)

    def score(self, prompts, responses):
        out = []
        for p, r in zip(prompts, responses):
            bucket = zlib.crc32(p.encode()) % 10
            if bucket >= self.known:
                out.append(0.0)  # unsure: p = 0.5, neither status
                continue
            sign = 1.0 if _correct(p, r) else -1.0
            if bucket == self.wrong_bucket:
                sign = -sign  # confidently wrong on this share: self-labels there are wrong
            out.append(3.0 * sign)
        return out

    def reset(self):
        self.resets += 1

    def save(self, path, **meta):
        self.saves.append(meta)
        return path


def _task(n=400, held=100, seed_fraction=0.25):
    pairs = synthetic_preferences(n + held, seed=5)
    return _Pairwise(pairs[:n], pairs[n:], seed_fraction, seed=0)


def _cfg(**ser):
    base = {"high": 0.55, "low": 0.45, "min_gap": 0.3, "use_status2": True, "max_rounds": 10, "patience": 2,
            "reinit_each_round": True}
    return SimpleNamespace(seed=0, ser=SimpleNamespace(**{**base, **ser}))


def _logger():
    rows = []
    return rows, rows.append


def test_rounds_grow_the_training_set_until_nothing_new_passes(tmp_path):
    task = _task()
    rm = FakeRM(per_known=25)
    rows, log = _logger()
    res = ser_round_loop(_cfg(), rm, task, tmp_path, log)
    assert rows[0]["ser/train_rows"] == 100 and rows[0]["ser/pool_left"] == 300
    # Seed RM knows 4 buckets in 10; every round it knows more and keeps what it became sure of.
    kept = [r["ser/kept_status1"] + r["ser/kept_status2"] for r in rows[1:]]
    assert all(k > 0 for k in kept[:-1]) and kept[-1] == 0
    assert "no unlabelled pair passed" in res.stop
    assert all(r["ser/self_label_accuracy"] == 1.0 for r in rows[1:-1])
    # status 1 only: a sure RM scores +3 / -3 -> p = 0.95 / 0.05
    assert all(r["ser/kept_status2"] == 0 for r in rows[1:])
    assert rm.fits == [100] + [int(r["ser/train_rows"]) for r in rows[1:-1]]
    assert rm.resets == len(rm.fits) - 1  # reinit_each_round
    accs = [r["ser/rm_accuracy"] for r in rows if "ser/rm_accuracy" in r]
    assert accs == sorted(accs) and accs[-1] > accs[0]
    # The best round is the first to reach the top (a tie is no improvement); saved whenever it improved.
    assert res.best_round == accs.index(max(accs)) and res.best_accuracy == max(accs)
    assert [m["ser_round"] for m in rm.saves] == list(range(res.best_round + 1))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["best_round"] == res.best_round and summary["stop"] == res.stop
    table = [json.loads(line) for line in (tmp_path / "scores_round1.jsonl").read_text().splitlines()]
    assert len(table) == 300 and {"p_a", "p_b", "status", "self_a_better", "true_a_better"} <= set(table[0])


def test_self_labels_follow_the_model_not_the_order(tmp_path):
    task = _task()
    rm = FakeRM(per_known=100)
    ser_round_loop(_cfg(max_rounds=1), rm, task, tmp_path, _logger()[1])
    assert task.kept
    for pair in task.kept:  # every kept pair has the RM's favourite as chosen
        assert _correct(pair.prompt, pair.chosen) and not _correct(pair.prompt, pair.rejected)


def test_wrong_confident_labels_are_counted_and_patience_stops(tmp_path):
    task = _task()
    # The RM is confidently wrong on bucket 0: its self-labels there are wrong, and
    # it stops learning after 2 buckets, so held-out accuracy stalls.
    rm = FakeRM(per_known=100, cap=2, wrong_bucket=0)
    rows, log = _logger()
    res = ser_round_loop(_cfg(patience=1), rm, task, tmp_path, log)
    assert rows[1]["ser/self_label_accuracy"] == 0.0  # round 1 keeps bucket 0 only, all wrong
    assert "not improved for 1 round" in res.stop or "no unlabelled pair" in res.stop


def test_max_rounds_and_seed_only(tmp_path):
    rows, log = _logger()
    res = ser_round_loop(_cfg(max_rounds=1), FakeRM(per_known=100), _task(), tmp_path, log)
    assert [r["ser/round"] for r in rows] == [0, 1] and "max_rounds=1" in res.stop
    rows, log = _logger()
    res = ser_round_loop(_cfg(max_rounds=0), FakeRM(per_known=100), _task(), tmp_path, log)
    assert [r["ser/round"] for r in rows] == [0] and res.best_round == 0


def test_continue_training_does_not_reset(tmp_path):
    rm = FakeRM(per_known=25)
    ser_round_loop(_cfg(max_rounds=2, reinit_each_round=False), rm, _task(), tmp_path, _logger()[1])
    assert rm.resets == 0 and len(rm.fits) == 3


def test_pointwise_rounds(tmp_path):
    from ttrl.data.preferences import synthetic_points

    items = synthetic_points(250, per_problem=2, seed=3)
    task = _Pointwise(items[:400], items[400:], seed_fraction=0.25, seed=0)
    assert len({it.prompt for it in task.seed_rows}) == 50  # a quarter of the 200 problems, all their responses
    assert not {it.prompt for it in task.seed_rows} & {it.prompt for it in task.pool}
    rows, log = _logger()
    ser_round_loop(_cfg(max_rounds=2), FakeRM(per_known=100), task, tmp_path, log)
    assert rows[1]["ser/kept_status1"] > 0 and rows[1]["ser/self_label_accuracy"] == 1.0
    assert all(_correct(it.prompt, it.response) == it.correct for it in task.kept)
    assert 0 <= rows[1]["ser/rm_accuracy"] <= 1 and 0 <= rows[1]["ser/rm_pair_accuracy"] <= 1


def test_build_task_splits_seed_pool_and_held_out():
    cfg = compose_config("ser=synthetic", "ser.then_policy=false", "ser.synthetic_num_pairs=200",
                         "ser.synthetic_num_eval=40")
    task = build_task(cfg)
    assert len(task.seed_rows) == 30 and len(task.pool) == 170 and len(task.held) == 40
    prompts = [p.prompt for p in task.seed_rows] + [p.prompt for p in task.pool] + [p.prompt for p in task.held]
    assert len(set(prompts)) == 240  # no problem in two places
    cfg = compose_config("ser=synthetic_pointwise", "ser.then_policy=false", "ser.synthetic_num_pairs=100",
                         "ser.synthetic_num_eval=20")
    task = build_task(cfg)
    assert len(task.seed_rows) == 30 and len(task.pool) == 170 and len(task.held) == 40


def test_build_task_pointwise_from_a_file_holds_out_whole_problems(tmp_path):
    rows = [{"problem": f"{i}+1=", "response": f"\\boxed{{{i + 1 + (j % 2)}}}", "answer": str(i + 1)}
            for i in range(40) for j in range(3)]
    path = tmp_path / "points.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = compose_config("ser=synthetic_pointwise", "ser.then_policy=false", "ser.source=jsonl",
                         f"ser.local_path={path}", "ser.eval_fraction=0.25", "ser.seed_fraction=0.1")
    task = build_task(cfg)
    held, seed, pool = ({it.prompt for it in x} for x in (task.held, task.seed_rows, task.pool))
    assert len(held) == 10 and len(seed) == 3 and len(pool) == 27 and not (held & seed or held & pool or seed & pool)
    assert all(it.correct == (it.response == f"\\boxed{{{it.answer}}}") for it in task.seed_rows)
