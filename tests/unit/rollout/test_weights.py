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


def test_flat_buckets_round_trip_bit_for_bit_through_read_only_arrays():
    import numpy as np

    from ttrl.rollout.nccl_sync import flat_named, iter_flat_buckets, param_specs, plan_buckets

    named = _named() + [("c.weight", torch.randn(3, 5, generator=torch.Generator().manual_seed(0)))]
    plan = plan_buckets(param_specs(named, torch.bfloat16), 64)
    arrays = list(iter_flat_buckets(plan, named))
    assert len(arrays) == len(plan) >= 2 and all(a.dtype == np.uint8 for a in arrays)
    for a in arrays:
        a.flags.writeable = False  # as the object store hands them out
    got = dict(flat_named(arrays, plan))
    assert list(got) == [n for n, _ in named]
    for n, t in named:
        assert got[n].dtype == torch.bfloat16 and torch.equal(got[n], t.to(torch.bfloat16))
    got = dict(flat_named([a.tobytes() for a in arrays], plan))  # bytes, as across a process boundary
    assert torch.equal(got["c.weight"], named[-1][1].to(torch.bfloat16))


def test_sender_refuses_a_non_finite_tensor_by_name_after_the_cast():
    from ttrl.rollout.nccl_sync import iter_flat_buckets, param_specs, plan_buckets

    bad = torch.ones(8)
    bad[3] = float("nan")
    named = _named(**{"b.weight": bad})
    with pytest.raises(ValueError, match=r"b.weight holds NaN or inf \(as float32\); refusing to send"):
        list(iter_flat_buckets(plan_buckets(param_specs(named, torch.float32), 1 << 20), named))
    big = _named(**{"b.weight": torch.full((8,), 1e6)})  # finite in fp32, inf in fp16
    with pytest.raises(ValueError, match=r"b.weight holds NaN or inf \(as float16\)"):
        list(iter_flat_buckets(plan_buckets(param_specs(big, torch.float16), 1 << 20), big))


def test_sender_refuses_tensors_that_disagree_with_the_plan():
    from ttrl.rollout.nccl_sync import iter_flat_buckets, param_specs, plan_buckets

    plan = plan_buckets(param_specs(_named(), torch.float32), 1 << 20)
    with pytest.raises(ValueError, match="yielded 'b.weight' where the plan has 'a.weight'"):
        list(iter_flat_buckets(plan, _named()[::-1]))
    with pytest.raises(ValueError, match="'z.weight', which is not in the plan"):
        list(iter_flat_buckets(plan, _named() + [("z.weight", torch.ones(1))]))


def test_a_served_versions_check_scans_the_values():
    bad = dict(_named())
    bad["a.weight"] = torch.full((4, 4), float("inf"))
    with pytest.raises(ValueError, match="a.weight holds NaN or inf"):
        check_weights(bad, EXPECTED, optional=("lm_head.weight",))
