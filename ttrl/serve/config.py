# ruff: noqa: UP045  (OmegaConf 2.3 structured configs need typing.Optional, not `X | None`)
"""The `serve` section of `ttrl-serve`'s config, its schema root, and its validation.

`ttrl-serve` composes `conf/serve.yaml`: every group of `ttrl-train`
(model, data, rollout, reward, algorithm, trainer, safety, experiment ...)
plus the `serve:` keys below. `ServeRootConfig` is the training schema with
that one section added, so a misspelt `serve.*` key fails at composition
like any other. `validate_serve` runs `ttrl.config.validate` and then the
checks that only matter when serving; each failure is one sentence naming
the key. No torch, ray, vllm or deepspeed here: `ttrl-serve --cfg job` is
instant.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ttrl.config import ConfigError, TTRLConfig, validate


@dataclass
class ServeLearnConfig:
    """The background learner: TTRL steps on the queries the server answered."""

    enabled: bool = True
    # A round starts once this many queries arrived since the last one (0 = never by count) ...
    every_queries: int = 64
    # ... or this many seconds after the last round, if at least `min_queries` arrived (0 = never by time).
    every_seconds: float = 0.0
    min_queries: int = 8
    # learn() steps per round: each takes data.prompts_per_step buffered queries
    # (cycled when fewer arrived), n_votes samples each on the staging engine.
    steps: int = 4
    # User feedback (/v1/feedback) corrects the majority vote of its query:
    # a thumbs-up makes the served answer the label, a thumbs-down vetoes it.
    feedback: bool = True
    # At most this many of the newest unused queries go into one round.
    max_buffer: int = 4096


@dataclass
class ServeGateConfig:
    """The safety gate between the learner's candidate and the served weights."""

    # A labelled JSON Lines file (data.problem_key / data.answer_key); null =
    # a frozen, held-out set of earlier queries: high-agreement pseudo-labels,
    # or answers a user gave a thumbs-up (ratings also override frozen labels).
    regression_set: Optional[str] = None
    # Size of the frozen set (its prompts are never trained on).
    regression_size: int = 32
    # A query joins the frozen set when this share of its n_votes samples agree
    # (or when one of its answers got a thumbs-up).
    min_agreement: float = 0.75
    # Samples per regression item, their temperature (null = serve.temperature)
    # and length (null = serve.max_tokens); a fixed seed makes current and
    # candidate draw with the same random numbers.
    n_samples: int = 16
    temperature: Optional[float] = None
    max_new_tokens: Optional[int] = None
    seed: int = 1234
    # Promote only if the candidate's regression score >= current - tolerance
    # (about the sampling noise of 32 items x 16 samples; the log gives the s.e.).
    tolerance: float = 0.03
    # Collapse signals, candidate vs current on the same set (null = off):
    # token entropy falling by more than this share ...
    max_entropy_drop: Optional[float] = 0.5
    # ... the share of samples with an answer falling by more than this ...
    max_answer_rate_drop: Optional[float] = 0.1
    # ... or the mean response length changing by more than this share.
    max_length_change: Optional[float] = 1.0


@dataclass
class ServeConfig:
    # Loopback by default: the OpenAI API has no user auth of its own.
    host: str = "127.0.0.1"
    port: int = 8000  # 0 = any free port (written to <dir>/server.json)
    # Where the store, the promoted versions and server.json live. A restart
    # with the same dir resumes: same store, last promoted version served.
    dir: str = "outputs/serve"
    store: Optional[str] = None  # null = <dir>/store.sqlite
    model_name: Optional[str] = None  # the model id of the API; null = model.name
    # 1 = plain sampling; N > 1 = self-consistency: sample N, answer with the
    # majority answer's most likely completion. A request may ask for its own (`votes`).
    votes: int = 1
    temperature: Optional[float] = None  # null = rollout.temperature
    top_p: Optional[float] = None  # null = rollout.top_p
    max_tokens: Optional[int] = None  # null = rollout.max_new_tokens (also the default of a request)
    # Requests batched into one engine call, and queued at most (then 503).
    max_batch: int = 64
    max_queue: int = 1024
    request_timeout_s: float = 120.0
    # /admin/* needs this token (Authorization: Bearer ...); null = read the
    # environment variable named below; neither = the admin API is off.
    admin_token: Optional[str] = None
    admin_token_env: str = "TTRL_ADMIN_TOKEN"
    # Promoted versions kept on disk (v0, the starting weights, is always kept).
    keep_versions: int = 5
    learn: ServeLearnConfig = field(default_factory=ServeLearnConfig)
    gate: ServeGateConfig = field(default_factory=ServeGateConfig)


