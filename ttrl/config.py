"""Structured configs (the schema behind conf/) and their validation, section by section.

Hydra composes YAML from conf/ on top of these dataclasses, so a misspelt key
or a value of the wrong type fails at composition time with the full key
named. Everything a type cannot say is a rule: each section's rules sit right
below its dataclass (`@_rules(RolloutConfig)`), the few that tie sections
together (max_model_len vs max_new_tokens, batch sizes that divide evenly,
...) in `_check_across`. `validate(cfg)` runs them all, on a composed
DictConfig or a dataclass instance alike, before any actor starts, and raises
one `ConfigError`: a single sentence that starts with the full dotted key.

Names that pick a registered piece (advantage estimators, losses, KL
estimators, rewards, answer extractors) are checked against the registries
themselves, never a copy, so registering a new one is all it takes.

This module must never import ray, vllm or deepspeed, and never torch at
import time: `ttrl-train --cfg job` must stay instant. The algorithm
registries live beside torch code and are imported inside `validate` only.
"""

from __future__ import annotations

import math
import re
import typing
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, NoReturn, Optional, Union

from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ttrl.registry import Registry, did_you_mean


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key."""


# ── how a section states its rules ─────────────────────────────────────────
# A rule function per dataclass, registered with `@_rules(RolloutConfig)` right
# below it, reads the section's values as attributes of a `Section`. They are
# plain Python values whether validate() got a DictConfig (resolved first) or
# a dataclass instance, and their types (and unknown keys) are checked for
# every section before any rule runs, so rules can trust them.
_RULES: dict[type, Callable[[Section], None]] = {}


def _rules(schema: type) -> Callable[[Callable[[Section], None]], Callable[[Section], None]]:
    def register(check: Callable[[Section], None]) -> Callable[[Section], None]:
        _RULES[schema] = check
        return check

    return register


def _show(value: Any) -> str:
    """A value as a user would type it on the command line."""
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value, resolve=True)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_show(v)}" for k, v in value.items()) + "}"
    return repr(value)


def _bound(x: float) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


class Section:
    """One config section under validation: its values as attributes, and the rules' vocabulary.

    Each helper checks one or more keys of the section and raises ConfigError
    with "<dotted key>=<value> must ..." on the first that breaks it. A null
    in an Optional field passes every helper (null means "off" or "default").
    """

    def __init__(self, node: Any, path: str, schema: type):
        self._node, self._path, self._schema = node, path, schema

    def __getattr__(self, name: str) -> Any:
        return getattr(self._node, name)

    def key(self, name: str) -> str:
        return f"{self._path}.{name}" if self._path else name

    def fail(self, name: str, rule: str) -> NoReturn:
        end = "" if rule.endswith("?") else "."
        raise ConfigError(f"{self.key(name)}={_show(getattr(self._node, name))} {rule}{end}")

    def _each(self, names: Iterable[str], ok: Callable[[Any], bool], rule: str, why: str | None) -> None:
        for name in names:
            value = getattr(self._node, name)
            if value is not None and not ok(value):
                nullable = _optional(_hints(self._schema)[name]) is not None
                self.fail(name, rule + (", or null" if nullable else "") + (f" ({why})" if why else ""))

    def at_least(self, low: float, *names: str, why: str | None = None) -> None:
        self._each(names, lambda v: v >= low, f"must be at least {_bound(low)}", why)

    def above(self, low: float, *names: str, why: str | None = None) -> None:
        self._each(names, lambda v: v > low, f"must be > {_bound(low)}", why)

    def within(self, low: float, high: float, *names: str, low_open: bool = False, high_open: bool = False,
               why: str | None = None) -> None:
        def ok(v: float) -> bool:
            return (v > low if low_open else v >= low) and (v < high if high_open else v <= high)

        span = f"{'(' if low_open else '['}{_bound(low)}, {_bound(high)}{')' if high_open else ']'}"
        self._each(names, ok, f"must lie in {span}", why)

    def share(self, *names: str, why: str | None = None) -> None:
        """A probability or a share of something: [0, 1]."""
        self.within(0, 1, *names, why=why)

    def filled(self, *names: str) -> None:
        """Strings that name something (a path, a field, a split) cannot be empty."""
        self._each(names, lambda v: bool(v.strip()), "must be a non-empty string", None)

    def one_of(self, name: str, choices: Collection[Any]) -> None:
        value = getattr(self._node, name)
        if value not in choices:
            self.fail(name, f"is not one of {', '.join(map(str, choices))}{did_you_mean(value, choices)}")

    def registered(self, name: str, registry: Registry[Any] | Collection[str], kind: str | None = None) -> None:
        """A name that must be in `registry`; `kind` (e.g. 'an advantage estimator') defaults to the registry's."""
        names = registry.names() if isinstance(registry, Registry) else sorted(registry)
        if kind is None:
            kind = ("an " if registry.kind[0] in "aeiou" else "a ") + registry.kind  # type: ignore[union-attr]
        value = getattr(self._node, name)
        if value not in names:
            hint = did_you_mean(value, names)
            listed = ", ".join(names)
            tail = f"{hint} Valid: {listed}." if hint else f"; valid: {listed}."
            raise ConfigError(f"{self.key(name)}={_show(value)} is not {kind}{tail}")

    def require(self, ok: bool, sentence: str) -> None:
        """A rule with its own sentence (which must name the key itself)."""
        if not ok:
            raise ConfigError(sentence)


# ── model ──────────────────────────────────────────────────────────────────
@dataclass
class TinyModelConfig:
    """Shape of the randomly initialised tiny Qwen2 built by `model=tiny`."""

    # Width of the model; must equal num_heads * head_dim.
    hidden_size: int = 128
    # Transformer blocks.
    num_layers: int = 2
    # Attention heads (as many key/value heads: no grouped-query attention).
    num_heads: int = 2
    head_dim: int = 64  # vLLM's CPU attention needs head_dim >= 32
    # Width of the MLP inside each block.
    intermediate_size: int = 512
    # Seed of the random initialisation; part of the cache key, so each seed is its own model.
    seed: int = 0


@_rules(TinyModelConfig)
def _check_tiny(s: Section) -> None:
    s.at_least(1, "hidden_size", "num_layers", "num_heads", "intermediate_size")
    s.at_least(32, "head_dim", why="vLLM's CPU attention needs head_dim >= 32")
    s.at_least(0, "seed")
    s.require(s.hidden_size == s.num_heads * s.head_dim,
              f"{s.key('hidden_size')}={s.hidden_size} must equal {s.key('num_heads')}*{s.key('head_dim')}"
              f"={s.num_heads * s.head_dim}.")


@dataclass
class WarmStartConfig:
    """How `model.path=tiny-arith` is trained from scratch on the easy arithmetic split.

    Everything here (and model.tiny, data.synthetic) names the cached build:
    change a number and a new model is trained; keep them and it is reused.
    """

    # Optimizer steps of the supervised warm start.
    steps: int = 500
    # Peak learning rate of the warm start (no weight decay).
    lr: float = 1e-3
    # adamw: AdamW on every parameter. muon: Muon on the layers' 2-D weights (its rate matched to AdamW's
    # update size, so `lr` serves both) and AdamW on embeddings, head, norms and biases (ttrl/models/muon.py).
    optimizer: str = "adamw"
    # fp32, or bf16: the forward and backward's matmuls in bfloat16 (torch autocast; weights, gradients, the
    # optimizer and the loss stay fp32), on CPUs that multiply bf16 natively (AVX512-BF16, AMX); on others the
    # build is the fp32 one (emulated bf16 would be slower). A bf16 build is a different model (its own cache).
    precision: str = "fp32"
    # Linear warm-up over the first warmup_steps, then cosine decay from lr to
    # lr * min_lr_ratio over the rest (the trainer's schedule).
    warmup_steps: int = 0
    # Where the cosine decay ends, as a share of lr.
    min_lr_ratio: float = 0.1
    # Worked solutions per optimizer step, drawn fresh from the easy split each step.
    batch_size: int = 256
    # Share of 2-number sums in the easy split (the rest have data.synthetic.terms numbers).
    short_share: float = 0.5
    # The careless teacher: chance that each step of a worked solution is off (by 10 or by 1).
    # This is what makes the demo work: the model learns a random slip, so one
    # sample is often wrong while the majority of 16 is usually right.
    slip: float = 0.2
    # Seed of the easy split's stream and of the training order; a new seed is a new warm start.
    seed: int = 0
    # Has the build reached its teacher? maj@check_votes of sampled solutions (temperature 1) on
    # check_prompts held-out sums of the test length (never a test problem, never a training one). Checked
    # where the schedule ends (`steps`), and every check_every steps from check_from on if that is earlier:
    # the build stops at the first check at or above target_maj. One still short at `steps` goes on at
    # lr * min_lr_ratio, checked every check_every steps, for up to extend_steps more, and then keeps the
    # model and says it fell short. null: no check, exactly `steps` steps (set it null when asking for a
    # weak model on purpose, e.g. model.warmstart.steps=300).
    target_maj: Optional[float] = None
    # Steps between two checks.
    check_every: int = 50
    # The first step that may be checked before the schedule ends (null: only from its end on).
    check_from: Optional[int] = None
    # Held-out sums per check (256: a standard error near 0.014 at maj 0.95).
    check_prompts: int = 256
    # Samples per held-out sum: the demo's rollout.n_votes.
    check_votes: int = 16
    # The most steps past `steps` that a build short of target_maj may take.
    extend_steps: int = 0


@_rules(WarmStartConfig)
def _check_warmstart(s: Section) -> None:
    s.at_least(1, "steps", "batch_size", "check_every", "check_prompts", "check_votes")
    s.above(0, "lr")
    s.at_least(0, "warmup_steps", "extend_steps")
    s.at_least(1, "check_from")
    s.require(s.warmup_steps < s.steps,
              f"{s.key('warmup_steps')}={s.warmup_steps} must be below {s.key('steps')}={s.steps}.")
    s.share("min_lr_ratio", "short_share", "slip", "target_maj")
    s.at_least(0, "seed")
    s.one_of("optimizer", ("adamw", "muon"))
    s.one_of("precision", ("fp32", "bf16"))


