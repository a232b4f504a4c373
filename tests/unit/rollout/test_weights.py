"""Weight buckets of the Ray sync path: flat buckets in and out, the sender's and the engine's checks (no engine)."""

from __future__ import annotations

import pytest
import torch

from ttrl.rollout.weights import check_weights

pytestmark = pytest.mark.unit

EXPECTED = {"a.weight": (4, 4), "b.weight": (8,), "lm_head.weight": (2, 4)}


def _named(**over):
    named = {"a.weight": torch.ones(4, 4), "b.weight": torch.arange(8.0)} | over
    return list(named.items())


@pytest.mark.parametrize("wire", [torch.bfloat16, torch.float32])
def test_store_buckets_round_trip_bit_for_bit_through_read_only_arrays(wire):
    import numpy as np

    from ttrl.rollout.nccl_sync import iter_store_buckets, plan_buckets, store_named

    named = _named() + [("c.weight", torch.randn(3, 5, generator=torch.Generator().manual_seed(0))),
                        ("d.scale", torch.tensor(2.5)), ("e.steps", torch.arange(3))]
    plan = plan_buckets([(n, wire if t.is_floating_point() else t.dtype, t.shape) for n, t in named], 64)
    buckets = list(iter_store_buckets(plan, named))
    assert len(buckets) == len(plan) >= 2
    assert all(a.dtype == np.uint8 for b in buckets for a in b)
    if wire == torch.float32:  # already in the wire dtype: the arrays are the tensors' own memory
        assert np.shares_memory(buckets[0][0], named[0][1].numpy())
    for b in buckets:
        for a in b:
            a.flags.writeable = False  # as the object store hands them out
    got = dict(store_named(buckets, plan))
    assert list(got) == [n for n, _ in named]
    for n, t in named:
        want = t.to(wire) if t.is_floating_point() else t
        assert got[n].dtype == want.dtype and got[n].shape == want.shape and torch.equal(got[n], want)
    as_bytes = [[a.tobytes() for a in b] for b in buckets]  # as across a process boundary
    assert torch.equal(dict(store_named(as_bytes, plan))["c.weight"], named[2][1].to(wire))


def test_sender_refuses_a_non_finite_tensor_by_name_after_the_cast():
    from ttrl.rollout.nccl_sync import iter_store_buckets, param_specs, plan_buckets

    bad = torch.ones(8)
    bad[3] = float("nan")
    named = _named(**{"b.weight": bad})
    with pytest.raises(ValueError, match=r"b.weight holds NaN or inf \(as float32\); refusing to send"):
        list(iter_store_buckets(plan_buckets(param_specs(named, torch.float32), 1 << 20), named))
    big = _named(**{"b.weight": torch.full((8,), 1e6)})  # finite in fp32, inf in fp16
    with pytest.raises(ValueError, match=r"b.weight holds NaN or inf \(as float16\)"):
        list(iter_store_buckets(plan_buckets(param_specs(big, torch.float16), 1 << 20), big))


def test_sender_refuses_tensors_that_disagree_with_the_plan():
    from ttrl.rollout.nccl_sync import iter_store_buckets, param_specs, plan_buckets

    plan = plan_buckets(param_specs(_named(), torch.float32), 1 << 20)
    with pytest.raises(ValueError, match="yielded 'b.weight' where the plan has 'a.weight'"):
        list(iter_store_buckets(plan, _named()[::-1]))
    with pytest.raises(ValueError, match="'z.weight', which is not in the plan"):
        list(iter_store_buckets(plan, _named() + [("z.weight", torch.ones(1))]))
    with pytest.raises(ValueError, match=r"a.weight has shape \(2, 8\), the plan says \(4, 4\)"):
        list(iter_store_buckets(plan, _named(**{"a.weight": torch.ones(2, 8)})))


def test_a_served_versions_check_scans_the_values():
    bad = dict(_named())
    bad["a.weight"] = torch.full((4, 4), float("inf"))
    with pytest.raises(ValueError, match="a.weight holds NaN or inf"):
        check_weights(bad, EXPECTED, optional=("lm_head.weight",))
