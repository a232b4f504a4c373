"""Weight buckets of the Ray sync path: packing, the sender's manifest and its checks (no engine)."""

from __future__ import annotations

import pytest
import torch

from ttrl.rollout.weights import check_manifest, check_weights, iter_buckets, iter_checked_buckets, unpack

pytestmark = pytest.mark.unit

EXPECTED = {"a.weight": (4, 4), "b.weight": (8,), "lm_head.weight": (2, 4)}


def _named(**over):
    named = {"a.weight": torch.ones(4, 4), "b.weight": torch.arange(8.0)} | over
    return list(named.items())


def test_checked_buckets_carry_the_same_bytes_and_a_manifest_of_names_and_shapes():
    plain = list(iter_buckets(_named(), bucket_bytes=64))
    checked = list(iter_checked_buckets(_named(), bucket_bytes=64))
    assert [b for b, _ in checked] == plain and len(plain) == 2  # 64 bytes of a.weight close the first bucket
    assert [m for _, m in checked] == [[("a.weight", (4, 4))], [("b.weight", (8,))]]
    assert torch.equal(unpack(checked[1][0])["b.weight"], torch.arange(8.0))
    check_manifest([m for _, m in checked], EXPECTED, optional=("lm_head.weight",))


def test_sender_refuses_a_non_finite_tensor_by_name():
    bad = torch.ones(8)
    bad[3] = float("nan")
    with pytest.raises(ValueError, match=r"b.weight holds NaN or inf; refusing to send"):
        list(iter_checked_buckets(_named(**{"b.weight": bad}), bucket_bytes=1 << 20))


@pytest.mark.parametrize("manifest, match", [
    ([[("a.weight", (4, 4)), ("c.weight", (1,)), ("b.weight", (8,))]], "unknown parameter"),
    ([[("a.weight", (4, 4))]], r"missing, e.g. \['b.weight'\]"),
    ([[("a.weight", (4, 5)), ("b.weight", (8,))]], r"a.weight has shape \(4, 5\)"),
])
def test_manifest_check_names_what_the_engine_cannot_load(manifest, match):
    with pytest.raises(ValueError, match=match):
        check_manifest(manifest, EXPECTED, optional=("lm_head.weight",))


def test_full_check_still_scans_values_when_no_manifest_comes():
    bad = dict(_named())
    bad["a.weight"] = torch.full((4, 4), float("inf"))
    with pytest.raises(ValueError, match="a.weight holds NaN or inf"):
        check_weights(bad, EXPECTED, optional=("lm_head.weight",))
    check_weights(bad, EXPECTED, optional=("lm_head.weight",), finite=False)
