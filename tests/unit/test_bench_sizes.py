"""make bench's sync_large section: the model it syncs is the size it claims (composed, not built)."""

from __future__ import annotations

import pytest

from tests.conftest import compose_config
from ttrl.bench.suite import LARGE_LAYER_BYTES, sync_large_overrides

pytestmark = pytest.mark.unit


def _fp32_bytes(t) -> int:
    """Parameters of the tiny Qwen2 these settings build, in fp32 (vocab: 257 byte tokens padded to 320)."""
    h, i, L = t.hidden_size, t.intermediate_size, t.num_layers
    per_layer = 4 * h * h + 3 * h + 3 * h * i + 2 * h  # q,k,v,o (+ q,k,v biases), MLP, 2 norms
    return 4 * (L * per_layer + 2 * 320 * h + h)


@pytest.mark.parametrize("path", ["ray", "ipc"])
@pytest.mark.parametrize("mib", [1, 64, 1024])
def test_sync_large_model_has_at_least_the_asked_size_and_two_engines(mib, path):
    cfg = compose_config(*sync_large_overrides(mib, path))
    t = cfg.model.tiny
    assert t.num_heads * t.head_dim == t.hidden_size
    assert _fp32_bytes(t) >= mib << 20
    assert _fp32_bytes(t) - 2 * 4 * 320 * t.hidden_size < (mib << 20) + LARGE_LAYER_BYTES  # no layer too many
    assert cfg.rollout.num_engines == 2
    # The colocated path feeds engine i from rank i: one rank per engine there.
    assert (cfg.trainer.num_workers, cfg.rollout.weight_sync) == ((1, "auto") if path == "ray" else (2, "ipc"))
    assert cfg.model.dtype == "float32" and cfg.algorithm.kl_coef == 0  # fp32 bytes; no reference model
