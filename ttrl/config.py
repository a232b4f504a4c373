"""Structured configs (the schema behind conf/) and their validation.

Hydra composes YAML from conf/ on top of these dataclasses, so a misspelt key
or a wrong type fails at composition time with the full key named. What a
type cannot express (n_train <= n_votes, batch sizes that divide evenly, ...)
is checked by `validate`, which runs before any actor starts and raises one
`ConfigError` whose message is a single sentence naming the key.

This module must never import torch, ray, vllm or deepspeed: validating a
config has to be instant and work on a machine without them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import MISSING, DictConfig, OmegaConf


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key."""


# ── model ──────────────────────────────────────────────────────────────────
@dataclass
class TinyModelConfig:
    """Shape of the randomly initialised tiny Qwen2 built by `model=tiny`."""

    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 2
    head_dim: int = 64  # vLLM's CPU attention needs head_dim >= 32
    intermediate_size: int = 512
    seed: int = 0


@dataclass
class WarmStartConfig:
    """How `model.path=tiny-arith` is trained from scratch on the easy arithmetic split.

    Everything here (and model.tiny, data.synthetic) names the cached build:
    change a number and a new model is trained; keep them and it is reused.
    """

    steps: int = 500
    lr: float = 1e-3
    # Cosine decay from lr to lr * min_lr_ratio over `steps`.
    min_lr_ratio: float = 0.1
    batch_size: int = 256
    # Share of 2-number sums in the easy split (the rest have data.synthetic.terms numbers).
    short_share: float = 0.5
    # The careless teacher: chance that each step of a worked solution is off (by 10 or by 1).
    # This is what makes the demo work: the model learns a random slip, so one
    # sample is often wrong while the majority of 16 is usually right.
    slip: float = 0.2
    seed: int = 0


@dataclass
class ModelConfig:
    name: str = "tiny"
    # A Hugging Face model id or local dir; "tiny" builds the random tiny
    # model, "tiny-arith" the tiny model warm-started on the arithmetic task.
    path: str = "tiny"
    tokenizer_path: Optional[str] = None
    # How a problem becomes a prompt: "plain" (the template below) or "chat"
    # (the tokenizer's chat template with `system_prompt`).
    template: str = "plain"
    prompt_template: str = "{problem}"
    system_prompt: Optional[str] = None
    # "auto" = bfloat16 on GPU, float32 on CPU.
    dtype: str = "auto"
    max_model_len: int = 1024
    trust_remote_code: bool = False
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    warmstart: WarmStartConfig = field(default_factory=WarmStartConfig)


# ── data ───────────────────────────────────────────────────────────────────
@dataclass
class SyntheticDataConfig:
    """The built-in arithmetic task (sums of `terms` numbers of `digits` digits)."""

    num_problems: int = 256
    terms: int = 3
    digits: int = 2
    seed: int = 1234


@dataclass
class DataConfig:
    # "synthetic", "jsonl" or a benchmark name (aime24, amc, math500, ...).
    name: str = "synthetic"
    hf_name: Optional[str] = None
    hf_subset: Optional[str] = None
    hf_split: str = "test"
    # A local .jsonl/.json/.parquet file that replaces the hub download.
    local_path: Optional[str] = None
    id_key: str = "id"
    problem_key: str = "problem"
    answer_key: str = "answer"
    limit: Optional[int] = None
    prompts_per_step: int = 8
    shuffle: bool = True
    synthetic: SyntheticDataConfig = field(default_factory=SyntheticDataConfig)


