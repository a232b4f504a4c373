"""Build the parts of a run: model dir, tokenizer, prompts, reward, then the engines and trainer.

Every entry builds what it runs here, so that `ttrl-train`, `ttrl-eval`,
`ttrl-serve` and the bench resolve the model, template the prompts, bound
the grader and build the reward (`reward_model`'s scorer included) the same
way:

    parts = build_parts(cfg)                      # no actor yet; SetupError names a bad input
    rt = parts.start_runtime(total_opt_steps)     # Ray: rollout engines + DeepSpeed ranks (train, serve, bench)
    engine = parts.local_engine()                 # or one vLLM engine in this process (ttrl-eval)
    ...
    parts.close()                                 # the reward's actor, then the runtime

Must never run a step or write into a run dir; heavy imports (ray, vllm,
deepspeed) wait until an engine or the runtime is asked for.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from omegaconf import OmegaConf

from ttrl.data.loader import load_prompts
from ttrl.data.templates import render_prompt
from ttrl.labeling import grade
from ttrl.labeling.extract import configured_extractor
from ttrl.models import resolve_model_path
from ttrl.rewards import Reward, build_reward
from ttrl.types import Prompt

if TYPE_CHECKING:
    from ttrl.distributed.runtime import Runtime
    from ttrl.rollout.vllm_engine import VLLMEngine


class SetupError(ValueError):
    """The run cannot start: bad data, model dir or reward; the message names it."""


@dataclass
class Parts:
    cfg: Any
    model_path: str
    tokenizer: Any
    # Templated, with their ground truth (metrics only); empty for ttrl-serve, whose prompts are its queries.
    prompts: list[Prompt]
    reward: Reward
    rt: Runtime | None = None

    def start_runtime(self, total_opt_steps: int, overrides: dict | None = None, tenant_slots: int = 0) -> Runtime:
        """Start Ray, the rollout engines and the trainer ranks (`overrides`: config keys for the runtime only;
        `tenant_slots`: per-request adapters each LoRA engine holds, for ttrl-serve's tenants)."""
        from ttrl.distributed.runtime import Runtime

        cfg = OmegaConf.merge(self.cfg, overrides) if overrides else self.cfg
        self.rt = Runtime(cfg, self.model_path, total_opt_steps, tenant_slots=tenant_slots)
        # The answer checker's worker processes start now, beside the first eval, not in the first step
        # that needs one.
        grade.warm_up_in_background()
        return self.rt

    def local_engine(self) -> VLLMEngine:
        """One vLLM engine in this process: no Ray, no trainer (ttrl-eval); with model.lora.path, base + adapter."""
        from ttrl.distributed.device import resolve_device, resolve_dtype
        from ttrl.rollout.lora import lora_spec
        from ttrl.rollout.vllm_engine import EngineArgs, VLLMEngine

        cfg, r = self.cfg, self.cfg.rollout
        device = resolve_device(cfg.device)
        lora = lora_spec(cfg.model.lora)
        engine = VLLMEngine(EngineArgs(
            model_path=self.model_path, dtype=resolve_dtype(cfg.model.dtype, device),
            max_model_len=cfg.model.max_model_len, seed=cfg.seed,
            enforce_eager=(device == "cpu") if r.enforce_eager is None else r.enforce_eager,
            enable_prefix_caching=r.enable_prefix_caching, gpu_memory_utilization=r.gpu_memory_utilization,
            tensor_parallel_size=r.tensor_parallel_size, cpu_kv_cache_gb=r.cpu_kv_cache_gb, device=device,
            lora=lora))
        if lora and cfg.model.lora.path:
            engine.load_adapter_dir(cfg.model.lora.path)
        return engine

    def close(self) -> None:
        """Let the reward (a reward model's actor) go, then the runtime's actors."""
        self.reward.close()
        if self.rt is not None:
            self.rt.shutdown()
            self.rt = None


def build_parts(cfg: Any, with_prompts: bool = True) -> Parts:
    """Resolve the model, load the tokenizer, load and template the prompts, build the reward.

    `with_prompts=False`: no data is read (ttrl-serve). Raises SetupError
    (a ValueError) naming the bad data file, model dir, reward or custom answer
    extractor.
    """
    grade.use(grade.GradeOptions(timeout_s=cfg.label.grade_timeout_s))
    try:
        model_path = resolve_model_path(cfg.model, cfg.data)
        if cfg.model.lora.enabled and cfg.model.lora.path:
            from ttrl.rollout.lora import lora_spec

            lora_spec(cfg.model.lora)  # an adapter dir we cannot read or serve fails here, naming it
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(cfg.model.tokenizer_path or model_path)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        prompts = [Prompt(p.id, p.problem, p.answer, render_prompt(p.problem, cfg.model, tokenizer))
                   for p in load_prompts(cfg.data)] if with_prompts else []
        # Imports a custom extractor now: a bad label.custom_extractor fails here, naming it.
        reward = build_reward(cfg.reward.name, extractor=configured_extractor(cfg.label), **reward_options(cfg))
        if "views" in reward.needs:
            prompts = with_views(prompts, cfg, tokenizer)
    except (ValueError, FileNotFoundError) as err:
        raise SetupError(str(err)) from err
    return Parts(cfg, model_path, tokenizer, prompts, reward)


def with_views(prompts: list[Prompt], cfg: Any, tokenizer: Any) -> list[Prompt]:
    """The prompts with their second view (`reward.view` of the problem alone), templated; ValueError names one."""
    from dataclasses import replace

    from ttrl.data.views import load_view

    view = load_view(cfg.reward.view)
    out = []
    for p in prompts:
        try:
            text = view(p.problem)
        except Exception as err:  # noqa: BLE001 - a user's view function: name it and the prompt
            raise ValueError(f"reward.view={cfg.reward.view!r} failed on prompt {p.id!r}: {err}") from err
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"reward.view={cfg.reward.view!r} gave {text!r} for prompt {p.id!r}, not a problem")
        out.append(replace(p, view_text=render_prompt(text, cfg.model, tokenizer)))
    return out


