"""The pure parts of the NCCL weight path: bucket plans, pack/unpack, the loops.

No GPU, no vLLM: the broadcast is an in-memory queue, so what the engine
receives is exactly what the trainer packed.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from collections import deque

import pytest
import torch

from ttrl.rollout.nccl_sync import (
    ALIGN,
    Bucket,
    WeightSyncTimeout,
    _wait,
    check_distinct_gpus,
    check_plan,
    layer_groups,
    pack_bucket,
    param_specs,
    plan_buckets,
    plan_from_wire,
    plan_to_wire,
    rank_offsets,
    receive_buckets,
    send_buckets,
    unpack_bucket,
)

MB = 1 << 20


def _weights() -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [
        ("model.embed_tokens.weight", torch.randn(300, 64, generator=g)),            # 76800 B fp32
        ("model.layers.0.self_attn.q_proj.weight", torch.randn(64, 64, generator=g)),
        ("model.layers.0.self_attn.q_proj.bias", torch.randn(7, generator=g)),       # odd size: padding
        ("model.layers.0.input_layernorm.weight", torch.randn(64, generator=g).bfloat16()),
        ("model.layers.1.mlp.up_proj.weight", torch.randn(128, 64, generator=g).half()),
        ("model.layers.1.scale", torch.tensor(3.5)),                                  # 0-d
        ("model.layers.1.empty", torch.empty(0, 4)),                                  # zero-size
        ("model.layers.1.steps", torch.arange(5, dtype=torch.int64)),
        ("model.norm.weight", torch.randn(64, generator=g)),
    ]


def _specs(ws):
    return [(n, t.dtype, t.shape) for n, t in ws]


def _fake_wire():
    """A broadcast that hands the sender's bytes to the receiver (a copy, like the wire)."""
    q: deque = deque()

    def send(buf):
        q.append(buf.clone())

    def recv(buf):
        buf.copy_(q.popleft())

    return send, recv, q


# ── planning ─────────────────────────────────────────────────────────────
@pytest.mark.parametrize("bucket_bytes", [1, 4096, 20_000, 80_000, 10 * MB])
def test_plan_covers_everything_in_order_and_respects_the_bound(bucket_bytes):
    ws = _weights()
    plan = plan_buckets(_specs(ws), bucket_bytes)
    names = [s.name for b in plan for s in b.slots]
    assert names == [n for n, _ in ws]
    for b in plan:
        assert b.nbytes <= bucket_bytes or len(b.slots) == 1, "only a lone oversized tensor may exceed the bound"
        end = 0
        for s in b.slots:
            assert s.offset % ALIGN == 0 and s.offset >= end
            end = s.offset + s.nbytes
        assert b.nbytes == end


def test_oversized_tensor_gets_a_bucket_of_its_own():
    specs = [("a", torch.float32, (10,)), ("big", torch.float32, (1000,)), ("b", torch.float32, (10,))]
    plan = plan_buckets(specs, bucket_bytes=1024)
    assert [[s.name for s in b.slots] for b in plan] == [["a"], ["big"], ["b"]]
    assert plan[1].nbytes == 4000


def test_plan_packs_small_tensors_together():
    specs = [(f"t{i}", torch.bfloat16, (128,)) for i in range(8)]  # 256 B each, already aligned
    plan = plan_buckets(specs, bucket_bytes=1024)
    assert [len(b.slots) for b in plan] == [4, 4]
    assert all(b.nbytes == 1024 for b in plan)


def test_plan_rejects_duplicates_bad_sizes_and_unknown_dtypes():
    with pytest.raises(ValueError, match="twice"):
        plan_buckets([("a", torch.float32, (1,)), ("a", torch.float32, (1,))], 1024)
    with pytest.raises(ValueError, match="positive"):
        plan_buckets([("a", torch.float32, (1,))], 0)
    with pytest.raises(ValueError, match="cannot travel"):
        plan_buckets([("a", torch.complex64, (1,))], 1024)


def test_wire_form_is_plain_data_and_round_trips():
    plan = plan_buckets(_specs(_weights()), 20_000)
    wire = plan_to_wire(plan)
    # What Ray and vLLM's msgpack RPC carry: JSON-able types only (tuples become lists).
    back = plan_from_wire(json.loads(json.dumps(wire)))
    assert back == plan


@pytest.mark.parametrize("corrupt", ["overlap", "misaligned", "size", "dtype", "dup"])
def test_corrupt_wire_plans_are_refused(corrupt):
    wire = plan_to_wire(plan_buckets(_specs(_weights()), 10 * MB))
    t = wire[0]["tensors"]
    if corrupt == "overlap":
        t[1][3] = 0
    elif corrupt == "misaligned":
        t[1][3] += 1
    elif corrupt == "size":
        wire[0]["nbytes"] += 1
    elif corrupt == "dtype":
        t[0][1] = "__import__('os')"
    else:
        wire.append({"nbytes": wire[0]["nbytes"], "tensors": [list(x) for x in t]})
    with pytest.raises(ValueError):
        plan_from_wire(wire)


