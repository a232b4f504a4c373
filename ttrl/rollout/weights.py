"""(De)serialising weight buckets for the CPU/Ray weight path, and checking them.

Tensors travel between Ray actors and into vLLM's worker processes as bytes
(`torch.save` of a name -> tensor dict): raw tensors passed through vLLM's
RPC arrived mangled, bytes do not. A bad name or shape must be caught here,
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


def iter_checked_buckets(named: Iterable[tuple[str, torch.Tensor]],
                         bucket_bytes: int) -> Iterator[tuple[bytes, list[tuple[str, tuple[int, ...]]]]]:
    """`iter_buckets`, each bucket with its manifest (names and shapes), refusing a non-finite tensor.

    The sender checks finiteness where the tensors already are (on the
    trainer's device, before packing), so a receiver need not unpack a
    bucket just to scan it: it checks the manifest, then loads once.
    """
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, t in named:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"weight sync: {name} holds NaN or inf; refusing to send it to the engines")
        bucket.append((name, t))
        size += t.numel() * t.element_size()
        if size >= bucket_bytes:
            yield pack(bucket), [(n, tuple(x.shape)) for n, x in bucket]
            bucket, size = [], 0
    if bucket:
        yield pack(bucket), [(n, tuple(x.shape)) for n, x in bucket]


def check_manifest(manifest: Iterable[Iterable[tuple[str, Iterable[int]]]], expected: dict[str, tuple[int, ...]],
                   optional: Iterable[str] = ()) -> None:
    """`check_weights` on the buckets' manifests (names and shapes), without unpacking a tensor."""
    shapes = {name: tuple(shape) for bucket in manifest for name, shape in bucket}
    check_weights({n: _Shape(s) for n, s in shapes.items()}, expected, optional, finite=False)


class _Shape:
    """A stand-in with just the shape of a tensor the manifest describes."""

    def __init__(self, shape: tuple[int, ...]):
        self.shape = shape


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
                  optional: Iterable[str] = (), finite: bool = True) -> None:
    """Raise ValueError naming the first unknown, missing, mis-shaped (or, with `finite`, non-finite) weight."""
    unknown = sorted(set(received) - set(expected))
    if unknown:
        raise ValueError(f"weight sync: {len(unknown)} unknown parameter(s), e.g. {unknown[:3]}")
    missing = sorted(set(expected) - set(received) - set(optional))
    if missing:
        raise ValueError(f"weight sync: {len(missing)} parameter(s) missing, e.g. {missing[:3]}")
    for name, t in received.items():
        if tuple(t.shape) != tuple(expected[name]):
            raise ValueError(f"weight sync: {name} has shape {tuple(t.shape)}, the engine expects {expected[name]}")
        if finite and not torch.isfinite(t).all():
            raise ValueError(f"weight sync: {name} holds NaN or inf; refusing to load it into the engine")