# The projections of a Qwen2-family (and Llama) block: vLLM serves adapters on these (packed as qkv_proj and
# gate_up_proj), and peft finds them by these names.
LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
@dataclass
class LoraConfig:
    """Low-rank adapters (peft LoRA) instead of full fine-tuning: `model.lora` for the policy, `ser.lora` for SER's
    reward model.

    Only the adapters' parameters are trainable and in the optimizer. For the policy, each sync sends the
    adapter alone to the engines (started with LoRA on), checkpoints keep the adapter and its optimizer
    state, and the KL reference is the base with the adapter switched off (no second copy of the weights).
    """

    # Train adapters instead of the whole model.
    enabled: bool = False
    # The adapters' rank (vLLM serves ranks up to 512).
    r: int = 8
    # Scaling numerator: an adapter's update is scaled by alpha / r.
    alpha: float = 16.0
    # Dropout on an adapter's input while training (0 = none; the engines never drop).
    dropout: float = 0.0
    # The projections that get an adapter; default: every attention and MLP projection of a Qwen2 (or Llama)
    # block, the linear layers vLLM can serve an adapter on.
    target_modules: list[str] = field(default_factory=lambda: list(LORA_MODULES))
    # How the adapters start; both leave the base weights untouched and start with B = 0 (the policy starts as
    # the base): default (A Kaiming-uniform, peft's default) | gaussian (A normal with std 1/r). Inits that
    # rewrite the base weights (PiSSA, OLoRA, LoftQ) are refused: the engines hold the base unchanged.
    init: str = "default"
    # Policy only: an adapter dir to start from (a checkpoint's policy/ trained with LoRA, or any peft
    # adapter of model.path); its r, alpha and target_modules replace the three keys above. ttrl-train
    # continues training it, ttrl-serve serves it as its starting version; null = a fresh adapter.
    path: Optional[str] = None


@_rules(LoraConfig)
def _check_lora(s: Section) -> None:
    s.within(1, 512, "r", why="vLLM's largest max_lora_rank")
    s.above(0, "alpha")
    s.within(0, 1, "dropout", high_open=True)
    mods = list(s.target_modules)
    s.require(bool(mods) and len(set(mods)) == len(mods) and all(m in LORA_MODULES for m in mods),
              f"{s.key('target_modules')}={_show(mods)} must name distinct projections among"
              f" {', '.join(LORA_MODULES)} (the linear layers of a Qwen2 block that vLLM serves adapters on).")
    s.one_of("init", ("default", "gaussian"))
    s.filled("path")
    s.require(s.path is None or s.enabled,
              f"{s.key('path')} is only read with {s.key('enabled')}=true.")


@dataclass
class ModelConfig:
    """The policy model: where it comes from, how a problem becomes its prompt, its precision and context.

    One file per model in conf/model/ (`model=qwen2.5-math-1.5b`); `model=tiny` and
    `model=tiny_arith` are built locally, with no download.
    """

    # A short name for the model: the run's label in logs and the model id ttrl-serve answers
    # to (unless serve.model_name).
    name: str = "tiny"
    # A Hugging Face model id or local dir; "tiny" builds the random tiny
    # model, "tiny-arith" the tiny model warm-started on the arithmetic task.
    # No default here: each conf/model/ file sets it, and `path: ???` (model=plain)
    # can only stay unset, and be reported, over a schema that has none.
    path: str = MISSING
    # A tokenizer dir or hub id when it is not the model's own; null = model.path.
    tokenizer_path: Optional[str] = None
    # How a problem becomes a prompt: "plain" (the template below) or "chat"
    # (the tokenizer's chat template with `system_prompt`).
    template: str = "plain"
    # The user text around the problem; `{problem}` marks where it goes (both templates).
    prompt_template: str = "{problem}"
    # The system turn of template=chat (Qwen2.5-Math: reason step by step, answer in
    # \boxed{}); null = none.
    system_prompt: Optional[str] = None
    # "auto" = bfloat16 on GPU, float32 on CPU.
    dtype: str = "auto"
    # Context length of the engines, prompt plus response: must exceed
    # rollout.max_new_tokens (and eval.max_new_tokens).
    max_model_len: int = 1024
    # Only false is accepted: models are loaded without running code from their repo.
    trust_remote_code: bool = False
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    warmstart: WarmStartConfig = field(default_factory=WarmStartConfig)
    # Train a LoRA adapter of the policy instead of all its weights (model.lora.enabled=true).
    lora: LoraConfig = field(default_factory=LoraConfig)


# What the DeepSpeed config (ttrl/trainer/ds_config.py) and vLLM understand;
# "auto" is resolved by device in ttrl/distributed/runtime.py.
_DTYPES = ("auto", "float32", "bfloat16", "float16")
# trainer.backward_products (ttrl/trainer/precision.py).
BACKWARD_PRODUCTS = ("auto", "float32", "bfloat16")
# trainer.autocast (ttrl/trainer/precision.py).
AUTOCAST = ("auto", "float32", "bfloat16")


@_rules(ModelConfig)
def _check_model(s: Section) -> None:
    s.filled("path", "tokenizer_path")
    s.one_of("template", ("plain", "chat"))
    # Both templates put the problem where {problem} stands (ttrl/data/templates.py).
    s.require("{problem}" in s.prompt_template,
              f"{s.key('prompt_template')}={_show(s.prompt_template)} must contain '{{problem}}'"
              " (where the problem goes).")
    s.require(s.system_prompt is None or s.template == "chat",
              f"{s.key('system_prompt')} is only read by {s.key('template')}=chat, not"
              f" {s.key('template')}={s.template}: put the instruction into {s.key('prompt_template')}.")
    s.one_of("dtype", _DTYPES)
    s.at_least(2, "max_model_len")
    # Nothing passes this on to transformers or vLLM: true would be silently ignored.
    s.require(not s.trust_remote_code,
              f"{s.key('trust_remote_code')}=true is not supported: ttrl loads models without remote code.")


# ── data ───────────────────────────────────────────────────────────────────
@dataclass
class SyntheticDataConfig:
    """The built-in arithmetic task (sums of `terms` numbers of `digits` digits)."""

    # Problems in the split (the unlabeled test set a demo trains and evaluates on).
    num_problems: int = 256
    # Numbers in each sum.
    terms: int = 3
    # Digits of each number.
    digits: int = 2
    # Seed of the problems; the warm start never sees the first 256 of this seed's problems.
    seed: int = 1234


@_rules(SyntheticDataConfig)
def _check_synthetic(s: Section) -> None:
    s.at_least(1, "num_problems", "terms", "digits")
    s.at_least(0, "seed")
    if s.digits * s.terms <= 12:  # beyond that there are always enough distinct sums
        per_number = 10**s.digits - (10 ** (s.digits - 1) if s.digits > 1 else 0)
        space = per_number**s.terms
        s.require(s.num_problems <= space,
                  f"{s.key('num_problems')}={s.num_problems} must be at most {space}: only that many distinct"
                  f" sums of {s.terms} numbers of {s.digits} digit{'s' if s.digits > 1 else ''} exist.")


@dataclass
class ChoicesConfig:
    """Multiple choice: rows with one right and several wrong option texts become lettered questions.

    Off while correct_key is null. On, each row's problem is followed by its
    options, placed by random.Random(f"{seed}:{row id}") (the same letters on
    every machine), and the answer is the right option's letter, which
    label.extractor=choice reads. data=synthetic_choice uses letters, seed
    and instruction for its sums.
    """

    # The field holding the right option's text (GPQA: "Correct Answer"); null = plain rows.
    correct_key: Optional[str] = None
    # The fields holding the wrong options' texts (GPQA: "Incorrect Answer 1".."3").
    incorrect_keys: list[str] = field(default_factory=list)
    # One letter per option, in display order.
    letters: str = "ABCD"
    # Seed of the option order (with each row's id), so every machine shows the same letters.
    seed: int = 0
    # Written after the options ("" = none).
    instruction: str = "Answer with the letter of the correct option."


# What label.extractor=choice reads back (ttrl.data.choices.READABLE_LETTERS, not imported: this module stays light).
_CHOICE_LETTERS = "ABCDEFGHIJ"


@_rules(ChoicesConfig)
def _check_choices(s: Section) -> None:
    s.filled("correct_key")
    s.at_least(0, "seed")
    s.require(len(s.letters) >= 2 and len(set(s.letters)) == len(s.letters)
              and all(c in _CHOICE_LETTERS for c in s.letters),
              f"{s.key('letters')}={s.letters!r} must be at least 2 distinct letters of {_CHOICE_LETTERS}"
              " (what label.extractor=choice reads).")
    keys = list(s.incorrect_keys)
    s.require(all(k.strip() for k in keys) and len(set(keys)) == len(keys) and s.correct_key not in keys,
              f"{s.key('incorrect_keys')}={_show(keys)} must name distinct non-empty fields, none of them"
              f" {s.key('correct_key')}.")
    if s.correct_key is None:
        s.require(not keys, f"{s.key('incorrect_keys')} is only read with {s.key('correct_key')} set.")
        return
    s.require(bool(keys), f"{s.key('incorrect_keys')} must name the wrong options' fields when"
                          f" {s.key('correct_key')} is set.")
    s.require(len(s.letters) == len(keys) + 1,
              f"{s.key('letters')}={s.letters!r} must hold one letter per option: {len(keys) + 1}"
              f" ({s.key('correct_key')} and {len(keys)} {s.key('incorrect_keys')}).")


@dataclass
class DataConfig:
    """The prompts a run trains on: a generated task, a local file or a hub dataset.

    Answers are read for metrics only (label quality, pass@1); a label-free reward never sees
    them. One file per benchmark in conf/data/ (`data=math500`).
    """

    # "synthetic", "synthetic_choice", "jsonl" or a benchmark name (aime24, amc, math500, gpqa_diamond, ...).
    name: str = "synthetic"
    # The Hugging Face dataset id when the prompts come from the hub (null: local_path or a
    # generated task).
    hf_name: Optional[str] = None
    # The dataset's configuration (subset) name, if it has several.
    hf_subset: Optional[str] = None
    # The split to read from the hub.
    hf_split: str = "test"
    # A local .jsonl/.json/.parquet/.csv file that replaces the hub download.
    local_path: Optional[str] = None
    # The field holding a row's id (default: its position), used in logs and for option order.
    id_key: str = "id"
    # The field holding the problem text; a row without it is an error naming file and line.
    problem_key: str = "problem"
    # Not read when choices.correct_key is set (the answer is then a letter).
    answer_key: str = "answer"
    # Keep only the first this many prompts (null: all of them).
    limit: Optional[int] = None
    # Prompts per training step; each gets rollout.n_votes samples.
    prompts_per_step: int = 8
    # Shuffle the prompts every epoch (seeded by the run's seed); false keeps file order.
    shuffle: bool = True
    synthetic: SyntheticDataConfig = field(default_factory=SyntheticDataConfig)
    choices: ChoicesConfig = field(default_factory=ChoicesConfig)


# data.name values generated in code (ttrl.data.loader.SYNTHETIC_TASKS), unless local_path is set.
_SYNTHETIC_TASKS = ("synthetic", "synthetic_choice")


@_rules(DataConfig)
def _check_data(s: Section) -> None:
    s.filled("name", "hf_name", "hf_subset", "hf_split", "local_path", "id_key", "problem_key", "answer_key")
    s.at_least(1, "limit", "prompts_per_step")
    generated = s.name in _SYNTHETIC_TASKS and s.local_path is None
    s.require(generated or s.local_path is not None or s.hf_name is not None,
              f"{s.key('name')}={s.name!r} needs {s.key('hf_name')} (a hub dataset) or {s.key('local_path')}"
              " (a file).")
    s.require(s.choices.correct_key is None or not generated,
              f"{s.key('choices.correct_key')}={_show(s.choices.correct_key)} names a field of file or hub rows;"
              f" {s.key('name')}={s.name} generates its problems (set it to null, or set {s.key('local_path')}).")


