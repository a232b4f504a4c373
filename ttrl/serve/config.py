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
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlsplit

from ttrl.config import ConfigError, TTRLConfig, validate

API_KEYS_ENV = "TTRL_API_KEYS_FILE"


@dataclass
class ServeLearnConfig:
    """The background learner: TTRL steps on the queries the server answered."""

    # Learn from the queries at all; false serves the starting weights only.
    enabled: bool = True
    # A round starts once this many queries arrived since the last one (0 = never by count) ...
    every_queries: int = 64
    # ... or this many seconds after the last round, if at least `min_queries` arrived (0 = never by time).
    every_seconds: float = 0.0
    # Queries that must have arrived for a round started by time (every_seconds).
    min_queries: int = 8
    # learn() steps per round: each takes data.prompts_per_step buffered queries
    # (cycled when fewer arrived), n_votes samples each on the staging engine.
    steps: int = 4
    # User feedback (/v1/feedback) corrects the majority vote of its prompt, but only
    # when it is earned: an answer becomes the label (thumbs-up) or is vetoed
    # (thumbs-down) when `feedback_quorum` distinct identities agree on it, or
    # when one of serve.trusted_raters says so. One identity alone changes nothing.
    feedback: bool = True
    # Distinct identities that must agree before a rating changes a label.
    feedback_quorum: int = 2
    # At most this many of the newest unused queries go into one round.
    max_buffer: int = 4096
    # Prompts only one identity asked ("its own") are at most this share of a
    # round's prompts (the rest of its queries wait); prompts asked by two or
    # more identities always count. With one identity's queries alone there is no round.
    max_client_share: float = 0.5
    # A query whose rollout failed this many rounds is quarantined: kept in the
    # store, never trained on, so the next round goes on without it.
    max_row_failures: int = 2


@dataclass
class ServeGateConfig:
    """The safety gate between the learner's candidate and the served weights."""

    # A labelled JSON Lines file (data.problem_key / data.answer_key); null =
    # a frozen, held-out set of earlier queries: high-agreement pseudo-labels,
    # or answers whose thumbs-up was earned (quorum or a trusted rater, as in
    # serve.learn.feedback_quorum); earned ratings also override frozen labels.
    regression_set: Optional[str] = None
    # Size of the frozen set (its prompts are not trained on while they are in it).
    regression_size: int = 32
    # A query joins the frozen set when this share of its n_votes samples agree
    # (or when a thumbs-up on one of its answers was earned) ...
    min_agreement: float = 0.75
    # ... and its prompt was asked by at least this many distinct identities:
    # one client cannot write the gate's yardstick by flooding it.
    min_askers: int = 2
    # Each round retires this share of a full frozen set (the oldest items) to
    # make room for newer prompts: no early flood owns the yardstick for good.
    rotate_share: float = 0.25
    # Samples per regression item, their temperature (null = serve.temperature)
    # and length (null = serve.max_tokens); a fixed seed makes current and
    # candidate draw with the same random numbers.
    n_samples: int = 16
    # Their temperature (null = serve.temperature).
    temperature: Optional[float] = None
    # Their length (null = serve.max_tokens).
    max_new_tokens: Optional[int] = None
    # The sampling seed both models draw with.
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
class ServeLimitsConfig:
    """What one request, and one identity, may ask of the server (each over-limit answer names its key)."""

    # Request bodies larger than this get 413 before they are read.
    max_body_bytes: int = 1_048_576
    # Seconds a request's whole body may take to arrive (408 after, connection closed): a client that
    # sends its body a byte at a time would otherwise hold one of its max_in_flight slots for ever.
    body_timeout_s: float = 30.0
    # Prompts in one completions request.
    max_prompts: int = 64
    # Samples one request may cost: prompts x max(n, votes).
    max_samples: int = 256
    # Characters of a feedback comment.
    max_comment_chars: int = 2000
    # Per identity (an API key's name; without keys every client is "anonymous"):
    # requests per minute, as a token bucket that holds `burst` requests (0 = no limit) ...
    requests_per_minute: float = 1200.0
    # The bucket's size: requests an identity may send at once after a quiet spell.
    burst: int = 120
    # ... and requests in flight at once (429 beyond either, with Retry-After).
    max_in_flight: int = 16
    # Prompts one identity (an API key's name) may have waiting for an engine (429 beyond, with Retry-After):
    # with the default serve.max_queue of 1024, no two keys fill the queue that everyone else is then
    # refused from. Not applied without keys (one anonymous identity).
    max_queued_prompts: int = 384


