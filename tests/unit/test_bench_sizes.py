"""make bench's sizes: sync_large's model is the size it claims; the recipe scaling's steps compose (not built)."""

from __future__ import annotations

import pytest

from tests.conftest import compose_config
from ttrl.bench.__main__ import recipe_scaling_points, sizes
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


@pytest.mark.parametrize("quick", [True, False])
def test_recipe_scaling_keeps_the_share_trained_and_every_point_composes(quick):
    # Each point starts a cluster of its own: a vote count whose rows do not split into the ranks'
    # micro-batches would fail there, minutes into the bench, instead of here.
    n_prompts, votes, n_train, _ = sizes(quick)
    points = recipe_scaling_points(quick)
    assert [v for v, _ in points] == ([8, 16, 32] if quick else [8, 16, 32, 64])
    assert (votes, n_train) in points  # the bench's own step is one of them
    for v, k in points:
        assert k * votes == v * n_train  # the share trained is the step's (8 of 16)
        cfg = compose_config("experiment=demo", f"data.prompts_per_step={n_prompts}", f"rollout.n_votes={v}",
                             f"rollout.n_train={k}", "trainer.micro_batch_size=32")
        assert (cfg.rollout.n_votes, cfg.rollout.n_train) == (v, k)


def test_a_scaling_point_is_the_median_of_its_steps_so_one_slow_step_does_not_bend_the_slope():
    from ttrl.bench.__main__ import scaling_point
    from ttrl.bench.suite import loglog_slope

    def rows(tokens: float, step: float, slow_at: int | None = None) -> list[dict]:
        # generate takes half the step; a slow step is twice as long in every phase, same tokens
        out = []
        for i in range(5):
            k = 2.0 if i == slow_at else 1.0
            out.append({"rollout/tokens_per_s": tokens / (k * step / 2), "timing/generate": k * step / 2,
                        "timing/train": k * step / 2, "timing/step": k * step})
        return out

    # Linear in the tokens, one slow step at the smallest count: the medians keep the slope at 1
    points = [scaling_point(rows(t, t / 1000, slow_at=2 if t == 8000 else None)) for t in (8000, 16000, 32000)]
    assert [p["tokens"] for p in points] == pytest.approx([8000, 16000, 32000])
    assert [p["step_s"] for p in points] == pytest.approx([8, 16, 32])
    assert points[0]["generate_s"] == pytest.approx(4) and points[0]["train_s"] == pytest.approx(4)
    assert loglog_slope([p["tokens"] for p in points], [p["step_s"] for p in points]) == pytest.approx(1.0)
    # ...the means beside them carry it (8 s * 6/5), and their slope is below 1
    assert points[0]["step_mean_s"] == pytest.approx(9.6)
    assert loglog_slope([p["tokens_mean"] for p in points], [p["step_mean_s"] for p in points]) < 0.95
