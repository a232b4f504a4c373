"""Per-GPU memory of a run's model states, estimated from the model's shape and the config, without a GPU.

`ttrl-train ... --cfg job` prints it under the composed config (as YAML
comments), so a preset such as `model=qwen2.5-math-7b-lora` can be sized
before a cluster is asked for. What is counted is what scales with the
parameters:

- a trainer rank: its weights, gradients and AdamW states (fp32 master copy
  and two moments) as ZeRO shards them (stage 1: optimizer states, 2: also
  gradients, 3: also weights, over trainer.num_workers ranks; offload moves
  the optimizer states, and at ZeRO-3 the weights, to the CPU), the frozen
  reference when the KL term needs one, and PPO's critic;
- with LoRA: the frozen base (no gradients, no optimizer states), the
  adapters' training states, and no reference (the base is the reference);
- an engine: its copy of the weights (model.dtype).

Left out, and said so: activations (they depend on the batch and the
response length; gradient checkpointing cuts them) and the engines' KV cache
(rollout.gpu_memory_utilization's share of the GPU). The shape comes from a
local model dir's config.json or, for the hub models of conf/model/, from
`KNOWN_SHAPES` (their config.json values): `--cfg job` stays offline.

Must never import torch, ray, vllm or deepspeed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GiB = 1 << 30
_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class ModelShape:
    """What the parameter count of a Qwen2/Llama-style decoder depends on."""

    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool  # lm_head shares the embedding's weights
    qkv_bias: bool = True  # Qwen2 has biases on q, k and v; Llama has none

    def projections(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each projection of one block, by its name."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return {"q_proj": (self.hidden, q), "k_proj": (self.hidden, kv), "v_proj": (self.hidden, kv),
                "o_proj": (q, self.hidden), "gate_proj": (self.hidden, self.intermediate),
                "up_proj": (self.hidden, self.intermediate), "down_proj": (self.intermediate, self.hidden)}

    def params(self) -> int:
        proj = self.projections()
        block = sum(i * o for i, o in proj.values()) + 2 * self.hidden  # + the two norms
        if self.qkv_bias:
            block += sum(proj[m][1] for m in ("q_proj", "k_proj", "v_proj"))
        embed = self.vocab * self.hidden
        return self.layers * block + embed * (1 if self.tied else 2) + self.hidden

    def lora_params(self, r: int, targets: list[str]) -> int:
        """An adapter's parameters: A [r, in] and B [out, r] per target projection of every block."""
        proj = self.projections()
        return self.layers * sum(r * (proj[m][0] + proj[m][1]) for m in targets)

    @classmethod
    def from_hf_config(cls, c: dict[str, Any]) -> ModelShape:
        heads = int(c["num_attention_heads"])
        return cls(hidden=int(c["hidden_size"]), layers=int(c["num_hidden_layers"]),
                   intermediate=int(c["intermediate_size"]), heads=heads,
                   kv_heads=int(c.get("num_key_value_heads") or heads),
                   head_dim=int(c.get("head_dim") or c["hidden_size"] // heads), vocab=int(c["vocab_size"]),
                   tied=bool(c.get("tie_word_embeddings", False)),
                   qkv_bias=c.get("model_type") == "qwen2" or bool(c.get("attention_bias", False)))


# config.json of the hub models conf/model/ names (hidden_size, num_hidden_layers, intermediate_size,
# num_attention_heads, num_key_value_heads, vocab_size, tie_word_embeddings).
KNOWN_SHAPES: dict[str, ModelShape] = {
    "Qwen/Qwen2.5-Math-7B": ModelShape(3584, 28, 18944, 28, 4, 128, 152064, tied=False),
    "Qwen/Qwen2.5-7B": ModelShape(3584, 28, 18944, 28, 4, 128, 152064, tied=False),
    "Qwen/Qwen2.5-Math-1.5B": ModelShape(1536, 28, 8960, 12, 2, 128, 151936, tied=True),
    "meta-llama/Llama-3.1-8B-Instruct": ModelShape(4096, 32, 14336, 32, 8, 128, 128256, tied=False,
                                                   qkv_bias=False),
}


def model_shape(path: str) -> ModelShape | None:
    """The shape of the model at `path` (a local dir's config.json, or a known hub id); None if unknown."""
    local = Path(path).expanduser() / "config.json"
    if local.is_file():
        return ModelShape.from_hf_config(json.loads(local.read_text()))
    return KNOWN_SHAPES.get(path)


@dataclass(frozen=True)
class Estimate:
    """Bytes per GPU of the model states (see the module docstring for what is left out)."""

    params: int
    trainable: int
    rank_bytes: int  # one trainer rank (policy, its reference, and the critic's rank where colocated)
    full_rank_bytes: int  # the same rank if every weight were trained (a full fine-tune)
    engine_bytes: int  # one engine's weights
    colocated: bool

    def lines(self, name: str, lora: str | None) -> list[str]:
        def gib(n: int) -> str:
            return f"{n / GiB:.1f} GiB"

        trained = (f"LoRA {lora}: {self.trainable / 1e6:.1f} M trainable ({100 * self.trainable / self.params:.2f}%)"
                   if lora else "all trainable")
        out = [f"memory estimate, model states per GPU (activations and KV cache not counted): {name}, "
               f"{self.params / 1e9:.2f} B parameters, {trained}",
               f"  trainer rank {gib(self.rank_bytes)}"
               + (f" (a full fine-tune's: {gib(self.full_rank_bytes)})" if lora else "")
               + f"; engine weights {gib(self.engine_bytes)}"]
        if self.colocated:
            out.append(f"  colocated GPU (an engine beside a rank): {gib(self.rank_bytes + self.engine_bytes)}"
                       " + the engine's KV cache")
        return out


def _states(params: int, trainable: int, dtype_bytes: int, zero: int, world: int, offload: bool) -> float:
    """Bytes one rank holds for `params` weights of which `trainable` train (AdamW, mixed precision when 2-byte)."""
    mixed = dtype_bytes == 2
    weights = params * dtype_bytes / (world if zero == 3 else 1)
    if offload and zero == 3:
        weights = 0.0
    grads = trainable * dtype_bytes / (world if zero >= 2 else 1)
    # fp32 master copy (mixed precision only) + Adam's two fp32 moments.
    optim = trainable * (4 * int(mixed) + 8) / (world if zero >= 1 else 1)
    return weights + grads + (0.0 if offload else optim)


def estimate(cfg: Any, shape: ModelShape) -> Estimate:
    """The estimate for a composed config (plain attribute access: a DictConfig or a TTRLConfig)."""
    t, lo = cfg.trainer, cfg.model.lora
    gpu = cfg.device != "cpu"
    tdtype = _BYTES.get("bfloat16" if t.dtype == "auto" and gpu else
                        ("float32" if t.dtype == "auto" else t.dtype), 4)
    edtype = _BYTES.get("bfloat16" if cfg.model.dtype == "auto" and gpu else
                        ("float32" if cfg.model.dtype == "auto" else cfg.model.dtype), 4)
    params = shape.params()
    kl = cfg.algorithm.kl_coef > 0
    full = _full(cfg, params, tdtype, kl)
    if lo.enabled:
        adapter = shape.lora_params(lo.r, list(lo.target_modules))
        one = _states(params + adapter, adapter, tdtype, t.zero_stage, t.num_workers, t.offload)
        # No reference (the base is it); PPO's critic: a base and an adapter of its own on the same slot.
        rank = one * (2 if cfg.algorithm.use_critic else 1)
    else:
        adapter, rank = params, full
    return Estimate(params=params, trainable=adapter, rank_bytes=int(rank), full_rank_bytes=int(full),
                    engine_bytes=params * edtype, colocated=cfg.cluster.placement == "colocate")


def _full(cfg: Any, params: int, dtype_bytes: int, kl: bool) -> float:
    """A rank of the full fine-tune of the same run: its states, its reference, its critic's rank."""
    t = cfg.trainer
    own = _states(params, params, dtype_bytes, t.zero_stage, t.num_workers, t.offload)
    if kl:
        own += params * dtype_bytes / (t.num_workers if t.zero_stage == 3 else 1)
    if cfg.algorithm.use_critic:
        own += _states(params, params, dtype_bytes, t.zero_stage, t.num_workers, t.offload)
    return own


def describe(cfg: Any) -> list[str]:
    """The estimate's lines for `--cfg job`, or one line saying why there is none."""
    path = str(cfg.model.path)
    if path in ("tiny", "tiny-arith"):
        return [f"memory estimate: none for model.path={path} (built locally on first use, a few MB)"]
    shape = model_shape(path)
    if shape is None:
        return [f"memory estimate: the shape of {path} is unknown here (no local config.json; not a model of"
                " conf/model/)"]
    lo = cfg.model.lora
    lora = f"r={lo.r} on {len(lo.target_modules)} projections" if lo.enabled else None
    return estimate(cfg, shape).lines(cfg.model.name, lora)


__all__ = ["Estimate", "KNOWN_SHAPES", "ModelShape", "describe", "estimate", "model_shape"]