def reward_options(cfg: Any) -> dict[str, Any]:
    """The constructor options of the configured reward, from its config section.

    For `reward_model` that is the scorer: the reward only turns scores into
    rewards (ttrl/rewards/ reaches no Ray actor); the model runs in a Ray
    actor that starts on the first score, once the Runtime has started Ray.
    """
    r = cfg.reward
    if r.name == "custom":
        return {"fn": r.fn, "needs_ground_truth": r.needs_ground_truth}
    if r.name == "reward_model":
        from ttrl.rewards.reward_model import check_reward_model_dir
        from ttrl.trainer.reward_model import RemoteRewardModel

        scorer = RemoteRewardModel(check_reward_model_dir(r.path))
        if r.ensemble:
            from ttrl.rewards.reward_model import EnsembleScorer

            scorer = EnsembleScorer([scorer, *(RemoteRewardModel(check_reward_model_dir(p)) for p in r.ensemble)],
                                    r.ensemble_reduce)
        return {"scorer": scorer, "normalize": r.normalize, "clip": r.clip, "length_penalty": r.length_penalty}
    if OmegaConf.is_dict(r) and r.name in r and OmegaConf.is_dict(r[r.name]):
        # self_harmony, evol_rl, tool_verified, scrl, rent: their paper's knobs, reward.<name>.*, key for key.
        return OmegaConf.to_container(r[r.name], resolve=True)  # type: ignore[return-value]
    if r.name in ("majority_vote", "co_reward"):
        return {"min_ratio": r.min_ratio}
    if r.name == "trajectory_logprob":
        return {"per_token": r.per_token}
    if r.name == "random":
        return {"p": r.p, "seed": cfg.seed if r.seed is None else r.seed}
    return {}


__all__ = ["Parts", "SetupError", "build_parts", "reward_options", "with_views"]
