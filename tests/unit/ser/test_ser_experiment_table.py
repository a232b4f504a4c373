"""python -m ttrl.ser.experiment's table: the (a)/(b)/(c) columns and, per round, how many
self-labels were kept and how many of them were right (the SER issue asks for both)."""

import pytest

from ttrl.ser.experiment import table

pytestmark = pytest.mark.unit


def _result(seed, a, b, c, rounds):
    per_round = [{"ser/round": 0, "ser/test_accuracy": a}] + [
        {"ser/round": k, "ser/kept_status1": s1, "ser/kept_status2": s2, "ser/self_label_accuracy": acc,
         "ser/test_accuracy": test} for k, (s1, s2, acc, test) in enumerate(rounds, 1)]
    return {"seed": seed, "a": a, "b": b, "c": c, "best_round": 1, "rounds": len(rounds), "kept": 0, "pool": 100,
            "self_label_accuracy": 0.9, "stop": "x", "per_round": per_round}


def test_the_table_reports_kept_and_right_self_labels_per_round():
    md = table([_result(0, 0.80, 0.90, 0.92, [(50, 10, 0.95, 0.90), (0, 0, float("nan"), None)]),
                _result(1, 0.70, 0.88, 0.90, [(40, 0, 0.75, 0.88)])])
    lines = md.splitlines()
    assert "| mean ± sd | 0.750 ± 0.071 | 0.890 ± 0.014 | 0.910 ± 0.014 | | | |" in lines
    assert "| 0 | 1 | 60 | 57 (0.950) | 0.900 |" in lines   # 60 kept, 95% right
    assert "| 0 | 2 | 0 | – | – |" in lines                 # a round that kept nothing
    assert "| 1 | 1 | 40 | 30 (0.750) | 0.880 |" in lines
