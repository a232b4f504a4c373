"""Every config key is validated: a wrong value of any leaf key stops the run with a sentence naming it.

For each leaf key of the schema, in each shipped base (the default config,
demo, debug, debug_ser, and debug_ser as a TTRLConfig instance), the key is
set to a value it must refuse (out of range, an unknown name, a wrong type)
and the error has to name the key.
Keys that accept anything of their type are listed in ANY_VALUE, each with
its reason. The configs are composed once per base and then edited in
memory, so the whole sweep takes seconds. Two `ttrl-train` runs show what a
user sees: a typo is stopped within seconds, before Ray starts.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import os
import re
import subprocess
import sys
import typing
from pathlib import Path
from typing import Any, Optional

import pytest
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from tests.conftest import ROOT, compose_config
from ttrl.cli import _one_sentence
from ttrl.config import ConfigError, TTRLConfig, validate

pytestmark = pytest.mark.unit

TTRL_TRAIN = str(Path(sys.executable).parent / "ttrl-train")
BASES = {"default": (), "demo": ("experiment=demo",), "debug": ("experiment=debug",),
         "debug_ser": ("experiment=debug_ser",)}

# Free text: any string (or list of strings) is a valid value.
ANY_VALUE = {
    "experiment": "the run's name, used only in the run dir's path and in logs",
    "model.name": "a label for logs, W&B tags and ttrl-serve's model id",
    "algorithm.name": "a label for logs, W&B tags and ttrl-compare's columns",
    "logger.wandb.entity": "a W&B account name (null: the default one)",
    "logger.wandb.group": "a W&B group name (null: derived from the sweep)",
    "logger.wandb.name": "a W&B run name (null: derived from the overrides)",
    "logger.wandb.job_type": "a W&B job type (null: <algorithm>/<reward>, ser+ in front when SER runs first)",
    "logger.wandb.notes": "free text shown in W&B",
    "logger.wandb.tags": "free W&B tags",
    "data.choices.instruction": "free text written after a question's options (empty: none)",
}

# A value each key must refuse, whatever the base config. Booleans not listed
# here get a value that is not a boolean (`_bad_value`).
BAD: dict[str, Any] = {
    "seed": -1,
    "device": "tpu",
    # model
    "model.path": "",
    "model.lora.r": 513,
    "model.lora.alpha": 0.0,
    "model.lora.dropout": 1.0,
    "model.lora.target_modules": ["qkv_proj"],
    "model.lora.init": "pissa",
    "model.lora.path": "",
    "model.tokenizer_path": "",
    "model.template": "jinja",
    "model.prompt_template": "Q: no placeholder",
    "model.system_prompt": "Think.",  # every base uses template=plain, which never reads it
    "model.dtype": "fp8",
    "model.max_model_len": 8,  # not above rollout.max_new_tokens
    "model.trust_remote_code": True,
    "model.tiny.hidden_size": 100,
    "model.tiny.num_layers": 0,
    "model.tiny.num_heads": 0,
    "model.tiny.head_dim": 16,
    "model.tiny.intermediate_size": 0,
    "model.tiny.seed": -1,
    "model.warmstart.steps": 0,
    "model.warmstart.lr": 0.0,
    "model.warmstart.optimizer": "sgd",
    "model.warmstart.precision": "fp16",
    "model.warmstart.min_lr_ratio": 1.5,
    "model.warmstart.batch_size": 0,
    "model.warmstart.short_share": 1.5,
    "model.warmstart.slip": -0.1,
    "model.warmstart.seed": -1,
    "model.warmstart.warmup_steps": -1,
    "model.warmstart.target_maj": 1.5,
    "model.warmstart.check_every": 0,
    "model.warmstart.check_from": 0,
    "model.warmstart.check_prompts": 0,
    "model.warmstart.check_votes": 0,
    "model.warmstart.extend_steps": -1,
    # data
    "data.name": "",
    "data.hf_name": "",
    "data.hf_subset": "",
    "data.hf_split": "",
    "data.local_path": "",
    "data.id_key": "",
    "data.problem_key": "",
    "data.answer_key": "",
    "data.limit": 0,
    "data.prompts_per_step": 0,
    "data.synthetic.num_problems": 0,
    "data.synthetic.terms": 0,
    "data.synthetic.digits": 0,
    "data.synthetic.seed": -1,
    "data.choices.correct_key": "",
    "data.choices.incorrect_keys": ["a", "b", "c"],  # without correct_key: never read
    "data.choices.letters": "ABCA",
    "data.choices.seed": -1,
    # rollout
    "rollout.n_votes": 0,
    "rollout.n_train": 0,
    "rollout.subsample": "last",
    "rollout.temperature": 0.0,
    "rollout.top_p": 0.0,
    "rollout.top_k": 0,
    "rollout.max_new_tokens": 0,
    "rollout.num_engines": 0,
    "rollout.tensor_parallel_size": 0,
    "rollout.gpu_memory_utilization": 1.5,
    "rollout.cpu_kv_cache_gb": 0.0,
    "rollout.cpu_threads": 0,
    "rollout.seed": -1,
    "rollout.tis_cap": 0.5,
    "rollout.max_retries": -1,
    "rollout.max_restarts": -1,
    "rollout.weight_sync": "gloo",
    "rollout.sync_bucket_mb": 0,
    "rollout.sync_timeout_s": 0,
    # label
    "label.extractor": "no_such_extractor",
    "label.custom_extractor": "no_module_path",
    "label.grade_timeout_s": 0.0,
    # reward
    "reward.name": "majority",
    "reward.fn": "no_module_path",
    "reward.needs_ground_truth": True,  # no base uses reward=custom, the only reader
    "reward.path": "",
    "reward.min_ratio": 1.5,
    "reward.p": -0.1,
    "reward.seed": -1,
    "reward.view": "reorder_terms",  # no base uses reward=co_reward, the only reader
    "reward.ensemble": [""],
    "reward.ensemble_reduce": "max",
    "reward.normalize": "maybe",
    "reward.clip": 0.0,
    "reward.length_penalty": -0.1,
    "reward.self_harmony.min_score": 1.5,
    "reward.evol_rl.mean_weight": -0.5,
    "reward.evol_rl.ngram": 0,
    "reward.tool_verified.verified_weight": 0.5,
    "reward.tool_verified.timeout_s": 0.0,
    "reward.scrl.mode": "soft",
    "reward.scrl.tau_pos": 1.5,
    "reward.scrl.tau_marg": -0.1,
    "reward.scrl.tau_low": 2.0,
    "reward.scrl.a_plus": -1.0,
    "reward.scrl.a_minus": -1.0,
    "reward.scrl.lambda_h": -0.1,
    "reward.rent.last_tokens": 0,
    # algorithm
    "algorithm.advantage": "gpro",
    "algorithm.gamma": 0.0,
    "algorithm.lam": 1.5,
    "algorithm.policy_loss": "ppo_clp",
    "algorithm.clip_low": 0.0,
    "algorithm.clip_high": -0.1,
    "algorithm.dual_clip": 1.0,
    "algorithm.loss_agg": "token_sum",
    "algorithm.kl_coef": -0.1,
    "algorithm.kl_estimator": "k4",
    "algorithm.entropy_coef": -0.01,
    "algorithm.ppo_epochs": 0,
    "algorithm.value_clip": 0.0,
    "algorithm.critic_lr": 0.0,
    # trainer
    "trainer.total_steps": 0,
    "trainer.episodes": 0,
    "trainer.save_every": -1,
    "trainer.keep_last": 0,
    "trainer.resume": "",
    "trainer.num_workers": 0,
    "trainer.zero_stage": 4,
    "trainer.lr": 0.0,
    "trainer.lr_schedule": "step",
    "trainer.warmup_steps": -1,
    "trainer.warmup_ratio": 1.0,
    "trainer.min_lr_ratio": 1.5,
    "trainer.weight_decay": -0.1,
    "trainer.betas": [0.9, 1.0],
    "trainer.grad_clip": -1.0,
    "trainer.mini_batch_size": 0,
    "trainer.micro_batch_size": 0,
    "trainer.logprob_micro_batch_size": 0,
    "trainer.dtype": "fp8",
    "trainer.backward_products": "fp16",
    "trainer.autocast": "fp16",
    "trainer.max_skipped_steps": 0,
    # eval
    "eval.every_n_steps": -1,
    "eval.n_samples": 0,
    "eval.temperature": -1.0,
    "eval.top_p": 0.0,
    "eval.max_new_tokens": 0,
    "eval.ks": [0],
    "eval.checkpoint": "",
    # logger
    "logger.samples_every": -1,
    "logger.samples_prompts": 0,
    "logger.samples_per_prompt": 0,
    "logger.objective": "",
    "logger.wandb.project": "",
    "logger.wandb.mode": "on",
    # cluster
    "cluster.address": "headnode",
    "cluster.num_cpus": 0,
    "cluster.num_gpus": -1,
    "cluster.placement": "spread",
    "cluster.nodes": 0,
    "cluster.gpus_per_node": -1,
    "cluster.placement_timeout_s": 0.0,
    "cluster.cpus_per_node": 0,
    "cluster.trainer_resources": {"GPU": 1.0},
    "cluster.engine_resources": {"engine": 0.0},
    # safety
    "safety.action": "pause",
    "safety.window": 0,
    "safety.max_flip_rate": 1.5,
    "safety.max_first_vote_drift": -0.1,
    "safety.max_excess_drift": 1.5,
    "safety.max_excess_flip_rate": -0.2,
    "safety.flip_confident": 2.0,
    "safety.anchor_prompts": -1,
    "safety.min_entropy": -1.0,
    "safety.max_majority_ratio": 1.5,
    "safety.min_response_length": -1.0,
    "safety.max_response_length": -1.0,
    "safety.max_eval_drop": 2.0,
    "safety.max_consensus_drop": 1.5,
    "safety.min_vote_alignment": 1.2,
    "safety.lr_factor": 0.0,
    "safety.max_rollbacks": -1,
    "faults.nan_loss_at_steps": [0],
    # ser
    "ser.mode": "listwise",
    "ser.source": "csv",
    "ser.preset": "",
    "ser.local_path": "",
    "ser.eval_path": "",
    "ser.hf_name": "",
    "ser.hf_subset": "",
    "ser.hf_data_dir": "",
    "ser.hf_split": "",
    "ser.eval_split": "",
    "ser.eval_fraction": 1.0,
    "ser.limit": 0,
    "ser.prompt_key": "",
    "ser.chosen_key": "",
    "ser.rejected_key": "",
    "ser.prompt_marker": "",
    "ser.response_key": "",
    "ser.answer_key": "",
    "ser.synthetic_num_pairs": 0,
    "ser.synthetic_num_eval": 0,
    "ser.synthetic_num_test": -1,
    "ser.synthetic_terms": 0,
    "ser.synthetic_digits": 0,
    "ser.synthetic_seed": -1,
    "ser.synthetic_style": "latex",
    "ser.synthetic_per_problem": 0,
    "ser.seed_fraction": 0.0,
    "ser.high": 1.5,
    "ser.low": -0.1,
    "ser.min_gap": 1.0,
    "ser.max_rounds": -1,
    "ser.patience": 0,
    "ser.rm.path": "",
    "ser.rm.head": "linear",
    "ser.rm.warmstart_steps": 0,
    "ser.rm.template": "Question: {q}",
    "ser.rm.max_length": 0,
    "ser.rm.num_workers": 0,
    "ser.rm.zero_stage": 4,
    "ser.rm.lr": 0.0,
    "ser.rm.lr_schedule": "step",
    "ser.rm.warmup_ratio": 1.0,
    "ser.rm.weight_decay": -0.1,
    "ser.rm.grad_clip": -1.0,
    "ser.rm.epochs": 0,
    "ser.rm.min_steps": -1,
    "ser.rm.batch_size": 0,
    "ser.rm.micro_batch_size": 0,
    "ser.rm.center_coef": -0.1,
    "ser.rm.seed": -1,
    "ser.score_batch_size": 0,
    "ser.lora.r": 0,
    "ser.lora.alpha": 0.0,
    "ser.lora.dropout": 1.0,
    "ser.lora.target_modules": [],
    "ser.lora.init": "pissa",
    "ser.lora.path": "/an/adapter",
    "ser.reward_transform": "tanh",
}


def _leaves(schema: type = TTRLConfig, prefix: str = "") -> dict[str, Any]:
    """Every leaf key of the schema -> its annotation (sections are walked, not listed)."""
    hints = typing.get_type_hints(schema)
    out: dict[str, Any] = {}
    for f in dataclasses.fields(schema):
        if dataclasses.is_dataclass(hints[f.name]):
            out |= _leaves(hints[f.name], f"{prefix}{f.name}.")
        else:
            out[f"{prefix}{f.name}"] = hints[f.name]
    return out


LEAVES = _leaves()


def _is_bool(hint: Any) -> bool:
    return hint is bool or hint == Optional[bool]  # noqa: UP045  (what the schema says)


def _bad_value(key: str) -> Any:
    return BAD[key] if key in BAD else "maybe"  # only booleans fall through (see the coverage test)


@functools.cache
def _base(name: str):
    return compose_config(*BASES[name])


def _names(key: str, message: str) -> bool:
    """Whether `message` names `key` itself (not just a key that ends with it)."""
    return re.search(rf"(?<![\w.]){re.escape(key)}(?!\w)", message) is not None


def _raw(container: dict, key: str) -> Any:
    for part in key.split("."):
        container = container[part]
    return container


def _error_with(cfg: Any, key: str, value: Any) -> str | None:
    """Set `key` to `value` in `cfg`, validate, put the old value back: the sentence a user would see, or None."""
    if dataclasses.is_dataclass(cfg):
        *parents, leaf = key.split(".")
        node = cfg
        for part in parents:
            node = getattr(node, part)
        old = getattr(node, leaf)
        setattr(node, leaf, value)
        restore = functools.partial(setattr, node, leaf, old)
    else:
        # Unresolved, so that an interpolation (mini_batch_size: ${rollout.n_train}) comes back as one.
        old = _raw(OmegaConf.to_container(cfg, resolve=False), key)
        restore = functools.partial(OmegaConf.update, cfg, key, old, merge=False)
    try:
        if not dataclasses.is_dataclass(cfg):
            OmegaConf.update(cfg, key, value, merge=False)
        validate(cfg)
    except (ConfigError, OmegaConfBaseException) as err:
        return _one_sentence(err)
    finally:
        restore()
    return None


# ── every key ───────────────────────────────────────────────────────────────
def test_tensor_parallel_engines_are_refused_before_anything_starts():
    from tests.conftest import compose_config
    from ttrl.config import ConfigError, validate

    with pytest.raises(ConfigError, match=r"rollout.tensor_parallel_size=2: tensor-parallel .* not supported yet"):
        validate(compose_config("experiment=debug", "rollout.tensor_parallel_size=2"))


@pytest.mark.parametrize("overrides, words", [
    (["rollout.weight_sync=ipc", "rollout.num_engines=3"],
     "rollout.weight_sync=ipc needs cluster.placement=colocate and rollout.num_engines=3 <= trainer.num_workers=2"),
    (["rollout.weight_sync=ipc", "cluster.placement=split"], "rollout.weight_sync=ipc needs cluster.placement"),
    (["rollout.weight_sync=nccl"], "rollout.weight_sync=nccl needs a GPU run"),
])
def test_a_weight_path_the_placement_cannot_carry_is_refused(overrides, words):
    from tests.conftest import compose_config
    from ttrl.config import ConfigError, validate

    with pytest.raises(ConfigError) as err:
        validate(compose_config("experiment=debug", *overrides))
    assert words in str(err.value)


@pytest.mark.parametrize("asked, gpu, colocate, ranks, engines, path", [
    ("auto", False, True, 2, 2, "ray"),    # CPU: the object store unless asked
    ("ipc", False, True, 2, 2, "ipc"),     # ... the CPU stand-in of the colocated path when asked
    ("auto", True, True, 2, 2, "ipc"),     # GPU, colocated: engine i fed by rank i
    ("auto", True, True, 1, 2, "ray"),     # an engine with no rank beside it
    ("auto", True, False, 2, 2, "nccl"),   # GPU, split
    ("ray", True, True, 2, 2, "ray"),
])
def test_the_weight_path_each_placement_gets(asked, gpu, colocate, ranks, engines, path):
    from ttrl.distributed.runtime import Runtime

    assert Runtime._pick_weight_sync(asked, gpu, colocate, ranks, engines) == path


def test_every_key_has_a_bad_value_or_a_reason():
    booleans = {k for k, hint in LEAVES.items() if _is_bool(hint)}
    uncovered = set(LEAVES) - set(BAD) - set(ANY_VALUE) - booleans
    assert not uncovered, f"keys with no value to refuse and no reason to accept anything: {sorted(uncovered)}"
    stale = (set(BAD) | set(ANY_VALUE)) - set(LEAVES)
    assert not stale, f"not config keys (any more): {sorted(stale)}"
    assert not set(BAD) & set(ANY_VALUE)


def test_the_schema_is_what_hydra_composes():
    def flat(node: dict, prefix: str = "") -> set[str]:
        keys = set()
        for k, v in node.items():
            if isinstance(v, dict) and f"{prefix}{k}" not in LEAVES:
                keys |= flat(v, f"{prefix}{k}.")
            else:
                keys.add(f"{prefix}{k}")
        return keys

    assert flat(OmegaConf.to_container(_base("default"))) == set(LEAVES)


@functools.cache
def _targets() -> dict[str, Any]:
    """The configs each key is broken in: every base composed, and debug_ser as a TTRLConfig instance.

    Shared by all the cases below: each case puts its value back (`_error_with`).
    """
    targets: dict[str, Any] = {name: copy.deepcopy(_base(name)) for name in BASES}
    # validate() also takes a dataclass instance, whose types nothing else checks.
    targets["debug_ser as a dataclass"] = OmegaConf.to_object(_base("debug_ser"))
    return targets


@pytest.mark.parametrize("key", [k for k in LEAVES if k not in ANY_VALUE])
def test_every_key_refuses_a_bad_value_naming_it(key):
    value = _bad_value(key)
    for name, cfg in _targets().items():
        message = _error_with(cfg, key, value)
        assert message is not None, f"{name}: {key}={value!r} was accepted"
        assert _names(key, message), f"{name}: {key}={value!r} gave an error that does not name it: {message}"
        assert "\n" not in message, message


def test_the_shared_configs_are_intact_after_the_sweep():
    # Runs after the sweep (file order): every value was put back, and all still validate.
    for name, cfg in _targets().items():
        validate(cfg)
        if name in BASES:
            assert OmegaConf.to_container(cfg) == OmegaConf.to_container(_base(name)), name


@pytest.mark.parametrize("key, value, words", [
    ("rollout.n_votes", "8", "rollout.n_votes='8' must be a whole number."),
    ("rollout.n_votes", True, "rollout.n_votes=true must be a whole number."),
    ("trainer.lr", float("nan"), "trainer.lr=nan must be a finite number."),
    ("rollout.overlap", 1, "rollout.overlap=1 must be true or false."),
    ("rollout.tis_cap", "2", "rollout.tis_cap='2' must be a finite number or null."),
    ("trainer.betas", [0.9, "x"], "trainer.betas=[0.9, 'x'] must be a list of finite numbers."),
    ("cluster.trainer_resources", {"trainer": "x"}, "must be a mapping of names to finite numbers."),
    ("model", {"path": "tiny"}, "model must be a section of keys"),
    ("model.path", "???", "model.path must be set"),
])
def test_wrong_types_in_a_dataclass_config(key, value, words):
    message = _error_with(OmegaConf.to_object(_base("default")), key, value)
    assert message is not None and words in message, message


def test_an_interpolation_that_does_not_resolve_names_its_key():
    cfg = copy.deepcopy(_base("debug"))
    OmegaConf.update(cfg, "trainer.mini_batch_size", "${rollout.n_trainn}", merge=False)
    with pytest.raises(ConfigError, match=r"^trainer\.mini_batch_size cannot be resolved: .*rollout\.n_trainn"):
        validate(cfg)


def test_nan_and_inf_pass_omegaconf_but_not_validate():
    for value in ("nan", "inf", "-inf"):
        with pytest.raises(ConfigError, match=r"trainer\.lr=.* must be a finite number"):
            compose_config(f"trainer.lr={value}")


# ── names from the registries, with a suggestion ────────────────────────────
@pytest.mark.parametrize("override, message", [
    ("algorithm.policy_loss=ppo_clp",
     "algorithm.policy_loss='ppo_clp' is not a policy loss; did you mean 'ppo_clip'? Valid: ppo_clip."),
    ("algorithm.advantage=gpro", "algorithm.advantage='gpro' is not an advantage estimator; did you mean 'grpo'?"),
    ("algorithm.loss_agg=token_sum", "did you mean 'token_mean'?"),
    ("algorithm.kl_estimator=k4", "algorithm.kl_estimator='k4' is not a KL estimator; valid: k1, k2, k3, low_var_kl."),
    ("reward.name=majority", "reward.name='majority' is not a reward; did you mean 'majority_vote'?"),
    ("label.extractor=boxd", "label.extractor='boxd' is not an answer extractor; did you mean 'boxed'? Valid: "),
    ("model.template=chatt", "model.template='chatt' is not one of plain, chat; did you mean 'chat'?"),
])
def test_unknown_names_get_a_suggestion(override, message):
    with pytest.raises(ConfigError) as err:
        compose_config(override)
    assert message in str(err.value)


def test_a_newly_registered_name_is_valid_without_touching_the_config(monkeypatch):
    from ttrl.algos import POLICY_LOSSES
    from ttrl.labeling.extract import EXTRACTORS

    monkeypatch.setitem(POLICY_LOSSES._items, "my_loss", lambda *a, **k: None)
    monkeypatch.setitem(EXTRACTORS._items, "my_extractor", lambda text: None)
    cfg = compose_config("algorithm.policy_loss=my_loss", "label.extractor=my_extractor")
    assert (cfg.algorithm.policy_loss, cfg.label.extractor) == ("my_loss", "my_extractor")


# ── keys that would be silently ignored ─────────────────────────────────────
@pytest.mark.parametrize("overrides, words", [
    (["algorithm.use_critic=true"], "algorithm.use_critic=true trains a critic whose values only"),
    (["model.system_prompt=Think."], "model.system_prompt is only read by model.template=chat"),
    (["trainer.warmup_steps=5", "trainer.warmup_ratio=0.1"], "trainer.warmup_ratio=0.1 is ignored"),
    (["reward.needs_ground_truth=true"], "reward.needs_ground_truth=true is only read by reward.name=custom"),
    (["reward.per_token=true"], "reward.per_token=true is only read by reward.name=trajectory_logprob"),
    (["reward.view=reorder_terms"], "reward.view='reorder_terms' is only read by reward.name=co_reward"),
    (["reward.normalize=true"], "reward.normalize=true is only read by reward.name=reward_model"),
    (["reward.ensemble=[/some/rm]"], "is only read by reward.name=reward_model"),
    (["reward.clip=5"], "reward.clip=5.0 is only read by reward.name=reward_model"),
    (["reward=reward_model", "reward.path=/x", "reward.clip=0"], "reward.clip=0.0 must be > 0"),
    (["reward=reward_model", "reward.path=/x", "reward.ensemble_reduce=max"], "reward.ensemble_reduce"),
    (["reward=co_reward", "reward.view=reorder_term"], "did you mean 'reorder_terms'?"),
    (["reward=co_reward", "reward.view=null"], "reward.view must name a view"),
    (["reward=self_harmony", "reward.view=null"], "reward.view must name a view (reorder_terms, or"),
    (["reward.scrl.tau_pos=0.5"], "reward.scrl.tau_pos=0.5 is only read by reward.name=scrl, not"),
    (["reward=evol_rl", "reward.rent.last_tokens=4"], "reward.rent.last_tokens=4 is only read by reward.name=rent"),
    (["reward=scrl", "reward.scrl.tau_low=2"], "reward.scrl.tau_low=2.0 must lie in [0, 1]"),
    (["reward=rent", "reward.rent.last_tokens=0"], "reward.rent.last_tokens=0 must be at least 1, or null"),
    (["model.trust_remote_code=true"], "model.trust_remote_code=true is not supported"),
    (["model=plain"], "model.path must be set"),  # `path: ???` in conf/model/plain.yaml
])
def test_settings_that_nothing_would_read_are_refused(overrides, words):
    with pytest.raises(ConfigError) as err:
        compose_config(*overrides)
    assert words in str(err.value)


def test_an_unknown_key_in_an_open_config_is_refused_with_a_suggestion():
    # A DictConfig without the schema (built by hand, not by Hydra) still gets its keys checked.
    plain = OmegaConf.create(OmegaConf.to_container(_base("default"), resolve=True))
    validate(plain)
    plain.rollout.n_votez = 3
    with pytest.raises(ConfigError, match=r"^rollout\.n_votez is not a known key of rollout; did you mean 'n_votes'\?$"):
        validate(plain)


def _sentence(*overrides: str) -> str:
    try:
        compose_config(*overrides)
    except Exception as err:  # ConfigError, or Hydra's wrapper of OmegaConf's error  # noqa: BLE001
        sentence = _one_sentence(err)
        assert sentence is not None, err
        return sentence
    raise AssertionError(f"{overrides} were accepted")


@pytest.mark.parametrize("overrides, words", [
    # SER's reward-model keys were flat (ser.rm_lr) before they became the ser.rm section.
    (["ser.rm_lr=1e-5"], "config error: ser.rm_lr is not a known key; it is ser.rm.lr now."),
    (["experiment=debug_ser", "ser.rm_micro_batch_size=2"],
     "config error: ser.rm_micro_batch_size is not a known key; it is ser.rm.micro_batch_size now."),
    # `+` adds the key past Hydra; validate() says the same.
    (["+ser.rm_epochs=2"], "config error: ser.rm_epochs is not a known key of ser; it is ser.rm.epochs now."),
    # A misspelt key inside the section still gets its did-you-mean.
    (["ser.rm.lrr=1e-5"], "config error: ser.rm.lrr is not a known key; did you mean ser.rm.lr?"),
    # SER's LoRA keys were flat (ser.lora_r) and a switch (ser.lora=true) before the policy's LoRA schema.
    (["ser.lora_r=4"], "config error: ser.lora_r is not a known key; it is ser.lora.r now."),
    (["ser.lora_target_modules=[q_proj]"],
     "config error: ser.lora_target_modules is not a known key; it is ser.lora.target_modules now."),
    (["ser.lora=true"], "config error: ser.lora=true is ser.lora.enabled=true now (ser.lora is a section)."),
])
def test_an_old_flat_key_names_the_nested_key_it_became(overrides, words):
    assert _sentence(*overrides) == words


def test_no_config_key_is_shadowed_by_a_rule_helper():
    # Rules read values as attributes of a Section (s.n_votes); a key named like
    # one of its helpers (s.share, s.key) would be unreadable there.
    from ttrl.config import Section

    helpers = {name for name in dir(Section) if not name.startswith("__")}
    assert not {key.rsplit(".", 1)[-1] for key in LEAVES} & helpers


def test_importing_the_config_does_not_import_torch():
    code = "import sys, ttrl.config; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.stdout.strip() == "False", out.stderr


# ── what a user sees ────────────────────────────────────────────────────────
@pytest.mark.parametrize("override, words", [
    ("algorithm.policy_loss=ppo_clp", ["algorithm.policy_loss='ppo_clp'", "did you mean 'ppo_clip'?"]),
    ("label.extractor=no_such_extractor", ["label.extractor='no_such_extractor'", "valid: boxed"]),
])
def test_ttrl_train_stops_a_typo_before_ray_starts(tmp_path, override, words):
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"} | {"HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([TTRL_TRAIN, "experiment=debug", override, f"hydra.run.dir={tmp_path / 'run'}"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("ttrl-train: config error: "), proc.stderr
    for word in words:
        assert word in proc.stderr, proc.stderr
    assert "starting ray" not in (proc.stdout + proc.stderr).lower()
    # Seconds, not minutes, is a speed claim measured elsewhere (no timed assertion): nothing that
    # takes long has run if neither Ray nor the run dir was started.
    assert not (tmp_path / "run" / "config.yaml").exists(), "stopped before the run dir was written"


def test_an_rm_backbone_from_the_warm_start_needs_the_tiny_arith_model():
    words = _sentence("experiment=debug_ser", "ser.rm.warmstart_steps=150")
    assert "ser.rm.warmstart_steps=150" in words and "model=tiny_arith" in words and "model.path is tiny" in words
    words = _sentence("experiment=ser_demo", "ser.rm.warmstart_steps=150", "ser.rm.path=/some/rm")
    assert "no ser.rm.path (it is /some/rm)" in words
    compose_config("experiment=ser_demo", "ser.rm.warmstart_steps=150")  # accepted
