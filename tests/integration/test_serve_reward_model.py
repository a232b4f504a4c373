"""`ttrl-serve reward=reward_model`: a learning round scored by a reward model's Ray actor, for real.

Serving once had its own copy of the training set-up and lost this branch
("needs reward.path"). Here a server on the tiny random model (no warm start
needed: a reward model scores any text) answers a few queries, then learns
one round with `reward=reward_model`. The reward model is a tiny sequence
classifier whose head is zeroed and whose format says `transform=sigmoid`,
so every sample it scores gets exactly 0.5: a round whose mean reward is 0.5
was scored by it (a majority vote gives 0 or 1 per sample), through the same
builder a training run uses (`ttrl.parts.build_parts`).
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from tests.conftest import compose_config
from tests.integration.serving import Server

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(1500)]


def _constant_reward_model(policy_dir: Path, out: Path) -> Path:
    """A sequence classifier on the policy's tokenizer that scores every text 0 (0.5 after the sigmoid)."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    from ttrl.trainer.reward_model import RMFormat

    tok = AutoTokenizer.from_pretrained(policy_dir)
    conf = AutoConfig.from_pretrained(policy_dir, num_labels=1, pad_token_id=tok.eos_token_id)
    model = AutoModelForSequenceClassification.from_config(conf)
    with torch.no_grad():
        model.score.weight.zero_()
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    RMFormat(template="{q}{a}", max_length=128, transform="sigmoid").save(out)
    return out


def test_a_round_is_scored_by_the_reward_model(tmp_path):
    from ttrl.models.resolve import resolve_model_path

    base = ["experiment=debug", "trainer.num_workers=1", "trainer.zero_stage=2", "logger.progress=false"]
    cfg = compose_config(*base)
    rm = _constant_reward_model(Path(resolve_model_path(cfg.model, cfg.data)), tmp_path / "rm")
    regression = tmp_path / "regression.jsonl"
    regression.write_text("".join(json.dumps({"id": f"r{i}", "problem": f"{i}+{i}=", "answer": str(2 * i)}) + "\n"
                                  for i in range(1, 5)))
    srv = Server(tmp_path / "serve", [*base, "serve.port=0"], "reward=reward_model", f"reward.path={rm}",
                 "serve.learn.every_queries=0", "serve.learn.steps=1", "serve.learn.feedback=false",
                 "serve.learn.min_queries=4", f"serve.gate.regression_set={regression}", "serve.gate.n_samples=2",
                 "serve.single_user=true")  # one client, no keys: its queries alone may make a round
    try:
        srv.start()
        for i in range(4):
            r = httpx.post(f"{srv.url}/v1/completions", json={"prompt": f"{10 + i}+{20 + i}="}, timeout=300)
            assert r.status_code == 200, r.text
        srv.learn()
        (first, *_) = srv.wait_rounds(1)
        metrics = first["metrics"]
        assert metrics["reward_mean"] == pytest.approx(0.5, abs=1e-6), (metrics, srv.tail())
        assert httpx.get(f"{srv.url}/health", timeout=30).json()["status"] == "ok"
    finally:
        srv.stop()