@dataclass
class ServeRootConfig(TTRLConfig):
    serve: ServeConfig = field(default_factory=ServeConfig)


def register_serve_configs() -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="ttrl_serve_schema", node=ServeRootConfig)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def validate_serve(cfg: Any) -> None:
    """`ttrl.config.validate`, then what serving adds; raise ConfigError naming the first bad key."""
    validate(cfg)

    def fail(msg: str) -> None:
        raise ConfigError(msg)

    s, r = cfg.serve, cfg.rollout
    if not 0 <= s.port <= 65535:
        fail(f"serve.port={s.port} must be between 0 and 65535 (0 = any free port).")
    if not s.host:
        fail("serve.host must be an address to listen on, e.g. 127.0.0.1.")
    if s.votes < 1:
        fail(f"serve.votes={s.votes} must be at least 1 (1 = plain sampling).")
    if s.temperature is not None and s.temperature < 0:
        fail(f"serve.temperature={s.temperature} must be >= 0 or null.")
    if s.votes > 1 and s.temperature == 0:
        fail(f"serve.votes={s.votes} needs serve.temperature > 0: greedy samples all agree.")
    if s.top_p is not None and not 0 < s.top_p <= 1:
        fail(f"serve.top_p={s.top_p} must be in (0, 1] or null.")
    max_tokens = s.max_tokens if s.max_tokens is not None else r.max_new_tokens
    if not 1 <= max_tokens < cfg.model.max_model_len:
        fail(f"serve.max_tokens={max_tokens} must be at least 1 and below model.max_model_len="
             f"{cfg.model.max_model_len}.")
    if s.max_batch < 1 or s.max_queue < 1:
        fail("serve.max_batch and serve.max_queue must be at least 1.")
    if s.request_timeout_s <= 0:
        fail(f"serve.request_timeout_s={s.request_timeout_s} must be > 0.")
    if s.keep_versions < 1:
        fail(f"serve.keep_versions={s.keep_versions} must be at least 1.")
    if r.weight_sync in ("nccl", "ipc"):
        fail(f"rollout.weight_sync={r.weight_sync} cannot be used by ttrl-serve: it feeds every engine at once, "
             "while serving and staging engines hold different weights; use rollout.weight_sync=auto or ray.")
    if cfg.reward.name == "ground_truth" or (cfg.reward.name == "custom" and cfg.reward.needs_ground_truth):
        fail(f"reward.name={cfg.reward.name} needs ground-truth answers, which live queries do not have; "
             "use reward=majority_vote (TTRL) or a label-free reward.")

    ln = s.learn
    if ln.every_queries < 0 or ln.every_seconds < 0:
        fail("serve.learn.every_queries and serve.learn.every_seconds must be >= 0 (0 = off).")
    if ln.min_queries < 1 or ln.steps < 1 or ln.max_buffer < 1:
        fail("serve.learn.min_queries, serve.learn.steps and serve.learn.max_buffer must be at least 1.")

    g = s.gate
    if g.regression_set is not None and not Path(g.regression_set).expanduser().exists():
        fail(f"serve.gate.regression_set={g.regression_set} does not exist (a labelled .jsonl file, or null).")
    if g.regression_size < 1 or g.n_samples < 1:
        fail("serve.gate.regression_size and serve.gate.n_samples must be at least 1.")
    if not 0 < g.min_agreement <= 1:
        fail(f"serve.gate.min_agreement={g.min_agreement} must be in (0, 1].")
    if g.tolerance < 0:
        fail(f"serve.gate.tolerance={g.tolerance} must be >= 0 (how much worse a candidate may score).")
    if g.temperature is not None and g.temperature <= 0:
        fail(f"serve.gate.temperature={g.temperature} must be > 0 or null.")
    if g.max_new_tokens is not None and not 1 <= g.max_new_tokens < cfg.model.max_model_len:
        fail(f"serve.gate.max_new_tokens={g.max_new_tokens} must be at least 1 and below model.max_model_len.")
    for key in ("max_entropy_drop", "max_answer_rate_drop"):
        v = getattr(g, key)
        if v is not None and not 0 <= v <= 1:
            fail(f"serve.gate.{key}={v} must be in [0, 1] or null.")
    if g.max_length_change is not None and g.max_length_change < 0:
        fail(f"serve.gate.max_length_change={g.max_length_change} must be >= 0 or null.")


__all__ = ["ConfigError", "ServeConfig", "ServeGateConfig", "ServeLearnConfig", "ServeRootConfig",
           "is_loopback", "register_serve_configs", "validate_serve"]
