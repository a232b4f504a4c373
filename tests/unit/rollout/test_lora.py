"""The pure parts of adapter syncs: wire names, the shapes an engine expects, the checks, peft dirs on disk,
and the NCCL path's adapter round over an in-memory wire (its receiving end included, vLLM's install aside).

No GPU, no vLLM: what the NCCL path adds for LoRA that can run here runs here; the broadcast itself and
vLLM's LoRA manager are tested on CPU through the Ray and IPC paths (tests/integration/test_lora.py).
"""

from __future__ import annotations

import json
from collections import deque
from types import SimpleNamespace

import pytest
import torch

from ttrl.rollout.lora import (
    adapter_shapes,
    check_adapter_plan,
    check_adapter_tensors,
    engine_rank,
    is_adapter_dir,
    lora_spec,
    peft_config,
    read_spec,
    read_tensors,
    spec_from_peft,
    wire_name,
    write_adapter,
)
from ttrl.rollout.nccl_sync import param_specs, plan_buckets, plan_from_wire, plan_to_wire, send_buckets

pytestmark = pytest.mark.unit

# A two-block Qwen2-like checkpoint: what checkpoint_shapes would read.
BASE = {
    "model.embed_tokens.weight": (96, 16),
    "lm_head.weight": (96, 16),
    "model.norm.weight": (16,),
    **{f"model.layers.{i}.{k}": s for i in range(2) for k, s in {
        "self_attn.q_proj.weight": (16, 16), "self_attn.q_proj.bias": (16,),
        "self_attn.k_proj.weight": (8, 16), "self_attn.v_proj.weight": (8, 16),
        "self_attn.o_proj.weight": (16, 16), "mlp.gate_proj.weight": (40, 16),
        "mlp.up_proj.weight": (40, 16), "mlp.down_proj.weight": (16, 40),
        "input_layernorm.weight": (16,)}.items()},
}
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SPEC = {"r": 4, "alpha": 8.0, "dropout": 0.0, "target_modules": ALL, "init": "default"}


def _adapter(r: int = 4, targets=ALL, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(*s, generator=g) for n, s in adapter_shapes(BASE, targets, r).items()}


def test_wire_names_are_peft_file_names():
    assert wire_name("base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight") == \
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    assert wire_name("base_model.model.model.layers.3.mlp.down_proj.lora_B.weight") == \
        "base_model.model.model.layers.3.mlp.down_proj.lora_B.weight"
    # A file written without peft's prefix still gets it (vLLM parses names after it).
    assert wire_name("model.layers.0.mlp.up_proj.lora_A.weight") == \
        "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"
    for not_adapter in ("base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight",
                        "base_model.model.score.modules_to_save.default.weight", "model.norm.weight"):
        assert wire_name(not_adapter) is None


def test_an_engine_expects_a_pair_per_target_projection_of_every_block():
    shapes = adapter_shapes(BASE, ALL, 4)
    assert len(shapes) == 2 * len(ALL) * 2
    assert shapes["base_model.model.model.layers.1.self_attn.k_proj.lora_A.weight"] == (4, 16)
    assert shapes["base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight"] == (8, 4)
    assert shapes["base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"] == (4, 40)
    assert not any("embed" in n or "lm_head" in n or "norm" in n or "bias" in n for n in shapes)
    only_q = adapter_shapes(BASE, ["q_proj"], 8)
    assert sorted(only_q) == [f"base_model.model.model.layers.{i}.self_attn.q_proj.lora_{ab}.weight"
                              for i in range(2) for ab in "AB"]
    with pytest.raises(ValueError, match="no projection of the base model"):
        adapter_shapes(BASE, ["qkv_proj"], 8)


@pytest.mark.parametrize("r, rank", [(1, 1), (2, 8), (8, 8), (9, 16), (64, 64), (300, 320), (512, 512)])
def test_the_engine_rank_is_the_smallest_vllm_allows(r, rank):
    assert engine_rank(r) == rank


def test_a_rank_vllm_cannot_serve_is_refused():
    with pytest.raises(ValueError, match="largest max_lora_rank"):
        engine_rank(513)


def _plan(tensors: dict[str, torch.Tensor], dtype="float32", bucket=1 << 20):
    return plan_from_wire(plan_to_wire(plan_buckets(param_specs(tensors.items(), dtype), bucket)))


