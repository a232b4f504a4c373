"""LoRA on the trainer side: wrap a model in peft adapters, read and write their tensors, merge them.

The DeepSpeed workers (`worker.py`, `reward_model.py`) call `wrap` on the
model they loaded, before `deepspeed.initialize`: the base weights are then
frozen, so only the adapters (and, for a value or reward head, the head)
are trainable and in the optimizer, under any ZeRO stage. Under ZeRO-3 the
base arrives partitioned (`HfDeepSpeedConfig`); the adapter layers peft adds
are plain tensors that DeepSpeed partitions when it initialises, so every
rank must build the very same ones: `wrap` seeds their initialisation with
the run's seed, not the rank's.

`adapter_params` names the policy's adapter tensors as peft files and vLLM
do (`ttrl.rollout.lora.wire_name`): the weight sync, the adapter-only
checkpoint and the export all go by these names.

Must never import ray or vllm; peft and transformers are imported inside
the functions that need them.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ttrl.rollout.lora import Spec, read_spec, read_tensors, wire_name


def peft_lora_config(spec: Spec, task_type: str = "CAUSAL_LM", modules_to_save: list[str] | None = None) -> Any:
    """peft's LoraConfig for a spec (ttrl.rollout.lora.lora_spec)."""
    from peft import LoraConfig, TaskType

    init: Any = True if spec.get("init", "default") == "default" else spec["init"]
    return LoraConfig(task_type=getattr(TaskType, task_type), r=int(spec["r"]), lora_alpha=spec["alpha"],
                      lora_dropout=float(spec["dropout"]), target_modules=list(spec["target_modules"]),
                      init_lora_weights=init, modules_to_save=modules_to_save)


def wrap(model: Any, spec: Spec, seed: int, task_type: str = "CAUSAL_LM",
         modules_to_save: list[str] | None = None) -> Any:
    """`model` with LoRA adapters (peft), its base frozen; the same adapters on every rank for one seed."""
    from peft import get_peft_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, peft_lora_config(spec, task_type, modules_to_save))
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    stray = [n for n in trainable if wire_name(n) is None and ".modules_to_save." not in n]
    if stray or not trainable:  # peft's promise, checked: nothing of the base is trained
        raise RuntimeError(f"LoRA: parameters outside the adapters are trainable: {stray[:3]}" if stray
                           else "LoRA: the adapters have no trainable parameters")
    return peft_model


def adapter_params(module: Any) -> list[tuple[str, Any]]:
    """(wire name, parameter) of every adapter tensor of a peft model, in module order."""
    out = []
    for name, p in module.named_parameters():
        wn = wire_name(name)
        if wn is not None:
            out.append((wn, p))
    return out


def load_into(module: Any, tensors: Mapping[str, torch.Tensor], where: str) -> None:
    """Copy an adapter's tensors (wire names) into a peft model's adapters (before DeepSpeed partitions them).

    ValueError naming `where` unless the names and shapes match one for one.
    """
    params = dict(adapter_params(module))
    missing, unknown = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
    if missing or unknown:
        raise ValueError(f"the adapter at {where} does not fit the model: missing {missing[:2]}, "
                         f"unknown {unknown[:2]}")
    with torch.no_grad():
        for name, p in params.items():
            t = tensors[name]
            if tuple(t.shape) != tuple(p.shape):
                raise ValueError(f"the adapter at {where}: {name} has shape {tuple(t.shape)}, the model's is "
                                 f"{tuple(p.shape)}")
            p.copy_(t.to(p.dtype))


def merge(base: str, adapter_dir: str, out: str, dtype: str = "float32", tokenizer: str | None = None) -> Path:
    """Write base + adapter as one plain Hugging Face model dir (the adapter merged into the weights)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ttrl.rollout.nccl_sync import to_dtype

    spec = read_spec(adapter_dir)
    tensors = read_tensors(adapter_dir)
    model = AutoModelForCausalLM.from_pretrained(base, torch_dtype=torch.float32)
    peft_model = PeftModel(model, peft_lora_config(spec))
    load_into(peft_model, tensors, adapter_dir)
    merged = peft_model.merge_and_unload().to(to_dtype(dtype))
    merged.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(tokenizer or base).save_pretrained(out)
    return Path(out)


__all__ = ["adapter_params", "load_into", "merge", "peft_lora_config", "wrap"]