# ── rollout ────────────────────────────────────────────────────────────────
@dataclass
class RolloutConfig:
    """Generation on the vLLM engine actors: how many samples per prompt, how they are sampled,
    and how new weights reach the engines after every update.
    """

    n_votes: int = 64  # samples per prompt for the majority vote
    n_train: int = 32  # of which this many are kept for the update
    # "first" keeps the first n_train (the official TTRL code), "random" draws.
    subsample: str = "first"
    # Sampling temperature; the paper uses 1.0 for Qwen2.5-Math (0.6 for other families).
    # Must be > 0: a vote needs samples that differ.
    temperature: float = 1.0
    # Nucleus sampling: keep the smallest set of tokens holding this much probability (1 = off).
    top_p: float = 1.0
    # Sample from the k most likely tokens only; -1 = off.
    top_k: int = -1
    # Longest response in tokens (the paper: 3072); model.max_model_len must leave room
    # for the prompt.
    max_new_tokens: int = 3072
    # vLLM engine actors, each a whole copy of the model; prompts are spread over them.
    num_engines: int = 1
    # GPUs per engine; only 1 is supported for now (use more engines instead).
    tensor_parallel_size: int = 1
    # Share of a GPU's memory each engine may take for weights and KV cache (GPU
    # runs); keep it low enough for the trainer when colocated.
    gpu_memory_utilization: float = 0.5
    # KV cache size for vLLM's CPU backend, in GiB.
    cpu_kv_cache_gb: float = 1.0
    # Torch threads of each engine on CPU. null = the usable CPUs shared among
    # the engines (in the synchronous loop the trainer ranks sit idle while
    # the engines generate, so Ray's one thread per actor would leave cores
    # unused); with overlap, only the CPUs the trainer ranks leave.
    cpu_threads: Optional[int] = None
    # Reuse the KV cache of a shared prompt prefix: every prompt is sampled
    # n_votes times, so its prompt is computed once.
    enable_prefix_caching: bool = True
    # null = decide by device (eager on CPU, CUDA graphs on GPU).
    enforce_eager: Optional[bool] = None
    # Release the KV cache while training when engines share GPUs with it.
    sleep_between_steps: bool = False
    # Added to the run's seed for the engines' sampling, to vary generation alone.
    seed: int = 0
    # Generate step k+1 while step k trains (one step off-policy): the
    # stale samples are reweighted by min(pi_old/pi_behaviour, tis_cap).
    overlap: bool = False
    # With overlap only: the cap of the truncated importance weight above (null = no
    # reweighting of the stale samples).
    tis_cap: Optional[float] = 2.0
    # A rollout engine that dies is restarted by Ray, re-synced with the
    # current weights, and the generation retried up to this many times.
    max_retries: int = 2
    # Ray restarts a dead engine at most this many times over the whole run
    # (each restart is re-synced with the current weights).
    max_restarts: int = 2
    # How new weights reach the engines: "ray" (buckets through the object
    # store; works everywhere), "nccl" (broadcast from trainer rank 0's GPU;
    # needs cluster.placement=split), "ipc" (colocated: trainer rank i hands
    # engine i each bucket by a CUDA IPC handle, or a shared-memory file on
    # CPU; needs num_engines <= trainer.num_workers), "auto" (GPU: nccl when
    # split, ipc when colocated and it can, else ray; CPU: ray).
    weight_sync: str = "auto"
    # Upper bound of one weight bucket (one NCCL broadcast / one Ray blob), MiB.
    sync_bucket_mb: int = 256
    # A weight-sync round that has not finished after this many seconds is
    # given up on every side (NCCL has no timeout of its own: an engine that
    # died mid-broadcast would hang the rest); its engines are then restarted
    # where dead and re-synced.
    sync_timeout_s: float = 180.0


@_rules(RolloutConfig)
def _check_rollout(s: Section) -> None:
    s.at_least(1, "n_votes")
    s.require(1 <= s.n_train <= s.n_votes,
              f"{s.key('n_train')}={s.n_train} must be between 1 and {s.key('n_votes')}={s.n_votes}:"
              " training samples are drawn from the voting samples.")
    s.one_of("subsample", ("first", "random"))
    s.above(0, "temperature", why="sampling, not greedy decoding, is needed to vote")
    s.within(0, 1, "top_p", low_open=True)
    s.require(s.top_k == -1 or s.top_k >= 1, f"{s.key('top_k')}={s.top_k} must be -1 (off) or at least 1.")
    s.at_least(1, "max_new_tokens", "num_engines", "tensor_parallel_size", "sync_bucket_mb", "sync_timeout_s")
    # Until engines place one 1-GPU bundle per TP rank (vLLM's Ray executor
    # rejects a multi-GPU bundle, and an engine actor holding the GPUs starves
    # its own workers), a TP engine would fail deep inside vLLM: refuse it here.
    s.require(s.tensor_parallel_size == 1,
              f"{s.key('tensor_parallel_size')}={s.tensor_parallel_size}: tensor-parallel rollout engines are not "
              "supported yet; use rollout.tensor_parallel_size=1 and more engines (rollout.num_engines), each "
              "holding a whole copy of the model on one GPU.")
    s.within(0, 1, "gpu_memory_utilization", low_open=True)
    s.above(0, "cpu_kv_cache_gb")
    s.at_least(1, "cpu_threads", why="null shares the CPUs out")
    s.at_least(0, "seed", "max_retries", "max_restarts")
    s.at_least(1, "tis_cap", why="it caps an importance weight")
    s.one_of("weight_sync", ("auto", "ray", "nccl", "ipc"))


# ── label ──────────────────────────────────────────────────────────────────
@dataclass
class LabelConfig:
    """How the answer of a sample is read and compared: the basis of the vote, the rewards and
    every accuracy metric.
    """

    # How a sample's answer is pulled out of its text (ttrl.labeling.extract.EXTRACTORS),
    # and so how answers compare: for the step's vote and rewards, label quality, eval
    # and ttrl-serve alike. boxed (last \boxed{}, math-verify) | choice (a letter A-J,
    # compared exactly) | number (the last number, compared numerically) | custom.
    extractor: str = "boxed"
    # For `custom`: "package.module:function", a `text -> str | None` (answers compare as boxed ones).
    custom_extractor: Optional[str] = None
    # Upper bound on one math-verify equivalence check, in seconds.
    grade_timeout_s: float = 5.0


@_rules(LabelConfig)
def _check_label(s: Section) -> None:
    from ttrl.labeling.extract import EXTRACTORS

    s.registered("extractor", EXTRACTORS)
    s.require(s.extractor != "custom" or bool(s.custom_extractor),
              f"{s.key('custom_extractor')} must name a function ('package.module:function') when"
              f" {s.key('extractor')}=custom.")
    s.require(s.custom_extractor is None or bool(_FUNCTION_PATH.fullmatch(s.custom_extractor)),
              f"{s.key('custom_extractor')}={_show(s.custom_extractor)} must name a function as"
              " 'package.module:function'.")
    s.require(s.custom_extractor is None or s.extractor == "custom",
              f"{s.key('custom_extractor')} is only read by {s.key('extractor')}=custom, not"
              f" {s.key('extractor')}={s.extractor}.")
    s.above(0, "grade_timeout_s")


# ── reward ─────────────────────────────────────────────────────────────────
# The methods built for votes that are often wrong read their paper's knobs
# from a sub-section named after them (reward.scrl.tau_pos): one section per
# method, each read by that reward alone (ttrl/rewards/<name>.py says how).
@dataclass
class SelfHarmonyConfig:
    """`reward=self_harmony` (Self-Harmony, arXiv 2511.01191): the label is the answer with the highest
    harmonic mean of its shares of the question's samples and of its reframing's (`reward.view`)."""

    # A label whose harmonic-mean score 2pq/(p+q) is below this pays nothing (0: every label pays).
    min_score: float = 0.0


@_rules(SelfHarmonyConfig)
def _check_self_harmony(s: Section) -> None:
    s.share("min_score", why="a harmonic mean of two shares")


@dataclass
class EvolRLConfig:
    """`reward=evol_rl` (EVOL-RL, arXiv 2509.15194): the majority vote as anchor, samples ranked within
    each side of it by the novelty of their reasoning. Its clip-higher and entropy bonus are
    `algorithm.clip_high` (0.28 in the paper) and `algorithm.entropy_coef`."""

    # A sample's similarity to its group: this weight on the mean cosine to its side of the vote,
    # the rest on the max cosine to any other sample (0.5 in the authors' code).
    mean_weight: float = 0.5
    # The reasoning's vector is its bag of character n-grams of this length, compared by cosine.
    ngram: int = 3


@_rules(EvolRLConfig)
def _check_evol_rl(s: Section) -> None:
    s.share("mean_weight")
    s.at_least(1, "ngram")


@dataclass
class ToolVerifiedConfig:
    """`reward=tool_verified` (T3RL, arXiv 2603.02203): each sample's worked steps checked by a
    calculator; votes weighted by the share of its checks that hold."""

    # The vote weight of a sample whose every check holds (T3RL's omega; about 5 worked best there);
    # a sample votes with 1 + (this - 1) * its share of checks that hold. 1 = the plain majority vote.
    verified_weight: float = 5.0
    # Run the calculator in a sandboxed worker process (hard deadline, capped memory) rather than
    # in the trainer's process.
    sandbox: bool = True
    # The sandboxed calculator's deadline for one step's samples, in seconds; a miss skips the step.
    timeout_s: float = 10.0


@_rules(ToolVerifiedConfig)
def _check_tool_verified(s: Section) -> None:
    s.at_least(1, "verified_weight", why="1 is the plain majority vote")
    s.above(0, "timeout_s")


@dataclass
class SCRLConfig:
    """`reward=scrl` (SCRL, arXiv 2603.19880): a positive label only under strict consensus, negative
    labels for rare answers produced with above-average entropy. Defaults: the authors' script."""

    # binary (+a_plus / -a_minus / 0) | continuous (scaled by the answer's share, minus lambda_h
    # times its class's entropy above the prompt's mean)
    mode: str = "continuous"
    # The top answer is the positive label only if it holds at least this share of the samples ...
    tau_pos: float = 0.375
    # ... and leads the runner-up by more than this share.
    tau_marg: float = 0.125
    # Answers holding less than this share, with a class entropy at or above the prompt's mean, are negatives.
    tau_low: float = 0.125
    # Scale of the positive reward.
    a_plus: float = 1.0
    # Scale of the negative reward.
    a_minus: float = 1.0
    # continuous mode: weight of the entropy term (class mean entropy minus the prompt's, in nats).
    lambda_h: float = 0.1


@_rules(SCRLConfig)
def _check_scrl(s: Section) -> None:
    s.one_of("mode", ("binary", "continuous"))
    s.share("tau_pos", "tau_marg", "tau_low", why="a share of the samples")
    s.at_least(0, "a_plus", "a_minus", "lambda_h")