# ── pack / unpack ────────────────────────────────────────────────────────
@pytest.mark.parametrize("bucket_bytes", [1, 20_000, 10 * MB])
def test_pack_unpack_round_trips_names_dtypes_shapes_and_bits(bucket_bytes):
    ws = _weights()
    ws[0][1][0, 0] = float("nan")  # bit-exact includes NaN payloads
    ws[1][1][0, 0] = float("-inf")
    plan = plan_buckets(_specs(ws), bucket_bytes)
    it = iter(ws)
    for b in plan:
        src = [next(it) for _ in b.slots]
        buf = pack_bucket(b, [t for _, t in src])
        assert buf.dtype == torch.uint8 and buf.numel() == b.nbytes
        out = unpack_bucket(buf, b)
        for (n0, t0), (n1, t1) in zip(src, out, strict=True):
            assert n1 == n0 and t1.dtype == t0.dtype and t1.shape == t0.shape
            assert torch.equal(t1.reshape(-1).view(torch.uint8), t0.reshape(-1).view(torch.uint8))


def test_pack_casts_to_the_wire_dtype_and_checks_shapes():
    t = torch.randn(4, 4)
    (b,) = plan_buckets([("w", torch.bfloat16, (4, 4))], MB)
    ((_, got),) = unpack_bucket(pack_bucket(b, [t]), b)
    assert got.dtype == torch.bfloat16 and torch.equal(got, t.bfloat16())
    with pytest.raises(ValueError, match="shape"):
        pack_bucket(b, [torch.randn(4, 5)])


def test_unpack_refuses_a_buffer_of_the_wrong_size():
    (b,) = plan_buckets([("w", torch.float32, (4,))], MB)
    with pytest.raises(ValueError):
        unpack_bucket(torch.zeros(b.nbytes + 1, dtype=torch.uint8), b)


