"""Packed weights for served versions (bytes), checking them, and EngineSyncError.

A served version travels to the engines as bytes (`torch.save` of a name ->
tensor dict; raw tensors passed through vLLM's RPC arrived mangled, bytes do
not). The training loop's syncs use `nccl_sync.iter_store_buckets` instead. A bad name or shape must be caught here,
before vLLM sees it: a failed in-place reload leaves meta tensors behind and
kills the engine. No vLLM import here, so the trainer side can use it too.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch


class EngineSyncError(RuntimeError):
    """A rollout engine died or stalled during a weight sync: restart it and re-sync, the run goes on.

    Raised by the trainer's sending rank, so the driver can tell an engine's
    failure (recoverable) from a trainer rank's (the run must resume).
    """


def pack(named: Iterable[tuple[str, torch.Tensor]]) -> bytes:
    """One bucket of (name, tensor) pairs as bytes (CPU, contiguous)."""
    buf = io.BytesIO()
    torch.save({n: t.detach().to("cpu").contiguous() for n, t in named}, buf)
    return buf.getvalue()


def unpack(blob: bytes) -> dict[str, torch.Tensor]:
    return torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)


def iter_buckets(named: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int) -> Iterator[bytes]:
    """Group tensors into packed buckets of about `bucket_bytes` each."""
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, t in named:
        bucket.append((name, t))
        size += t.numel() * t.element_size()
        if size >= bucket_bytes:
            yield pack(bucket)
            bucket, size = [], 0
    if bucket:
        yield pack(bucket)


def checkpoint_shapes(model_dir: str) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes as stored in a model dir's safetensors files."""
    from safetensors import safe_open

    d = Path(model_dir)
    index = d / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else [
        "model.safetensors"
    ]
    shapes: dict[str, tuple[int, ...]] = {}
    for f in files:
        with safe_open(str(d / f), framework="pt") as fh:
            for name in fh.keys():
                shapes[name] = tuple(fh.get_slice(name).get_shape())
    return shapes


def check_weights(received: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]],
                  optional: Iterable[str] = ()) -> None:
    """Raise ValueError naming the first unknown, missing, mis-shaped or non-finite weight."""
    unknown = sorted(set(received) - set(expected))
    if unknown:
        raise ValueError(f"weight sync: {len(unknown)} unknown parameter(s), e.g. {unknown[:3]}")
    missing = sorted(set(expected) - set(received) - set(optional))
    if missing:
        raise ValueError(f"weight sync: {len(missing)} parameter(s) missing, e.g. {missing[:3]}")
    for name, t in received.items():
        if tuple(t.shape) != tuple(expected[name]):
            raise ValueError(f"weight sync: {name} has shape {tuple(t.shape)}, the engine expects {expected[name]}")
        if not torch.isfinite(t).all():
            raise ValueError(f"weight sync: {name} holds NaN or inf; refusing to load it into the engine")