@dataclass
class RentConfig:
    """`reward=rent` (RENT, arXiv 2505.22660): minus the policy's mean token entropy over the end of
    the response."""

    # How many tokens from the response's end are measured; null = all of them (= reward=token_entropy).
    last_tokens: Optional[int] = 16


@_rules(RentConfig)
def _check_rent(s: Section) -> None:
    s.at_least(1, "last_tokens")


# The rewards that read a sub-section of their own name, and its schema.
_REWARD_SECTIONS = {"self_harmony": SelfHarmonyConfig, "evol_rl": EvolRLConfig, "tool_verified": ToolVerifiedConfig,
                    "scrl": SCRLConfig, "rent": RentConfig}


@dataclass
class RewardConfig:
    """What a sample is paid: `name` picks a registered reward (ttrl/rewards/); the other keys are
    options of particular rewards, each saying which one reads it. One file per reward in
    conf/reward/ (`reward=self_certainty`).
    """

    # majority_vote (label-free) | soft_majority | token_entropy | self_certainty | trajectory_logprob |
    # co_reward | self_harmony | evol_rl | tool_verified | scrl | rent (label-free) | ground_truth
    # (oracle) | custom | reward_model | random (control)
    name: str = "majority_vote"
    # For `custom`: "package.module:function", TRL-style reward function.
    fn: Optional[str] = None
    # For `custom`: hand the function ground-truth answers (then it is not label-free).
    needs_ground_truth: bool = False
    # For `reward_model`: the reward model dir.
    path: Optional[str] = None
    # For `majority_vote`: a vote whose winning class holds less than this share
    # of the samples rewards nothing (0 = TTRL: every vote counts).
    min_ratio: float = 0.0
    # For `random`: the chance of a 1, and the generator's seed (null: the run's seed).
    p: float = 0.5
    # For `random`: the generator's seed (null: the run's seed).
    seed: Optional[int] = None
    # For `trajectory_logprob`: the mean log-prob per token rather than the sum.
    per_token: bool = False
    # For `co_reward` and `self_harmony`: how the second view of a problem is made, a view of
    # ttrl/data/views.py (reorder_terms) or "package.module:function".
    view: Optional[str] = None
    # For `reward_model`, the defences against reward hacking (all off by default;
    # ttrl/rewards/reward_model.py): more RM dirs scored beside reward.path,
    # combined by ensemble_reduce (mean | min); scores whitened by their running
    # mean and std; clamped to [-clip, clip]; minus length_penalty per response token.
    ensemble: list[str] = field(default_factory=list)
    # How the ensemble's scores combine: mean, or min (the most sceptical model wins).
    ensemble_reduce: str = "mean"
    # Whiten the scores by their running mean and std, so the scale of the RM does not set
    # the step size.
    normalize: bool = False
    # Clamp scores to [-clip, clip] after whitening (null = no clamp): one outlier score cannot
    # dominate a group.
    clip: Optional[float] = None
    # Subtracted per response token, against RMs that pay for length (0 = off).
    length_penalty: float = 0.0
    self_harmony: SelfHarmonyConfig = field(default_factory=SelfHarmonyConfig)
    evol_rl: EvolRLConfig = field(default_factory=EvolRLConfig)
    tool_verified: ToolVerifiedConfig = field(default_factory=ToolVerifiedConfig)
    scrl: SCRLConfig = field(default_factory=SCRLConfig)
    rent: RentConfig = field(default_factory=RentConfig)


# What ttrl.rewards.custom.load_function imports: "package.module:function" (or a dotted path).
_FUNCTION_PATH = re.compile(r"[A-Za-z_][\w.]*[:.][A-Za-z_][\w.]*")


@_rules(RewardConfig)
def _check_reward(s: Section) -> None:
    from ttrl.rewards import REWARDS

    s.registered("name", REWARDS)
    s.require(s.name != "custom" or bool(s.fn),
              f"{s.key('fn')} must name a function ('package.module:function') when {s.key('name')}=custom.")
    s.require(s.fn is None or bool(_FUNCTION_PATH.fullmatch(s.fn)),
              f"{s.key('fn')}={_show(s.fn)} must name a function as 'package.module:function'.")
    s.require(not s.needs_ground_truth or s.name == "custom",
              f"{s.key('needs_ground_truth')}=true is only read by {s.key('name')}=custom, not"
              f" {s.key('name')}={s.name}.")
    s.filled("path")
    s.require(s.name != "reward_model" or bool(s.path),
              f"{s.key('path')} must point to a reward model dir when {s.key('name')}=reward_model.")
    s.share("min_ratio", "p")
    s.at_least(0, "seed")
    viewed = ("co_reward", "self_harmony")  # the rewards that vote on a second view of each problem
    s.require(s.name not in viewed or bool(s.view),
              f"{s.key('view')} must name a view (reorder_terms, or 'package.module:function') when"
              f" {s.key('name')}={s.name}.")
    if s.view and ":" not in s.view and "." not in s.view:  # a registered view, not a user's function
        from ttrl.data.views import VIEWS

        s.registered("view", VIEWS)
    s.require(s.view is None or s.name in viewed,
              f"{s.key('view')}={_show(s.view)} is only read by {s.key('name')}=co_reward or self_harmony, not"
              f" {s.key('name')}={s.name}.")
    # A method's own sub-section set for another reward would be ignored: say so.
    for section, schema in _REWARD_SECTIONS.items():
        node = getattr(s, section)
        for f in fields(schema):
            value = getattr(node, f.name)
            s.require(s.name == section or value == f.default,
                      f"{s.key(section)}.{f.name}={_show(value)} is only read by {s.key('name')}={section}, not"
                      f" {s.key('name')}={s.name}.")
    s.one_of("ensemble_reduce", ("mean", "min"))
    s.require(all(str(p).strip() for p in s.ensemble),
              f"{s.key('ensemble')}={_show(s.ensemble)} must list reward model dirs (an entry is empty).")
    s.require(s.clip is None or s.clip > 0, f"{s.key('clip')}={_show(s.clip)} must be > 0 (or null: no clip).")
    s.at_least(0, "length_penalty")
    for key, on in (("ensemble", bool(s.ensemble)), ("normalize", s.normalize), ("clip", s.clip is not None),
                    ("length_penalty", bool(s.length_penalty))):
        s.require(not on or s.name == "reward_model",
                  f"{s.key(key)}={_show(getattr(s, key))} is only read by {s.key('name')}=reward_model, not"
                  f" {s.key('name')}={s.name}.")
    s.require(not s.per_token or s.name == "trajectory_logprob",
              f"{s.key('per_token')}=true is only read by {s.key('name')}=trajectory_logprob, not"
              f" {s.key('name')}={s.name}.")


# ── algorithm ──────────────────────────────────────────────────────────────
@dataclass
class AlgorithmConfig:
    """The policy update: advantage estimator, policy loss, KL to the reference, entropy bonus,
    and the critic for PPO. Each name is looked up in a registry of ttrl/algos/, so a new
    estimator or loss is one function, one decorator and one file in conf/algorithm/.
    """

    # A label for logs, W&B tags and ttrl-compare's columns (the file in conf/algorithm/).
    name: str = "grpo"
    # grpo | dr_grpo | rloo | reinforce_pp | gae
    advantage: str = "grpo"
    # Train a value model beside the policy (PPO); only advantage=gae reads its values.
    use_critic: bool = False
    # Discount over tokens for gae and reinforce_pp; estimators that score whole responses need 1.
    gamma: float = 1.0
    # GAE's lambda (bias vs variance of the token advantages); 1 for every other estimator.
    lam: float = 1.0
    # The registered policy loss (ttrl/algos/losses.py): ppo_clip, PPO's clipped surrogate.
    policy_loss: str = "ppo_clip"
    # The ratio is clipped to [1 - clip_low, 1 + clip_high].
    clip_low: float = 0.2
    # Above clip_low, DAPO's clip-higher (e.g. 0.28): more room for unlikely tokens to grow,
    # against entropy collapse.
    clip_high: float = 0.2
    # Dual clip (> 1): for negative advantages the loss is capped at -dual_clip * A, so a
    # runaway ratio cannot make it unbounded; null = off.
    dual_clip: Optional[float] = None
    # token_mean | seq_mean_token_sum | seq_mean_token_mean
    loss_agg: str = "token_mean"
    # KL to the reference policy: as a loss term or as a per-token reward penalty.
    kl_coef: float = 0.0
    # How the per-token KL is estimated: k1 (log-ratio), k2 (half its square), k3 or
    # low_var_kl (unbiased, non-negative, clamped).
    kl_estimator: str = "k3"
    # true: subtract kl_coef * KL from the token rewards (PPO's classic penalty); false: add
    # it to the loss.
    kl_in_reward: bool = False
    # Weight of an entropy bonus in the loss, against collapse; 0 = off.
    entropy_coef: float = 0.0
    # Passes over each batch of rollouts.
    ppo_epochs: int = 1
    # Critic (PPO only).
    value_clip: float = 0.2
    # The critic's learning rate (its optimiser follows trainer.lr_schedule).
    critic_lr: float = 1e-5


@_rules(AlgorithmConfig)
def _check_algorithm(s: Section) -> None:
    # The registries sit beside the maths (torch): imported when a config is checked, not with this module.
    from ttrl.algos import ADVANTAGES, AGG_MODES, KL_ESTIMATORS, POLICY_LOSSES, TOKEN_ADVANTAGES

    s.registered("advantage", {*ADVANTAGES.names(), *TOKEN_ADVANTAGES.names()}, "an advantage estimator")
    s.registered("policy_loss", POLICY_LOSSES)
    s.registered("loss_agg", AGG_MODES)
    s.registered("kl_estimator", KL_ESTIMATORS)
    adv = s.advantage
    s.require(adv != "gae" or s.use_critic,
              f"{s.key('advantage')}=gae needs {s.key('use_critic')}=true (GAE uses the critic's values).")
    # Every other estimator refuses critic values (ttrl/algos/advantages.py), mid-run.
    s.require(adv == "gae" or not s.use_critic,
              f"{s.key('use_critic')}=true trains a critic whose values only {s.key('advantage')}=gae reads,"
              f" not {s.key('advantage')}={adv}.")
    s.within(0, 1, "gamma", low_open=True)
    s.share("lam")
    if adv in ADVANTAGES and adv not in TOKEN_ADVANTAGES:
        s.require(s.gamma == 1 and s.lam == 1,
                  f"{s.key('advantage')}={adv} scores whole responses: set {s.key('gamma')}=1 and"
                  f" {s.key('lam')}=1 (they only apply to gae and reinforce_pp).")
    s.require(adv != "reinforce_pp" or s.lam == 1,
              f"{s.key('advantage')}=reinforce_pp has no lambda: set {s.key('lam')}=1.")
    # ppo_clip refuses these mid-run (ttrl/algos/losses.py); a new loss gets the same bounds.
    s.above(0, "clip_low", "clip_high", why="the ratio is clipped to [1 - clip_low, 1 + clip_high]")
    s.above(1, "dual_clip", why="it caps the loss at -dual_clip * A")
    s.at_least(0, "kl_coef")
    # The update applies the entropy bonus only when the coefficient is positive.
    s.at_least(0, "entropy_coef", why="0 is off")
    s.at_least(1, "ppo_epochs")
    s.above(0, "value_clip", "critic_lr")


