"""The GPU weight path: trainer rank 0 broadcasts packed buckets over NCCL.

One NCCL group per run: trainer rank 0 is group rank 0, every worker process
of every rollout engine (all TP ranks) is a rank after it. Each step the
parameters are planned into buckets of at most `bucket_mb` (a tensor larger
than that travels alone), each bucket is one flat uint8 buffer holding its
tensors at aligned byte offsets, and each bucket is ONE broadcast. The plan —
per bucket, (name, dtype, shape, offset) of every tensor — reaches the
engines ahead of the bytes (over Ray, as plain lists), so both sides cut the
stream identically and the receiver never has to guess.

The Ray path uses the same plan, each tensor's bytes a numpy array in the
object store (`iter_store_buckets`, `store_named`): one copy in, none out.

Here: the plan (pure), pack/unpack (pure torch), the send and receive loops
(generic over a `broadcast(buf)` callable, so `ttrl.bench.nccl_sync_check`
runs the very same loops over torch.distributed), the plan check the engine
runs before anything moves, and the trainer-side sender. The receiving end
lives in `vllm_ext.TTRLWorkerExtension.ttrl_receive_weights`.

This module must never import deepspeed or ray, and imports vllm only inside
the functions that open the NCCL group: tests and the bench use the rest on
machines without vllm. It must never leave a round half-sent while the
engines are healthy: once the first bucket is on the wire every bucket of the
plan is sent, and a bad value is reported after the round, not by stopping
it. Only a dead peer (the caller's `poll` raises, or the round's deadline
passes: NCCL itself has no timeout) or a plan/stream mismatch (a programming
error) ends a round early; the group is then aborted on every member still
alive (each side has the same deadline, so survivors are freed too) and must
be opened again by all of them (NCCL takes no new peers).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ttrl.rollout.weights import EngineSyncError

if TYPE_CHECKING:
    from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator

# Every tensor starts at a multiple of this many bytes in its bucket, so a
# uint8 slice can be `.view()`-ed as any dtype (<= 8-byte items) and copies
# stay vector-aligned. Padding costs < ALIGN bytes per tensor.
ALIGN = 256

# What may travel: floating weights plus the integer/bool dtypes a buffer
# might hold. A name outside this set in a plan is refused, never eval'd.
_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
    "float64": torch.float64, "int64": torch.int64, "int32": torch.int32, "int16": torch.int16,
    "int8": torch.int8, "uint8": torch.uint8, "bool": torch.bool,
}

# Sends (rank 0) or receives one buffer; may return an async handle to wait on.
Broadcast = Callable[[torch.Tensor], Any]


def dtype_name(dtype: torch.dtype | str) -> str:
    """'bfloat16' for torch.bfloat16 (or for 'bfloat16'); ValueError if not allowed."""
    name = dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(f"weight sync: dtype {dtype!r} cannot travel (allowed: {sorted(_DTYPES)})")
    return name


def to_dtype(name: str) -> torch.dtype:
    return _DTYPES[dtype_name(name)]


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


# ── the plan ──────────────────────────────────────────────────────────────
@dataclass(frozen=True)
class Slot:
    """Where one tensor lives in its bucket's flat buffer."""

    name: str
    dtype: str  # a key of _DTYPES
    shape: tuple[int, ...]
    offset: int  # bytes from the bucket's start, a multiple of ALIGN

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * _DTYPES[self.dtype].itemsize


@dataclass(frozen=True)
class Bucket:
    slots: tuple[Slot, ...]
    nbytes: int  # size of the flat buffer: end of the last slot

    def to_wire(self) -> dict[str, Any]:
        # Plain dicts/lists/str/int only: this crosses Ray and vLLM's
        # collective_rpc (msgpack between engine processes), where custom
        # classes and tensors do not survive intact.
        return {"nbytes": self.nbytes,
                "tensors": [[s.name, s.dtype, list(s.shape), s.offset] for s in self.slots]}

    @staticmethod
    def from_wire(d: dict[str, Any]) -> Bucket:
        slots = tuple(Slot(str(n), dtype_name(str(dt)), tuple(int(x) for x in shape), int(off))
                      for n, dt, shape, off in d["tensors"])
        b = Bucket(slots, int(d["nbytes"]))
        _check_layout(b)
        return b