@dataclass
class ServeTenantsConfig:
    """A model per tenant: each API key's tenant is served its own LoRA adapter on the one shared base.

    Needs model.lora.enabled=true (the engines then serve adapters) and
    serve.api_keys_file (a key's tenant is its name, or the third field of
    its line). A tenant's adapter is <serve.dir>/tenants/<name>/adapter/ (peft
    format), a copy of the served version's adapter made on its first
    request; its r, alpha and target modules are therefore model.lora's.
    With serve.learn.enabled each learning round is one tenant's: it trains
    that tenant's adapter on that tenant's queries, behind the gate, and
    promotes <serve.dir>/tenants/<name>/versions/v<N>/ for it alone.
    """

    # Serve each tenant its own adapter (false: one model for every client).
    enabled: bool = False
    # Tenant adapters resident in each serving engine at once; the least
    # recently used one is unloaded, and read from disk again when asked for.
    max_loaded: int = 4
    # Tenants with a `tenant` label of their own on the per-tenant /metrics
    # counters (the first ones to learn); later ones are counted as `_other`.
    metrics_max_tenants: int = 32


@dataclass
class ServeConfig:
    """`ttrl-serve`: the OpenAI-compatible server that answers queries and learns from them.

    Who may connect (host, keys, origins, admin token), how it answers (votes, sampling,
    batching), and what it learns (`learn`), keeps (`gate`) and allows (`limits`).
    """

    # Loopback by default. Beyond loopback the server needs API keys, or
    # serve.allow_unauthenticated=true saying that an open API is meant.
    host: str = "127.0.0.1"
    port: int = 8000  # 0 = any free port (written to <dir>/server.json)
    # Where the store, the promoted versions and server.json live. A restart
    # with the same dir resumes: same store, last promoted version served.
    dir: str = "outputs/serve"
    store: Optional[str] = None  # null = <dir>/store.sqlite
    model_name: Optional[str] = None  # the model id of the API; null = model.name
    # 1 = plain sampling; N > 1 = self-consistency: sample N, answer with the
    # majority answer's most likely completion. A request may ask for its own (`votes`); one that asks for
    # n > 1 or temperature 0 without it gets plain sampling. At most 64 and serve.limits.max_samples.
    votes: int = 1
    temperature: Optional[float] = None  # null = rollout.temperature
    top_p: Optional[float] = None  # null = rollout.top_p
    max_tokens: Optional[int] = None  # null = rollout.max_new_tokens (also the default of a request)
    # Requests batched into one engine call, and queued at most (then 503).
    max_batch: int = 64
    # Requests waiting for an engine at most; the next one gets 503 (overloaded).
    max_queue: int = 1024
    # A request not answered within this many seconds gets 504.
    request_timeout_s: float = 120.0
    # A file of `name:key` lines (null = the TTRL_API_KEYS_FILE environment
    # variable, else no keys). With keys, every /v1/* request needs
    # `Authorization: Bearer <key>`, and the key's name is the client's
    # identity, stored with its queries and ratings. Keys never go on the
    # command line or into config.yaml: only the file's path does.
    api_keys_file: Optional[str] = None
    # Without keys the server only listens on loopback, unless this says an
    # unauthenticated API is meant.
    allow_unauthenticated: bool = False
    # One user, the operator, on loopback and without keys: that user's ratings
    # count as a trusted rater's, a prompt asked once may enter the gate's set,
    # and serve.learn.max_client_share does not apply.
    single_user: bool = False
    # Identities (names from the keys file) whose rating alone overrides the vote.
    trusted_raters: list[str] = field(default_factory=list)
    # Host headers answered besides loopback names and serve.host (a
    # DNS-rebinding page, under its own name, gets 400); "*" = any.
    allowed_hosts: list[str] = field(default_factory=list)
    # Browser origins given CORS headers; a request from any other origin gets 403.
    cors_origins: list[str] = field(default_factory=list)
    # /admin/* (and /health's details) need the token in this environment
    # variable (Authorization: Bearer ...); unset = the admin API is off.
    admin_token_env: str = "TTRL_ADMIN_TOKEN"
    # Refused when set: a token in the config shows in `ps` and in config.yaml.
    admin_token: Optional[str] = None
    # Promoted versions kept on disk (v0, the starting weights, is always kept).
    keep_versions: int = 5
    limits: ServeLimitsConfig = field(default_factory=ServeLimitsConfig)
    learn: ServeLearnConfig = field(default_factory=ServeLearnConfig)
    gate: ServeGateConfig = field(default_factory=ServeGateConfig)
    tenants: ServeTenantsConfig = field(default_factory=ServeTenantsConfig)


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

    _validate_access(s)
    _validate_tenants(cfg)
    from ttrl.serve.faults import ENV, POINTS

    crash = os.environ.get(ENV)
    if crash and crash not in POINTS:
        fail(f"${ENV}={crash} is not a crash point; the points are {', '.join(POINTS)} (tests only).")
    lim = s.limits
    if lim.max_body_bytes < 1024:
        fail(f"serve.limits.max_body_bytes={lim.max_body_bytes} must be at least 1024 (a request needs room).")
    for key in ("max_prompts", "max_samples", "max_comment_chars", "burst", "max_in_flight", "max_queued_prompts"):
        if getattr(lim, key) < 1:
            fail(f"serve.limits.{key}={getattr(lim, key)} must be at least 1.")
    # The default a request gets must be one it could ask for: a plain request refused (or served more votes
    # than it may ask) over a field it never sent is the server's misconfiguration.
    from ttrl.serve.protocol import MAX_VOTES

    if s.votes > min(MAX_VOTES, lim.max_samples):
        fail(f"serve.votes={s.votes} must be at most {min(MAX_VOTES, lim.max_samples)} (the most a request may ask: "
             f"{MAX_VOTES}, and serve.limits.max_samples={lim.max_samples}).")
    if not lim.body_timeout_s > 0:
        fail(f"serve.limits.body_timeout_s={lim.body_timeout_s} must be > 0 (seconds a body may take to arrive).")
    if not lim.requests_per_minute >= 0:
        fail(f"serve.limits.requests_per_minute={lim.requests_per_minute} must be >= 0 (0 = no limit).")

    ln = s.learn
    if ln.feedback_quorum < 1:
        fail(f"serve.learn.feedback_quorum={ln.feedback_quorum} must be at least 1 (distinct identities that agree).")
    if not 0 < ln.max_client_share <= 1:
        fail(f"serve.learn.max_client_share={ln.max_client_share} must be in (0, 1].")
    if ln.max_row_failures < 1:
        fail(f"serve.learn.max_row_failures={ln.max_row_failures} must be at least 1.")
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
    if g.min_askers < 1:
        fail(f"serve.gate.min_askers={g.min_askers} must be at least 1.")
    if not 0 <= g.rotate_share < 1:
        fail(f"serve.gate.rotate_share={g.rotate_share} must be in [0, 1).")


