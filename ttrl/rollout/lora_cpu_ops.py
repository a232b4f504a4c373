"""Grouped LoRA matmuls for vLLM's CPU engines: one GEMM per adapter in the batch, not one per token.

vLLM's CPU LoRA path (`vllm.lora.ops.torch_ops`) applies an adapter by
gathering a copy of its A or B matrix for every token of the batch and then
multiplying token by token (`einsum("bi,boi->bo")`). In a training rollout every
token uses the same adapter, so a 512-token decode step copies the same
matrix 512 times per projection: in the demo with an adapter, py-spy put 48%
of the engine's time in those ops. Here the tokens are grouped by adapter
slot and each group is one matrix product, which gives the same numbers up
to the order of a float sum.

`install()` swaps the three `bgmv_*` functions in the module that defines them
(the `sgmv_*` prefill ops call them through it) and in the CPU punica wrapper
that imported them by name. Slot indices keep vLLM's CPU meaning exactly,
negative ones included (Python indexing: -1 is the last slot), so a batch
behaves as it did before, only faster. This module must never change what a
token's adapter is, and is only installed in an engine process that serves
LoRA on CPU.
"""

from __future__ import annotations

from typing import Any

_INSTALLED = False


def _grouped(inputs: Any, weights: Any, indices: Any, dtype: Any) -> Any:
    """[b, i] inputs times each row's slot of `weights` ([slots, (1,) o, i]): [b, o]."""
    import torch

    w = weights.squeeze(1) if weights.dim() == 4 else weights                  # [slots, o, i]
    x = inputs.to(dtype)
    idx = indices.to(torch.long)
    idx = torch.where(idx < 0, idx + w.shape[0], idx)  # vLLM's CPU ops index with -1 as Python does
    if idx.numel() == 0:
        return x.new_zeros(0, w.shape[1])
    first = int(idx[0])
    if bool((idx == first).all()):
        return x @ w[first].to(dtype).T
    out = x.new_empty(x.shape[0], w.shape[1])
    for slot in torch.unique(idx).tolist():
        rows = (idx == slot).nonzero().squeeze(1)
        out[rows] = x[rows] @ w[slot].to(dtype).T
    return out


def bgmv_shrink(inputs: Any, lora_a_weights: Any, output_tensor: Any, lora_indices_tensor: Any,
                scaling: float = 1.0) -> None:
    outputs = _grouped(inputs, lora_a_weights, lora_indices_tensor, output_tensor.dtype)
    output_tensor[:, : outputs.shape[1]] = scaling * outputs


def bgmv_expand(inputs: Any, lora_b_weights: Any, output_tensor: Any, lora_indices_tensor: Any,
                add_inputs: bool = True) -> None:
    outputs = _grouped(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    limit = output_tensor.shape[0]
    if outputs.shape[0] == 1 and output_tensor.shape[0] != 1:
        limit = 1  # as vLLM's own op: one row of output broadcast over the rest
    common = min(outputs.shape[1], output_tensor.shape[1])  # adapter and model may pad differently
    if add_inputs:
        output_tensor[:, :common] += outputs[:limit, :common]
    else:
        output_tensor[:, :common] = outputs[:limit, :common]


def bgmv_expand_slice(inputs: Any, lora_b_weights: Any, output_tensor: Any, lora_indices_tensor: Any,
                      slice_offset: int, slice_size: int, add_inputs: bool = True) -> None:
    outputs = _grouped(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    if add_inputs:
        output_tensor[:, slice_offset: slice_offset + slice_size] += outputs
    else:
        output_tensor[:, slice_offset: slice_offset + slice_size] = outputs


def install() -> bool:
    """Swap vLLM's per-token CPU LoRA ops for the grouped ones in this process; False if vLLM lacks them."""
    global _INSTALLED
    if _INSTALLED:
        return True
    try:
        from vllm.lora.ops.torch_ops import lora_ops
        from vllm.lora.punica_wrapper import punica_cpu
    except ImportError:
        return False
    names = ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice")
    if not all(hasattr(lora_ops, n) for n in names):
        return False  # another vLLM: leave its ops alone rather than guess
    for module in (lora_ops, punica_cpu):
        for name in names:
            if hasattr(module, name):
                setattr(module, name, globals()[name])
    _INSTALLED = True
    return True