# ── trainer ────────────────────────────────────────────────────────────────
@dataclass
class TrainerConfig:
    """The DeepSpeed trainer of the policy: run length, checkpoints, ranks, optimiser, schedule,
    batch sizes and memory.
    """

    # Training steps of the run; null = trainer.episodes passes over the prompts.
    total_steps: Optional[int] = None
    # Passes over the data; used when total_steps is null.
    episodes: int = 1
    save_every: int = 0  # 0 = only at the end
    # Checkpoints kept in the run dir; older ones are deleted after each save.
    keep_last: int = 2
    # auto (newest checkpoint in the run dir) | none | a checkpoint path
    resume: str = "auto"
    num_workers: int = 1  # DeepSpeed ranks of the policy
    # DeepSpeed ZeRO stage: 0 plain data parallel, 1 shards optimizer states, 2 also
    # gradients, 3 also parameters (the most memory saved, a gather per forward).
    zero_stage: int = 3
    # Peak learning rate of the policy (AdamW); the paper's 5e-7.
    lr: float = 5e-7
    lr_schedule: str = "cosine"  # cosine | constant | linear
    # Optimizer steps of linear warm-up from 0 to lr.
    warmup_steps: int = 0
    # Warmup as a share of all optimizer steps; used when warmup_steps is 0.
    warmup_ratio: Optional[float] = None
    # Where cosine and linear decay end, as a share of lr.
    min_lr_ratio: float = 0.0
    # AdamW's decoupled weight decay.
    weight_decay: float = 0.0
    # AdamW's (beta1, beta2).
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    # Clip the global gradient norm to this (0 = no clipping).
    grad_clip: float = 1.0
    # Samples per optimizer step (rollouts of a step split into mini-batches);
    # null = the whole step's batch is one mini-batch.
    mini_batch_size: Optional[int] = None
    micro_batch_size: int = 4  # samples per forward/backward, per rank
    # Samples per no-grad forward (old/reference log-probs, token stats), per
    # rank; null = micro_batch_size. Under ZeRO-3 every forward gathers all
    # parameters, so a larger one means fewer gathers, for more activation memory.
    logprob_micro_batch_size: Optional[int] = None
    # Keep optimizer states (and with ZeRO-3 parameters) in CPU memory: slower, fits bigger models.
    offload: bool = False
    # Recompute activations in the backward pass: less memory, about a third
    # more compute.
    gradient_checkpointing: bool = False
    # Training precision; auto = bfloat16 on GPU, float32 on CPU.
    dtype: str = "auto"
    # The matrix products of the policy's backward pass in fp32 training:
    # "bfloat16" computes the gradients' products in bf16 (the forward, the
    # weights and the optimizer stay fp32; the gradient moves by ~0.3% of its
    # norm): an update 29% faster on a 13M-parameter model on a CPU with AMX,
    # 5% on the demo's 1M. "auto" = bfloat16 on a CPU with AMX below ZeRO-3,
    # float32 elsewhere (emulated bf16 is slower); float32 = exact.
    backward_products: str = "float32"
    # The policy's forward and backward in fp32 training on a CPU under
    # bf16 autocast (as TRL's and Transformers' bf16=True do there), with
    # plain matmul-softmax attention (the fused CPU attention's bf16 backward
    # is slow); weights, gradients, the optimizer and the log-softmax stay
    # fp32. The log-probs move by ~1e-2. "auto" = bfloat16 on a CPU with bf16
    # instructions (AVX512-BF16 or AMX), float32 elsewhere; float32 = no
    # autocast. Overrides backward_products (its products are bf16 already).
    autocast: str = "float32"
    # Rows that share a prompt (a group's samples) run it once in the
    # trainer's forward and backward: its keys and values are repeated for
    # each row's response. The same log-probs to float rounding; off under
    # ZeRO-3 (a second forward gathers every parameter again) and with
    # gradient checkpointing.
    prompt_once: bool = True
    # Rows whose advantage is zero on every token (a group whose samples all
    # got the same reward) add exactly nothing to the policy gradient when the
    # loss has no entropy or KL term: they then skip the backward pass (one
    # no-grad forward still measures their entropy for the metrics and the
    # guard). The update is the same either way; false computes them anyway.
    skip_zero_advantage: bool = True
    # A non-finite loss or gradient norm skips the update; this many skips in
    # a row stop the run (the last checkpoint stays intact).
    max_skipped_steps: int = 3


# The schedules of ttrl/trainer/ds_config.py's lr_lambda.
_LR_SCHEDULES = ("cosine", "constant", "linear")


@_rules(TrainerConfig)
def _check_trainer(s: Section) -> None:
    s.at_least(1, "total_steps", "episodes", "keep_last", "num_workers", "mini_batch_size", "micro_batch_size",
               "logprob_micro_batch_size",
               "max_skipped_steps")
    s.at_least(0, "save_every", why="0 saves only at the end")
    s.require(s.resume.strip() != "",
              f"{s.key('resume')} must be 'auto', 'none' or a checkpoint path.")
    s.one_of("zero_stage", (0, 1, 2, 3))
    s.above(0, "lr")
    s.one_of("lr_schedule", _LR_SCHEDULES)
    s.at_least(0, "warmup_steps", "weight_decay")
    s.within(0, 1, "warmup_ratio", high_open=True)
    s.require(not (s.warmup_steps and s.warmup_ratio is not None),
              f"{s.key('warmup_ratio')}={s.warmup_ratio} is ignored when {s.key('warmup_steps')}={s.warmup_steps}:"
              " set only one of them.")
    s.share("min_lr_ratio")
    s.require(len(s.betas) == 2 and all(0 <= b < 1 for b in s.betas),
              f"{s.key('betas')}={_show(s.betas)} must be two numbers in [0, 1).")
    s.at_least(0, "grad_clip", why="0 is no clipping")
    s.one_of("dtype", _DTYPES)
    s.one_of("backward_products", BACKWARD_PRODUCTS)
    s.one_of("autocast", AUTOCAST)


# ── eval ───────────────────────────────────────────────────────────────────
@dataclass
class EvalConfig:
    """Evaluation on the run's own prompts (the paper's protocol: pass@1 averaged over n_samples,
    maj@k), during training and by `ttrl-eval`. It reads ground truth, as metrics may.
    """

    every_n_steps: int = 0  # 0 = never during training
    # Evaluate the starting model before the first step (the "before" of before/after).
    at_start: bool = False
    # Evaluate after the last step.
    at_end: bool = False
    # Samples per prompt: pass@1 is averaged over them, maj@k votes among them.
    n_samples: int = 16
    # Sampling temperature of evaluation (the paper: 0.6).
    temperature: float = 0.6
    # Nucleus sampling of evaluation (the paper: 0.95).
    top_p: float = 0.95
    max_new_tokens: Optional[int] = None  # null = rollout.max_new_tokens
    # The k of pass@k and maj@k to report; each at most n_samples.
    ks: list[int] = field(default_factory=lambda: [1, 16])
    # One greedy sample per prompt instead (temperature 0): a deterministic pass@1.
    greedy: bool = False
    # `ttrl-eval` only: a checkpoint or model dir that replaces model.path.
    checkpoint: Optional[str] = None


@_rules(EvalConfig)
def _check_eval(s: Section) -> None:
    s.at_least(0, "every_n_steps", why="0 is never during training")
    s.at_least(1, "n_samples", "max_new_tokens")
    s.at_least(0, "temperature")
    s.require(s.greedy or s.temperature > 0,
              f"{s.key('temperature')}={s.temperature} must be > 0 unless {s.key('greedy')}=true.")
    s.within(0, 1, "top_p", low_open=True)
    s.require(all(k >= 1 for k in s.ks) and (s.greedy or all(k <= s.n_samples for k in s.ks)),
              f"{s.key('ks')}={_show(s.ks)} must lie between 1 and {s.key('n_samples')}={s.n_samples}.")
    s.filled("checkpoint")


# ── logger ─────────────────────────────────────────────────────────────────
@dataclass
class WandbConfig:
    """Weights & Biases logging, beside metrics.jsonl (`logger=wandb` turns it on)."""

    # Log to W&B at all (conf/logger/wandb.yaml sets it); metrics.jsonl is written either way.
    enabled: bool = False
    # The W&B project the runs go to.
    project: str = "ttrl"
    # The W&B team or user; null = the account's default.
    entity: Optional[str] = None
    # null: the jobs of one `-m` sweep share "<experiment>/<sweep dir name>"
    # (PPO, GRPO and SER runs of a sweep line up); a single run has no group.
    group: Optional[str] = None
    # Extra tags; the experiment, algorithm and reward names are always added.
    tags: list[str] = field(default_factory=list)
    # null: "<experiment>/<the job's overrides>", e.g. "debug/algorithm=ppo,seed=1".
    name: Optional[str] = None
    # W&B's job type, which its UI groups and filters by: one per arm of a
    # comparison. null: "<algorithm>/<reward>", with "ser+" in front when the run
    # trains its own reward model first (e.g. "ser+ppo/reward_model").
    job_type: Optional[str] = None
    mode: str = "offline"  # online | offline | disabled
    # A free-text note shown with the run.
    notes: Optional[str] = None


@_rules(WandbConfig)
def _check_wandb(s: Section) -> None:
    s.filled("project")
    s.one_of("mode", ("online", "offline", "disabled"))


@dataclass
class LoggerConfig:
    """What a run records: metrics.jsonl, sample tables, progress bars, and W&B."""

    jsonl: bool = True  # metrics.jsonl in the run dir, always on by default
    samples_every: int = 10  # a table of prompts/completions/votes every N steps (0 = never)
    # Size of that table: the first `samples_prompts` prompts of the step,
    # `samples_per_prompt` completions each (samples.jsonl and W&B).
    samples_prompts: int = 4
    # Completions shown per prompt in that table.
    samples_per_prompt: int = 4
    # Progress bars and per-step lines on stderr; false for quiet sweeps and CI.
    progress: bool = True
    # The metric `ttrl-train` returns at the end of a run (its last value):
    # what a Hydra sweeper such as Optuna (hydra/sweeper=optuna_lr_kl) optimises.
    objective: str = "reward/mean"
    wandb: WandbConfig = field(default_factory=WandbConfig)


@_rules(LoggerConfig)
def _check_logger(s: Section) -> None:
    s.at_least(0, "samples_every", why="0 is never")
    s.at_least(1, "samples_prompts", "samples_per_prompt")
    s.filled("objective")


