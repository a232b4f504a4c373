"""SER for real: reward-model ranks on Ray + DeepSpeed (ZeRO-3, 2 ranks, gloo), one
self-labelling round, the saved RM dir, then one PPO step whose rewards come from that
RM through the lazily started scoring actor, with vLLM CPU rollouts.

The tiny random model learns little in seconds; what is checked is the plumbing: the
round's metrics, the filter's bookkeeping, a HF model dir that scores exactly as the
trainer did, and a PPO step that trains on the RM's scores.
"""

from __future__ import annotations

import json
import math
import random

import pytest

from tests.conftest import compose_config

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

OVERRIDES = [
    "experiment=debug_ser",
    "logger.progress=false",
    "ser.synthetic_num_pairs=80",
    "ser.synthetic_num_eval=24",
    "ser.seed_fraction=0.25",
    "ser.rm.min_steps=3",
    # Wide thresholds: a barely trained RM still keeps some pairs, so the round retrains.
    "ser.high=0.5",
    "ser.low=0.5",
    "ser.min_gap=0.0",
]


def test_one_ser_round_then_one_ppo_step_with_the_learned_rm(tmp_path):
    import ray

    from ttrl.distributed.runtime import Runtime
    from ttrl.parts import build_parts
    from ttrl.rewards import build_reward, compute_rewards
    from ttrl.ser.loop import run_ser
    from ttrl.step import StepContext, StepOptions, step
    from ttrl.trainer.reward_model import RemoteRewardModel, RewardModelScorer
    from ttrl.types import Group, Sample

    cfg = compose_config(*OVERRIDES)
    res = run_ser(cfg, tmp_path)
    assert not ray.is_initialized(), "the SER stage must stop the Ray cluster it started"

    # ── the rounds' metrics ───────────────────────────────────────────────
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1] == [r["ser/round"] for r in rows]
    assert rows == [json.loads(line) for line in (tmp_path / "ser" / "metrics.jsonl").read_text().splitlines()]
    seed_rm, round1 = rows
    assert seed_rm["ser/train_rows"] == 20 and seed_rm["ser/pool_left"] == 60
    kept = round1["ser/kept_status1"] + round1["ser/kept_status2"]
    assert kept > 0 and round1["ser/kept_total"] == kept
    assert round1["ser/pool_left"] == 60 - kept and round1["ser/train_rows"] == 20 + kept
    assert 0 <= round1["ser/self_label_accuracy"] <= 1
    for r in rows:
        assert 0 <= r["ser/rm_accuracy"] <= 1 and math.isfinite(r["ser/train_loss"])
    assert "max_rounds=1" in res.stop or "not improved" in res.stop
    summary = json.loads((tmp_path / "ser" / "summary.json").read_text())
    assert summary["best_round"] == res.best_round

    # ── the saved RM: a HF dir that scores as it was trained ──────────────
    final = tmp_path / "ser" / "final_rm"
    meta = json.loads((final / "ttrl_rm.json").read_text())
    assert meta["template"] == "{q}{a}" and meta["ser_round"] == res.best_round
    scorer = RewardModelScorer(str(final), device="cpu")
    held = ["12+34+56=", "12+34+56="], ["\\boxed{102}", "\\boxed{103}"]
    s1 = scorer.score(*held)
    assert len(s1) == 2 and all(math.isfinite(x) for x in s1)
    # Batching and padding do not change a score.
    longer = scorer.score(["12+34+56=", "1+2=", "12+34+56="], ["\\boxed{102}", "x" * 30, "\\boxed{103}"])
    assert longer[0] == pytest.approx(s1[0], abs=1e-5) and longer[2] == pytest.approx(s1[1], abs=1e-5)

    # ── one PPO step against it ───────────────────────────────────────────
    # (built by hand, as ttrl.ser.chain does through the loop once it passes reward.path)
    pcfg = compose_config(*OVERRIDES, "reward=majority_vote", "ser.enabled=false")
    setup = build_parts(pcfg)
    setup.reward = build_reward("reward_model", scorer=RemoteRewardModel(str(final)))
    rt = Runtime(pcfg, setup.model_path, total_opt_steps=4)
    try:
        ctx = StepContext(rt, setup.reward, setup.tokenizer, StepOptions.from_config(pcfg), random.Random(0))
        # The reward scores exactly what the RM dir scores, through its Ray actor.
        prompt = setup.prompts[0]
        g = Group(prompt, [], [Sample(text="\\boxed{1}"), Sample(text="\\boxed{22}")])
        out = compute_rewards(setup.reward, [g])
        assert out.votes is None
        assert out.rewards[0] == pytest.approx(scorer.score([prompt.problem] * 2, ["\\boxed{1}", "\\boxed{22}"]),
                                               abs=1e-4)
        row = step(ctx, setup.prompts[:pcfg.data.prompts_per_step])
        assert math.isfinite(row["train/pg_loss"]) and row["train/grad_norm"] > 0
        assert math.isfinite(row["critic/vf_loss"])
        assert math.isfinite(row["reward/mean"]) and row["reward/mean"] != 0.0
    finally:
        setup.reward.close()
        rt.shutdown()