def _check_layout(b: Bucket) -> None:
    """Offsets aligned, in order, non-overlapping, inside the buffer: a plan
    that breaks this would unpack into garbage without any error."""
    end = 0
    for s in b.slots:
        if s.offset % ALIGN or s.offset < end or any(d < 0 for d in s.shape):
            raise ValueError(f"weight sync: bad slot for {s.name} in a bucket plan "
                             f"(offset {s.offset}, shape {s.shape}, previous end {end})")
        end = s.offset + s.nbytes
    if end != b.nbytes:
        raise ValueError(f"weight sync: bucket plan says {b.nbytes} bytes, its tensors end at {end}")


def plan_buckets(specs: Iterable[tuple[str, torch.dtype | str, Sequence[int]]],
                 bucket_bytes: int) -> list[Bucket]:
    """Greedy, order-preserving buckets of (name, wire dtype, full shape).

    A bucket never exceeds `bucket_bytes` unless it holds one tensor that is
    larger on its own (that tensor then gets a bucket to itself). The order of
    `specs` is the order the sender must yield tensors in.
    """
    if bucket_bytes <= 0:
        raise ValueError(f"weight sync: bucket size must be positive, got {bucket_bytes} bytes")
    buckets: list[Bucket] = []
    slots: list[Slot] = []
    end = 0
    seen: set[str] = set()
    for name, dtype, shape in specs:
        if name in seen:
            raise ValueError(f"weight sync: {name} appears twice in the plan")
        seen.add(name)
        slot = Slot(name, dtype_name(dtype), tuple(int(d) for d in shape), 0)
        start = _align(end)
        if slots and start + slot.nbytes > bucket_bytes:
            buckets.append(Bucket(tuple(slots), end))
            slots, start = [], 0
        slots.append(Slot(slot.name, slot.dtype, slot.shape, start))
        end = start + slot.nbytes
    if slots:
        buckets.append(Bucket(tuple(slots), end))
    return buckets


def plan_to_wire(plan: Sequence[Bucket]) -> list[dict[str, Any]]:
    return [b.to_wire() for b in plan]


def plan_from_wire(wire: Sequence[dict[str, Any]]) -> list[Bucket]:
    plan = [Bucket.from_wire(d) for d in wire]
    names = [s.name for b in plan for s in b.slots]
    if len(names) != len(set(names)):
        raise ValueError("weight sync: a parameter appears twice in the bucket plan")
    return plan


def param_specs(named_params: Iterable[tuple[str, torch.nn.Parameter]],
                wire_dtype: torch.dtype | str) -> list[tuple[str, str, tuple[int, ...]]]:
    """(name, wire dtype, FULL shape) of each parameter, without gathering.

    Under ZeRO-3 `p.shape` is the empty local placeholder; DeepSpeed keeps the
    full shape in `p.ds_shape`.
    """
    wd = dtype_name(wire_dtype)
    return [(n, wd, tuple(getattr(p, "ds_shape", p.shape))) for n, p in named_params]


def layer_groups(names: Sequence[str]) -> list[list[str]]:
    """Consecutive names that share a layer: `model.layers.3.*` is one group.

    The unit of a ZeRO-3 gather: one collective per decoder layer instead of
    one per tensor, and never more than a layer gathered at once. Names with
    no integer segment (embeddings, final norm, lm_head) stand alone.
    Flattening the groups gives back `names` in order.
    """
    def key(name: str) -> str:
        parts = name.split(".")
        for i, p in enumerate(parts):
            if p.isdigit():
                return ".".join(parts[:i + 1])
        return name

    groups: list[list[str]] = []
    last = None
    for n in names:
        k = key(n)
        if groups and k == last:
            groups[-1].append(n)
        else:
            groups.append([n])
        last = k
    return groups


def rank_offsets(engine_world_sizes: Sequence[int]) -> tuple[list[int], int]:
    """Group rank of each engine's first worker (trainer is rank 0), and the world size."""
    offsets, nxt = [], 1
    for w in engine_world_sizes:
        offsets.append(nxt)
        nxt += w
    return offsets, nxt


# ── pack / unpack ─────────────────────────────────────────────────────────
def slot_view(buf: torch.Tensor, s: Slot) -> torch.Tensor:
    """The slot's tensor as a view of the flat uint8 buffer (no copy)."""
    return buf[s.offset:s.offset + s.nbytes].view(_DTYPES[s.dtype]).view(s.shape)