# ── cluster ────────────────────────────────────────────────────────────────
@dataclass
class ClusterConfig:
    """Where the actors run: a local Ray cluster or one to join, GPU placement, SLURM sizes, and
    custom Ray resources to pin actors to nodes. One file per setting in conf/cluster/.
    """

    # null = start a local Ray cluster; "auto" or "host:port" = join one.
    address: Optional[str] = None
    # CPUs of the local Ray cluster a run starts; null = the CPUs this process may use (at
    # least what the actors need). Not read when joining a cluster.
    num_cpus: Optional[int] = None
    # GPUs of the local Ray cluster a run starts; null = what Ray detects. Not read when
    # joining a cluster.
    num_gpus: Optional[int] = None
    # colocate: engines and trainers share GPUs | split: separate GPUs
    placement: str = "colocate"
    # How many nodes the run spans, as its launcher reports it
    # (experiments/slurm/ray_multinode.sbatch): a record in config.yaml for comparing runs.
    # Ray places the actors on whatever nodes joined; nothing reads this to place them.
    nodes: int = 1
    # GPUs per node: cluster=slurm asks SLURM for this many per job
    # (hydra.launcher.gpus_per_node).
    gpus_per_node: int = 0
    # Seconds to wait for actors to be placed before naming what is missing.
    placement_timeout_s: float = 300.0
    # cluster=slurm: CPUs asked for each SLURM job (sbatch --cpus-per-task).
    cpus_per_node: int = 8
    # Custom Ray resources each trainer rank / rollout engine asks for, to pin
    # them to nodes started with `ray start --resources='{"trainer": 8}'`. In
    # YAML `trainer_resources: {trainer: 1}`; on the command line (a new key)
    # `+cluster.trainer_resources.trainer=1`. Empty: placed anywhere.
    trainer_resources: dict[str, float] = field(default_factory=dict)
    # The same for each rollout engine, e.g. {engine: 1}.
    engine_resources: dict[str, float] = field(default_factory=dict)


@_rules(ClusterConfig)
def _check_cluster(s: Section) -> None:
    s.require(s.address in (None, "auto", "local") or ":" in s.address,
              f"{s.key('address')}={s.address!r} must be null, 'auto' or 'host:port'.")
    s.at_least(1, "num_cpus", "nodes", "cpus_per_node")
    s.at_least(0, "num_gpus", "gpus_per_node")
    s.one_of("placement", ("colocate", "split"))
    s.above(0, "placement_timeout_s")
    for group in ("trainer_resources", "engine_resources"):
        for name, amount in getattr(s, group).items():
            s.require(name not in ("CPU", "GPU", "memory"),
                      f"{s.key(group)}.{name}: CPU, GPU and memory are set by the run itself; name a custom"
                      " resource of `ray start --resources` here.")
            s.require(amount > 0, f"{s.key(group)}.{name}={amount} must be > 0.")


# ── safety ─────────────────────────────────────────────────────────────────
@dataclass
class SafetyConfig:
    """Collapse detectors for label-free training (see ttrl/metrics/safety.py).

    Self-training can collapse: the majority ratio climbs to 1 while answers
    stop being right, or the policy's entropy collapses. Each threshold
    below is checked on a moving average over `window` steps; null disables it.
    """

    # warn: log an event | stop: end the run | rollback: reload the best
    # evaluated checkpoint and multiply the learning rate by lr_factor.
    action: str = "warn"
    # Steps in each moving average; a detector waits until its window is full.
    window: int = 3
    # Label-free vote signals (ttrl.metrics.safety.VoteTracker), on by default
    # in every run whose reward does not read the ground truth: the share of
    # confident votes (previous ratio >= flip_confident) that changed since the
    # prompt's last visit, and the share of revisited prompts whose vote
    # differs from their first (or anchor) one. Calibrated on the demo task
    # (docs/reliability.md, the guard's record): healthy runs peaked at 0.06 and 0.22 (3-step
    # averages; 0.12 drift on the grid's warm starts), collapsing ones reached
    # 0.51 and 0.81; a drift limit of 0.3 caught the old 1:1 warm start's
    # collapse at step 8, 0.25 at step 4.
    max_flip_rate: Optional[float] = 0.2
    # The limit of the second signal above, the share of revisited prompts whose
    # vote moved from their first (or anchor) vote.
    max_first_vote_drift: Optional[float] = 0.25
    # The same drift less what sampling alone would show (`label/excess_drift`:
    # each prompt's chance that a fresh vote of the unchanged policy elects
    # another winner, from its first or anchor vote's class sizes, subtracted).
    # For models whose votes split: on the hard bed (majority ratio 0.4) the
    # raw drift is 0.26 from sampling alone and any raw limit fires at once.
    # Null: off.
    max_excess_drift: Optional[float] = None
    # The flip rate less what sampling alone would show (`label/excess_flip_rate`:
    # over the confident prompts whose previous vote kept its class sizes, each
    # one's chance that a fresh vote of an unchanged policy elects another
    # winner, subtracted). Not calibrated: replayed on the hard bed's runs,
    # 0.10 fired on 11 of the 12 that gained (learning flips votes too). Null: off.
    max_excess_flip_rate: Optional[float] = None
    # The votes losing their consensus: the paired change of each revisited
    # prompt's majority ratio since its first (or anchor) vote, averaged over
    # the window, falling below minus this. Calibrated on the demo grid
    # (docs/reliability.md, the guard's record): healthy runs never averaged below -0.005, the
    # random-reward control fell through -0.03 by about step 11.
    max_consensus_drop: Optional[float] = 0.03
    # A reward that does not side with the vote: `label/vote_alignment` (of
    # the (agreeing, dissenting) sample pairs of a prompt, the share in which
    # the reward pays the sample that agrees with the prompt's vote; 1 for
    # majority vote, 0.5 for a reward blind to the vote such as the random
    # control) averaged over the window, falling below this. Calibrated on
    # the demo (docs/reliability.md, the guard's record): token entropy and self-certainty, which
    # collapse there, averaged 0.43-0.52 from step 3; trajectory log-prob,
    # which learns, 0.97-0.99. On a task whose starting votes are mostly
    # wrong a good judge pays dissenters often: lower it or set null there.
    min_vote_alignment: Optional[float] = 0.55
    # A vote counts as confident (for the flip rate) when its previous majority ratio
    # was at least this.
    flip_confident: float = 0.5
    # Before the first step, vote on this many prompts (n_votes samples each,
    # the rollout's sampling) with the starting policy, so vote drift is
    # measured from step 1 rather than from each prompt's first revisit.
    # 0: no anchor pass; the drift starts at the first revisit.
    anchor_prompts: int = 0
    # Policy entropy (train/entropy) averaging below this: the policy stopped exploring.
    min_entropy: Optional[float] = None
    # Majority ratio averaging above this: everything agrees, right or not.
    max_majority_ratio: Optional[float] = None
    # Mean response length leaving [min, max] tokens.
    min_response_length: Optional[float] = None
    # The upper bound of the length band above.
    max_response_length: Optional[float] = None
    # eval/pass@1 falling this far (absolute) below the best seen so far.
    max_eval_drop: Optional[float] = None
    # rollback: the k-th rollback multiplies the learning rate by lr_factor ** k, after reloading the weights.
    lr_factor: float = 0.5
    # rollback: once this many are done, the next collapse restores the rollback target and stops the run.
    max_rollbacks: int = 2


@_rules(SafetyConfig)
def _check_safety(s: Section) -> None:
    s.one_of("action", ("warn", "stop", "rollback"))
    s.at_least(1, "window")
    s.share("max_flip_rate", "max_first_vote_drift", "max_excess_drift", "max_excess_flip_rate", "flip_confident",
            why="a share of prompts")
    s.share("min_vote_alignment", why="a share of sample pairs")
    s.share("max_majority_ratio", "max_eval_drop", "max_consensus_drop")
    s.at_least(0, "anchor_prompts", why="0 is no anchor pass")
    s.at_least(0, "min_entropy", "min_response_length", "max_response_length", "max_rollbacks")
    lo, hi = s.min_response_length, s.max_response_length
    s.require(lo is None or hi is None or lo <= hi,
              f"{s.key('min_response_length')}={lo} must not exceed {s.key('max_response_length')}={hi}.")
    s.within(0, 1, "lr_factor", low_open=True)


@dataclass
class FaultConfig:
    """Deliberate faults, for testing the guards above; leave empty in real runs."""

    # Steps whose loss is made NaN on purpose, to show the update is skipped and the
    # run stops after trainer.max_skipped_steps in a row.
    nan_loss_at_steps: list[int] = field(default_factory=list)


@_rules(FaultConfig)
def _check_faults(s: Section) -> None:
    s.require(all(step >= 1 for step in s.nan_loss_at_steps),
              f"{s.key('nan_loss_at_steps')}={_show(s.nan_loss_at_steps)} must list steps >= 1.")


# ── ser.rm: the reward model that SER trains ──────────────────────────────
@dataclass
class SERRewardModelConfig:
    """The reward model's trainer (ser.rm.*): the policy trainer's knobs, for the RM's own DeepSpeed ranks.

    A section of its own rather than rm_-prefixed keys in ser, so the names
    match trainer.* (ser.rm.lr beside trainer.lr) and a misspelt one gets the
    same did-you-mean as any other key.
    """

    # null: the policy's model (model.path) is the RM's backbone
    path: Optional[str] = None
    # With model=tiny_arith and no ser.rm.path: the RM's backbone is the demo's
    # warm-start recipe run for this many steps instead of model.warmstart.steps
    # (built and cached like the policy's): a weaker judge than the policy.
    warmstart_steps: Optional[int] = None
    # scalar: a linear head on the last token's hidden state (the usual RM) |
    # likelihood: the score is the backbone's own log-likelihood of the response
    # (sum over its tokens), scaled and offset once from the seed data so that
    # sigmoid(score) is a usable probability; the whole LM is then trained by the
    # same loss. A backbone that already ranks answers by likelihood starts as a
    # judge instead of relearning judgement through a fresh head.
    head: str = "scalar"
    # The RM's input text: {q} is the prompt, {a} the response.
    template: str = "Question: {q}\n\nAnswer: {a}"
    # Longest RM input in tokens; longer ones lose their beginning (the answer is at the end).
    max_length: int = 1024
    # End each input with the EOS token, where the scalar head reads (for tokenizers that
    # add none).
    append_eos: bool = False
    # DeepSpeed ranks of the RM trainer.
    num_workers: int = 1
    # DeepSpeed ZeRO stage of the RM trainer.
    zero_stage: int = 2
    # Peak learning rate of the RM.
    lr: float = 1e-5
    # cosine | constant | linear, as trainer.lr_schedule.
    lr_schedule: str = "cosine"
    # Warm-up as a share of the RM's optimizer steps.
    warmup_ratio: float = 0.03
    # AdamW's weight decay for the RM.
    weight_decay: float = 0.0
    # Gradient-norm clip for the RM (0 = none).
    grad_clip: float = 1.0
    # Passes over each round's training data.
    epochs: int = 1
    # At least this many optimizer steps per round (small seed sets run more epochs).
    min_steps: int = 0
    batch_size: int = 32  # pairs (or items) per optimizer step
    micro_batch_size: int = 8  # per rank and forward pass
    # Pairwise: adds center_coef * (r_chosen + r_rejected)^2 per pair, which keeps the
    # scores centred on 0 (Bradley-Terry only sees their difference).
    center_coef: float = 0.01
    # Keep the RM's optimizer states in CPU memory.
    offload: bool = False
    # Recompute the RM's activations in the backward pass (less memory).
    gradient_checkpointing: bool = False
    # added to the run's seed
    seed: int = 0