# ── rollout ────────────────────────────────────────────────────────────────
@dataclass
class RolloutConfig:
    n_votes: int = 64  # samples per prompt for the majority vote
    n_train: int = 32  # of which this many are kept for the update
    # "first" keeps the first n_train (the official TTRL code), "random" draws.
    subsample: str = "first"
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 3072
    num_engines: int = 1
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.5
    # KV cache size for vLLM's CPU backend, in GiB.
    cpu_kv_cache_gb: float = 1.0
    # Torch threads of each engine on CPU. null = the usable CPUs shared among
    # the engines (in the synchronous loop the trainer ranks sit idle while
    # the engines generate, so Ray's one thread per actor would leave cores
    # unused); with overlap, only the CPUs the trainer ranks leave.
    cpu_threads: Optional[int] = None
    enable_prefix_caching: bool = True
    # null = decide by device (eager on CPU, CUDA graphs on GPU).
    enforce_eager: Optional[bool] = None
    # Release the KV cache while training when engines share GPUs with it.
    sleep_between_steps: bool = False
    seed: int = 0
    # Generate step k+1 while step k trains (one step off-policy): the
    # stale samples are reweighted by min(pi_old/pi_behaviour, tis_cap).
    overlap: bool = False
    tis_cap: Optional[float] = 2.0
    # A rollout engine that dies is restarted by Ray, re-synced with the
    # current weights, and the generation retried up to this many times.
    max_retries: int = 2
    # How new weights reach the engines: "ray" (packed bytes through the
    # object store; works everywhere), "nccl" (broadcast from trainer rank 0's
    # GPU; needs cluster.placement=split), "auto" (nccl where it can, else ray).
    weight_sync: str = "auto"
    # Upper bound of one weight bucket (one NCCL broadcast / one Ray blob), MiB.
    sync_bucket_mb: int = 256


# ── label ──────────────────────────────────────────────────────────────────
@dataclass
class LabelConfig:
    # How a sample's answer is pulled out of its text.
    extractor: str = "boxed"
    # Upper bound on one math-verify equivalence check, in seconds.
    grade_timeout_s: float = 5.0


# ── reward ─────────────────────────────────────────────────────────────────
@dataclass
class RewardConfig:
    # majority_vote (label-free) | ground_truth (oracle) | custom | reward_model | random (control)
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
    seed: Optional[int] = None


# ── algorithm ──────────────────────────────────────────────────────────────
@dataclass
class AlgorithmConfig:
    name: str = "grpo"
    # grpo | dr_grpo | rloo | reinforce_pp | gae
    advantage: str = "grpo"
    use_critic: bool = False
    gamma: float = 1.0
    lam: float = 1.0
    policy_loss: str = "ppo_clip"
    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: Optional[float] = None
    # token_mean | seq_mean_token_sum | seq_mean_token_mean
    loss_agg: str = "token_mean"
    # KL to the reference policy: as a loss term or as a per-token reward penalty.
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    kl_in_reward: bool = False
    entropy_coef: float = 0.0
    # Passes over each batch of rollouts.
    ppo_epochs: int = 1
    # Critic (PPO only).
    value_clip: float = 0.2
    critic_lr: float = 1e-5


# ── trainer ────────────────────────────────────────────────────────────────
@dataclass
class TrainerConfig:
    total_steps: Optional[int] = None
    # Passes over the data; used when total_steps is null.
    episodes: int = 1
    save_every: int = 0  # 0 = only at the end
    keep_last: int = 2
    # auto (newest checkpoint in the run dir) | none | a checkpoint path
    resume: str = "auto"
    num_workers: int = 1  # DeepSpeed ranks of the policy
    zero_stage: int = 3
    lr: float = 5e-7
    lr_schedule: str = "cosine"  # cosine | constant | linear
    warmup_steps: int = 0
    # Warmup as a share of all optimizer steps; used when warmup_steps is 0.
    warmup_ratio: Optional[float] = None
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    grad_clip: float = 1.0
    # Samples per optimizer step (rollouts of a step split into mini-batches);
    # null = the whole step's batch is one mini-batch.
    mini_batch_size: Optional[int] = None
    micro_batch_size: int = 4  # samples per forward/backward, per rank
    offload: bool = False
    gradient_checkpointing: bool = False
    dtype: str = "auto"
    # A non-finite loss or gradient norm skips the update; this many skips in
    # a row stop the run (the last checkpoint stays intact).
    max_skipped_steps: int = 3


# ── eval ───────────────────────────────────────────────────────────────────
@dataclass
class EvalConfig:
    every_n_steps: int = 0  # 0 = never during training
    at_start: bool = False
    at_end: bool = False
    n_samples: int = 16
    temperature: float = 0.6
    top_p: float = 0.95
    max_new_tokens: Optional[int] = None  # null = rollout.max_new_tokens
    ks: list[int] = field(default_factory=lambda: [1, 16])
    greedy: bool = False
    # `ttrl-eval` only: a checkpoint or model dir that replaces model.path.
    checkpoint: Optional[str] = None


