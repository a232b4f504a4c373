"""The sweep scripts parse, and name only rewards that exist: a renamed reward must not break a sweep silently."""

import re
import subprocess
from pathlib import Path

import pytest

from ttrl.rewards import REWARDS

pytestmark = pytest.mark.unit

SWEEPS = Path(__file__).resolve().parents[2] / "experiments" / "sweeps"


@pytest.mark.parametrize("script", sorted(p.name for p in SWEEPS.glob("*.sh")))
def test_sweep_script_parses(script: str) -> None:
    proc = subprocess.run(["bash", "-n", str(SWEEPS / script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_label_free_rewards_sweep_covers_the_family_with_oracle_and_control() -> None:
    text = (SWEEPS / "label_free_rewards.sh").read_text()
    names = re.search(r'REWARDS=\$\{REWARDS:-"([^"]+)"\}', text).group(1).split()
    assert set(names) <= set(REWARDS.names()), set(names) - set(REWARDS.names())
    label_free = {n for n in REWARDS.names() if not getattr(REWARDS.get(n), "needs_ground_truth", False)}
    # Every label-free reward that needs nothing from outside (a model dir, a user function) is compared.
    assert label_free - {"custom", "reward_model"} <= set(names)
    assert {"ground_truth", "random"} <= set(names)
    seeds = re.search(r'SEEDS=\$\{SEEDS:-"([^"]+)"\}', text).group(1).split()
    assert len(seeds) >= 2
