"""The warm start's Muon: torch.optim.Muon's arithmetic, the matrices of one shape orthogonalised together."""

from __future__ import annotations

import pytest
import torch

from ttrl.models.muon import StackedMuon, hidden_matrices, orthogonalize

SHAPES = [(32, 32)] * 3 + [(64, 32)] * 2 + [(32, 64)] * 2


def _pair(seed=0):
    g = torch.Generator().manual_seed(seed)
    ours = [torch.nn.Parameter(torch.randn(*s, generator=g) * 0.02) for s in SHAPES]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    return ours, theirs, g


def test_steps_match_torch_muon_with_the_adamw_matched_rate():
    ours, theirs, g = _pair()
    mine = StackedMuon(ours, lr=2e-3)
    ref = torch.optim.Muon(theirs, lr=2e-3, weight_decay=0.0, adjust_lr_fn="match_rms_adamw")
    start = [p.detach().clone() for p in ours]
    for _ in range(4):  # momentum carries over steps, so a wrong buffer would drift apart
        grads = [torch.randn(*s, generator=g) for s in SHAPES]
        for p, q, gr in zip(ours, theirs, grads):
            p.grad, q.grad = gr.clone(), gr.clone()
        mine.step()
        ref.step()
    for p, q, p0 in zip(ours, theirs, start):
        moved = (q - p0).abs().max()
        assert moved > 1e-3  # the reference did move the weights
        # The same bf16 iterations, batched or one by one: they differ by bf16 rounding only.
        assert (p - q).abs().max() < 0.05 * moved


def test_an_update_is_near_orthogonal_and_keeps_the_shape():
    g = torch.Generator().manual_seed(1)
    for rows, cols in ((32, 32), (64, 32), (32, 64)):
        o = orthogonalize(torch.randn(3, rows, cols, generator=g)).float()
        assert o.shape == (3, rows, cols)
        small = min(rows, cols)
        gram = o @ o.mT if rows <= cols else o.mT @ o
        # Newton-Schulz's quintic puts every singular value in about (0.5, 1.5), not exactly at 1.
        eig = torch.linalg.eigvalsh(gram)
        assert eig.shape == (3, small) and eig.min() > 0.25 and eig.max() < 2.25


def test_only_the_layers_matrices_are_muons_and_a_vector_is_refused():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=40, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2, head_dim=32))
    names = {id(p): n for n, p in model.named_parameters()}
    muon, rest = hidden_matrices(model)
    assert len(muon) == 2 * 7  # q, k, v, o, gate, up, down in each layer
    assert all(p.ndim == 2 and "layers." in names[id(p)] for p in muon)
    assert {n for n in (names[id(p)] for p in rest) if "embed" in n or "lm_head" in n} == {
        "model.embed_tokens.weight", "lm_head.weight"}
    assert len(muon) + len(rest) == len(list(model.parameters()))
    with pytest.raises(ValueError, match="2-D matrices only"):
        StackedMuon(rest, lr=1e-3)
