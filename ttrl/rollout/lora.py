"""LoRA adapters on the wire and on disk: their names, what an engine expects, the checks before a load.

With `model.lora.enabled` the engines keep the base weights they started
with and only the adapter moves. It travels every weight path (Ray, IPC,
NCCL) in the same bucket plan as full weights (`nccl_sync`), each tensor
named as peft saves it and vLLM parses it:

    base_model.model.<module>.lora_A.weight   [r, in_features]
    base_model.model.<module>.lora_B.weight   [out_features, r]

one pair per target projection (`q_proj`, ..., `down_proj`) of every block.
An engine knows what to expect from the base checkpoint's shapes and the
adapter's spec (rank, target modules): `adapter_shapes`. A plan or a file
that differs (another rank, a missing projection, a full-model tensor) is
refused by `check_adapter_plan` / `check_adapter_tensors` with one sentence
naming the tensor, before vLLM sees anything.

On disk an adapter is a peft dir (adapter_config.json and
adapter_model.safetensors): what checkpoints keep as `policy/`, what
`ttrl-eval` and `ttrl-serve` load beside the base, what `ttrl.export`
merges. `spec` dicts ({r, alpha, dropout, target_modules, init}) are what
the config's LoRA section resolves to (`lora_spec`), plain data that
crosses Ray.

Must never import ray, vllm, deepspeed or peft: the trainer, the engine and
the tests without a GPU share it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ttrl.rollout.nccl_sync import Bucket, check_plan

# The prefix peft gives every tensor of a saved adapter (and vLLM strips).
PREFIX = "base_model.model."
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# vLLM's allowed max_lora_rank values (vllm.config.lora.MaxLoRARanks), smallest first.
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# What the engine names the one adapter it serves (its LoRARequest), and its int id.
ADAPTER_NAME = "ttrl-policy"
ADAPTER_ID = 1

Spec = dict[str, Any]  # {r, alpha, dropout, target_modules, init}
Shapes = dict[str, tuple[int, ...]]


# ── the spec ──────────────────────────────────────────────────────────────
def lora_spec(section: Any) -> Spec | None:
    """A config LoRA section (model.lora, ser.lora) as a spec dict, or None when off.

    With `path` set, the adapter dir's own r, alpha and target modules are
    the spec (a dir trained with other values could not load otherwise).
    """
    if section is None or not section.enabled:
        return None
    spec = {"r": int(section.r), "alpha": float(section.alpha), "dropout": float(section.dropout),
            "target_modules": list(section.target_modules), "init": str(section.init)}
    path = getattr(section, "path", None)
    if path:
        own = read_spec(path)
        spec |= {k: own[k] for k in ("r", "alpha", "target_modules")}
    return spec


def engine_rank(r: int) -> int:
    """vLLM's max_lora_rank for an adapter of rank r: the smallest allowed value >= r."""
    for allowed in VLLM_RANKS:
        if allowed >= r:
            return allowed
    raise ValueError(f"LoRA rank {r} is above vLLM's largest max_lora_rank, {VLLM_RANKS[-1]}")


def peft_config(spec: Spec, base: str | None = None, task_type: str = "CAUSAL_LM") -> dict[str, Any]:
    """The adapter_config.json of an adapter with this spec: what peft loads and vLLM's PEFTHelper reads."""
    alpha = float(spec["alpha"])
    return {"peft_type": "LORA", "task_type": task_type, "base_model_name_or_path": base,
            "r": int(spec["r"]), "lora_alpha": int(alpha) if alpha.is_integer() else alpha, "lora_dropout": float(spec["dropout"]),
            "target_modules": sorted(spec["target_modules"]), "bias": "none", "fan_in_fan_out": False,
            "init_lora_weights": True if spec.get("init", "default") == "default" else spec["init"],
            "modules_to_save": None, "use_rslora": False, "use_dora": False}


def spec_from_peft(cfg: Mapping[str, Any], where: str = "the adapter") -> Spec:
    """A spec from an adapter_config.json; ValueError (naming `where`) for what the engines cannot serve."""
    if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
        raise ValueError(f"{where} is a {cfg.get('peft_type')} adapter, not LoRA")
    unsupported = [k for k in ("use_dora", "use_rslora", "fan_in_fan_out", "modules_to_save", "rank_pattern",
                               "alpha_pattern", "layers_to_transform") if cfg.get(k)]
    if cfg.get("bias", "none") != "none":
        unsupported.append("bias")
    if unsupported:
        raise ValueError(f"{where} uses {', '.join(unsupported)}, which ttrl's engines do not serve "
                         "(plain LoRA on the attention and MLP projections only)")
    targets = cfg.get("target_modules")
    if isinstance(targets, str):  # peft allows a regex; ttrl writes and reads lists of names
        raise ValueError(f"{where} names its target modules by a pattern ({targets!r}); ttrl needs a list of names")
    init = cfg.get("init_lora_weights", True)
    return {"r": int(cfg["r"]), "alpha": float(cfg["lora_alpha"]), "dropout": float(cfg.get("lora_dropout", 0.0)),
            "target_modules": sorted(targets or []), "init": "default" if init is True else str(init)}


