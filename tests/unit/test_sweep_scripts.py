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


def _default(script: str, var: str) -> list[str]:
    """The default value of `VAR=${VAR:-"..."}` in a sweep script, split."""
    text = (SWEEPS / script).read_text()
    return re.search(rf'{var}=\$\{{{var}:-"([^"]+)"\}}', text).group(1).split()


def test_label_free_rewards_sweep_covers_the_family_with_oracle_and_control() -> None:
    names = _default("label_free_rewards.sh", "REWARDS")
    assert set(names) <= set(REWARDS.names()), set(names) - set(REWARDS.names())
    label_free = {n for n in REWARDS.names() if not getattr(REWARDS.get(n), "needs_ground_truth", False)}
    # Every label-free reward that needs nothing from outside (a model dir, a user function) is compared:
    # on the demo task, or (the methods built for wrong votes) on the hard beds.
    assert label_free - {"custom", "reward_model"} <= set(names) | set(_default("hard_regime.sh", "ARMS"))
    assert {"ground_truth", "random"} <= set(names)
    assert len(_default("label_free_rewards.sh", "SEEDS")) >= 2


def test_hard_regime_sweep_compares_every_method_with_ttrl_oracle_and_control() -> None:
    arms = _default("hard_regime.sh", "ARMS")
    assert set(arms) <= set(REWARDS.names()), set(arms) - set(REWARDS.names())
    assert {"self_harmony", "evol_rl", "tool_verified", "scrl", "rent", "majority_vote", "ground_truth",
            "random"} <= set(arms)
    assert len(_default("hard_regime.sh", "WARMSTARTS")) >= 3 and len(_default("hard_regime.sh", "SEEDS")) >= 2
    assert set(_default("hard_regime.sh", "BEDS")) == {"demo_hard", "demo_hard_4terms"}
