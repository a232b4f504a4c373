"""LoRA policies for real: Ray, two vLLM CPU engines started with LoRA on, DeepSpeed ZeRO-2 and ZeRO-3 on gloo.

Each runtime trains the tiny model's adapter and shows what the adapter-only
sync must give: after a sync, the engines' log-probs with the adapter equal
the trainer's per token (and differ before it); what moved is the adapter
alone (bytes, names); the KL reference is the base with the adapter off; a
mismatched adapter is refused and the engine keeps serving. The ZeRO-3
runtime is shared by the tests after the parity one (kill an engine, save
and resume, load a saved adapter, merge it): starting one costs most of a
test's time here.
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import pytest
import ray
import torch

from tests.conftest import compose_config

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

FAKE_REWARD = "tests.integration.rewards_fake:digit_share"
BASE = [
    "experiment=debug",  # kl_coef 0.001: the reference (the base, adapter off) is used every step
    "reward=custom",
    f"reward.fn={FAKE_REWARD}",
    "model.lora.enabled=true",
    "model.lora.r=8",
    # An adapter starts at zero (B = 0): a large lr makes one update move log-probs well past 1e-3.
    "trainer.lr=1e-2",
    "trainer.lr_schedule=constant",
    "trainer.num_workers=2",
    "rollout.num_engines=2",
    "logger.progress=false",
]
TOL = 1e-3  # per token, as the full-weight parity test


class Cluster:
    """A runtime with its parts and a fixed sequence to score on both sides."""

    def __init__(self, *overrides: str):
        from ttrl.distributed.runtime import Runtime
        from ttrl.parts import build_parts
        from ttrl.step import StepContext, StepOptions

        self.cfg = compose_config(*BASE, *overrides)
        self.parts = build_parts(self.cfg)
        self.rt = Runtime(self.cfg, self.parts.model_path, total_opt_steps=16)
        self.ctx = StepContext(self.rt, self.parts.reward, self.parts.tokenizer, StepOptions.from_config(self.cfg),
                               random.Random(0))
        tok = self.parts.tokenizer
        self.prompt = tok("12+34+56=", add_special_tokens=False)["input_ids"]
        self.completion = tok("\\boxed{102}", add_special_tokens=False)["input_ids"]

    def trainer_logprobs(self, which: str = "policy") -> list[float]:
        from ttrl.trainer.batch import pack_batch

        batch = pack_batch([self.prompt], [self.completion], pad_id=0)
        return self.rt.logprobs(batch, temperature=1.0, which=which)[0].tolist()

    def engine_logprobs(self, engine: int) -> list[float]:
        return self.rt.engine_score([self.prompt], [self.completion], engine=engine)[0]

    def max_diff(self, engine: int, trainer: list[float]) -> float:
        got = self.engine_logprobs(engine)
        assert len(got) == len(trainer)
        return max(abs(a - b) for a, b in zip(got, trainer))

    def update_without_sync(self) -> None:
        """One optimizer step on the fixed sequence (advantage 1), the engines left as they are."""
        from ttrl.trainer.batch import pack_batch

        rows = self.cfg.data.prompts_per_step * self.cfg.rollout.n_train
        batch = pack_batch([self.prompt] * rows, [self.completion] * rows, pad_id=0)
        batch["old_logp"] = self.rt.logprobs(batch, 1.0)
        batch["advantages"] = torch.ones_like(batch["old_logp"])
        batch["ref_logp"] = self.rt.logprobs(batch, 1.0, which="ref")
        self.rt.train_policy(batch, dataclasses.replace(self.ctx.opts.update, ppo_epochs=1))

    def adapter(self) -> dict[str, torch.Tensor]:
        return self.rt.policy.call("sync_state")[0]

    def versions(self) -> set[int]:
        return {ray.get(e.info.remote())["weights_version"] for e in self.rt.engines}

    def close(self) -> None:
        self.rt.shutdown()


def _check_parity(c: Cluster, label: str) -> dict[str, float]:
    """Train (a step, then an update left unsynced), sync, and hold the engines to the trainer per token."""
    from ttrl.step import step

    rt = c.rt
    # The engines apply the adapter with ttrl's grouped CPU ops (ttrl/rollout/lora_cpu_ops.py): the parity
    # below is theirs.
    assert {ray.get(e.info.remote())["lora_ops"] for e in rt.engines} == {"grouped"}
    # The starting adapter (B = 0, or model.lora.path's) went to every engine at start-up, as version 0.
    assert c.versions() == {0}
    base_ref = c.trainer_logprobs("ref")
    for e in range(2):
        assert c.max_diff(e, c.trainer_logprobs()) < TOL
    names = rt.policy.call("trainable_names")
    assert names and all(".lora_A." in n or ".lora_B." in n for ns in names for n in ns), "the base trains"

    row = step(c.ctx, c.parts.prompts[:c.cfg.data.prompts_per_step])
    adapter = c.adapter()
    adapter_bytes = sum(t.numel() * t.element_size() for t in adapter.values())
    assert row["sync/bytes"] == pytest.approx(adapter_bytes, rel=0.01), "the sync moved more than the adapter"
    assert row["sync/seconds"] > 0 and row["train/kl"] >= 0
    if rt.need_critic:
        assert row["critic/vf_loss"] > 0 and row["critic/critic_grad_norm"] > 0
    assert row["rollout/logprob_diff"] < TOL  # sampled with the starting adapter, which the trainer held

    c.update_without_sync()
    trainer_now = c.trainer_logprobs()
    stale = [c.max_diff(e, trainer_now) for e in range(2)]
    assert min(stale) > TOL, f"an engine matched the new adapter before any sync: {stale}"
    sync = rt.sync_weights()
    assert sync["bytes"] == pytest.approx(adapter_bytes, rel=0.01)
    fresh = [c.max_diff(e, trainer_now) for e in range(2)]
    print(f"\n{label}: max |engine - trainer| log-prob per token after a sync: {max(fresh):.2e} "
          f"(stale before it: {min(stale):.2e}); adapter {adapter_bytes} bytes")
    assert max(fresh) < TOL, f"engines do not serve the synced adapter: {fresh}"
    assert c.versions() == {rt.weights_version}
    # The reference is the base (adapter off): unmoved by training, while the policy moved.
    assert c.trainer_logprobs("ref") == pytest.approx(base_ref, abs=1e-6)
    assert max(abs(a - b) for a, b in zip(trainer_now, base_ref)) > TOL
    return {"max_diff": max(fresh), "bytes": adapter_bytes}


def _random_adapter(tmp_path: Path) -> Path:
    """An adapter dir of the tiny model (B != 0), as a LoRA checkpoint's policy/ would hold."""
    from transformers import AutoModelForCausalLM

    from ttrl.models import resolve_model_path
    from ttrl.rollout.lora import write_adapter
    from ttrl.trainer.lora import adapter_params, wrap

    base = resolve_model_path(compose_config(*BASE).model)
    spec = {"r": 8, "alpha": 16.0, "dropout": 0.0, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj",
                                                                      "gate_proj", "up_proj", "down_proj"],
            "init": "default"}
    model = wrap(AutoModelForCausalLM.from_pretrained(base), spec, seed=1)
    g = torch.Generator().manual_seed(1)
    tensors = {n: (torch.randn(p.shape, generator=g) * 0.05 if ".lora_B." in n else p.detach())
               for n, p in adapter_params(model)}
    return write_adapter(tmp_path / "start" / "policy", tensors, spec, base)