def test_the_engines_adapter_passes_and_a_mismatched_one_is_refused_in_one_sentence():
    expected = adapter_shapes(BASE, ALL, 4)
    check_adapter_plan(_plan(_adapter()), expected, SPEC, "float32")
    cases = [
        (_adapter(r=8), "has shape (8, 16), the engine expects (4, 16)"),  # another rank
        (_adapter(targets=["q_proj", "v_proj"]), "parameter(s) missing"),  # another set of projections
        ({**_adapter(), "model.embed_tokens.weight": torch.zeros(96, 16)}, "unknown parameter(s)"),  # full weights
    ]
    for tensors, words in cases:
        with pytest.raises(ValueError) as err:
            check_adapter_plan(_plan(tensors), expected, SPEC, "float32")
        sentence = str(err.value)
        assert words in sentence and "rank 4" in sentence and sentence.endswith("refusing this adapter")
        assert "\n" not in sentence
    with pytest.raises(ValueError, match="travels as bfloat16, the engine runs in float32"):
        check_adapter_plan(_plan(_adapter(), "bfloat16"), expected, SPEC, "float32")
    # Named tensors (a served version, an adapter file): the same checks, and finiteness.
    check_adapter_tensors(_adapter(), expected, SPEC)
    nan = _adapter()
    next(iter(nan.values()))[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        check_adapter_tensors(nan, expected, SPEC)


def test_an_adapter_dir_round_trips_and_reads_as_peft_writes_it(tmp_path):
    tensors = _adapter()
    d = write_adapter(tmp_path / "policy", tensors, SPEC, base="/models/base")
    assert is_adapter_dir(d) and not is_adapter_dir(tmp_path)
    got = read_tensors(d)
    assert got.keys() == tensors.keys() and all(torch.equal(got[n], tensors[n]) for n in tensors)
    assert read_spec(d) == {**SPEC, "target_modules": sorted(ALL)}
    cfg = json.loads((d / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["lora_alpha"] == 8 and cfg["base_model_name_or_path"] == "/models/base"
    # What vLLM's PEFTHelper requires of a config: r, lora_alpha, target_modules, no bias.
    assert {"r", "lora_alpha", "target_modules"} <= set(cfg) and cfg["bias"] == "none"


@pytest.mark.parametrize("extra, words", [
    ({"use_dora": True}, "use_dora"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"bias": "all"}, "bias"),
    ({"target_modules": "q_proj|v_proj"}, "by a pattern"),
    ({"peft_type": "IA3"}, "not LoRA"),
])
def test_adapters_the_engines_cannot_serve_are_refused_naming_why(extra, words):
    with pytest.raises(ValueError, match=words):
        spec_from_peft({**peft_config(SPEC), **extra}, where="the adapter at /x")


def test_a_config_section_becomes_a_spec_and_a_dir_brings_its_own_shape(tmp_path):
    section = SimpleNamespace(enabled=True, r=16, alpha=32.0, dropout=0.05, target_modules=["q_proj"],
                              init="gaussian", path=None)
    assert lora_spec(section) == {"r": 16, "alpha": 32.0, "dropout": 0.05, "target_modules": ["q_proj"],
                                  "init": "gaussian"}
    assert lora_spec(SimpleNamespace(**{**vars(section), "enabled": False})) is None
    d = write_adapter(tmp_path / "a", _adapter(), SPEC, base=None)
    spec = lora_spec(SimpleNamespace(**{**vars(section), "path": str(d)}))
    assert spec["r"] == 4 and spec["alpha"] == 8.0 and spec["target_modules"] == sorted(ALL)
    assert spec["dropout"] == 0.05 and spec["init"] == "gaussian"  # training knobs stay the config's


# ── the NCCL path's adapter round, over an in-memory wire ────────────────
def test_an_adapter_round_over_the_wire_reaches_the_install_bit_exactly():
    """The trainer's send loop and the engine worker's `ttrl_receive_adapter`, the broadcast a queue.

    Uses the worker extension's own method with a stand-in for `self` (no vLLM): it must receive every
    bucket of the plan and hand the whole adapter, by wire name, to the install.
    """
    from ttrl.rollout.vllm_ext import TTRLWorkerExtension

    tensors = _adapter(seed=3)
    plan = plan_buckets(param_specs(tensors.items(), "float32"), 1500)  # small buckets: many of them
    assert len(plan) > 4
    q: deque = deque()
    stats = send_buckets(plan, iter(tensors.items()), lambda buf: q.append(buf.clone()), "cpu")
    assert stats.buckets == len(plan) and stats.nonfinite == ()

    class Comm:
        def broadcast(self, buf, src, stream=None):
            assert src == 0
            buf.copy_(q.popleft())

    installed = {}
    worker = SimpleNamespace(_ttrl_weight_comm=Comm(), device=torch.device("cpu"),
                             _ttrl_install=lambda t, peft: installed.update(t, peft=peft) or 123,
                             ttrl_close_weight_group=lambda: None)
    res = TTRLWorkerExtension.ttrl_receive_adapter(worker, plan_to_wire(plan), peft_config(SPEC))
    assert not q, "buckets left on the wire"
    peft = installed.pop("peft")
    assert peft["r"] == 4 and res["bytes"] == 123.0
    assert installed.keys() == tensors.keys() and all(torch.equal(installed[n], tensors[n]) for n in tensors)


def test_a_round_cut_short_frees_the_receiving_worker():
    from ttrl.rollout.vllm_ext import TTRLWorkerExtension

    plan = plan_buckets(param_specs(_adapter().items(), "float32"), 1500)

    class DeadSender:
        def broadcast(self, buf, src, stream=None):
            raise RuntimeError("peer gone")

    closed = []
    worker = SimpleNamespace(_ttrl_weight_comm=DeadSender(), device=torch.device("cpu"),
                             _ttrl_install=lambda t, peft: pytest.fail("installed a partial adapter"),
                             ttrl_close_weight_group=lambda: closed.append(True))
    with pytest.raises(RuntimeError, match="peer gone"):
        TTRLWorkerExtension.ttrl_receive_adapter(worker, plan_to_wire(plan), peft_config(SPEC))
    assert closed == [True]
