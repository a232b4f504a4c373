"""The grouped CPU LoRA ops give what vLLM's own per-token ops give, on the same batches.

vLLM's functions are the reference, called on copies of the same tensors:
one adapter for every token (a training rollout), several adapters mixed (the
server's tenants), a negative slot (vLLM's CPU ops index it as Python does),
the prefill (`sgmv_*`) ops that reach the bgmv ones through their module, and
the one-row broadcast of `bgmv_expand`.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
lora_ops = pytest.importorskip("vllm.lora.ops.torch_ops.lora_ops")

from ttrl.rollout import lora_cpu_ops  # noqa: E402

SLOTS, R, HIDDEN, OUT = 3, 8, 32, 48
REFERENCE = {n: getattr(lora_ops, n) for n in ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice",
                                              "sgmv_shrink", "sgmv_expand", "sgmv_expand_slice")}
INDICES = {
    "one adapter": [1] * 10,
    "mixed adapters": [0, 2, 2, 1, 0, 0, 1, 2, 1, 0],
    "a negative slot": [1, -1, 1, 0, -1, 2, 2, 1, 0, 1],
}


def test_the_reference_is_vllms_own():
    # Were the grouped ops installed in this process before the import, the tests would compare them to themselves.
    assert all(f.__module__ == lora_ops.__name__ for f in REFERENCE.values())


def _same(ours, ref):
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", sorted(INDICES))
def test_shrink_matches_vllm(case):
    g = torch.Generator().manual_seed(0)
    idx = torch.tensor(INDICES[case])
    x = torch.randn(len(idx), HIDDEN, generator=g)
    a = torch.randn(SLOTS, 1, R, HIDDEN, generator=g)  # vLLM's stacked lora_a: [slots, 1, r, hidden]
    ref, ours = torch.zeros(len(idx), R), torch.zeros(len(idx), R)
    REFERENCE["bgmv_shrink"](x, a, ref, idx, 0.5)
    lora_cpu_ops.bgmv_shrink(x, a, ours, idx, 0.5)
    _same(ours, ref)


@pytest.mark.parametrize("add_inputs", [True, False])
@pytest.mark.parametrize("case", sorted(INDICES))
def test_expand_and_expand_slice_match_vllm(case, add_inputs):
    g = torch.Generator().manual_seed(1)
    idx = torch.tensor(INDICES[case])
    x = torch.randn(len(idx), R, generator=g)
    b = torch.randn(SLOTS, 1, OUT, R, generator=g)
    base = torch.randn(len(idx), OUT + 16, generator=g)
    ref, ours = base.clone(), base.clone()
    REFERENCE["bgmv_expand"](x, b, ref, idx, add_inputs)
    lora_cpu_ops.bgmv_expand(x, b, ours, idx, add_inputs)
    _same(ours, ref)
    ref, ours = base.clone(), base.clone()
    REFERENCE["bgmv_expand_slice"](x, b, ref, idx, 8, OUT, add_inputs)
    lora_cpu_ops.bgmv_expand_slice(x, b, ours, idx, 8, OUT, add_inputs)
    _same(ours, ref)


def test_expand_broadcasts_one_row_as_vllm_does():
    g = torch.Generator().manual_seed(2)
    x, b = torch.randn(1, R, generator=g), torch.randn(SLOTS, OUT, R, generator=g)
    base = torch.randn(4, OUT, generator=g)
    ref, ours = base.clone(), base.clone()
    REFERENCE["bgmv_expand"](x, b, ref, torch.tensor([2]), True)
    lora_cpu_ops.bgmv_expand(x, b, ours, torch.tensor([2]), True)
    _same(ours, ref)


def test_installed_ops_serve_the_prefill_path_and_the_cpu_wrapper(monkeypatch):
    punica_cpu = pytest.importorskip("vllm.lora.punica_wrapper.punica_cpu")
    for module in (lora_ops, punica_cpu):
        for name in ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice"):
            monkeypatch.setattr(module, name, getattr(module, name))  # undone after the test
    monkeypatch.setattr(lora_cpu_ops, "_INSTALLED", False)
    assert lora_cpu_ops.install()
    assert punica_cpu.bgmv_shrink is lora_cpu_ops.bgmv_shrink
    assert lora_ops.bgmv_expand_slice is lora_cpu_ops.bgmv_expand_slice

    # Prefill: two sequences of 3 and 4 tokens on slots 2 and 0, through vLLM's own sgmv op.
    g = torch.Generator().manual_seed(3)
    x = torch.randn(7, HIDDEN, generator=g)
    a = torch.randn(SLOTS, 1, R, HIDDEN, generator=g)
    seq_lens, slots = torch.tensor([3, 4]), torch.tensor([2, 0])
    ours = torch.zeros(7, R)
    lora_ops.sgmv_shrink(x, a, ours, torch.tensor([0, 3]), seq_lens, slots, 2, 4, 7, 1.0)
    want = torch.cat([x[:3] @ a[2, 0].T, x[3:] @ a[0, 0].T])
    _same(ours, want)
