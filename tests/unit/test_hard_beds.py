"""The hard test beds differ from the demo in what makes the vote wrong, and in nothing else."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from tests.conftest import compose_config

pytestmark = pytest.mark.unit


def _flat(cfg) -> dict:
    def walk(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            out |= walk(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v}
        return out

    return walk(OmegaConf.to_container(cfg, resolve=True))


def _differ(a: dict, b: dict) -> set[str]:
    return {k for k in set(a) | set(b) if a.get(k) != b.get(k)}


def test_demo_hard_is_the_demo_on_demo_collapses_warm_start() -> None:
    demo, hard, collapse = (_flat(compose_config(f"experiment={e}")) for e in ("demo", "demo_hard", "demo_collapse"))
    # Only the warm start (model.tiny, model.warmstart) and the name differ from the demo's recipe ...
    assert all(k.startswith(("model.tiny.", "model.warmstart.")) for k in _differ(demo, hard) - {"experiment"})
    # ... and that warm start is demo_collapse's, key for key: a change to one is a change to the other.
    model = {k: v for k, v in hard.items() if k.startswith("model.")}
    assert model == {k: v for k, v in collapse.items() if k.startswith("model.")}
    assert hard["model.warmstart.slip"] > demo["model.warmstart.slip"]


def test_demo_hard_4terms_is_the_demo_with_one_more_term_and_no_check_on_its_build() -> None:
    demo, four = _flat(compose_config("experiment=demo")), _flat(compose_config("experiment=demo_hard_4terms"))
    # The build's schedule is the demo's earlier one (AdamW, fp32, 700 steps of 256), which the bed was measured on.
    old_build = {"model.warmstart.steps", "model.warmstart.batch_size", "model.warmstart.optimizer",
                 "model.warmstart.precision"}
    assert _differ(demo, four) == {"experiment", "data.synthetic.terms", "rollout.max_new_tokens",
                                   "model.warmstart.target_maj", *old_build}
    assert [four[k] for k in sorted(old_build)] == [256, "adamw", "fp32", 700]
    assert four["data.synthetic.terms"] == 4
    # The demo's build goes on until its vote reaches the teacher's; this bed keeps the 700-step build's votes.
    assert demo["model.warmstart.target_maj"] is not None and four["model.warmstart.target_maj"] is None
    # The longest 4-term response, "99+99=198,198+99=297,297+99=396 \boxed{396}" and the end token (one byte
    # a token on the demo's tokenizer), fits.
    assert four["rollout.max_new_tokens"] >= len("99+99=198,198+99=297,297+99=396 \\boxed{396}") + 1


@pytest.mark.parametrize("bed", ["demo_hard", "demo_hard_4terms"])
@pytest.mark.parametrize("reward", ["self_harmony", "evol_rl", "tool_verified", "scrl", "rent", "majority_vote",
                                    "ground_truth", "random"])
def test_every_arm_of_the_hard_sweep_composes(bed: str, reward: str) -> None:
    cfg = compose_config(f"experiment={bed}", f"reward={reward}")
    assert (cfg.experiment, cfg.reward.name) == (bed, reward)


@pytest.mark.parametrize("bed", ["demo_hard", "demo_hard_4terms"])
def test_the_collapse_probe_keeps_the_beds_warm_start_and_watches_consensus_only(bed: str) -> None:
    full, probe = _flat(compose_config(f"experiment={bed}")), _flat(compose_config(f"experiment={bed}",
                                                                                   "debug=collapse_probe"))
    # The same model and data: its collapse step is the bed's warm start's.
    assert {k: v for k, v in probe.items() if k.startswith(("model.", "data."))} == \
        {k: v for k, v in full.items() if k.startswith(("model.", "data."))}
    assert (probe["reward.name"], probe["trainer.total_steps"], probe["safety.action"]) == ("token_entropy", 20, "stop")
    assert all(probe[f"safety.{k}"] is None for k in ("min_entropy", "max_majority_ratio", "max_eval_drop"))