def pack_into(buf: torch.Tensor, s: Slot, t: torch.Tensor) -> None:
    """Copy (and cast to the wire dtype) one tensor into its slot."""
    if tuple(t.shape) != s.shape:
        raise ValueError(f"weight sync: {s.name} has shape {tuple(t.shape)}, the plan says {s.shape}")
    slot_view(buf, s).copy_(t)


def pack_bucket(bucket: Bucket, tensors: Sequence[torch.Tensor], device: torch.device | str = "cpu") -> torch.Tensor:
    """All of a bucket's tensors as one flat uint8 buffer [bucket.nbytes]."""
    if len(tensors) != len(bucket.slots):
        raise ValueError(f"weight sync: {len(tensors)} tensors for a bucket of {len(bucket.slots)}")
    buf = torch.empty(bucket.nbytes, dtype=torch.uint8, device=device)
    for s, t in zip(bucket.slots, tensors, strict=True):
        pack_into(buf, s, t)
    return buf


def unpack_bucket(buf: torch.Tensor, bucket: Bucket) -> list[tuple[str, torch.Tensor]]:
    """(name, view) pairs; the views keep `buf` alive and alias it."""
    if buf.dtype != torch.uint8 or buf.numel() != bucket.nbytes:
        raise ValueError(f"weight sync: got a {buf.dtype} buffer of {buf.numel()} for a "
                         f"bucket of {bucket.nbytes} bytes")
    return [(s.name, slot_view(buf, s)) for s in bucket.slots]


def _in_plan_order(plan: Sequence[Bucket],
                   named: Iterable[tuple[str, torch.Tensor | None]]) -> Iterator[tuple[Slot, torch.Tensor]]:
    """Each slot of the plan, in order, with its tensor from `named`.

    Refuses a tensor out of order, a missing one, and (once the plan's last
    slot has been taken, on the next call) one the plan does not have.
    """
    it = iter(named)
    for bucket in plan:
        for s in bucket.slots:
            try:
                name, t = next(it)
            except StopIteration:
                raise ValueError(f"weight sync: the trainer ran out of tensors at {s.name}; "
                                 "the plan and the parameters disagree") from None
            if name != s.name or t is None:
                raise ValueError(f"weight sync: the trainer yielded {name!r} where the plan has {s.name!r}")
            yield s, t
            del t  # before the next tensor is asked for: the caller may free each layer behind it
    extra = next(it, None)
    if extra is not None:
        raise ValueError(f"weight sync: the trainer yielded {extra[0]!r}, which is not in the plan")


# ── the Ray path: the same plan, each tensor's bytes in the object store ──
def _raw(t: torch.Tensor) -> Any:
    """A tensor's bytes as a uint8 numpy array, without a copy (numpy has no bfloat16; bytes do)."""
    return t.reshape(-1).view(torch.uint8).numpy()


def all_finite(tensors: Sequence[torch.Tensor]) -> bool:
    """No NaN or inf in any of `tensors`: a sum per tensor (one read, no temporary) is finite unless a
    value is, or the sum overflowed; one host sync for all the sums.

    Only a tensor whose sum is not finite pays for the exact elementwise check.
    """
    if not tensors:
        return True
    sums = [t.sum(dtype=torch.float64 if t.dtype == torch.float64 else torch.float32) for t in tensors]
    flags = torch.isfinite(torch.stack(sums)).tolist()
    return all(bool(torch.isfinite(t).all()) for t, ok in zip(tensors, flags, strict=True) if not ok)


def _all_finite(t: torch.Tensor) -> bool:
    return all_finite([t])


def iter_store_buckets(plan: Sequence[Bucket], named: Iterable[tuple[str, torch.Tensor]]) -> Iterator[list[Any]]:
    """Per bucket of the plan, the raw bytes of each of its tensors (cast to the wire dtype) as numpy arrays.

    For the Ray path: `ray.put` of such a list copies each array into the
    object store once, straight from the tensor (no packing copy first), and
    every engine on the node reads them there without a copy (a `bytes` blob
    would be copied out again by each engine, then unpacked once more). A
    tensor already in the wire dtype and contiguous is not copied here at all.
    Refuses a NaN/inf value, checked after the cast (an fp32 -> fp16 overflow
    shows too), before the bucket leaves the sender.
    """
    slots = _in_plan_order(plan, named)
    for bucket in plan:
        arrays = []
        for _ in bucket.slots:
            s, t = next(slots)
            if tuple(t.shape) != s.shape:
                raise ValueError(f"weight sync: {s.name} has shape {tuple(t.shape)}, the plan says {s.shape}")
            t = t.detach().to("cpu", _DTYPES[s.dtype]).contiguous()
            if t.is_floating_point() and not _all_finite(t):
                raise ValueError(f"weight sync: {s.name} holds NaN or inf (as {s.dtype}); "
                                 "refusing to send it to the engines")
            arrays.append(_raw(t))
        yield arrays
    next(slots, None)  # refuses a tensor the plan does not have


