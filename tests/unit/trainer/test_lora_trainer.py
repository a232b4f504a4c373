"""LoRA on the trainer side, on CPU (plain torch and peft, no DeepSpeed): the wrap, the names the engines
expect, loading an adapter dir, the merge; and the memory estimate's counts against real models."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT, compose_config, tiny_model_in_own_cache
from ttrl.rollout.lora import adapter_shapes, check_adapter_plan, read_tensors, write_adapter
from ttrl.rollout.nccl_sync import param_specs, plan_buckets, plan_from_wire, plan_to_wire
from ttrl.rollout.weights import checkpoint_shapes
from ttrl.trainer.lora import adapter_params, load_into, merge, wrap
from ttrl.trainer.memory import KNOWN_SHAPES, ModelShape, describe, estimate, model_shape

pytestmark = pytest.mark.unit

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SPEC = {"r": 4, "alpha": 8.0, "dropout": 0.0, "target_modules": ALL, "init": "default"}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    yield from tiny_model_in_own_cache(tmp_path_factory, num_layers=2)


def _model(tiny_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_dir, torch_dtype=torch.float32)


def test_only_the_adapters_train_and_every_rank_builds_the_same_ones(tiny_dir):
    a, b = wrap(_model(tiny_dir), SPEC, seed=7), wrap(_model(tiny_dir), SPEC, seed=7)
    trainable = [n for n, p in a.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    pa, pb = dict(adapter_params(a)), dict(adapter_params(b))
    assert all(torch.equal(pa[n], pb[n]) for n in pa), "two ranks with one seed built different adapters"
    assert all(not p.any() for n, p in pa.items() if ".lora_B." in n)  # B = 0: the policy starts as the base
    c = dict(adapter_params(wrap(_model(tiny_dir), SPEC, seed=8)))
    assert any(not torch.equal(pa[n], c[n]) for n in pa if ".lora_A." in n)


def test_the_trainers_adapter_plan_is_the_one_every_engine_expects(tiny_dir):
    """The names and shapes the trainer sends (any path: Ray, IPC, NCCL) against those an engine derives
    from the base checkpoint: one for one, so every plan passes the engine's check."""
    model = wrap(_model(tiny_dir), SPEC, seed=0)
    sent = dict((n, tuple(p.shape)) for n, p in adapter_params(model))
    expected = adapter_shapes(checkpoint_shapes(str(tiny_dir)), ALL, SPEC["r"])
    assert sent == expected
    plan = plan_from_wire(plan_to_wire(plan_buckets(param_specs(adapter_params(model), "float32"), 1 << 20)))
    check_adapter_plan(plan, expected, SPEC, "float32")


def test_an_adapter_dir_loads_back_and_merges_into_a_plain_model(tiny_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    model = wrap(_model(tiny_dir), SPEC, seed=0)
    with torch.no_grad():
        for n, p in adapter_params(model):
            if ".lora_B." in n:
                p.normal_(0, 0.1)
    adapter = write_adapter(tmp_path / "policy", {n: p.detach() for n, p in adapter_params(model)}, SPEC,
                            str(tiny_dir))
    again = wrap(_model(tiny_dir), SPEC, seed=1)
    load_into(again, read_tensors(adapter), str(adapter))
    ids = torch.tensor([[3, 5, 7, 9, 11, 4]])
    model.eval(), again.eval()
    with torch.no_grad():
        want = model(input_ids=ids).logits
        assert torch.equal(again(input_ids=ids).logits, want)
        with model.disable_adapter():  # the reference: the base, adapter off
            base = model(input_ids=ids).logits
    assert (want - base).abs().max() > 1e-3
    out = merge(str(tiny_dir), str(adapter), str(tmp_path / "merged"))
    merged = AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        assert (merged(input_ids=ids).logits - want).abs().max() < 1e-5
    with pytest.raises(ValueError, match="has shape"):
        load_into(wrap(_model(tiny_dir), {**SPEC, "r": 8}, seed=0), read_tensors(adapter), "x")


def test_ttrl_export_merges_a_checkpoint_and_refuses_what_is_no_adapter(tiny_dir, tmp_path):
    model = wrap(_model(tiny_dir), SPEC, seed=0)
    write_adapter(tmp_path / "step_2" / "policy", {n: p.detach() for n, p in adapter_params(model)}, SPEC,
                  str(tiny_dir))

    def export(*args):
        return subprocess.run([sys.executable, "-m", "ttrl.export", *map(str, args)], capture_output=True,
                              text=True, timeout=120, cwd=ROOT)

    done = export(tmp_path / "step_2", "--out", tmp_path / "merged")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "merged" / "config.json").exists() and (tmp_path / "merged" / "tokenizer_config.json").exists()
    refused = export(tiny_dir, "--out", tmp_path / "again")
    assert refused.returncode == 2 and "holds a full model, not a LoRA adapter" in refused.stderr