def test_pointwise_ser_with_lora_on_zero2(tmp_path):
    """The pointwise variant (BCE on graded responses) with LoRA adapters on one ZeRO-2 rank:
    a round of self-labels, and a merged, plain HF export."""
    import ray
    from transformers import AutoModelForSequenceClassification

    from ttrl.ser.loop import run_ser

    cfg = compose_config("ser=synthetic_pointwise", "ser.then_policy=false", "model=tiny", "device=cpu",
                         "logger.progress=false", "ser.synthetic_num_pairs=40", "ser.synthetic_num_eval=10",
                         "ser.seed_fraction=0.25", "ser.max_rounds=1", "ser.high=0.5", "ser.low=0.5",
                         "ser.rm.num_workers=1", "ser.rm.zero_stage=2", "ser.rm.batch_size=8",
                         "ser.rm.micro_batch_size=4", "ser.rm.min_steps=3", "ser.rm.lr=1e-3", "ser.lora.enabled=true",
                         "ser.lora.r=4")
    res = run_ser(cfg, tmp_path)
    assert not ray.is_initialized()
    rows = [json.loads(line) for line in (tmp_path / "ser" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["ser/train_rows"] == 20  # 10 seed problems x 2 graded responses
    assert rows[1]["ser/kept_status1"] > 0 and rows[1]["ser/kept_status2"] == 0
    assert 0 <= rows[1]["ser/self_label_accuracy"] <= 1 and 0 <= rows[-1]["ser/rm_accuracy"] <= 1
    meta = json.loads((res.final_rm / "ttrl_rm.json").read_text())
    assert meta["mode"] == "pointwise" and meta["transform"] == "sigmoid"
    model = AutoModelForSequenceClassification.from_pretrained(res.final_rm)
    assert not any("lora" in n for n, _ in model.named_parameters())  # merged into the weights


def test_ttrl_train_runs_ser_on_worked_solutions_with_a_likelihood_head_then_ppo(tmp_path):
    """`ttrl-train experiment=debug_ser` end to end from the command line, with worked
    solutions (ser.synthetic_style=worked), the likelihood head (ser.rm.head=likelihood:
    the backbone's own response log-likelihood, calibrated once from the seed pairs, trained
    on 2 ZeRO-3 ranks; the reset between rounds keeps the calibration) and two of the
    reward-hacking defences (normalize, clip). Then: the saved RM dir is a plain causal LM
    whose scores are scale * loglik + bias, and the PPO steps trained on its scores."""
    import os
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ttrl.trainer.reward_model import RewardModelScorer

    ray_tmp = tempfile.mkdtemp(prefix="ttrlser-", dir="/tmp")
    env = {**os.environ, "CI": "true", "RAY_TMPDIR": ray_tmp}
    env.pop("RAY_ADDRESS", None)
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "ttrl-train"), *OVERRIDES, "ser.synthetic_style=worked",
         "ser.rm.head=likelihood", "reward.normalize=true", "reward.clip=3", f"hydra.run.dir={run_dir}"],
        env=env, capture_output=True, text=True, timeout=840)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    ser_rows = [r for r in rows if "ser/round" in r]
    policy = [r for r in rows if "train/pg_loss" in r]
    assert [r["ser/round"] for r in ser_rows] == [0, 1]
    assert all(math.isfinite(r["ser/train_loss"]) and 0 <= r["ser/rm_accuracy"] <= 1 for r in ser_rows)
    assert [r["step"] for r in policy] == [1, 2]
    for r in policy:
        assert math.isfinite(r["train/pg_loss"]) and math.isfinite(r["critic/vf_loss"])
        # normalize then clip: whitened scores, bounded by 3.
        assert -3.0 <= r["reward/mean"] <= 3.0
    # Round 1 scored every unlabelled pair (60 of 80) with both p's in (0, 1).
    table = [json.loads(x) for x in (run_dir / "ser" / "scores_round1.jsonl").read_text().splitlines()]
    assert len(table) == 60 and all(0 < t["p_a"] < 1 and 0 < t["p_b"] < 1 for t in table)

    final = run_dir / "ser" / "final_rm"
    meta = json.loads((final / "ttrl_rm.json").read_text())
    assert meta["head"] == "likelihood" and meta["head_scale"] > 0 and math.isfinite(meta["head_bias"])
    lm = AutoModelForCausalLM.from_pretrained(final)
    tok = AutoTokenizer.from_pretrained(final)
    prompt, response = "12+34+56=", "12+34=46,46+56=102 \\boxed{102}"
    n = len(tok(prompt)["input_ids"])
    ids = tok(prompt + response, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(lm(ids).logits[0].float(), -1)
    ll = sum(float(logp[t - 1, ids[0, t]]) for t in range(n, ids.shape[1]))
    got = RewardModelScorer(str(final), device="cpu").score([prompt], [response])[0]
    assert got == pytest.approx(meta["head_scale"] * ll + meta["head_bias"], abs=1e-3)