# ── logger ─────────────────────────────────────────────────────────────────
@dataclass
class WandbConfig:
    enabled: bool = False
    project: str = "ttrl"
    entity: Optional[str] = None
    # null: the jobs of one `-m` sweep share "<experiment>/<sweep dir name>"
    # (PPO, GRPO and SER runs of a sweep line up); a single run has no group.
    group: Optional[str] = None
    tags: list[str] = field(default_factory=list)
    # null: "<experiment>/<the job's overrides>", e.g. "debug/algorithm=ppo,seed=1".
    name: Optional[str] = None
    mode: str = "offline"  # online | offline | disabled
    notes: Optional[str] = None


@dataclass
class LoggerConfig:
    jsonl: bool = True  # metrics.jsonl in the run dir, always on by default
    samples_every: int = 10  # a table of prompts/completions/votes every N steps (0 = never)
    # Size of that table: the first `samples_prompts` prompts of the step,
    # `samples_per_prompt` completions each (samples.jsonl and W&B).
    samples_prompts: int = 4
    samples_per_prompt: int = 4
    progress: bool = True
    # The metric `ttrl-train` returns at the end of a run (its last value):
    # what a Hydra sweeper such as Optuna (hydra/sweeper=optuna_lr_kl) optimises.
    objective: str = "reward/mean"
    wandb: WandbConfig = field(default_factory=WandbConfig)


# ── cluster ────────────────────────────────────────────────────────────────
@dataclass
class ClusterConfig:
    # null = start a local Ray cluster; "auto" or "host:port" = join one.
    address: Optional[str] = None
    num_cpus: Optional[int] = None
    num_gpus: Optional[int] = None
    # colocate: engines and trainers share GPUs | split: separate GPUs
    placement: str = "colocate"
    nodes: int = 1
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
    engine_resources: dict[str, float] = field(default_factory=dict)


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
    window: int = 3
    # Label-free vote signals (ttrl.metrics.safety.VoteTracker), on by default
    # in every run whose reward does not read the ground truth: the share of
    # confident votes (previous ratio >= flip_confident) that changed since the
    # prompt's last visit, and the share of revisited prompts whose vote
    # differs from their first (or anchor) one. Calibrated on the demo task:
    # healthy runs peaked at 0.06 and 0.22 (3-step averages), a collapsing run
    # reached 0.51 and 0.81 (README, Reliability).
    max_flip_rate: Optional[float] = 0.2
    max_first_vote_drift: Optional[float] = 0.3
    flip_confident: float = 0.5
    # Before the first step, vote on this many prompts (n_votes samples each,
    # the rollout's sampling) with the starting policy, so vote drift is
    # measured from step 1 rather than from each prompt's first revisit.
    # 0: no anchor pass; the drift starts at the first revisit.
    anchor_prompts: int = 0
    min_entropy: Optional[float] = None
    max_majority_ratio: Optional[float] = None
    # Mean response length leaving [min, max] tokens.
    min_response_length: Optional[float] = None
    max_response_length: Optional[float] = None
    # eval/pass@1 falling this far (absolute) below the best seen so far.
    max_eval_drop: Optional[float] = None
    lr_factor: float = 0.5
    max_rollbacks: int = 2