# ── the memory estimate ───────────────────────────────────────────────────
def test_the_parameter_counts_are_the_models_own(tiny_dir):
    import json

    shape = ModelShape.from_hf_config(json.loads((tiny_dir / "config.json").read_text()))
    model = _model(tiny_dir)
    assert shape.params() == sum(p.numel() for p in model.parameters())
    peft_model = wrap(model, SPEC, seed=0)
    assert shape.lora_params(SPEC["r"], ALL) == sum(p.numel() for _, p in adapter_params(peft_model))
    assert model_shape(str(tiny_dir)) == shape


def test_the_known_hub_models_have_their_published_sizes():
    # Parameter counts of the model cards: 7.62 B (Qwen2.5(-Math)-7B), 1.54 B (-1.5B), 8.03 B (Llama 3.1 8B).
    sizes = {k: round(v.params() / 1e9, 2) for k, v in KNOWN_SHAPES.items()}
    assert sizes == {"Qwen/Qwen2.5-Math-7B": 7.62, "Qwen/Qwen2.5-7B": 7.62, "Qwen/Qwen2.5-Math-1.5B": 1.54,
                     "meta-llama/Llama-3.1-8B-Instruct": 8.03}


def test_the_7b_lora_preset_needs_a_fraction_of_a_full_fine_tunes_memory():
    full = compose_config("experiment=ttrl_math500_qwen2.5-math-7b")
    lora = compose_config("experiment=ttrl_math500_qwen2.5-math-7b_lora")
    assert lora.model.lora.enabled and lora.model.path == full.model.path == "Qwen/Qwen2.5-Math-7B"
    shape = KNOWN_SHAPES["Qwen/Qwen2.5-Math-7B"]
    f, lo = estimate(full, shape), estimate(lora, shape)
    P, W = shape.params(), 8
    # Full, ZeRO-3 over 8 ranks, bf16: weights 2P, grads 2P, fp32 master + Adam 12P, the reference 2P; all /8.
    assert f.rank_bytes == pytest.approx(18 * P / W, rel=1e-6)
    # LoRA: the frozen base 2P/8, the adapter's 16 bytes per parameter /8, no reference.
    assert lo.rank_bytes == pytest.approx((2 * P + 16 * lo.trainable) / W, rel=1e-6)
    assert lo.trainable == shape.lora_params(64, ALL) and lo.full_rank_bytes == f.rank_bytes
    assert lo.rank_bytes < 0.15 * f.rank_bytes and lo.engine_bytes == f.engine_bytes == 2 * P
    lines = describe(lora)
    assert "LoRA r=64 on 7 projections" in lines[0] and "a full fine-tune's: 16.0 GiB" in lines[1]


def test_cfg_job_prints_the_estimate_below_the_config():
    out = subprocess.run([sys.executable, "-m", "ttrl.train", "experiment=ttrl_math500_qwen2.5-math-7b_lora",
                          "--cfg", "job"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    tail = out.stdout.rstrip().splitlines()[-3:]
    assert tail[0].startswith("# memory estimate, model states per GPU") and "qwen2.5-math-7b-lora" in tail[0]
    assert tail[1].startswith("#   trainer rank 2.1 GiB")
    import yaml

    assert yaml.safe_load(out.stdout)["model"]["lora"]["r"] == 64  # still YAML: the estimate is comments


def test_with_gradient_checkpointing_the_adapters_get_gradients_and_the_base_none(tiny_dir):
    # The 7B preset recomputes activations (trainer.gradient_checkpointing): with a frozen base and
    # non-reentrant checkpointing (the worker's), gradients still reach the adapters.
    model = _model(tiny_dir)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    peft_model = wrap(model, SPEC, seed=0)
    peft_model.train()
    ids = torch.tensor([[3, 5, 7, 9, 11, 4, 8, 2]])
    peft_model(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in peft_model.named_parameters()}
    assert all(g is None for n, g in grads.items() if ".lora_" not in n)
    assert all(g is not None and g.abs().sum() > 0 for n, g in grads.items() if ".lora_B." in n)
