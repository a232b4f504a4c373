"""`ttrl-eval` for real: the vLLM CPU engine on a 20-problem slice of MATH-500 (tiny model)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

TTRL_EVAL = str(Path(sys.executable).parent / "ttrl-eval")


def test_eval_on_a_math500_slice_writes_summary_and_per_problem_files(tmp_path, shared_data):
    out = tmp_path / "eval"
    proc = subprocess.run(
        [TTRL_EVAL, "model=tiny", "data=math500", f"data.local_path={shared_data / 'math500.jsonl'}",
         "data.id_key=id", "data.limit=20", "eval.n_samples=4", "eval.ks=[1,2,4]", "eval.temperature=1.0",
         "eval.max_new_tokens=16", "rollout.max_new_tokens=16", f"hydra.run.dir={out}"],
        capture_output=True, text=True, timeout=500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "eval.json").read_text())
    m = result["metrics"]
    assert m["n_problems"] == 20 and m["n_samples"] == 4
    for key in ("pass@1", "pass@2", "pass@4", "maj@1", "maj@2", "maj@4", "pass@1_stderr"):
        assert 0.0 <= m[key] <= 1.0, key
    assert m["pass@1"] <= m["pass@2"] <= m["pass@4"]  # unbiased pass@k grows with k
    lines = [json.loads(line) for line in (out / "eval_problems.jsonl").read_text().splitlines()]
    assert len(lines) == 20
    first = lines[0]
    assert first["id"] == "test/precalculus/807.json" and len(first["answers"]) == 4 and len(first["correct"]) == 4
    # The summary is exactly what the per-problem table implies.
    assert m["pass@1"] == pytest.approx(sum(sum(r["correct"]) / 4 for r in lines) / 20)
    assert m["maj@4"] == pytest.approx(sum(r["vote_correct"] for r in lines) / 20)


def test_eval_of_a_lora_checkpoint_serves_the_adapter_on_its_base(tmp_path):
    # A LoRA run's policy/ is an adapter dir: ttrl-eval serves it on the base (model.path) instead of
    # loading it as a model. The adapter here is random (B != 0), written as a checkpoint would be.
    from transformers import AutoModelForCausalLM

    from tests.conftest import compose_config
    from ttrl.models import resolve_model_path
    from ttrl.rollout.lora import write_adapter
    from ttrl.trainer.lora import adapter_params, wrap

    base = resolve_model_path(compose_config("model=tiny").model)
    spec = {"r": 8, "alpha": 16.0, "dropout": 0.0, "target_modules": ["q_proj", "v_proj", "down_proj"],
            "init": "default"}
    model = wrap(AutoModelForCausalLM.from_pretrained(base), spec, seed=0)
    tensors = {n: (p.detach().normal_(0, 0.2) if ".lora_B." in n else p.detach()) for n, p in adapter_params(model)}
    adapter = write_adapter(tmp_path / "step_2" / "policy", tensors, spec, base)
    out = tmp_path / "eval"
    proc = subprocess.run(
        [TTRL_EVAL, "model=tiny", "data=synthetic", "data.synthetic.num_problems=4", f"eval.checkpoint={adapter}",
         "eval.greedy=true", "eval.ks=[1]", "eval.max_new_tokens=8", "rollout.max_new_tokens=8",
         f"hydra.run.dir={out}"], capture_output=True, text=True, timeout=500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "eval.json").read_text())
    assert result["adapter"] == str(adapter) and result["model"] == base
    assert result["metrics"]["n_problems"] == 4