def store_named(buckets: Sequence[Sequence[Any]], plan: Sequence[Bucket]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every tensor in `iter_store_buckets`' output, as views of the arrays (no copy).

    `buckets`: the lists of arrays straight from the object store (read-only;
    the reload only copies out of them) or of bytes, as across a process boundary.
    """
    import warnings

    import numpy as np

    if len(buckets) != len(plan):
        raise ValueError(f"weight sync: {len(buckets)} buckets for a plan of {len(plan)}")
    for arrays, bucket in zip(buckets, plan, strict=True):
        if len(arrays) != len(bucket.slots):
            raise ValueError(f"weight sync: {len(arrays)} tensors for a bucket of {len(bucket.slots)}")
        for a, s in zip(arrays, bucket.slots, strict=True):
            a = a if isinstance(a, np.ndarray) else np.frombuffer(a, dtype=np.uint8)
            with warnings.catch_warnings():
                # Read-only store memory: torch warns that writes would be undefined.
                warnings.simplefilter("ignore", UserWarning)
                raw = torch.from_numpy(a)
            t = raw.view(_DTYPES[s.dtype]).reshape(s.shape)
            yield s.name, t


# ── the loops (any communicator) ──────────────────────────────────────────
@dataclass
class SendStats:
    bytes: int = 0
    buckets: int = 0
    seconds: float = 0.0
    nonfinite: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, float]:
        return {"bytes": float(self.bytes), "buckets": float(self.buckets), "send_s": self.seconds,
                "send_gbps": self.bytes / max(self.seconds, 1e-9) / 1e9, "nonfinite": float(len(self.nonfinite))}


class WeightSyncTimeout(EngineSyncError):
    """A broadcast round made no progress within its deadline: a peer is dead or stuck."""


def _completed(done: Any) -> bool:
    # torch.distributed's Work (gloo, async_op=True) or a CUDA event/stream.
    return done.is_completed() if hasattr(done, "is_completed") else done.query()


def _wait(done: Any, poll: Callable[[], None] | None, deadline: float | None = None,
          timeout_s: float | None = None) -> None:
    """Block until `done` has completed, calling `poll` meanwhile.

    `done`: a CUDA event or stream (NCCL), or a torch.distributed Work (the
    gloo stand-in). NCCL has no timeout: a receiver that died leaves the
    broadcast waiting forever, so `poll` (e.g. "did an engine's RPC fail?")
    may raise to give up, and past `deadline` (time.monotonic()) this raises
    WeightSyncTimeout; `timeout_s` only words the message.
    """
    work = hasattr(done, "is_completed")
    if poll is None and deadline is None and not work:
        done.synchronize()
        return
    while (poll is not None or deadline is not None) and not _completed(done):
        if poll is not None:
            poll()
        if deadline is not None and time.monotonic() > deadline:
            raise WeightSyncTimeout(
                f"weight sync: the broadcast round did not finish within {timeout_s or 0:.0f} s "
                "(rollout.sync_timeout_s): an engine is dead or stuck")
        time.sleep(0.002)
    if work:
        try:
            done.wait()  # a failed Work raises its error here
        except Exception as e:
            raise EngineSyncError(f"weight sync: a peer has gone, a broadcast failed ({e})") from e


def _deadline(timeout_s: float | None) -> float | None:
    return None if timeout_s is None else time.monotonic() + timeout_s


def send_buckets(plan: Sequence[Bucket], named: Iterable[tuple[str, torch.Tensor | None]],
                 broadcast: Broadcast, device: torch.device | str, max_in_flight: int = 2,
                 comm_stream: torch.cuda.Stream | None = None,
                 poll: Callable[[], None] | None = None, timeout_s: float | None = None) -> SendStats:
    """Pack `named` bucket by bucket as the plan says and broadcast each bucket.

    `named` must yield the plan's tensors in plan order (full, on `device`);
    each is copied into its slot as it arrives and the reference dropped, so
    the caller may gather layer by layer and free each layer behind it. On
    CUDA the broadcast runs on `comm_stream` while the next layer is gathered
    and packed on the current stream; at most `max_in_flight` buffers are
    alive at once. Returns once every broadcast has completed on the GPU;
    `poll` is called while waiting for that and may raise to give up. On CPU
    `broadcast` may return a torch.distributed Work (gloo, async_op=True),
    which is waited on the same way. Past `timeout_s` from the start of the
    round it raises WeightSyncTimeout.
    """
    device = torch.device(device)
    cuda = device.type == "cuda"
    if cuda and comm_stream is None:
        comm_stream = torch.cuda.Stream(device=device)
    current = torch.cuda.current_stream(device) if cuda else None
    slots = _in_plan_order(plan, named)
    pending: deque = deque()  # CUDA events of broadcasts still running
    flags: list[torch.Tensor] = []  # per float tensor: all finite, on device (no sync)
    flag_names: list[str] = []
    stats = SendStats()
    t0 = time.perf_counter()
    deadline = _deadline(timeout_s)
    for bucket in plan:
        if cuda and len(pending) >= max_in_flight:
            _wait(pending.popleft(), poll, deadline, timeout_s)  # bound memory: a buffer per broadcast in flight
        buf = torch.empty(bucket.nbytes, dtype=torch.uint8, device=device)
        for _ in bucket.slots:
            s, t = next(slots)
            pack_into(buf, s, t)
            del t
            view = slot_view(buf, s)
            if view.is_floating_point():
                # Checked after the cast: fp32 -> fp16 overflow shows here too.
                flags.append(torch.isfinite(view).all())
                flag_names.append(s.name)
        if cuda:
            comm_stream.wait_stream(current)  # the packing copies come first
            with torch.cuda.stream(comm_stream):
                broadcast(buf)
            # The allocator must not hand this memory out again before the
            # broadcast has read it: tie the buffer's lifetime to comm_stream.
            buf.record_stream(comm_stream)
            ev = torch.cuda.Event()
            ev.record(comm_stream)
            pending.append(ev)
        else:
            work = broadcast(buf)
            if work is not None:
                _wait(work, poll, deadline, timeout_s)
        stats.bytes += bucket.nbytes
        stats.buckets += 1
        del buf
    next(slots, None)  # refuses a tensor the plan does not have
    if cuda:
        _wait(comm_stream, poll, deadline, timeout_s)
    if flags:
        ok = torch.stack(flags).cpu()  # one sync for the whole model
        stats.nonfinite = tuple(n for n, good in zip(flag_names, ok.tolist(), strict=True) if not good)
    stats.seconds = time.perf_counter() - t0
    return stats


def receive_buckets(plan: Sequence[Bucket], broadcast: Broadcast, device: torch.device | str,
                    timeout_s: float | None = None) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Receive the plan's buckets in order; yield each as (name, view) pairs.

    A fresh buffer per bucket, never a reused one: the consumer may hold
    views of earlier buckets (vLLM's layerwise reload buffers a layer's
    tensors until the whole layer has arrived). Stream order on the current
    stream keeps the receive ahead of any use of the views. With `timeout_s`
    each bucket is waited for (on CUDA: an event after its broadcast) and
    past the round's deadline WeightSyncTimeout is raised, so a receiver
    whose sender or fellow receiver died is freed instead of hanging.
    """
    device = torch.device(device)
    deadline = _deadline(timeout_s)
    for bucket in plan:
        buf = torch.empty(bucket.nbytes, dtype=torch.uint8, device=device)
        done = broadcast(buf)
        if done is None and deadline is not None and device.type == "cuda":
            done = torch.cuda.Event()
            done.record(torch.cuda.current_stream(device))
        if done is not None:
            _wait(done, None, deadline, timeout_s)
        yield unpack_bucket(buf, bucket)


# ── checks the engine runs before anything moves ──────────────────────────
def check_plan(plan: Sequence[Bucket], expected: dict[str, tuple[int, ...]], engine_dtype: str | None,
               optional: Iterable[str] = ()) -> None:
    """Raise ValueError naming the first unknown, missing, mis-shaped or mis-typed weight.

    Run by the rollout actor before the round starts: once the engine has
    begun a reload, a bad name would leave it broken.
    """
    got = {s.name: s for b in plan for s in b.slots}
    unknown = sorted(set(got) - set(expected))
    if unknown:
        raise ValueError(f"weight sync: {len(unknown)} unknown parameter(s), e.g. {unknown[:3]}")
    missing = sorted(set(expected) - set(got) - set(optional))
    if missing:
        raise ValueError(f"weight sync: {len(missing)} parameter(s) missing, e.g. {missing[:3]}")
    for name, s in got.items():
        if s.shape != tuple(expected[name]):
            raise ValueError(f"weight sync: {name} has shape {s.shape}, the engine expects {tuple(expected[name])}")
        if engine_dtype and _DTYPES[s.dtype].is_floating_point and s.dtype != engine_dtype:
            raise ValueError(f"weight sync: {name} travels as {s.dtype}, the engine runs in {engine_dtype}")


def check_distinct_gpus(sender_uuid: str, receiver_uuids: Sequence[str]) -> None:
    """NCCL refuses two ranks of one group on the same GPU; say so before it hangs or errors."""
    shared = [u for u in receiver_uuids if u == sender_uuid]
    dup = len(set(receiver_uuids)) != len(receiver_uuids)
    if shared or dup:
        raise ValueError("weight sync over NCCL needs every engine worker on a GPU of its own, apart from "
                         "trainer rank 0's (colocated placement shares GPUs): use the Ray/CPU weight path "
                         "there, or cluster.placement=split")


def gpu_uuid(device: torch.device | str | int | None = None) -> str:
    return str(torch.cuda.get_device_properties(device if device is not None else torch.cuda.current_device()).uuid)


# ── the NCCL group (vLLM's stateless group + PyNccl) ──────────────────────
def open_weight_group(host: str, port: int, rank: int, world_size: int,
                      device: torch.device | int) -> PyNcclCommunicator:
    """Join the trainer->engines group as `rank`; blocks until all ranks have joined.

    A group apart from both torch.distributed worlds (DeepSpeed's and vLLM's
    own): vLLM's StatelessProcessGroup for the rendezvous (rank 0 hosts the
    TCP store) and PyNccl for the data — the pairing vLLM's own NCCL weight
    transfer uses, through its helper, which also creates the communicator
    without any NCCL settings vLLM pinned for its internal groups.
    """
    from vllm.distributed.weight_transfer.nccl_common import stateless_init_process_group

    if torch.cuda.is_available():
        # Importing vLLM patched torch.cuda.set_stream to remember the current
        # stream; with nothing remembered, PyNccl's warm-up would install a new
        # current stream in this process (the trainer's!). Remember ours.
        torch.cuda.set_stream(torch.cuda.current_stream())
    comm = stateless_init_process_group(host, port, rank, world_size, device=device)
    if comm.disabled:
        raise RuntimeError("weight sync: NCCL is not available in this process (no CUDA, or "
                           "VLLM_DISABLE_PYNCCL is set)")
    return comm


class NcclWeightSender:
    """Trainer rank 0's end of the weight group."""

    def __init__(self, comm: PyNcclCommunicator, device: torch.device):
        self.comm, self.device = comm, device
        self.stream = torch.cuda.Stream(device=device)

    @classmethod
    def open(cls, host: str, port: int, world_size: int) -> NcclWeightSender:
        device = torch.device("cuda", torch.cuda.current_device())
        return cls(open_weight_group(host, port, 0, world_size, device), device)

    def send(self, plan: Sequence[Bucket], named: Iterable[tuple[str, torch.Tensor | None]],
             max_in_flight: int = 2, poll: Callable[[], None] | None = None,
             timeout_s: float | None = None) -> SendStats:
        """One full round. On any error the group is aborted (the broadcasts
        queued on the GPU are cancelled) and must be opened again."""
        if self.comm is None:
            raise RuntimeError("weight sync: the NCCL weight group was closed; open it again")

        def bcast(buf: torch.Tensor) -> None:
            # The stream explicitly: PyNccl's default is vLLM's idea of the
            # current stream, not necessarily torch's.
            self.comm.broadcast(buf, src=0, stream=torch.cuda.current_stream())

        try:
            return send_buckets(plan, named, bcast, self.device, max_in_flight, comm_stream=self.stream,
                                poll=poll, timeout_s=timeout_s)
        except BaseException:
            self.close()  # ncclCommAbort: otherwise the GPU keeps waiting for peers that will not come
            raise

    def close(self) -> None:
        if self.comm is not None:
            self.comm.destroy()
            self.comm = None