def test_adapter_sync_parity_zero2_two_engines_from_a_saved_adapter_with_a_lora_critic(tmp_path):
    # model.lora.path: training starts from a saved adapter (as ttrl-serve serves one as its v0), which
    # every engine is pushed at start-up. PPO: the critic trains adapters of its own and its value head.
    c = Cluster("trainer.zero_stage=2", "algorithm=ppo", f"model.lora.path={_random_adapter(tmp_path)}")
    try:
        assert c.rt.weight_sync == "ray"
        critic = c.rt.critic.call("trainable_names")
        assert all(".lora_" in n or ".score.modules_to_save." in n for ns in critic for n in ns)
        assert any(".score." in n for n in critic[0])
        start, base = c.trainer_logprobs(), c.trainer_logprobs("ref")
        assert max(abs(a - b) for a, b in zip(start, base)) > TOL, "the saved adapter was not loaded"
        _check_parity(c, "ZeRO-2")
    finally:
        c.close()


@pytest.fixture(scope="module")
def zero3():
    # The colocated path (shared-memory buckets on CPU), in 1 MiB buckets: several per adapter.
    c = Cluster("trainer.zero_stage=3", "rollout.weight_sync=ipc", "rollout.sync_bucket_mb=1")
    yield c
    c.close()


def test_adapter_sync_parity_zero3_two_engines_by_handle(zero3):
    assert zero3.rt.weight_sync == "ipc"
    _check_parity(zero3, "ZeRO-3")


def test_a_mismatched_adapter_is_refused_and_the_engine_keeps_serving(zero3):
    from ttrl.rollout.weights import pack

    before = zero3.engine_logprobs(0)
    good = zero3.adapter()
    # Rank 4 where the engine serves rank 8: refused with one sentence naming the tensor.
    bad = {n: (t[:4] if ".lora_A." in n else t[:, :4]).contiguous() for n, t in good.items()}
    with pytest.raises(Exception) as err:
        ray.get(zero3.rt.engines[0].load_weights.remote([pack(bad.items())], 99))
    words = str(err.value).strip().splitlines()[-1]
    assert "lora_A.weight has shape (4, 128), the engine expects (8, 128)" in words and "refusing" in words
    # A full model's tensor is no adapter either.
    with pytest.raises(Exception, match="unknown parameter"):
        ray.get(zero3.rt.engines[0].load_weights.remote(
            [pack([("model.embed_tokens.weight", torch.zeros(3, 3))])], 99))
    assert ray.get(zero3.rt.engines[0].info.remote())["weights_version"] == zero3.rt.weights_version
    assert zero3.engine_logprobs(0) == pytest.approx(before, abs=1e-6)