@_rules(SERRewardModelConfig)
def _check_ser_rm(s: Section) -> None:
    s.filled("path")
    s.one_of("head", ("scalar", "likelihood"))
    s.require(s.warmstart_steps is None or s.warmstart_steps >= 1,
              f"{s.key('warmstart_steps')}={_show(s.warmstart_steps)} must be >= 1 (or null: the policy's model).")
    s.require("{a}" in s.template,
              f"{s.key('template')} must contain '{{a}}' (the response; '{{q}}' is the prompt).")
    s.at_least(1, "max_length", "num_workers", "epochs", "batch_size", "micro_batch_size")
    s.one_of("zero_stage", (0, 1, 2, 3))
    s.require(s.batch_size % (s.num_workers * s.micro_batch_size) == 0,
              f"{s.key('batch_size')}={s.batch_size} must be divisible by"
              f" {s.key('num_workers')}*{s.key('micro_batch_size')}"
              f"={s.num_workers * s.micro_batch_size} (each rank takes whole micro-batches).")
    s.above(0, "lr")
    s.one_of("lr_schedule", _LR_SCHEDULES)
    s.within(0, 1, "warmup_ratio", high_open=True)
    s.at_least(0, "weight_decay", "grad_clip", "center_coef", "min_steps", "seed")


# ── ser ────────────────────────────────────────────────────────────────────
@dataclass
class SERConfig:
    """Self-Evolved Reward learning (SER, arXiv 2411.00418), run by ttrl/ser/.

    A reward model (RM) is trained on `seed_fraction` of the labelled data,
    labels the rest itself (kept only where its learning status says it is
    sure: `high`/`low`, `min_gap`), and is retrained on seed + kept data,
    round after round. With `then_policy`, `ttrl-train` then trains the
    policy against it (`reward=reward_model reward.path=ser`).
    """

    # Run SER first: train the reward model, round after round, before any policy step.
    enabled: bool = False
    # pairwise: preference pairs, Bradley-Terry loss | pointwise: one
    # response correct or not (verifiable tasks), binary cross-entropy.
    mode: str = "pairwise"
    # After SER, train the policy against its RM (needs reward=reward_model
    # reward.path=ser); false runs SER alone.
    then_policy: bool = True
    # ── data: synthetic (the arithmetic preference task) | jsonl | hf
    # Where the labelled data comes from: synthetic (the arithmetic preference task), jsonl (a
    # local file), hf (a hub dataset).
    source: str = "synthetic"
    preset: str = "synthetic"  # a name for logs (conf/ser/<preset>.yaml)
    # source=jsonl: the file of pairs (or pointwise rows): .jsonl, .json or .parquet.
    local_path: Optional[str] = None
    # source=jsonl: a file of held-out rows; null = eval_fraction of local_path.
    eval_path: Optional[str] = None
    # source=hf: the dataset id.
    hf_name: Optional[str] = None
    # source=hf: the dataset's configuration name.
    hf_subset: Optional[str] = None
    # source=hf: a data dir inside the dataset repo.
    hf_data_dir: Optional[str] = None
    # source=hf: the training split.
    hf_split: str = "train"
    # source=hf: the held-out split; null = eval_fraction of the training split.
    eval_split: Optional[str] = None
    # Held-out share when no eval split/file is given.
    eval_fraction: float = 0.1
    # Keep only the first this many rows (null: all).
    limit: Optional[int] = None
    # null: chosen/rejected are whole conversations split at `prompt_marker`.
    prompt_key: Optional[str] = "prompt"
    # The field holding the preferred response (or whole conversation).
    chosen_key: str = "chosen"
    # The field holding the dispreferred one.
    rejected_key: str = "rejected"
    # With prompt_key null: the prompt is everything up to and including the last
    # occurrence of this marker, which both responses must share.
    prompt_marker: Optional[str] = None
    # pointwise files: one graded response per row (problem: ser.prompt_key, default "problem")
    response_key: str = "response"
    # pointwise files: the field telling whether the response is correct.
    answer_key: str = "answer"
    # source=synthetic: training pairs (pointwise: problems).
    synthetic_num_pairs: int = 2000
    # source=synthetic: held-out pairs, which pick SER's best round.
    synthetic_num_eval: int = 500
    # Test pairs, apart from the held-out ones that pick the best round (0 = none).
    synthetic_num_test: int = 0
    # source=synthetic: numbers in each sum.
    synthetic_terms: int = 3
    # source=synthetic: digits of each number.
    synthetic_digits: int = 2
    # source=synthetic: seed of the problems and of the wrong answers.
    synthetic_seed: int = 7
    # boxed: "\\boxed{97}" | worked: "37+48=85,85+12=97 \\boxed{97}" (match what the model writes)
    synthetic_style: str = "boxed"
    # pointwise: responses per problem of the synthetic task
    synthetic_per_problem: int = 2
    # ── the loop
    # Share of the training data whose labels the seed RM is trained on (round 0); the
    # rest is labelled by the RM itself.
    seed_fraction: float = 0.15
    # Status 1 (sure of both): one response with sigmoid(score) above high, the other below low.
    high: float = 0.55
    # The lower threshold of status 1.
    low: float = 0.45
    # Status 2 (sure of the difference): the two probabilities differ by more than this.
    min_gap: float = 0.3
    # Keep status-2 pairs too (pairwise only); false keeps status 1 alone.
    use_status2: bool = True
    # Self-labelling rounds after the seed RM (0 = the seed RM only).
    max_rounds: int = 3
    # Stop after this many rounds without a better held-out accuracy.
    patience: int = 1
    # true: each round retrains from the backbone; false: continues from the last RM.
    reinit_each_round: bool = True
    # ── the reward model's trainer: ser.rm.lr, ser.rm.path, ... (SERRewardModelConfig)
    rm: SERRewardModelConfig = field(default_factory=SERRewardModelConfig)
    # Items per forward pass when the RM scores the unlabelled data.
    score_batch_size: int = 64
    # Train LoRA adapters instead of the whole RM (ser.lora.enabled=true; saves memory on big backbones).
    # The policy's schema (model.lora); ser.lora.path is not read here.
    lora: LoraConfig = field(default_factory=LoraConfig)
    # What reward=reward_model returns: raw | sigmoid; null = raw (pairwise), sigmoid (pointwise).
    reward_transform: Optional[str] = None


@_rules(SERConfig)
def _check_ser(s: Section) -> None:
    # ── data
    s.one_of("mode", ("pairwise", "pointwise"))
    s.one_of("source", ("synthetic", "jsonl", "hf"))
    s.require(s.source != "jsonl" or bool(s.local_path),
              f"{s.key('source')}=jsonl needs {s.key('local_path')} (a .jsonl/.json/.parquet file of preference"
              " pairs).")
    s.require(s.source != "hf" or bool(s.hf_name), f"{s.key('source')}=hf needs {s.key('hf_name')} (a Hugging Face"
                                                   " dataset).")
    s.require(not (s.mode == "pointwise" and s.source == "hf"),
              f"{s.key('mode')}=pointwise reads the synthetic task or a JSON Lines file of graded responses"
              f" ({s.key('source')}=synthetic or jsonl), not a hub dataset.")
    s.filled("preset", "local_path", "eval_path", "hf_name", "hf_subset", "hf_data_dir", "hf_split", "eval_split",
             "prompt_key", "chosen_key", "rejected_key", "prompt_marker", "response_key", "answer_key")
    s.within(0, 1, "eval_fraction", high_open=True)
    s.at_least(1, "limit", "synthetic_num_pairs", "synthetic_num_eval", "synthetic_terms", "synthetic_digits",
               "synthetic_per_problem")
    s.at_least(0, "synthetic_num_test", "synthetic_seed")
    s.one_of("synthetic_style", ("boxed", "worked"))
    # ── the loop
    s.within(0, 1, "seed_fraction", low_open=True)
    s.require(0 <= s.low <= s.high <= 1,
              f"{s.key('low')}={s.low} and {s.key('high')}={s.high} must satisfy 0 <= low <= high <= 1.")
    s.within(0, 1, "min_gap", high_open=True, why="it bounds |p_a - p_b| of two probabilities")
    s.at_least(0, "max_rounds")
    s.at_least(1, "patience")
    s.at_least(1, "score_batch_size")
    s.require(s.lora.path is None, f"{s.key('lora.path')} is not read: SER trains its reward model's adapters"
                                   " from scratch each round.")
    s.require(s.reward_transform in (None, "raw", "sigmoid"),
              f"{s.key('reward_transform')}={s.reward_transform!r} must be raw, sigmoid or null.")