# vLLM allocates every adapter slot (max_loras) in every LoRA layer at start-up, used or not: a typo such as
# 4000 would take the engine's memory before the first request, so the key has a ceiling.
MAX_LOADED_LIMIT = 64
# Each labelled tenant adds series to every per-tenant counter: a scrape stays small below this.
MAX_LABELLED_TENANTS = 1000


def _validate_tenants(cfg: Any) -> None:
    """serve.tenants: LoRA serving, keys to name tenants, a sane max_loaded (the learner learns per tenant)."""
    t = cfg.serve.tenants
    if not t.enabled:
        return
    if not 1 <= t.max_loaded <= MAX_LOADED_LIMIT:
        raise ConfigError(f"serve.tenants.max_loaded={t.max_loaded} must be between 1 and {MAX_LOADED_LIMIT} "
                          "(tenant adapters resident per serving engine).")
    if not 0 <= t.metrics_max_tenants <= MAX_LABELLED_TENANTS:
        raise ConfigError(f"serve.tenants.metrics_max_tenants={t.metrics_max_tenants} must be between 0 and "
                          f"{MAX_LABELLED_TENANTS} (tenants with a /metrics label of their own; 0 = all as _other).")
    if not cfg.model.lora.enabled:
        raise ConfigError("serve.tenants.enabled=true needs LoRA serving: set model.lora.enabled=true (each tenant "
                          "is served its own adapter on the shared base, with model.lora's r, alpha and targets).")
    if api_keys_path(cfg.serve) is None:
        raise ConfigError("serve.tenants.enabled=true needs serve.api_keys_file: a tenant is the name of an API key "
                          "(or the third field of its line, name:key:tenant), and a client without a key has none.")