@dataclass
class FaultConfig:
    """Deliberate faults, for testing the guards above; leave empty in real runs."""

    nan_loss_at_steps: list[int] = field(default_factory=list)


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

    enabled: bool = False
    # pairwise: preference pairs, Bradley-Terry loss | pointwise: one
    # response correct or not (verifiable tasks), binary cross-entropy.
    mode: str = "pairwise"
    then_policy: bool = True
    # ── data: synthetic (the arithmetic preference task) | jsonl | hf
    source: str = "synthetic"
    preset: str = "synthetic"  # a name for logs (conf/ser/<preset>.yaml)
    local_path: Optional[str] = None
    eval_path: Optional[str] = None
    hf_name: Optional[str] = None
    hf_subset: Optional[str] = None
    hf_data_dir: Optional[str] = None
    hf_split: str = "train"
    eval_split: Optional[str] = None
    # Held-out share when no eval split/file is given.
    eval_fraction: float = 0.1
    limit: Optional[int] = None
    # null: chosen/rejected are whole conversations split at `prompt_marker`.
    prompt_key: Optional[str] = "prompt"
    chosen_key: str = "chosen"
    rejected_key: str = "rejected"
    prompt_marker: Optional[str] = None
    # pointwise files: one graded response per row (problem: ser.prompt_key, default "problem")
    response_key: str = "response"
    answer_key: str = "answer"
    synthetic_num_pairs: int = 2000
    synthetic_num_eval: int = 500
    # Test pairs, apart from the held-out ones that pick the best round (0 = none).
    synthetic_num_test: int = 0
    synthetic_terms: int = 3
    synthetic_digits: int = 2
    synthetic_seed: int = 7
    # boxed: "\\boxed{97}" | worked: "37+48=85,85+12=97 \\boxed{97}" (match what the model writes)
    synthetic_style: str = "boxed"
    # pointwise: responses per problem of the synthetic task
    synthetic_per_problem: int = 2
    # ── the loop
    seed_fraction: float = 0.15
    high: float = 0.55
    low: float = 0.45
    min_gap: float = 0.3
    use_status2: bool = True
    max_rounds: int = 3
    patience: int = 1
    # true: each round retrains from the backbone; false: continues from the last RM.
    reinit_each_round: bool = True
    # ── the reward model (null rm_path = the policy's model)
    rm_path: Optional[str] = None
    rm_template: str = "Question: {q}\n\nAnswer: {a}"
    rm_max_length: int = 1024
    rm_append_eos: bool = False
    rm_num_workers: int = 1
    rm_zero_stage: int = 2
    rm_lr: float = 1e-5
    rm_lr_schedule: str = "cosine"
    rm_warmup_ratio: float = 0.03
    rm_weight_decay: float = 0.0
    rm_grad_clip: float = 1.0
    rm_epochs: int = 1
    # At least this many optimizer steps per round (small seed sets run more epochs).
    rm_min_steps: int = 0
    rm_batch_size: int = 32  # pairs (or items) per optimizer step
    rm_micro_batch_size: int = 8  # per rank and forward pass
    rm_center_coef: float = 0.01
    rm_offload: bool = False
    rm_gradient_checkpointing: bool = False
    rm_seed: int = 0
    score_batch_size: int = 64
    lora: bool = False
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    # What reward=reward_model returns: raw | sigmoid; null = raw (pairwise), sigmoid (pointwise).
    reward_transform: Optional[str] = None


# ── root ───────────────────────────────────────────────────────────────────
@dataclass
class TTRLConfig:
    seed: int = 0
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


