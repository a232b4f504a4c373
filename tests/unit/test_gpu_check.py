"""`make gpu-check`: its refusal on a machine without a GPU, and its table (pure parts, no GPU needed)."""

from __future__ import annotations

import pytest
import torch

from ttrl.bench import gpu_check

pytestmark = pytest.mark.unit


def test_without_a_gpu_it_says_so_in_one_sentence_and_exits_2(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main([]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("gpu-check: no GPU to check on this machine (") and err.count("\n") == 0
    assert "run it on a GPU node" in err


def _rows(diff=0.01, loss=0.1):
    row = {"train/pg_loss": loss, "rollout/logprob_diff": diff, "rollout/tokens_per_s": 5e4, "sync/bytes": 4e9,
           "timing/sync": 2.0, "check/train_tokens": 1e4, "timing/train": 1.0}
    return [dict(row), dict(row)]


def test_the_table_gives_every_measure_a_verdict_and_fails_on_bad_parity_or_memory():
    lines = gpu_check.run_lines(_rows(), n_params=10**9, copy_rate=4e12, matmul_rate=1e15,
                                peak=[50 * 2**30], total=[80 * 2**30], weight_path="ipc", expected_path="ipc")
    by = {x.measure: x for x in lines}
    assert by["engine/trainer log-prob parity"].verdict == "ok"
    assert "2.00 GB/s via ipc (0.1% of the device copy 4000 GB/s)" in by["weight sync"].value
    assert by["trainer MFU"].value.startswith("6.0%")  # 6 * 1e9 params * 1e4 tokens / 1 s / 1e15 FLOP/s
    assert by["peak memory, GPU 0"].verdict == "ok"
    bad = gpu_check.run_lines(_rows(diff=0.3, loss=float("nan")), 10**9, 4e12, 1e15, [79 * 2**30], [80 * 2**30])
    assert {x.measure for x in bad if x.verdict == "FAIL"} == {
        "GRPO steps, colocated", "engine/trainer log-prob parity", "peak memory, GPU 0"}
    # A colocated check whose syncs fell back to the Ray path did not check the CUDA IPC path.
    fell_back = gpu_check.run_lines(_rows(), 10**9, 4e12, 1e15, [1], [80 * 2**30], "ray", "ipc")
    assert {x.measure for x in fell_back if x.verdict == "FAIL"} == {"weight path"}
    text = gpu_check.table(bad)
    assert text.count("\n") == len(bad) - 1 and "[FAIL]" in text


def test_install_lines_read_the_optimizer_our_config_asks_deepspeed_for():
    by = {x.measure: x for x in gpu_check.install_lines()}
    assert by["DeepSpeed optimizer"].verdict == "ok"
    assert by["torch CUDA build"].verdict == ("ok" if torch.version.cuda else "FAIL")


def test_without_vllm_or_ray_it_says_so_and_runs_the_torch_level_checks(monkeypatch, capsys, tmp_path):
    import importlib.util

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    called = []
    # A fake of the checks' process.
    monkeypatch.setattr(gpu_check, "torch_level", lambda device="cuda": called.append(device) or 0)
    assert gpu_check.main([]) == 0 and called == ["cuda"]
    err = capsys.readouterr().err
    assert "vllm not installed here: running the torch-level checks only" in err and err.count("\n") == 1
    # --full will not fall back: it goes on to the install lines (which then fail on the missing vLLM).
    monkeypatch.setattr(gpu_check, "install_lines", lambda: [gpu_check.Line("vLLM CUDA build", "-", "-", "FAIL")])
    monkeypatch.chdir(tmp_path)
    assert gpu_check.main(["--full"]) == 1 and called == ["cuda"]


def test_torch_only_runs_the_torch_level_checks_even_with_vllm_and_ray_and_cpu_is_their_self_test(
        monkeypatch, capsys):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())  # vLLM and Ray "installed"
    called = []
    monkeypatch.setattr(gpu_check, "torch_level", lambda device="cuda": called.append(device) or 0)
    monkeypatch.setattr(gpu_check, "install_lines", lambda: pytest.fail("--torch-only went on to the full check"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert gpu_check.main(["--torch-only"]) == 0 and called == ["cuda"]
    assert "gpu-check: --torch-only: running the torch-level checks only" in capsys.readouterr().err
    # --device cpu needs no GPU: the CPU self-test of the same checks.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(["--device", "cpu"]) == 0 and called == ["cuda", "cpu"]
    assert "this checks no GPU" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        gpu_check.main(["--torch-only", "--full"])


def test_the_torch_level_worker_gets_the_spec_a_run_builds():
    """gpu_torch_check creates PolicyWorker directly (no Ray, no Hydra on a bare GPU box): its spec must carry
    exactly the keys ttrl.distributed.runtime passes to the worker group."""
    import ast
    import inspect

    from ttrl.bench import gpu_torch_check
    from ttrl.distributed import runtime

    keys = None
    for node in ast.walk(ast.parse(inspect.getsource(runtime))):
        if (isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["spec"]
                and isinstance(node.value, ast.Call) and getattr(node.value.func, "id", None) == "dict"):
            keys = {k.arg for k in node.value.keywords}
    assert keys and "zero_stage" in keys  # the parse found the run's spec
    mine = gpu_torch_check.spec("cuda", "bfloat16", zero_stage=2, micro=4, grad_accum=2)
    assert set(mine) == keys
