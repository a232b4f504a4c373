"""Pure parts of the trainer side: batch packing, DeepSpeed config, LR schedule, metrics file."""

from __future__ import annotations

import json
import math

import pytest
import torch

from ttrl.metrics.logger import JsonlLogger
from ttrl.trainer.batch import concat, pack_batch, response_slice, select, split
from ttrl.trainer.ds_config import build_ds_config, lr_lambda


def test_pack_batch_aligns_responses_and_positions():
    b = pack_batch([[5, 6, 7], [8]], [[1, 2], [3, 4, 9]], pad_id=0, behavior_logps=[[-1.0, -2.0], [-3.0, -4.0, -5.0]])
    # prompts left-padded to 3, responses right-padded to 3
    assert b["input_ids"].tolist() == [[5, 6, 7, 1, 2, 0], [0, 0, 8, 3, 4, 9]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]]
    # positions count real tokens only, so left padding does not shift them
    assert b["position_ids"][1, 2:].tolist() == [0, 1, 2, 3]
    assert b["response_mask"].tolist() == [[1, 1, 0], [1, 1, 1]]
    assert b["behavior_logp"].tolist() == [[-1, -2, 0], [-3, -4, -5]]
    # logits at column P-1+t predict response token t
    s = response_slice(b)
    assert (s.start, s.stop) == (2, 5)


def test_select_split_concat_round_trip():
    b = pack_batch([[1]] * 4, [[2, 3]] * 4, pad_id=0)
    parts = split(b, 2)
    assert [p["input_ids"].shape[0] for p in parts] == [2, 2]
    back = concat(parts)
    assert torch.equal(back["input_ids"], b["input_ids"])
    assert select(b, slice(1, 3))["input_ids"].shape[0] == 2
    with pytest.raises(ValueError, match="3 equal parts"):
        split(b, 3)