def test_a_killed_engine_is_restarted_with_the_current_adapter(zero3):
    from ttrl.step import step

    c, rt = zero3, zero3.rt
    k = c.cfg.data.prompts_per_step
    step(c.ctx, c.parts.prompts[:k])
    ray.kill(rt.engines[0], no_restart=False)  # Ray restarts it: the base, no adapter
    row = step(c.ctx, c.parts.prompts[k:2 * k])
    assert rt.engine_restarts >= 1
    assert row["rollout/logprob_diff"] < TOL, "the restarted engine sampled without the current adapter"
    assert c.versions() == {rt.weights_version}
    assert c.max_diff(0, c.trainer_logprobs()) < TOL
    # Lost while the adapter is being sent: restarted and re-synced, the run goes on.
    c.update_without_sync()
    ray.kill(rt.engines[1], no_restart=False)
    rt.sync_weights()
    assert c.versions() == {rt.weights_version}
    assert c.max_diff(1, c.trainer_logprobs()) < TOL


def test_resume_from_an_adapter_checkpoint_continues_bit_exactly(zero3, tmp_path):
    c, rt = zero3, zero3.rt
    rt.save(str(tmp_path))
    # The checkpoint holds the adapter and its optimizer state, not the frozen base.
    model_bytes = sum(f.stat().st_size for f in Path(c.parts.model_path).glob("*.safetensors"))
    ckpt_files = [f for f in (tmp_path / "policy_ds").rglob("*") if f.is_file()]
    adapter_bytes = sum(t.numel() * t.element_size() for t in c.adapter().values())
    # Weights, Adam's two moments, fp32 master copies, all of the adapter (and some framing): no base.
    assert sum(f.stat().st_size for f in ckpt_files) < 6 * adapter_bytes + (1 << 20) < model_bytes
    assert sorted(p.name for p in (tmp_path / "policy").iterdir()) == ["adapter_config.json",
                                                                       "adapter_model.safetensors"]
    saved_fp = rt.fingerprint()

    c.update_without_sync()
    after_first = c.adapter()
    c.update_without_sync()  # move the state further, then go back to the checkpoint
    rt.load(str(tmp_path))
    assert rt.fingerprint() == saved_fp
    c.update_without_sync()
    after_resume = c.adapter()
    assert after_first.keys() == after_resume.keys()
    assert all(torch.equal(after_first[n], after_resume[n]) for n in after_first), \
        "the update after a resume differs from the one before it (adapter or optimizer state not restored)"


def test_a_saved_adapter_is_served_from_disk_and_merges_into_the_base(zero3, tmp_path):
    from transformers import AutoModelForCausalLM

    from ttrl.serve.versions import Versions
    from ttrl.trainer.lora import merge

    c, rt = zero3, zero3.rt
    rt.sync_weights()
    trainer = c.trainer_logprobs()
    # As ttrl-serve keeps a promoted version: Runtime.save under versions/v7 (policy/ is the adapter).
    versions = Versions(tmp_path / "versions")
    adapter_dir = versions.save(rt, 7) / "policy"
    c.update_without_sync()
    assert c.max_diff(0, c.trainer_logprobs()) > TOL
    # ttrl-eval (and the start of ttrl-serve with model.lora.path) load the adapter dir beside the base...
    ray.get(rt.engines[1].load_adapter_dir.remote(str(adapter_dir), rt.weights_version))
    assert c.max_diff(1, trainer) < TOL
    # ... and ttrl-serve's swaps, rollbacks and restarts load a version's packed blobs.
    ray.get(rt.engines[0].load_weights.remote(versions.blobs(7, rt.engine_dtype), 7))
    assert c.max_diff(0, trainer) < TOL
    # The export: one plain model dir, the adapter merged into the weights, scoring as the trainer did.
    out = merge(c.parts.model_path, str(adapter_dir), str(tmp_path / "merged"))
    model = AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32)
    assert not any("lora" in n for n, _ in model.named_parameters())
    ids = torch.tensor([c.prompt + c.completion])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
    P = len(c.prompt)
    merged = [logp[P + i - 1, t].item() for i, t in enumerate(c.completion)]
    assert max(abs(a - b) for a, b in zip(merged, trainer)) < 1e-4
    rt.sync_weights()  # engines back on the trainer's adapter for whoever uses the runtime next
