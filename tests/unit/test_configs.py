"""The config tree: every shipped config composes and validates, the paper
reproductions carry the paper's numbers, and the command line answers a config
mistake with one line naming the key (exit status 2).

Composition runs in-process (milliseconds); only the few tests that check what
a user sees on the terminal start `ttrl-train` as a subprocess (~1 s each).
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from tests.conftest import ROOT, compose_config
from ttrl.config import ConfigError

pytestmark = pytest.mark.unit

CONF = ROOT / "conf"
TTRL_TRAIN = str(Path(sys.executable).parent / "ttrl-train")

EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))

# The reproductions of the TTRL paper (arXiv 2504.16084) and their benchmark.
PAPER_RUNS = {
    f"ttrl_{bench}_qwen2.5-math-{size}": bench
    for bench in ("math500", "amc", "aime24")
    for size in ("1.5b", "7b")
} | {
    "ppo_math500_qwen2.5-math-1.5b": "math500",
    "oracle_math500_qwen2.5-math-1.5b": "math500",
}
# Paper: 10 episodes on MATH-500, 30 on AMC, 80 on AIME 2024.
EPISODES = {"math500": 10, "amc": 30, "aime24": 80}
HUB_MODELS = {"1.5b": "Qwen/Qwen2.5-Math-1.5B", "7b": "Qwen/Qwen2.5-Math-7B"}
QWEN_MATH_SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."

# Group choices that need one more value to compose (a `???` in their file).
REQUIRED_EXTRAS = {
    ("data", "jsonl"): ["data.local_path=some.jsonl"],
    ("data", "hf"): ["data.hf_name=ORG/NAME"],
    # Multiple choice: answers are letters, which only the choice extractor reads.
    ("data", "gpqa_diamond"): ["label.extractor=choice"],
    ("data", "synthetic_choice"): ["label.extractor=choice"],
    ("model", "plain"): ["model.path=Qwen/Qwen2.5-Math-1.5B"],
    ("reward", "custom"): ["reward.fn=tests.unit.rewards.reward_fns_fake:length"],
    ("reward", "reward_model"): ["reward.path=some/rm_dir"],
    # The demo model reads 256 tokens: its responses must be shorter.
    ("model", "tiny_arith"): ["rollout.max_new_tokens=32"],
}

# Composing costs ~0.2 s; the read-only tests share one config per override list.
_composed = functools.lru_cache(maxsize=None)(compose_config)


def _choices(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def _as_dict(cfg) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)


def _diff(a: dict, b: dict, prefix: str = "") -> dict[str, tuple]:
    """Dotted keys whose values differ between two nested dicts."""
    out: dict[str, tuple] = {}
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out |= _diff(va, vb, f"{prefix}{key}.")
        elif va != vb:
            out[f"{prefix}{key}"] = (va, vb)
    return out


# ── every shipped config composes ──────────────────────────────────────────
def test_the_paper_runs_are_all_shipped():
    assert set(PAPER_RUNS) <= set(EXPERIMENTS), set(PAPER_RUNS) - set(EXPERIMENTS)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_composes_and_validates(name):
    cfg = _composed(f"experiment={name}")
    # An experiment names its runs (hydra.run.dir is outputs/${experiment}/...).
    assert cfg.experiment == name
    # Interpolations (e.g. trainer.mini_batch_size: ${rollout.n_train}) resolve.
    _as_dict(cfg)


GROUPS = ("model", "data", "rollout", "label", "reward", "algorithm", "trainer", "eval", "logger", "cluster", "debug")


@pytest.mark.parametrize("group, choice", [(g, c) for g in GROUPS for c in _choices(g)])
def test_every_group_choice_composes_and_validates(group, choice):
    cfg = _composed(f"{group}={choice}", *REQUIRED_EXTRAS.get((group, choice), []))
    if group in ("data", "reward", "algorithm"):
        # Each file names itself: the code dispatches on these names.
        assert cfg[group].name == choice


@pytest.mark.parametrize("model", ["qwen2.5-math-1.5b", "qwen2.5-math-7b", "qwen2.5-7b", "llama-3.1-8b-instruct"])
def test_hub_model_presets_use_the_qwen_math_chat_recipe(model):
    m = _composed(f"model={model}").model
    assert "/" in m.path, "a Hugging Face hub id"
    assert m.template == "chat"
    assert m.system_prompt == QWEN_MATH_SYSTEM_PROMPT
    assert m.prompt_template == "{problem}"
    assert m.dtype == "auto"
    # Room for a 1024-token prompt beside the paper's 3072-token responses.
    assert m.max_model_len >= 1024 + 3072


@pytest.mark.parametrize("bench, hub, split", [
    ("aime24", "HuggingFaceH4/aime_2024", "train"),
    ("amc", "AI-MO/aimo-validation-amc", "train"),
    ("math500", "HuggingFaceH4/MATH-500", "test"),
])
def test_benchmarks_default_to_the_hub(bench, hub, split):
    d = _composed(f"data={bench}").data
    assert (d.name, d.hf_name, d.hf_split, d.local_path) == (bench, hub, split, None)


# ── the paper reproductions carry the paper's numbers ──────────────────────
@pytest.mark.parametrize("name, bench", sorted(PAPER_RUNS.items()))
def test_paper_runs_show_the_papers_numbers(name, bench):
    cfg = _composed(f"experiment={name}")
    size = "7b" if "-7b" in name else "1.5b"
    assert cfg.model.path == HUB_MODELS[size]
    assert cfg.data.name == bench
    r, t, e = cfg.rollout, cfg.trainer, cfg.eval
    assert (r.n_votes, r.n_train, r.subsample) == (64, 16, "first")
    assert (r.temperature, r.max_new_tokens) == (1.0, 3072)
    assert (t.lr, t.lr_schedule) == (5e-7, "cosine")
    assert t.episodes == EPISODES[bench]
    assert t.total_steps is None, "the length of a paper run is set by episodes"
    assert (e.n_samples, e.temperature, e.top_p, e.greedy) == (16, 0.6, 0.95, False)
    assert e.at_start and e.at_end, "the paper reports pass@1 before and after"
    assert 1 in e.ks
    # Sized for one node of 8 GPUs, colocated: one engine and one rank per GPU.
    assert cfg.cluster.placement == "colocate"
    assert r.num_engines * r.tensor_parallel_size == 8
    assert t.num_workers == 8
    # The reward: majority vote, except in the oracle baseline.
    assert cfg.reward.name == ("ground_truth" if name.startswith("oracle_") else "majority_vote")
    assert cfg.algorithm.name == ("ppo" if name.startswith("ppo_") else "grpo")


def test_paper_runs_start_with_the_global_package_and_their_command():
    for name in PAPER_RUNS:
        lines = (CONF / "experiment" / f"{name}.yaml").read_text().splitlines()
        assert lines[0] == "# @package _global_"
        assert lines[1] == f"# ttrl-train experiment={name}"


@pytest.mark.parametrize("base, variant, expected", [
    ("ttrl_math500_qwen2.5-math-1.5b", "oracle_math500_qwen2.5-math-1.5b", {"reward.name"}),
    ("ttrl_math500_qwen2.5-math-1.5b", "ppo_math500_qwen2.5-math-1.5b",
     {"algorithm.name", "algorithm.advantage", "algorithm.use_critic", "algorithm.critic_lr",
      "algorithm.value_clip"}),
])
def test_baselines_differ_from_the_ttrl_run_only_where_intended(base, variant, expected):
    # A comparison is only as clean as the configs: anything else that differs
    # (sampling, schedule, eval) would confound it.
    diff = _diff(_as_dict(_composed(f"experiment={base}")), _as_dict(_composed(f"experiment={variant}")))
    diff.pop("experiment")
    assert set(diff) == expected, diff


def test_v3_paper_setting_is_one_override_away():
    # The v3 paper keeps 32 of the 64 samples; mini-batches (one prompt's
    # training samples each) follow n_train, so the config stays valid.
    cfg = compose_config("experiment=ttrl_math500_qwen2.5-math-1.5b", "rollout.n_train=32")
    assert cfg.trainer.mini_batch_size == 32
    assert cfg.data.prompts_per_step * cfg.rollout.n_train // cfg.trainer.mini_batch_size == 32


def test_command_line_overrides_beat_the_experiment():
    cfg = compose_config("experiment=ttrl_amc_qwen2.5-math-7b", "algorithm=rloo", "model=qwen2.5-math-1.5b",
                         "rollout.n_votes=32", "trainer.episodes=3")
    assert (cfg.algorithm.name, cfg.model.name) == ("rloo", "qwen2.5-math-1.5b")
    assert (cfg.rollout.n_votes, cfg.trainer.episodes) == (32, 3)
    assert cfg.data.name == "amc"


# ── validate: cross-field rules, one sentence naming the key ───────────────
@pytest.mark.parametrize("overrides, key", [
    (["rollout.n_votes=8", "rollout.n_train=16"], r"rollout\.n_train=16 .*rollout\.n_votes=8"),
    (["model.max_model_len=2048", "rollout.max_new_tokens=2048"], r"model\.max_model_len=2048 .*rollout\.max_new_tokens"),
    (["trainer.mini_batch_size=24"], r"trainer\.mini_batch_size=24 .*divide"),
    (["experiment=ttrl_math500_qwen2.5-math-1.5b", "trainer.num_workers=3"], r"trainer\.num_workers=3"),
    (["experiment=ttrl_math500_qwen2.5-math-1.5b", "trainer.micro_batch_size=4"], r"trainer\.micro_batch_size=4"),
    (["algorithm=ppo", "algorithm.use_critic=false"], r"algorithm\.advantage=gae .*algorithm\.use_critic"),
    (["algorithm=rloo", "rollout.n_votes=4", "rollout.n_train=1"], r"algorithm\.advantage=rloo .*rollout\.n_train"),
    (["algorithm=grpo", "algorithm.lam=0.95"], r"algorithm\.lam"),
    (["data=math500", "data.hf_name=null"], r"data\.hf_name"),
    (["data=amc", "data.local_path=x.jsonl", "data.limit=0"], r"data\.limit=0"),
    (["eval.n_samples=8", "eval.ks=[1,16]"], r"eval\.ks=\[1, 16\] .*eval\.n_samples=8"),
    (["rollout.temperature=0"], r"rollout\.temperature=0"),
    (["rollout.cpu_threads=0"], r"rollout\.cpu_threads=0"),
    (["reward=custom"], r"reward\.fn"),
    (["cluster.address=headnode"], r"cluster\.address='headnode'"),
    (["model.template=jinja"], r"model\.template='jinja' is not one of plain, chat"),
])
def test_validate_names_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key) as err:
        compose_config(*overrides)
    assert "\n" not in str(err.value), "one sentence, one line"


# ── the command line, as a user sees it ────────────────────────────────────
def _cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    # As a user's shell would have it: no HYDRA_FULL_ERROR (ttrl-train sets its own).
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"} | {"HF_HUB_OFFLINE": "1"}
    return subprocess.run([TTRL_TRAIN, *args], capture_output=True, text=True, timeout=120, cwd=cwd, env=env)


def test_cfg_job_prints_every_group_override():
    proc = _cli("--cfg", "job", "model=qwen2.5-math-7b", "data=amc", "rollout.n_votes=32", "label.grade_timeout_s=2",
                "reward=ground_truth", "algorithm=ppo", "trainer.lr=1e-6", "eval.n_samples=4", "eval.ks=[1,4]",
                "logger=wandb", "cluster=ray")
    assert proc.returncode == 0, proc.stderr
    cfg = yaml.safe_load(proc.stdout)
    assert cfg["model"]["path"] == "Qwen/Qwen2.5-Math-7B"
    assert cfg["data"]["hf_name"] == "AI-MO/aimo-validation-amc"
    assert cfg["rollout"]["n_votes"] == 32
    assert cfg["label"]["grade_timeout_s"] == 2.0
    assert cfg["reward"]["name"] == "ground_truth"
    assert (cfg["algorithm"]["name"], cfg["algorithm"]["advantage"]) == ("ppo", "gae")
    assert cfg["trainer"]["lr"] == 1e-6
    assert cfg["eval"]["n_samples"] == 4
    assert cfg["logger"]["wandb"]["enabled"] is True
    assert cfg["cluster"]["address"] == "auto"


def test_cfg_job_prints_an_experiment_with_overrides():
    proc = _cli("--cfg", "job", "experiment=ttrl_aime24_qwen2.5-math-1.5b", "rollout.n_train=32",
                "data.local_path=../shared/data/aime24.jsonl")
    assert proc.returncode == 0, proc.stderr
    cfg = yaml.safe_load(proc.stdout)
    assert cfg["experiment"] == "ttrl_aime24_qwen2.5-math-1.5b"
    assert cfg["rollout"]["n_train"] == 32
    assert cfg["data"]["local_path"] == "../shared/data/aime24.jsonl"
    assert cfg["trainer"]["episodes"] == 80


@pytest.mark.parametrize("args, must_name", [
    (["--cfg", "job", "rollout.n_votez=3"], ["rollout.n_votez", "rollout.n_votes"]),  # with a suggestion
    (["--cfg", "job", "rollout.n_votes=abc"], ["rollout.n_votes", "abc"]),
    (["--cfg", "job", "algorithm=nope"], ["algorithm=nope", "grpo", "ppo"]),
    # A cross-field rule is checked by validate(), which runs before the run
    # starts (`--cfg job` only prints, so this one runs for real and must stop).
    (["rollout.n_votes=8", "rollout.n_train=16"], ["rollout.n_train", "rollout.n_votes"]),
], ids=["unknown-key", "wrong-type", "unknown-choice", "cross-field"])
def test_config_mistakes_exit_2_with_one_line(tmp_path, args, must_name):
    proc = _cli(*args, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("ttrl-train: config error:")
    for word in must_name:
        assert word in lines[0], lines[0]
    # Stopped before any run started: no metrics, no checkpoints.
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