def register_configs() -> None:
    """Put the schema into Hydra's ConfigStore (conf/config.yaml extends it)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="ttrl_schema", node=TTRLConfig)


# ── validation ─────────────────────────────────────────────────────────────
_CHOICES: dict[str, tuple[str, ...]] = {
    "rollout.subsample": ("first", "random"),
    "rollout.weight_sync": ("auto", "ray", "nccl"),
    "model.template": ("plain", "chat"),
    "model.dtype": ("auto", "float32", "bfloat16", "float16"),
    "trainer.dtype": ("auto", "float32", "bfloat16", "float16"),
    "trainer.lr_schedule": ("cosine", "constant", "linear"),
    "algorithm.loss_agg": ("token_mean", "seq_mean_token_sum", "seq_mean_token_mean"),
    "algorithm.kl_estimator": ("k1", "k2", "k3", "low_var_kl"),
    "algorithm.advantage": ("grpo", "dr_grpo", "rloo", "reinforce_pp", "gae"),
    "reward.name": ("majority_vote", "ground_truth", "custom", "reward_model", "random"),
    "logger.wandb.mode": ("online", "offline", "disabled"),
    "cluster.placement": ("colocate", "split"),
    "safety.action": ("warn", "stop", "rollback"),
    "device": ("auto", "cpu", "cuda"),
    "trainer.zero_stage": (0, 1, 2, 3),
}


def _get(cfg: Any, dotted: str) -> Any:
    node = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def validate(cfg: DictConfig | TTRLConfig) -> None:
    """Check what types cannot; raise ConfigError naming the first bad key."""
    c = cfg

    def fail(msg: str) -> None:
        raise ConfigError(msg)

    if isinstance(cfg, DictConfig):
        missing = sorted(OmegaConf.missing_keys(cfg))
        if missing:
            fail(f"{missing[0]} must be set (it is ??? in the config).")

    for key, allowed in _CHOICES.items():
        value = _get(c, key)
        if value not in allowed:
            fail(f"{key}={value!r} is not one of {', '.join(map(str, allowed))}.")

    r = c.rollout
    if r.n_votes < 1:
        fail(f"rollout.n_votes={r.n_votes} must be at least 1.")
    if not 1 <= r.n_train <= r.n_votes:
        fail(
            f"rollout.n_train={r.n_train} must be between 1 and rollout.n_votes={r.n_votes}:"
            " training samples are drawn from the voting samples."
        )
    if r.temperature <= 0:
        fail(f"rollout.temperature={r.temperature} must be > 0 (sampling, not greedy, is needed to vote).")
    if not 0 < r.top_p <= 1:
        fail(f"rollout.top_p={r.top_p} must be in (0, 1].")
    if r.max_new_tokens < 1:
        fail(f"rollout.max_new_tokens={r.max_new_tokens} must be at least 1.")
    if r.tis_cap is not None and r.tis_cap < 1:
        fail(f"rollout.tis_cap={r.tis_cap} must be >= 1 or null (it caps an importance weight).")
    if r.num_engines < 1 or r.tensor_parallel_size < 1:
        fail("rollout.num_engines and rollout.tensor_parallel_size must be at least 1.")
    if not 0 < r.gpu_memory_utilization <= 1:
        fail(f"rollout.gpu_memory_utilization={r.gpu_memory_utilization} must be in (0, 1].")
    if r.sync_bucket_mb < 1:
        fail(f"rollout.sync_bucket_mb={r.sync_bucket_mb} must be at least 1.")
    if r.cpu_threads is not None and r.cpu_threads < 1:
        fail(f"rollout.cpu_threads={r.cpu_threads} must be at least 1, or null to share the CPUs out.")
    if r.weight_sync == "nccl" and (c.device == "cpu" or c.cluster.placement != "split"):
        fail("rollout.weight_sync=nccl needs a GPU run with cluster.placement=split: NCCL cannot put "
             "trainer rank 0 and an engine worker on the same GPU.")

    if c.model.max_model_len <= r.max_new_tokens:
        fail(
            f"model.max_model_len={c.model.max_model_len} must exceed rollout.max_new_tokens="
            f"{r.max_new_tokens} to leave room for the prompt."
        )
    if c.model.template == "plain" and "{problem}" not in c.model.prompt_template:
        fail("model.prompt_template must contain '{problem}'.")

    d = c.data
    if d.prompts_per_step < 1:
        fail(f"data.prompts_per_step={d.prompts_per_step} must be at least 1.")
    if d.limit is not None and d.limit < 1:
        fail(f"data.limit={d.limit} must be at least 1 or null.")
    if d.name != "synthetic" and d.local_path is None and d.hf_name is None:
        fail(f"data.name={d.name!r} needs data.hf_name (a hub dataset) or data.local_path (a file).")

    rw = c.reward
    if rw.name == "custom" and not rw.fn:
        fail("reward.fn must name a function ('package.module:function') when reward.name=custom.")
    if rw.name == "reward_model" and not rw.path:
        fail("reward.path must point to a reward model dir when reward.name=reward_model.")

    a = c.algorithm
    if a.advantage == "gae" and not a.use_critic:
        fail("algorithm.advantage=gae needs algorithm.use_critic=true (GAE uses the critic's values).")
    if a.advantage == "rloo" and r.n_train < 2:
        fail("algorithm.advantage=rloo needs rollout.n_train >= 2 (it subtracts the mean of the other samples).")
    if a.clip_low < 0 or a.clip_high < 0:
        fail("algorithm.clip_low and algorithm.clip_high must be >= 0.")
    if a.dual_clip is not None and a.dual_clip <= 1:
        fail(f"algorithm.dual_clip={a.dual_clip} must be > 1 or null.")
    if a.kl_coef < 0:
        fail(f"algorithm.kl_coef={a.kl_coef} must be >= 0.")
    if not (0 <= a.gamma <= 1 and 0 <= a.lam <= 1):
        fail("algorithm.gamma and algorithm.lam must be in [0, 1].")
    if a.advantage in ("grpo", "dr_grpo", "rloo") and (a.gamma != 1 or a.lam != 1):
        fail(f"algorithm.advantage={a.advantage} scores whole responses: set algorithm.gamma=1 and algorithm.lam=1"
             " (they only apply to gae and reinforce_pp).")
    if a.advantage == "reinforce_pp" and a.lam != 1:
        fail("algorithm.advantage=reinforce_pp has no lambda: set algorithm.lam=1.")
    if a.ppo_epochs < 1:
        fail(f"algorithm.ppo_epochs={a.ppo_epochs} must be at least 1.")

    t = c.trainer
    if t.total_steps is not None and t.total_steps < 1:
        fail(f"trainer.total_steps={t.total_steps} must be at least 1 or null.")
    if t.episodes < 1:
        fail(f"trainer.episodes={t.episodes} must be at least 1.")
    if t.lr <= 0:
        fail(f"trainer.lr={t.lr} must be > 0.")
    if t.save_every < 0 or t.keep_last < 1:
        fail("trainer.save_every must be >= 0 and trainer.keep_last >= 1.")
    if t.num_workers < 1:
        fail(f"trainer.num_workers={t.num_workers} must be at least 1.")
    if t.micro_batch_size < 1:
        fail(f"trainer.micro_batch_size={t.micro_batch_size} must be at least 1.")
    if len(t.betas) != 2 or not all(0 <= b < 1 for b in t.betas):
        fail(f"trainer.betas={list(t.betas)} must be two numbers in [0, 1).")
    step_batch = d.prompts_per_step * r.n_train
    mini = t.mini_batch_size or step_batch
    if step_batch % mini:
        fail(
            f"trainer.mini_batch_size={mini} must divide the step batch "
            f"data.prompts_per_step*rollout.n_train={step_batch}."
        )
    if mini % t.num_workers:
        fail(
            f"the mini-batch of {mini} samples must be divisible by trainer.num_workers={t.num_workers}"
            " (each rank takes an equal share)."
        )
    if (mini // t.num_workers) % t.micro_batch_size:
        fail(
            f"trainer.micro_batch_size={t.micro_batch_size} must divide the per-rank mini-batch of"
            f" {mini // t.num_workers} samples."
        )
    if t.resume not in ("auto", "none") and not t.resume:
        fail("trainer.resume must be 'auto', 'none' or a checkpoint path.")

    e = c.eval
    if e.every_n_steps < 0 or e.n_samples < 1:
        fail("eval.every_n_steps must be >= 0 and eval.n_samples >= 1.")
    if not e.greedy and any(k < 1 or k > e.n_samples for k in e.ks):
        fail(f"eval.ks={list(e.ks)} must lie between 1 and eval.n_samples={e.n_samples}.")
    if not e.greedy and e.temperature <= 0:
        fail(f"eval.temperature={e.temperature} must be > 0 unless eval.greedy=true.")

    sf = c.safety
    if sf.window < 1 or not 0 < sf.lr_factor <= 1:
        fail("safety.window must be >= 1 and safety.lr_factor in (0, 1].")
    for key in ("max_flip_rate", "max_first_vote_drift", "flip_confident"):
        v = getattr(sf, key)
        if v is not None and not 0 <= v <= 1:
            fail(f"safety.{key}={v} must lie in [0, 1] (a share of prompts), or be null to switch it off.")
    if sf.anchor_prompts < 0:
        fail(f"safety.anchor_prompts={sf.anchor_prompts} must be >= 0 (0: no anchor pass).")
    if sf.action == "rollback" and sf.max_eval_drop is not None and not (c.trainer.save_every
                                                                         and c.eval.every_n_steps):
        fail("safety.action=rollback with safety.max_eval_drop needs trainer.save_every > 0 and "
             "eval.every_n_steps > 0 (it rolls back to the best evaluated checkpoint).")
    if t.max_skipped_steps < 1:
        fail(f"trainer.max_skipped_steps={t.max_skipped_steps} must be at least 1.")

    if t.warmup_ratio is not None and not 0 <= t.warmup_ratio < 1:
        fail(f"trainer.warmup_ratio={t.warmup_ratio} must be in [0, 1).")

    se = c.ser
    if se.mode not in ("pairwise", "pointwise"):
        fail(f"ser.mode={se.mode!r} is not one of pairwise, pointwise.")
    if se.source not in ("synthetic", "jsonl", "hf"):
        fail(f"ser.source={se.source!r} is not one of synthetic, jsonl, hf.")
    if se.source == "jsonl" and not se.local_path:
        fail("ser.source=jsonl needs ser.local_path (a .jsonl/.json/.parquet file of preference pairs).")
    if se.source == "hf" and not se.hf_name:
        fail("ser.source=hf needs ser.hf_name (a Hugging Face dataset).")
    if se.synthetic_style not in ("boxed", "worked"):
        fail(f"ser.synthetic_style={se.synthetic_style!r} is not one of boxed, worked.")
    if se.mode == "pointwise" and se.source == "hf":
        fail("ser.mode=pointwise reads the synthetic task or a JSON Lines file of graded responses"
             " (ser.source=synthetic or jsonl), not a hub dataset.")
    if not 0 < se.seed_fraction <= 1:
        fail(f"ser.seed_fraction={se.seed_fraction} must be in (0, 1].")
    if not 0 <= se.low <= se.high <= 1:
        fail(f"ser.low={se.low} and ser.high={se.high} must satisfy 0 <= low <= high <= 1.")
    if not 0 <= se.min_gap < 1:
        fail(f"ser.min_gap={se.min_gap} must be in [0, 1): it bounds |p_a - p_b| of two probabilities.")
    if not 0 <= se.eval_fraction < 1:
        fail(f"ser.eval_fraction={se.eval_fraction} must be in [0, 1).")
    if se.max_rounds < 0 or se.patience < 1:
        fail("ser.max_rounds must be >= 0 and ser.patience >= 1.")
    if se.rm_zero_stage not in (0, 1, 2, 3) or se.rm_num_workers < 1 or se.rm_micro_batch_size < 1:
        fail("ser.rm_zero_stage must be 0-3, ser.rm_num_workers and ser.rm_micro_batch_size at least 1.")
    if se.rm_batch_size % (se.rm_num_workers * se.rm_micro_batch_size):
        fail(f"ser.rm_batch_size={se.rm_batch_size} must be divisible by ser.rm_num_workers*ser.rm_micro_batch_size"
             f"={se.rm_num_workers * se.rm_micro_batch_size} (each rank takes whole micro-batches).")
    if se.rm_lr <= 0 or se.rm_epochs < 1 or se.rm_min_steps < 0:
        fail("ser.rm_lr must be > 0, ser.rm_epochs >= 1 and ser.rm_min_steps >= 0.")
    if se.rm_lr_schedule not in ("cosine", "constant", "linear"):
        fail(f"ser.rm_lr_schedule={se.rm_lr_schedule!r} is not one of cosine, constant, linear.")
    if "{a}" not in se.rm_template:
        fail("ser.rm_template must contain '{a}' (the response; '{q}' is the prompt).")
    if se.reward_transform not in (None, "raw", "sigmoid"):
        fail(f"ser.reward_transform={se.reward_transform!r} must be raw, sigmoid or null.")
    if se.enabled and se.then_policy and not (rw.name == "reward_model" and rw.path == "ser"):
        fail(f"ser.enabled=true trains a reward model and then (ser.then_policy=true) the policy, but the policy"
             f" stage would use reward={rw.name}{'' if rw.name != 'reward_model' else ' from ' + str(rw.path)}, not"
             " it: add reward=reward_model reward.path=ser, or ser.then_policy=false to run SER alone.")
    if rw.name == "reward_model" and rw.path == "ser" and not (se.enabled and se.then_policy):
        fail("reward.path=ser means the reward model that this run's SER stage trains: set ser.enabled=true"
             " (and ser.then_policy=true), or point reward.path to a reward model dir.")

    cl = c.cluster
    if cl.address not in (None, "auto", "local") and ":" not in str(cl.address):
        fail(f"cluster.address={cl.address!r} must be null, 'auto' or 'host:port'.")
    if cl.nodes < 1 or cl.gpus_per_node < 0 or cl.cpus_per_node < 1:
        fail("cluster.nodes and cluster.cpus_per_node must be at least 1, cluster.gpus_per_node at least 0.")
    for group in ("trainer_resources", "engine_resources"):
        for name, amount in dict(getattr(cl, group) or {}).items():
            if name in ("CPU", "GPU", "memory"):
                fail(f"cluster.{group}.{name}: CPU, GPU and memory are set by the run itself; name a custom"
                     " resource of `ray start --resources` here.")
            if not amount > 0:
                fail(f"cluster.{group}.{name}={amount} must be > 0.")


def to_container(cfg: DictConfig) -> dict:
    """A plain, resolved dict of the config (for run dirs and W&B)."""
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


__all__ = [
    "MISSING",
    "ConfigError",
    "TTRLConfig",
    "register_configs",
    "validate",
    "to_container",
]