# ── root ───────────────────────────────────────────────────────────────────
@dataclass
class TTRLConfig:
    """The whole config of `ttrl-train` and `ttrl-eval` (conf/config.yaml composes it).

    Sections follow the data flow of a step: model, data, rollout, label, reward, algorithm,
    trainer; then eval, logger, cluster, the collapse guard (safety), test faults and SER.
    `ttrl-train --cfg job` prints it composed; each run dir keeps it resolved in config.yaml.
    """

    # The run's seed: prompt order, torch, the engines' sampling (plus rollout.seed), the random
    # reward (unless reward.seed), SER's splits (the RM's init adds ser.rm.seed).
    seed: int = 0
    # The experiment's name: the run dir (outputs/<experiment>/<time>), the W&B name, group
    # and tags. Each conf/experiment/ file sets its own.
    experiment: str = "default"
    device: str = "auto"  # auto | cpu | cuda
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    label: LabelConfig = field(default_factory=LabelConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    safety: SafetyConfig = field(default_factory=SafetyConfig)
    faults: FaultConfig = field(default_factory=FaultConfig)
    ser: SERConfig = field(default_factory=SERConfig)


@_rules(TTRLConfig)
def _check_root(s: Section) -> None:
    s.at_least(0, "seed")
    s.one_of("device", ("auto", "cpu", "cuda"))


def register_configs() -> None:
    """Put the schema into Hydra's ConfigStore (conf/config.yaml extends it)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="ttrl_schema", node=TTRLConfig)


# ── validation ─────────────────────────────────────────────────────────────
def validate(cfg: DictConfig | TTRLConfig) -> None:
    """Check a whole config; raise ConfigError naming the first bad key.

    In order: keys left at ???, values of the wrong type and keys the schema
    does not know (every section), then each section's rules, and last the
    rules across sections. Works on a composed DictConfig and on a
    TTRLConfig instance (whose types nothing else has checked).
    """
    schema = _root_schema(cfg)
    if isinstance(cfg, DictConfig):
        # One resolving pass, then plain Python values: reading a DictConfig
        # key by key costs more than everything else here together.
        try:
            plain = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
        except OmegaConfBaseException as err:  # an interpolation that does not resolve
            raise ConfigError(f"{getattr(err, 'full_key', '') or 'the config'} cannot be resolved:"
                              f" {str(err).splitlines()[0]}.") from None
        cfg = _Keys(plain, schema)  # type: ignore[assignment]
    _check_types(cfg, schema, "")
    _check_rules(cfg, schema, "")
    _check_across(cfg)


def _check_across(c: Any) -> None:
    """The rules that tie sections together; each sentence names every key involved."""

    def require(ok: bool, sentence: str) -> None:
        if not ok:
            raise ConfigError(sentence)

    m, d, r, a, t, e = c.model, c.data, c.rollout, c.algorithm, c.trainer, c.eval
    require(m.max_model_len > r.max_new_tokens,
            f"model.max_model_len={m.max_model_len} must exceed rollout.max_new_tokens={r.max_new_tokens}"
            " to leave room for the prompt.")
    require(e.max_new_tokens is None or e.max_new_tokens < m.max_model_len,
            f"eval.max_new_tokens={e.max_new_tokens} must be below model.max_model_len={m.max_model_len}"
            " to leave room for the prompt.")
    require(r.weight_sync != "nccl" or (c.device != "cpu" and c.cluster.placement == "split"),
            "rollout.weight_sync=nccl needs a GPU run with cluster.placement=split: NCCL cannot put"
            " trainer rank 0 and an engine worker on the same GPU.")
    require(r.weight_sync != "ipc" or (c.cluster.placement == "colocate" and r.num_engines <= t.num_workers),
            f"rollout.weight_sync=ipc needs cluster.placement=colocate and rollout.num_engines={r.num_engines} <= "
            f"trainer.num_workers={t.num_workers}: engine i takes its weights from trainer rank i on its device.")
    require(a.advantage != "rloo" or r.n_train >= 2,
            "algorithm.advantage=rloo needs rollout.n_train >= 2 (it subtracts the mean of the other samples).")
    # Multiple-choice answers are letters: another extractor reads none, so every vote would come out empty.
    lettered = d.choices.correct_key is not None or (d.name == "synthetic_choice" and d.local_path is None)
    require(not lettered or c.label.extractor in ("choice", "custom"),
            f"label.extractor={c.label.extractor} cannot read the letter answers of data.name={d.name}"
            " (multiple choice): add label.extractor=choice.")

    step_batch = d.prompts_per_step * r.n_train
    mini = t.mini_batch_size or step_batch
    require(step_batch % mini == 0,
            f"trainer.mini_batch_size={mini} must divide the step batch"
            f" data.prompts_per_step*rollout.n_train={step_batch}.")
    require(mini % t.num_workers == 0,
            f"the mini-batch of {mini} samples must be divisible by trainer.num_workers={t.num_workers}"
            " (each rank takes an equal share).")
    require((mini // t.num_workers) % t.micro_batch_size == 0,
            f"trainer.micro_batch_size={t.micro_batch_size} must divide the per-rank mini-batch of"
            f" {mini // t.num_workers} samples.")

    sf = c.safety
    require(not (sf.action == "rollback" and sf.max_eval_drop is not None)
            or bool(t.save_every and e.every_n_steps),
            "safety.action=rollback with safety.max_eval_drop needs trainer.save_every > 0 and"
            " eval.every_n_steps > 0 (it rolls back to the best evaluated checkpoint).")

    se, rw = c.ser, c.reward
    require(se.rm.warmstart_steps is None or (c.model.path == "tiny-arith" and se.rm.path is None),
            f"ser.rm.warmstart_steps={se.rm.warmstart_steps} builds the RM's backbone from the tiny-arith warm start:"
            f" it needs model=tiny_arith (model.path is {c.model.path}) and no ser.rm.path"
            f"{'' if se.rm.path is None else ' (it is ' + str(se.rm.path) + ')'}.")
    require(not (se.enabled and se.then_policy) or (rw.name == "reward_model" and rw.path == "ser"),
            f"ser.enabled=true trains a reward model and then (ser.then_policy=true) the policy, but the policy"
            f" stage would use reward={rw.name}{'' if rw.name != 'reward_model' else ' from ' + str(rw.path)}, not"
            " it: add reward=reward_model reward.path=ser, or ser.then_policy=false to run SER alone.")
    # With ser.then_policy=false no policy runs, so reward.path=ser names nothing and harms nothing:
    # `experiment=ser_demo ser.then_policy=false` trains the RM alone without a reward override.
    require(not (rw.name == "reward_model" and rw.path == "ser") or bool(se.enabled),
            "reward.path=ser means the reward model that this run's SER stage trains: set ser.enabled=true"
            " (and ser.then_policy=true), or point reward.path to a reward model dir.")


# ── validation machinery: schema walk and type checks ─────────────────────
def _root_schema(cfg: Any) -> type:
    """The dataclass a config follows (TTRLConfig, or a subclass such as ttrl-serve's)."""
    kind = type(cfg) if is_dataclass(cfg) else OmegaConf.get_type(cfg)
    return kind if isinstance(kind, type) and issubclass(kind, TTRLConfig) else TTRLConfig


_hint_cache: dict[type, dict[str, Any]] = {}


def _hints(schema: type) -> dict[str, Any]:
    """Field name -> type annotation, in declaration order (base classes first)."""
    if schema not in _hint_cache:
        hints = typing.get_type_hints(schema)
        _hint_cache[schema] = {f.name: hints[f.name] for f in fields(schema)}
    return _hint_cache[schema]


def _optional(hint: Any) -> Any:
    """X for Optional[X], else None."""
    if typing.get_origin(hint) is Union:
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(inner) == 1 and len(typing.get_args(hint)) == 2:
            return inner[0]
    return None


class _Keys:
    """A section of a resolved DictConfig (a plain dict) read by attribute, like a dataclass instance."""

    __slots__ = ("_data", "_schema")

    def __init__(self, data: dict[str, Any], schema: type):
        self._data, self._schema = data, schema

    def __getattr__(self, name: str) -> Any:
        try:
            value = self._data[name]
        except KeyError:
            raise AttributeError(name) from None
        hint = _hints(self._schema).get(name)
        return _Keys(value, hint) if is_dataclass(hint) and isinstance(value, dict) else value

    def keys(self) -> Iterable[str]:
        return self._data.keys()


def _sections(node: Any, schema: type, path: str) -> Iterable[tuple[Any, type, str]]:
    """This section and every section below it: (node, dataclass, dotted path)."""
    yield node, schema, path
    for name, hint in _hints(schema).items():
        if is_dataclass(hint):
            key = f"{path}.{name}" if path else name
            yield from _sections(getattr(node, name), hint, key)


_NOUNS = {bool: "true or false", int: "a whole number", float: "a finite number", str: "a string"}
_PLURALS = {bool: "booleans", int: "whole numbers", float: "finite numbers", str: "strings"}


def _fits(value: Any, hint: Any) -> bool:
    """Whether `value` has the annotated type (floats finite, ints not bools)."""
    inner = _optional(hint)
    if inner is not None:
        return value is None or _fits(value, inner)
    if hint is Any:
        return True
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if hint is str:
        return isinstance(value, str)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is list:
        return isinstance(value, (list, tuple, ListConfig)) and all(_fits(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, (dict, DictConfig)) and all(
            isinstance(k, str) and _fits(v, args[1]) for k, v in value.items())
    return True


def _type_noun(hint: Any) -> str:
    inner = _optional(hint)
    if inner is not None:
        return f"{_type_noun(inner)} or null"
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is list:
        return f"a list of {_PLURALS.get(args[0], 'values')}"
    if origin is dict:
        return f"a mapping of names to {_PLURALS.get(args[1], 'values')}"
    return _NOUNS.get(hint, "a value of the right type")


def _check_types(node: Any, schema: type, path: str) -> None:
    """Unknown keys and values of the wrong type, in this section and below."""
    for sub, sub_schema, sub_path in _sections(node, schema, path):
        hints = _hints(sub_schema)
        where = sub_path or "the config"
        if not (is_dataclass(sub) or isinstance(sub, _Keys)):
            switched = switched_key(sub_schema, sub)
            if switched:
                raise ConfigError(f"{where}={_show(sub)} is {where}.{switched}={_show(sub)} now ({where} is a section).")
            raise ConfigError(f"{where} must be a section of keys, not {_show(sub)}.")
        if isinstance(sub, _Keys):
            for name in sub.keys():
                if name not in hints:
                    key = f"{sub_path}.{name}" if sub_path else str(name)
                    moved = moved_key(sub_schema, sub_path, name)
                    hint = f"; it is {moved} now." if moved else did_you_mean(name, hints) or "."
                    raise ConfigError(f"{key} is not a known key of {where}{hint}")
        for name, hint in hints.items():
            key = f"{sub_path}.{name}" if sub_path else name
            if isinstance(sub, _Keys) and name not in sub.keys():
                raise ConfigError(f"{key} is missing from {where}.")
            if is_dataclass(hint):
                continue
            value = getattr(sub, name)
            if isinstance(value, str) and value == MISSING:
                raise ConfigError(f"{key} must be set (it is ??? in the config).")
            if not _fits(value, hint):
                raise ConfigError(f"{key}={_show(value)} must be {_type_noun(hint)}.")


def moved_key(schema: type, path: str, name: str) -> str | None:
    """The nested key an unknown flat one now lives at (ser.rm_lr -> ser.rm.lr), or None.

    Keys that once carried their section's name as a prefix (ser.rm_lr) moved
    into that section (ser.rm.lr); an old command line or YAML file should be
    told the new name, not a look-alike key of the old section. Shared by
    validate() and ttrl.cli, whose unknown-key sentences both use it.
    """
    for sub, hint in _hints(schema).items():
        rest = name[len(sub) + 1:]
        if is_dataclass(hint) and name.startswith(f"{sub}_") and rest in _hints(hint):
            return ".".join(p for p in (path, sub, rest) if p)
    return None


def switched_key(section: Any, value: Any) -> str | None:
    """The flag a true/false given for a whole section now lives at ('enabled' for ser.lora=true), or None.

    A key that was a switch (ser.lora: bool) became a section with the
    switch inside it (ser.lora.enabled); the old command line should be told
    the new name, not that a bool is not a section. Shared by validate() and
    ttrl.cli.
    """
    hints = _hints(section) if isinstance(section, type) and is_dataclass(section) else {}
    return "enabled" if isinstance(value, bool) and hints.get("enabled") is bool else None


def _check_rules(node: Any, schema: type, path: str) -> None:
    for sub, sub_schema, sub_path in _sections(node, schema, path):
        check = _RULES.get(sub_schema)
        if check is not None:
            check(Section(sub, sub_path, sub_schema))


def to_container(cfg: DictConfig) -> dict:
    """A plain, resolved dict of the config (for run dirs and W&B)."""
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


__all__ = [
    "MISSING",
    "ConfigError",
    "TTRLConfig",
    "register_configs",
    "validate",
    "moved_key",
    "switched_key",
    "to_container",
]