def test_ds_config_from_trainer_settings():
    cfg = build_ds_config(zero_stage=3, micro_batch_size=4, grad_accum=2, world_size=2, lr=1e-5, betas=(0.9, 0.99),
                          weight_decay=0.0, grad_clip=1.0, dtype="bfloat16", device="cuda", offload=True)
    assert cfg["train_batch_size"] == 16
    assert cfg["zero_optimization"]["stage"] == 3
    assert cfg["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert cfg["bf16"]["enabled"] and not cfg["fp16"]["enabled"]
    assert cfg["optimizer"]["params"]["lr"] == 1e-5
    frozen = build_ds_config(zero_stage=2, micro_batch_size=4, grad_accum=1, world_size=1, lr=1.0, betas=(0.9, 0.99),
                             weight_decay=0.0, grad_clip=1.0, dtype="float32", device="cpu", offload=False, train=False)
    assert "optimizer" not in frozen
    cpu = build_ds_config(zero_stage=2, micro_batch_size=1, grad_accum=1, world_size=1, lr=1.0, betas=(0.9, 0.99),
                          weight_decay=0.0, grad_clip=1.0, dtype="float32", device="cpu", offload=False)
    assert cpu["optimizer"]["params"]["torch_adam"] is True


def test_gpu_ds_config_needs_no_compiled_optimizer():
    # DeepSpeed's FusedAdam / CPU Adam compile at start-up (nvcc / a C++ toolchain); torch's AdamW does not.
    def opt(device, offload):
        return build_ds_config(zero_stage=2, micro_batch_size=1, grad_accum=1, world_size=1, lr=1.0,
                               betas=(0.9, 0.99), weight_decay=0.0, grad_clip=1.0, dtype="bfloat16",
                               device=device, offload=offload)["optimizer"]["params"]
    assert opt("cuda", False)["torch_adam"] is True and opt("cuda", False)["fused"] is True
    assert opt("cuda", True)["torch_adam"] is True and "fused" not in opt("cuda", True)  # CPU-side states


def test_lr_schedules():
    cos = lr_lambda("cosine", warmup_steps=2, total_steps=12, min_ratio=0.1)
    assert cos(0) == pytest.approx(0.5) and cos(1) == pytest.approx(1.0)
    assert cos(2) == pytest.approx(1.0)
    assert cos(7) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert cos(12) == pytest.approx(0.1)
    assert lr_lambda("constant", 0, 10, 0.0)(9) == 1.0
    assert lr_lambda("linear", 0, 10, 0.0)(5) == pytest.approx(0.5)


def test_jsonl_logger_resume_drops_later_and_torn_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = JsonlLogger(path)
    for s in (1, 2, 3):
        log.log({"step": s, "x": float(s)})
    log.close()
    with path.open("a") as fh:
        fh.write('{"step": 4, "x"')  # torn by a kill
    log = JsonlLogger(path)
    log.truncate_from(3)
    log.log({"step": 3, "x": 30.0, "nan": float("nan")})
    log.close()
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[-1]["x"] == 30.0 and rows[-1]["nan"] is None


def test_trim_padding_equals_packing_the_rows_alone():
    from ttrl.trainer.batch import trim_padding

    prompts, responses = [[5, 6, 7, 8], [8, 9], [4, 4, 4], [1]], [[1, 2, 3, 4, 5], [3], [4, 9], [7, 7]]
    full = pack_batch(prompts, responses, pad_id=0, behavior_logps=[[-0.5] * len(r) for r in responses])
    rows = torch.tensor([1, 2])  # the short prompt and responses: most columns are padding
    t = trim_padding(select(full, rows))
    alone = pack_batch([prompts[1], prompts[2]], [responses[1], responses[2]], pad_id=0,
                       behavior_logps=[[-0.5], [-0.5, -0.5]])
    for k in ("input_ids", "attention_mask", "position_ids", "response_mask", "behavior_logp"):
        assert torch.equal(t[k], alone[k]), k
    assert int(t["prompt_width"]) == 3
    # Nothing to cut: the batch comes back as it was.
    assert trim_padding(full) is full


def test_trimmed_micro_batches_give_the_same_log_probs():
    """The trainer's micro-batches (sorted by length, trimmed) score every row as the whole batch does."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from ttrl.trainer.worker import PolicyWorker

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=50, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2, head_dim=32)).eval()
    g = torch.Generator().manual_seed(1)
    lens = [(int(torch.randint(1, 6, (1,), generator=g)), int(torch.randint(1, 12, (1,), generator=g)))
            for _ in range(10)]
    prompts = [torch.randint(1, 50, (p,), generator=g).tolist() for p, _ in lens]
    responses = [torch.randint(1, 50, (r,), generator=g).tolist() for _, r in lens]
    batch = pack_batch(prompts, responses, pad_id=0)

    class Probe(PolicyWorker):  # only the micro-batching and scoring, no DeepSpeed
        def __init__(self):
            self.spec = {"micro_batch_size": 3}
            self.engine = model

        def _to_dev(self, mb):
            return mb

    with torch.no_grad():
        whole, _ = Probe()._logp(model, batch, 0.7)
        parts = [(rows, Probe()._logp(model, mb, 0.7)[0]) for rows, mb in Probe()._micro_batches(batch)]
    got = PolicyWorker._scatter_rows(parts, batch)
    mask = batch["response_mask"].bool()
    assert sorted(int(i) for rows, _ in parts for i in rows) == list(range(10))
    assert max(mb.shape[1] for _, mb in parts) <= whole.shape[1]
    assert torch.allclose(got[mask], whole[mask], atol=1e-5)
    # No-grad passes take trainer.logprob_micro_batch_size rows at a time (fewer ZeRO-3 gathers),
    # compute_logprobs included; the same log-probs come out.
    probe = Probe()
    probe.spec["logprob_micro_batch_size"] = 8
    assert [len(rows) for rows, _ in probe._micro_batches(batch, no_grad=True)] == [8, 2]
    assert [len(rows) for rows, _ in probe._micro_batches(batch)] == [3, 3, 3, 1]
    assert torch.allclose(probe.compute_logprobs(batch, 0.7)[mask], whole[mask], atol=1e-5)


def test_cpu_engines_get_the_cores_the_trainer_leaves():
    from ttrl.distributed.ray_setup import engine_cpu_threads

    # The demo's box: 2 cores, 2 trainer ranks, 1 engine.
    assert engine_cpu_threads(2, 1, 2, overlap=False) == 2  # the ranks wait while it generates
    assert engine_cpu_threads(2, 1, 2, overlap=True) == 1   # they train meanwhile: never fewer than one
    assert engine_cpu_threads(16, 2, 4, overlap=True) == 6
    assert engine_cpu_threads(16, 3, 4, overlap=False) == 5



def _adv_batch(lengths: list[int], live: list[int]) -> dict:
    from ttrl.trainer.batch import pack_batch

    b = pack_batch([[1, 2]] * len(lengths), [[3] * n for n in lengths], pad_id=0)
    b["advantages"] = torch.zeros_like(b["response_mask"], dtype=torch.float32)
    for i in live:
        b["advantages"][i] = 0.5 * b["response_mask"][i]
    return b


def test_gradient_micro_batches_keep_their_count_and_carry_every_row_with_an_advantage_once():
    from ttrl.trainer.batch import gradient_micro_batches, zero_advantage_rows

    # 8 rows, 4 micro-batches; rows 1, 2, 6 have an advantage (lengths 5, 9, 2), the rest none.
    b = _adv_batch([3, 5, 9, 4, 7, 1, 2, 6], live=[1, 2, 6])
    assert zero_advantage_rows(b).tolist() == [True, False, False, True, True, True, False, True]
    sets, rest = gradient_micro_batches(b, zero_advantage_rows(b), 4)
    # Longest first, one per micro-batch; the fourth borrows the longest zero row (4, length 7).
    assert [s.tolist() for s in sets] == [[2], [1], [6], [4]]
    assert sorted(rest.tolist()) == [0, 3, 5, 7]
    # Enough rows with an advantage: near-equal sets, none borrowed.
    b = _adv_batch([3, 5, 9, 4, 7, 1, 2, 6], live=[0, 1, 2, 3, 4])
    sets, rest = gradient_micro_batches(b, zero_advantage_rows(b), 2)
    assert [s.tolist() for s in sets] == [[2, 4, 1], [3, 0]] and sorted(rest.tolist()) == [5, 6, 7]
    # An advantage that is nonzero only on padding does not count.
    b = _adv_batch([1, 2], live=[])
    assert b["response_mask"][0, 1] == 0
    b["advantages"][0, 1] = 1.0
    assert zero_advantage_rows(b).tolist() == [True, True]


def test_spread_rows_gives_each_rank_an_equal_share_of_the_rows_with_an_advantage():
    from ttrl.trainer.batch import split, spread_rows, zero_advantage_rows

    # Two prompts' groups of 4: the first group all zero (its samples agreed), the second all live.
    b = _adv_batch([3, 5, 9, 4, 7, 1, 2, 6], live=[4, 5, 6, 7])
    parts = split(spread_rows(b, zero_advantage_rows(b), 2), 2)
    assert [int((~zero_advantage_rows(p)).sum()) for p in parts] == [2, 2]
    # The longest live rows are dealt in turn: 7 and 2 to the first rank, 6 and 1 to the second.
    assert [sorted(p["response_mask"].sum(1).tolist()) for p in parts] == [[2, 4, 7, 9], [1, 3, 5, 6]]
    with pytest.raises(ValueError, match="3 equal parts"):
        spread_rows(b, zero_advantage_rows(b), 3)


def test_the_zero_advantage_skip_holds_only_where_those_rows_have_no_gradient():
    from ttrl.trainer.options import UpdateOptions

    assert UpdateOptions().skips_zero_advantage
    assert not UpdateOptions(skip_zero_advantage=False).skips_zero_advantage
    assert not UpdateOptions(entropy_coef=0.001).skips_zero_advantage  # the entropy bonus has a gradient on every row
    assert not UpdateOptions(kl_coef=0.01).skips_zero_advantage  # so has a KL loss term
    assert UpdateOptions(kl_coef=0.01, kl_in_reward=True).skips_zero_advantage  # a KL in the reward is in the advantage


def test_shared_prompts_maps_each_row_to_one_row_with_its_prompt():
    from ttrl.trainer.batch import shared_prompts

    a, b, c = [5, 6, 7], [8, 9], [5, 6, 7, 1]
    batch = pack_batch([a, b, a, c, b, a], [[1], [2, 3], [4], [5], [6], [7, 8]], pad_id=0)
    first, inverse = shared_prompts(batch)
    assert len(first) == 3
    prompts = [a, b, a, c, b, a]
    for i, p in enumerate(prompts):
        assert prompts[int(first[inverse[i]])] == p
    assert len({int(inverse[i]) for i in (0, 2, 5)}) == 1 and int(inverse[1]) == int(inverse[4])
    assert shared_prompts(pack_batch([a, b, c], [[1], [2], [3]], pad_id=0)) is None
    # The same tokens behind different left padding are different prompts to the model: [0, 8, 9] is not [8, 9, 0].
    assert shared_prompts(pack_batch([[8, 9], [8, 9, 0]], [[1], [1]], pad_id=0)) is None


@pytest.mark.parametrize("response_lengths", [(1, 1), (1, 9)])
def test_the_prompt_once_gives_the_full_forwards_log_probs_and_gradient(response_lengths):
    """Groups of samples sharing left-padded prompts of several lengths: one prompt pass per group."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from ttrl.trainer.worker import PolicyWorker

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=50, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2, head_dim=32))
    g = torch.Generator().manual_seed(2)
    prompts, responses = [], []
    for plen in (3, 6, 4, 6):
        p = torch.randint(1, 50, (plen,), generator=g).tolist()
        for _ in range(3):
            prompts.append(p)
            n = int(torch.randint(response_lengths[0], response_lengths[1] + 1, (1,), generator=g))
            responses.append(torch.randint(1, 50, (n,), generator=g).tolist())
    batch = pack_batch(prompts, responses, pad_id=0)

    class Probe(PolicyWorker):  # the scoring alone, no DeepSpeed
        def __init__(self, once: bool):
            self.spec = {"prompt_once": once, "zero_stage": 2, "gradient_checkpointing": False}

    calls = []
    hook = model.register_forward_pre_hook(lambda m, a, k: calls.append(k["input_ids"].shape), with_kwargs=True)
    mask = batch["response_mask"]
    out = {}
    for once in (False, True):
        calls.clear()
        model.zero_grad(set_to_none=True)
        logp, ent = Probe(once)._logp(model, batch, 0.7, with_entropy=True)
        (logp * mask).sum().backward()
        out[once] = (logp.detach(), ent, [p.grad.clone() for p in model.parameters()], list(calls))
    hook.remove()
    (lp0, ent0, g0, calls0), (lp1, ent1, g1, calls1) = out[False], out[True]
    assert calls0 == [torch.Size([12, batch["input_ids"].shape[1]])]
    # 4 distinct prompts in one pass, then the 12 responses (all but their last token) against their copies.
    assert calls1[0] == torch.Size([4, 6])
    R = mask.shape[1]
    assert calls1[1:] == ([torch.Size([12, R - 1])] if R > 1 else [])
    m = mask.bool()
    assert torch.allclose(lp1[m], lp0[m], atol=1e-5) and torch.allclose(ent1[m], ent0[m], atol=1e-5)
    for a, b in zip(g0, g1):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)