# ── the send / receive loops over a fake wire ────────────────────────────
def test_send_then_receive_delivers_every_tensor_exactly():
    ws = _weights()
    plan = plan_buckets(_specs(ws), 20_000)
    send, recv, q = _fake_wire()
    stats = send_buckets(plan, iter(ws), send, "cpu")
    assert stats.buckets == len(plan) == len(q)
    assert stats.bytes == sum(b.nbytes for b in plan)
    assert stats.nonfinite == ()
    got = [pair for bucket in receive_buckets(plan, recv, "cpu") for pair in bucket]
    assert [n for n, _ in got] == [n for n, _ in ws]
    for (_, a), (_, b) in zip(ws, got, strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_received_views_of_earlier_buckets_stay_valid():
    # vLLM's layerwise reload holds a layer's tensors until the layer is
    # complete, across buckets: a reused receive buffer would corrupt them.
    ws = [(f"t{i}", torch.full((64,), float(i))) for i in range(6)]
    plan = plan_buckets(_specs(ws), 256)
    send, recv, _ = _fake_wire()
    send_buckets(plan, iter(ws), send, "cpu")
    held = [pair for bucket in receive_buckets(plan, recv, "cpu") for pair in bucket]
    for (_, a), (_, b) in zip(ws, held, strict=True):
        assert torch.equal(a, b)


def test_send_reports_nonfinite_after_the_cast():
    ws = [("ok", torch.ones(4)), ("bad", torch.tensor([1.0, float("nan")])), ("big", torch.tensor([1e6]))]
    plan = plan_buckets([(n, torch.float16, t.shape) for n, t in ws], MB)
    send, _, _ = _fake_wire()
    stats = send_buckets(plan, iter(ws), send, "cpu")
    assert stats.nonfinite == ("bad", "big")  # 1e6 overflows fp16


def test_send_refuses_a_stream_that_disagrees_with_the_plan():
    ws = _weights()
    plan = plan_buckets(_specs(ws), MB)
    send, _, _ = _fake_wire()
    with pytest.raises(ValueError, match="where the plan has"):
        send_buckets(plan, iter([ws[1], ws[0], *ws[2:]]), send, "cpu")
    with pytest.raises(ValueError, match="ran out"):
        send_buckets(plan, iter(ws[:-1]), send, "cpu")
    with pytest.raises(ValueError, match="not in the plan"):
        send_buckets(plan, iter([*ws, ("extra", torch.ones(1))]), send, "cpu")


class _SlowEvent:
    """Stands in for a CUDA event that completes after a few queries."""

    def __init__(self, after: int):
        self.left = after

    def query(self) -> bool:
        self.left -= 1
        return self.left < 0

    def synchronize(self) -> None:
        self.left = -1


def test_wait_polls_until_done_and_lets_poll_give_up():
    calls = []
    _wait(_SlowEvent(3), lambda: calls.append(1))
    assert len(calls) == 3
    _wait(_SlowEvent(3), None)  # no poll: a plain synchronize

    def dead_peer():
        raise RuntimeError("engine 1 died")

    with pytest.raises(RuntimeError, match="died"):
        _wait(_SlowEvent(100), dead_peer)


class _FakeWork:
    """Stands in for torch.distributed's Work (gloo, async_op=True): done after `left` checks."""

    def __init__(self, left: int, error: Exception | None = None):
        self.left, self.error = left, error

    def is_completed(self) -> bool:
        self.left -= 1
        return self.left < 0

    def wait(self) -> bool:
        if self.error is not None:
            raise self.error
        return True


def test_wait_gives_up_at_the_deadline_naming_the_setting():
    import time

    t0 = time.monotonic()
    with pytest.raises(WeightSyncTimeout, match=r"within 1 s \(rollout.sync_timeout_s\)"):
        _wait(_SlowEvent(10**9), None, deadline=time.monotonic() + 0.2, timeout_s=1)
    assert time.monotonic() - t0 < 2
    with pytest.raises(WeightSyncTimeout):  # a Work that never completes, as a stuck gloo peer leaves it
        _wait(_FakeWork(10**9), None, deadline=time.monotonic() + 0.1, timeout_s=1)


def test_wait_on_a_failed_work_says_a_peer_has_gone():
    from ttrl.rollout.weights import EngineSyncError

    _wait(_FakeWork(2), None, deadline=None)  # completes: no error
    for poll in (None, lambda: None):
        with pytest.raises(EngineSyncError, match="a peer has gone.*Connection closed by peer"):
            _wait(_FakeWork(2, RuntimeError("Connection closed by peer")), poll)


def test_cpu_send_and_receive_wait_on_async_handles():
    ws = _weights()
    plan = plan_buckets(_specs(ws), 20_000)
    send, recv, _ = _fake_wire()
    sent = []

    def send_async(buf):
        send(buf)
        sent.append(1)
        return _FakeWork(1)

    def recv_async(buf):
        recv(buf)
        return _FakeWork(1)

    send_buckets(plan, ws, send_async, "cpu", timeout_s=5)
    assert len(sent) == len(plan)
    got = dict(p for named in receive_buckets(plan, recv_async, "cpu", timeout_s=5) for p in named)
    assert all(torch.equal(got[n], t.to(got[n].dtype)) for n, t in ws)


# ── helpers ──────────────────────────────────────────────────────────────
def test_layer_groups_are_consecutive_runs_that_flatten_back():
    names = ["model.embed_tokens.weight",
             "model.layers.0.a", "model.layers.0.b", "model.layers.1.a",
             "model.layers.10.a", "model.norm.weight", "lm_head.weight"]
    groups = layer_groups(names)
    assert groups == [["model.embed_tokens.weight"], ["model.layers.0.a", "model.layers.0.b"],
                      ["model.layers.1.a"], ["model.layers.10.a"], ["model.norm.weight"], ["lm_head.weight"]]
    assert [n for g in groups for n in g] == names


def test_param_specs_use_the_full_zero3_shape():
    p = torch.nn.Parameter(torch.empty(0))
    p.ds_shape = torch.Size([8, 4])  # what DeepSpeed ZeRO-3 keeps on a partitioned parameter
    q = torch.nn.Parameter(torch.empty(3))
    assert param_specs([("p", p), ("q", q)], torch.bfloat16) == [("p", "bfloat16", (8, 4)), ("q", "bfloat16", (3,))]


def test_rank_offsets_give_each_worker_its_own_rank():
    assert rank_offsets([2, 2, 2]) == ([1, 3, 5], 7)
    assert rank_offsets([1]) == ([1], 2)


def test_check_plan_names_the_first_problem():
    expected = {"a": (2, 3), "b": (4,), "lm_head.weight": (5, 2)}
    good = plan_buckets([("a", "bfloat16", (2, 3)), ("b", "bfloat16", (4,))], MB)
    check_plan(good, expected, "bfloat16", optional=("lm_head.weight",))
    with pytest.raises(ValueError, match="missing"):
        check_plan(good, expected, "bfloat16")
    with pytest.raises(ValueError, match="unknown"):
        check_plan(plan_buckets([("zz", "bfloat16", (1,))], MB), expected, "bfloat16", optional=expected)
    with pytest.raises(ValueError, match="shape"):
        check_plan(plan_buckets([("a", "bfloat16", (3, 2)), ("b", "bfloat16", (4,))], MB), expected, "bfloat16",
                   optional=("lm_head.weight",))
    with pytest.raises(ValueError, match="engine runs in"):
        check_plan(good, expected, "float32", optional=("lm_head.weight",))


def test_shared_gpus_are_refused():
    check_distinct_gpus("g0", ["g1", "g2"])
    with pytest.raises(ValueError, match="GPU of its own"):
        check_distinct_gpus("g0", ["g1", "g0"])
    with pytest.raises(ValueError, match="GPU of its own"):
        check_distinct_gpus("g0", ["g1", "g1"])


def test_module_imports_without_vllm():
    # Tests and the bench load it on machines with torch only.
    code = "import sys, ttrl.rollout.nccl_sync; assert 'vllm' not in sys.modules, 'vllm imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_bucket_is_frozen_data():
    b = Bucket((), 0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        b.nbytes = 3  # type: ignore[misc]
