"""Pack variable-length (prompt, response) pairs into aligned training tensors.

Layout: prompts left-padded to a common width P, responses right-padded to a
common width R, so that every per-token quantity of a response (log-probs,
advantages, values, masks) is a [batch, R] tensor whose column t is the t-th
response token of every row. Pure torch; no model, no ray.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

Batch = dict[str, Tensor]


def pack_batch(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int,
               behavior_logps: Sequence[Sequence[float]] | None = None) -> Batch:
    """Tensors for a list of token sequences.

    Returns input_ids/attention_mask/position_ids [B, P+R], response_mask [B, R]
    and, when given, behavior_logp [B, R] (the rollout engine's log-probs).
    """
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    B = len(prompts)
    P = max(len(p) for p in prompts)
    R = max(1, max(len(r) for r in responses))
    input_ids = torch.full((B, P + R), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, P + R), dtype=torch.long)
    response_mask = torch.zeros((B, R), dtype=torch.float32)
    behavior = torch.zeros((B, R), dtype=torch.float32)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        input_ids[i, P - len(p):P] = torch.as_tensor(list(p), dtype=torch.long)
        input_ids[i, P:P + len(r)] = torch.as_tensor(list(r), dtype=torch.long)
        attention_mask[i, P - len(p):P + len(r)] = 1
        response_mask[i, :len(r)] = 1.0
        if behavior_logps is not None and len(r):
            behavior[i, :len(r)] = torch.as_tensor(list(behavior_logps[i]), dtype=torch.float32)
    # Positions count real tokens only, so left padding does not shift them.
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    out: Batch = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": position_ids,
        "response_mask": response_mask,
        "prompt_width": torch.tensor(P),
    }
    if behavior_logps is not None:
        out["behavior_logp"] = behavior
    return out


def response_slice(batch: Batch) -> slice:
    """Columns of the model's output (logits at t predict token t+1) that predict response tokens."""
    P = int(batch["prompt_width"])
    R = batch["response_mask"].shape[1]
    return slice(P - 1, P - 1 + R)


def trim_padding(batch: Batch) -> Batch:
    """The same rows without the columns that are padding in every row.

    A micro-batch whose longest response is r tokens keeps r response columns,
    and only as many prompt columns as its longest prompt: the model then
    runs on that micro-batch's lengths, not on the whole step's. Per-row
    quantities keep their meaning (column t is still response token t).
    """
    P = int(batch["prompt_width"])
    R = batch["response_mask"].shape[1]
    r = max(1, int(batch["response_mask"].sum(1).max()))
    real = batch["attention_mask"][:, :P].any(0)
    # Prompts are left-padded: the first column with a real token in any row.
    left = min(int(real.to(torch.int8).argmax()) if bool(real.any()) else P - 1, max(P - 1, 0))
    if r == R and left == 0:
        return batch
    out: Batch = {}
    for k, v in batch.items():
        if v.dim() == 0:
            out[k] = v
        elif v.dim() >= 2 and v.shape[1] == P + R:
            out[k] = v[:, left:P + r]
        elif v.dim() >= 2 and v.shape[1] == R:
            out[k] = v[:, :r]
        else:
            out[k] = v
    out["prompt_width"] = torch.tensor(P - left)
    return out


def shared_prompts(batch: Batch) -> tuple[Tensor, Tensor] | None:
    """(one row per distinct prompt [G], each row's prompt among them [B]); None when no two rows share one.

    Samples of one group share their prompt token for token (and, in one
    batch, its left padding): its keys and values can be computed once and
    every sample's response attend to them.
    """
    P = int(batch["prompt_width"])
    prompts = torch.cat([batch["input_ids"][:, :P], batch["attention_mask"][:, :P]], 1)
    uniq, inverse = torch.unique(prompts, dim=0, return_inverse=True)
    if len(uniq) == len(prompts):
        return None
    dev = inverse.device
    first = torch.full((len(uniq),), len(prompts), dtype=torch.long, device=dev)
    first = first.scatter_reduce(0, inverse, torch.arange(len(prompts), device=dev), reduce="amin")
    return first, inverse


def batch_size(batch: Batch) -> int:
    return batch["input_ids"].shape[0]


def select(batch: Batch, idx: slice | Tensor) -> Batch:
    """Rows `idx` of every per-row tensor (scalars are shared)."""
    return {k: (v if v.dim() == 0 else v[idx]) for k, v in batch.items()}


def split(batch: Batch, n: int) -> list[Batch]:
    """n equal consecutive row chunks (the caller ensures divisibility)."""
    B = batch_size(batch)
    if B % n:
        raise ValueError(f"cannot split a batch of {B} rows into {n} equal parts")
    k = B // n
    return [select(batch, slice(i * k, (i + 1) * k)) for i in range(n)]


def concat(batches: Sequence[Batch]) -> Batch:
    """Row-concatenate per-row tensors of equal layout."""
    out: Batch = {}
    for key, v in batches[0].items():
        out[key] = v if v.dim() == 0 else torch.cat([b[key] for b in batches], dim=0)
    return out


def zero_advantage_rows(batch: Batch) -> Tensor:
    """[B] bool: rows whose advantage is zero on every response token (no policy gradient comes from them)."""
    return ~((batch["advantages"] != 0) & (batch["response_mask"] > 0)).any(1)


def _longest_first(idx: Tensor, lengths: Tensor) -> Tensor:
    return idx[torch.argsort(lengths[idx], descending=True, stable=True)]


def spread_rows(batch: Batch, zero: Tensor, n: int) -> Batch:
    """The rows reordered so that each of `split`'s n parts gets an equal share of the rows that are not `zero`.

    Those rows, longest first, are dealt to the parts in turn, then the zero
    rows likewise: where zero-advantage rows skip the backward, no rank is
    left with all the work. Only the order changes (sums over rows do not).
    """
    B = batch_size(batch)
    if B % n:
        raise ValueError(f"cannot spread a batch of {B} rows over {n} equal parts")
    lengths = batch["response_mask"].sum(1)
    order = torch.cat([_longest_first((~zero).nonzero().squeeze(1), lengths),
                       _longest_first(zero.nonzero().squeeze(1), lengths)])
    return select(batch, torch.cat([order[r::n] for r in range(n)]))


def gradient_micro_batches(batch: Batch, zero: Tensor, n: int) -> tuple[list[Tensor], Tensor]:
    """(n row sets that carry gradient, the `zero` rows left over), rows longest first; the batch has >= n rows.

    The rows with a nonzero advantage are cut into exactly n near-equal sets
    (DeepSpeed steps the optimizer after a fixed count of backward passes,
    the same on every rank); a set that would be empty borrows one
    zero-advantage row, which adds exactly nothing to the gradient (with at
    least n rows in all, there is always one to borrow).
    """
    lengths = batch["response_mask"].sum(1)
    live = _longest_first((~zero).nonzero().squeeze(1), lengths)
    spare = _longest_first(zero.nonzero().squeeze(1), lengths)
    sets, borrowed = [], 0
    for part in torch.tensor_split(live, n):
        if len(part) == 0:
            part, borrowed = spare[borrowed:borrowed + 1], borrowed + 1
        sets.append(part)
    return sets, spare[borrowed:]