# ── names and shapes ──────────────────────────────────────────────────────
def wire_name(param_name: str) -> str | None:
    """A peft model's parameter name as the adapter file (and vLLM) names it; None for a non-adapter one.

    `base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight`
    -> `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`
    (the ".default" is the name of peft's active adapter; files leave it out).
    """
    parts = param_name.split(".")
    for i, p in enumerate(parts):
        if p in ("lora_A", "lora_B"):
            rest = parts[i + 1:]
            if rest and rest[-1] == "weight" and len(rest) <= 2:
                name = ".".join(parts[:i + 1] + ["weight"])
                return name if name.startswith(PREFIX) else PREFIX + name
    return None


def adapter_shapes(base_shapes: Mapping[str, Sequence[int]], target_modules: Iterable[str], r: int) -> Shapes:
    """Every adapter tensor an engine expects (wire name -> shape), from the base checkpoint's shapes.

    For each 2-D `<module>.weight` [out, in] whose module ends in a target
    projection: lora_A [r, in] and lora_B [out, r].
    """
    targets = set(target_modules)
    shapes: Shapes = {}
    for name, shape in base_shapes.items():
        if not name.endswith(".weight") or len(shape) != 2:
            continue
        module = name[:-len(".weight")]
        if module.rsplit(".", 1)[-1] not in targets:
            continue
        out_f, in_f = int(shape[0]), int(shape[1])
        shapes[f"{PREFIX}{module}.lora_A.weight"] = (int(r), in_f)
        shapes[f"{PREFIX}{module}.lora_B.weight"] = (out_f, int(r))
    if not shapes:
        raise ValueError(f"LoRA: no projection of the base model is named one of {sorted(targets)}")
    return shapes


def _explain(err: ValueError, spec: Spec) -> ValueError:
    return ValueError(f"{err} (the engine serves an adapter of rank {spec['r']} on "
                      f"{', '.join(sorted(spec['target_modules']))}); refusing this adapter")


def check_adapter_plan(plan: Sequence[Bucket], expected: Shapes, spec: Spec, engine_dtype: str | None) -> None:
    """Refuse (one ValueError sentence naming a tensor) a plan that is not exactly the engine's adapter."""
    try:
        check_plan(plan, expected, engine_dtype)
    except ValueError as err:
        raise _explain(err, spec) from None


def check_adapter_tensors(tensors: Mapping[str, torch.Tensor], expected: Shapes, spec: Spec) -> None:
    """The same for named tensors (an adapter file, a served version's blobs), finiteness included."""
    from ttrl.rollout.weights import check_weights

    try:
        check_weights(dict(tensors), expected)
    except ValueError as err:
        raise _explain(err, spec) from None


# ── on disk ───────────────────────────────────────────────────────────────
def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


def read_spec(path: str | Path) -> Spec:
    """The spec of the adapter dir at `path`; ValueError naming the dir when it is none (or one we cannot serve)."""
    f = Path(path) / CONFIG_FILE
    if not f.is_file():
        raise ValueError(f"{path} is not an adapter dir (no {CONFIG_FILE})")
    return spec_from_peft(json.loads(f.read_text()), where=f"the adapter at {path}")


def read_base(path: str | Path) -> str | None:
    """The base model an adapter dir names (base_model_name_or_path), if any."""
    return json.loads((Path(path) / CONFIG_FILE).read_text()).get("base_model_name_or_path")


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """An adapter dir's tensors by wire name (a ".default" some writers keep is dropped)."""
    from safetensors.torch import load_file

    f = Path(path) / WEIGHTS_FILE
    if not f.is_file():
        raise ValueError(f"the adapter at {path} has no {WEIGHTS_FILE}")
    out = {}
    for name, t in load_file(str(f)).items():
        wn = wire_name(name)
        if wn is None:
            raise ValueError(f"the adapter at {path} holds {name}, which is not a LoRA tensor")
        out[wn] = t
    return out


def write_adapter(path: str | Path, tensors: Mapping[str, torch.Tensor], spec: Spec, base: str | None) -> Path:
    """Write an adapter dir (peft's format) with these tensors (wire names, CPU)."""
    from safetensors.torch import save_file

    d = Path(path)
    d.mkdir(parents=True, exist_ok=True)
    save_file({n: t.detach().to("cpu").contiguous() for n, t in tensors.items()}, str(d / WEIGHTS_FILE),
              metadata={"format": "pt"})
    (d / CONFIG_FILE).write_text(json.dumps(peft_config(spec, base), indent=1))
    return d


__all__ = ["ADAPTER_ID", "ADAPTER_NAME", "CONFIG_FILE", "PREFIX", "WEIGHTS_FILE", "adapter_shapes",
           "check_adapter_plan", "check_adapter_tensors", "engine_rank", "is_adapter_dir", "lora_spec",
           "peft_config", "read_base", "read_spec", "read_tensors", "spec_from_peft", "wire_name", "write_adapter"]