WILDCARD_HOSTS = ("0.0.0.0", "::", "")


def secret_on_command_line(argv: list[str]) -> str | None:
    """Why the command line must be refused before Hydra runs (it writes overrides.yaml), or None.

    A token or key there shows in `ps` and would be written into the serve
    dir by Hydra before any validation could refuse it.
    """
    for arg in argv:
        key, sep, value = arg.lstrip("+~").partition("=")
        if not sep:
            continue
        if key == "serve.admin_token" and value not in ("", "null"):
            return ("serve.admin_token on the command line is refused: it would show in `ps` and be written to "
                    "the serve dir; put the token in the environment variable TTRL_ADMIN_TOKEN.")
        if key == "serve.api_keys_file" and ":" in value and not Path(value).expanduser().exists():
            return ("serve.api_keys_file must name a file of name:key lines; a key itself on the command line is "
                    "refused (it would show in `ps` and be written to the serve dir).")
    return None


def api_keys_path(s: Any, environ: Mapping[str, str] | None = None) -> Path | None:
    """serve.api_keys_file, else $TTRL_API_KEYS_FILE, else None (no keys)."""
    environ = os.environ if environ is None else environ
    value = s.api_keys_file or environ.get(API_KEYS_ENV) or None
    return Path(value).expanduser() if value else None


def _validate_access(s: Any) -> None:
    """Who may reach the server: keys, hosts, origins, the admin token."""
    from ttrl.serve.auth import KeysFileError, load_api_keys

    if s.admin_token is not None:
        raise ConfigError(f"serve.admin_token is refused: a token on the command line or in a config file shows in "
                          f"`ps` and is written to config.yaml; put it in the environment variable "
                          f"{s.admin_token_env} (serve.admin_token_env).")
    path = api_keys_path(s)
    names: list[str] = []
    if path is not None:
        source = "serve.api_keys_file" if s.api_keys_file else f"${API_KEYS_ENV}"
        if not path.is_file():
            # Never echo the value: it may be a key pasted where a path belongs.
            raise ConfigError(f"{source} must name a file of name:key lines, and no such file exists (a key "
                              "itself never goes on the command line: it would show in `ps` and in config.yaml).")
        try:
            names = list(load_api_keys(path))
        except KeysFileError as err:
            raise ConfigError(f"{source}: {err}") from None
    if path is None and not is_loopback(s.host) and not s.allow_unauthenticated:
        raise ConfigError(f"serve.host={s.host} is not loopback and there are no API keys: anyone who can reach it "
                          "could steer what the model learns; give serve.api_keys_file (or $TTRL_API_KEYS_FILE), or "
                          "set serve.allow_unauthenticated=true if an open API is what you mean.")
    if s.single_user and (path is not None or not is_loopback(s.host)):
        raise ConfigError("serve.single_user=true is for one person on loopback without keys: drop it, or drop "
                          "serve.api_keys_file and keep serve.host on loopback.")
    unknown = [n for n in s.trusted_raters if n not in names]
    if unknown:
        raise ConfigError(f"serve.trusted_raters names {unknown}, which are not identities of the API keys file"
                          + (f" (it has {sorted(names)})." if names else " (there is none)."))
    if s.host in WILDCARD_HOSTS and not s.allowed_hosts:
        raise ConfigError(f"serve.host={s.host} listens on every address, so serve.allowed_hosts must list the "
                          "names clients use to reach it (or [\"*\"] for any Host header).")
    for origin in s.cors_origins:
        u = urlsplit(str(origin))
        if u.scheme not in ("http", "https") or not u.hostname or u.path not in ("", "/") or u.query:
            raise ConfigError(f"serve.cors_origins entry {origin!r} must be an origin such as "
                              "https://app.example.com (scheme, host, optional port).")


__all__ = ["API_KEYS_ENV", "ConfigError", "secret_on_command_line", "ServeConfig", "ServeGateConfig", "ServeLearnConfig", "ServeLimitsConfig",
           "ServeRootConfig", "ServeTenantsConfig", "api_keys_path", "is_loopback", "register_serve_configs", "validate_serve"]
