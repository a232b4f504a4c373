"""`make gpu-check`: is this GPU node ready for ttrl? One command, one table.

    python -m ttrl.bench.gpu_check [--steps 2] [--set KEY=VALUE ...]   # Hydra overrides of the run
    python -m ttrl.bench.gpu_check --torch-only    # the torch-level checks alone (below)
    python -m ttrl.bench.gpu_check --device cpu    # their CPU self-test, for testing only

1. The install: torch built for CUDA and able to use this GPU, vLLM's CUDA
   build, and DeepSpeed's optimizer taken from torch (no op compiled at
   start-up, so no nvcc is needed).
2. Real GRPO steps (default 2) of the demo's tiny model (built locally, no
   download) with colocated engines: Ray, vLLM, DeepSpeed ZeRO-2, bf16.
3. Parity: the engines' log-probs of the step-2 samples against the
   trainer's, after the step-1 sync (`rollout/logprob_diff`).

Where vLLM or Ray is not installed (a bare GPU box with torch alone), it
says in one line which, and runs the torch-level checks instead
(`ttrl.bench.gpu_torch_check`, in a process of its own: the DeepSpeed
worker in bf16 on ZeRO-2 and ZeRO-3, its own weights handed to a second
process as the colocated sync does, its log-probs against fp32, a
1.5B-shaped CUDA IPC handoff, the NCCL path's bucket loop, MFU on a 0.4B
model); `--torch-only` runs those alone even where vLLM and Ray are
installed, `--full` refuses to fall back. `--device cpu` (testing only, no
GPU needed) runs the torch-level checks' CPU self-test: the trainer and
handoff checks on gloo and /dev/shm, fp32, the tiny model.

Then one table: each measure, its value, its goal and a verdict; generation
tokens/s, sync GB/s against this GPU's own device-to-device copy rate,
trainer MFU against its own measured bf16 matmul rate, peak memory per GPU.
Exit 0 when no line fails, 1 when one does, 2 when there is no usable GPU
(one sentence says why). Writes only under outputs/gpu_check/ (latest.json
for the full check; torch_cuda.json, torch_cpu.json for the torch-level
ones) and a temporary dir.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Goals the check holds a node to. The parity bound is for bf16 engines
# against a bf16 trainer (two kernels, same weights).
MAX_LOGPROB_DIFF = 0.05
MAX_MEMORY_SHARE = 0.95


@dataclass
class Line:
    measure: str
    value: str
    goal: str
    verdict: str  # "ok", "FAIL", or "info" (reported, no goal)


def no_gpu_reason() -> str | None:
    """Why this machine cannot run the GPU path, in one sentence; None when it can."""
    import warnings

    import torch

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        usable = torch.cuda.is_available()
    if usable:
        return None
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build, and no GPU can be used through it"
    told = [str(w.message).splitlines()[0] for w in caught]
    return (f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no usable GPU"
            + (f": {told[0]}" if told else ""))


def install_lines() -> list[Line]:
    import importlib.metadata as md

    import torch

    from ttrl.trainer.ds_config import build_ds_config

    lines = [Line("torch CUDA build", f"torch {torch.__version__}, CUDA {torch.version.cuda}",
                  "a CUDA build", "ok" if torch.version.cuda else "FAIL")]
    try:
        from vllm.platforms import current_platform

        cuda = bool(current_platform.is_cuda())
        lines.append(Line("vLLM CUDA build", f"vllm {md.version('vllm')}, platform {current_platform.device_name}",
                          "CUDA platform", "ok" if cuda else "FAIL"))
    except Exception as err:  # noqa: BLE001 - an import failure is the finding
        lines.append(Line("vLLM CUDA build", f"{type(err).__name__}: {err}", "importable", "FAIL"))
    opt = build_ds_config(zero_stage=2, micro_batch_size=1, grad_accum=1, world_size=1, lr=1e-6,
                          betas=(0.9, 0.99), weight_decay=0.0, grad_clip=1.0, dtype="bfloat16", device="cuda",
                          offload=False)["optimizer"]["params"]
    lines.append(Line("DeepSpeed optimizer", "torch AdamW (fused)" if opt.get("torch_adam") else "a DeepSpeed op",
                      "no op compiled", "ok" if opt.get("torch_adam") else "FAIL"))
    return lines


def device_rates() -> tuple[float, float]:
    """This GPU's device-to-device copy rate (bytes/s) and bf16 matmul rate (FLOP/s), measured here."""
    import torch

    a = torch.empty(1 << 28, dtype=torch.uint8, device="cuda")  # 256 MiB
    b = torch.empty_like(a)
    for _ in range(2):
        b.copy_(a)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        b.copy_(a)
    torch.cuda.synchronize()
    copy = 2 * a.numel() * 10 / (time.perf_counter() - t)  # read + write
    del a, b
    n = 8192
    x = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    y = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    for _ in range(2):
        x @ y
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        x @ y
    torch.cuda.synchronize()
    flops = 2 * n**3 * 10 / (time.perf_counter() - t)
    del x, y
    torch.cuda.empty_cache()
    return copy, flops


class MemoryPeak:
    """Peak used memory of every GPU (all processes on it), sampled from this process."""

    def __init__(self, every_s: float = 0.1):
        import torch

        self.n = torch.cuda.device_count()
        self.base = [self._used(i) for i in range(self.n)]
        self.peak = list(self.base)
        self.total = [torch.cuda.mem_get_info(i)[1] for i in range(self.n)]
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, args=(every_s,), daemon=True)

    @staticmethod
    def _used(i: int) -> int:
        import torch

        free, total = torch.cuda.mem_get_info(i)
        return total - free

    def _run(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            self.peak = [max(p, self._used(i)) for i, p in enumerate(self.peak)]

    def __enter__(self) -> MemoryPeak:
        self._t.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._t.join()


def run_lines(rows: list[dict], n_params: int, copy_rate: float, matmul_rate: float,
              peak: list[int], total: list[int], weight_path: str = "", expected_path: str = "") -> list[Line]:
    """The table's measured lines from the steps' metric rows and the device's own rates (pure)."""
    lines = [Line("GRPO steps, colocated", f"{len(rows)} ran", "all finite",
                  "ok" if rows and all(math.isfinite(r.get("train/pg_loss", math.nan)) for r in rows) else "FAIL")]
    if expected_path:
        # A colocated run that fell back to the Ray path (its start-up probe could not map the
        # trainer's GPU memory from the engine) would pass every other line without ever running
        # the CUDA IPC path it is meant to check.
        lines.append(Line("weight path", weight_path or "–", expected_path,
                          "ok" if weight_path == expected_path else "FAIL"))
    diff = rows[-1].get("rollout/logprob_diff") if rows else None
    lines.append(Line("engine/trainer log-prob parity", "–" if diff is None else f"{diff:.4f} mean |diff|",
                      f"< {MAX_LOGPROB_DIFF}", "ok" if diff is not None and diff < MAX_LOGPROB_DIFF else "FAIL"))
    tps = [r["rollout/tokens_per_s"] for r in rows if r.get("rollout/tokens_per_s")]
    lines.append(Line("generation", f"{tps[-1]:.0f} tokens/s" if tps else "–", "reported", "info"))
    syncs = [(r.get("sync/bytes", 0.0), r.get("timing/sync", 0.0)) for r in rows]
    b, s = syncs[-1] if syncs else (0.0, 0.0)
    if b and s:
        rate = b / s
        via = f" via {weight_path}" if weight_path else ""
        lines.append(Line("weight sync", f"{rate / 1e9:.2f} GB/s{via} ({rate / copy_rate:.1%} of the device copy "
                                         f"{copy_rate / 1e9:.0f} GB/s)", "reported", "info"))
    train = [(r.get("check/train_tokens"), r.get("timing/train")) for r in rows]
    tok, ts = train[-1] if train else (None, None)
    if tok and ts:
        mfu = 6 * n_params * tok / ts / matmul_rate
        lines.append(Line("trainer MFU", f"{mfu:.1%} of the measured bf16 matmul {matmul_rate / 1e12:.0f} TFLOP/s",
                          "reported (a tiny model cannot fill a GPU)", "info"))
    for i, (p, t) in enumerate(zip(peak, total, strict=True)):
        share = p / t if t else 0.0
        lines.append(Line(f"peak memory, GPU {i}", f"{p / 2**30:.1f} of {t / 2**30:.0f} GiB",
                          f"< {MAX_MEMORY_SHARE:.0%}", "ok" if share < MAX_MEMORY_SHARE else "FAIL"))
    return lines


def table(lines: list[Line]) -> str:
    w = max(len(x.measure) for x in lines)
    v = max(len(x.value) for x in lines)
    return "\n".join(f"{x.measure:<{w}}  {x.value:<{v}}  {x.goal}  [{x.verdict}]" for x in lines)


def gpu_steps(steps: int, overrides: list[str]) -> tuple[list[dict], int, str, str]:
    """`steps` real GRPO steps with colocated engines; the rows, the policy's parameter count, the weight
    path taken and the one expected (colocated: "ipc", CUDA IPC handles, unless asked otherwise; "ray"
    when the start-up probe fell back)."""
    import random

    from ttrl.cli import compose
    from ttrl.parts import build_parts
    from ttrl.step import StepContext, StepOptions, step, token_ids

    cfg = compose(["experiment=demo", "device=cuda", "cluster.placement=colocate", "algorithm=grpo",
                    "eval.at_start=false", "eval.at_end=false", "eval.every_n_steps=0", "logger.progress=false",
                    "data.prompts_per_step=16", "rollout.n_votes=8", "rollout.n_train=8",
                    "rollout.sleep_between_steps=true", "trainer.num_workers=1", "rollout.num_engines=1",
                    *overrides])
    setup = build_parts(cfg)
    rt = setup.start_runtime(total_opt_steps=steps)
    weight_path = rt.weight_sync
    expected = "ipc" if cfg.rollout.weight_sync == "auto" else cfg.rollout.weight_sync
    try:
        ctx = StepContext(rt, setup.reward, setup.tokenizer, StepOptions.from_config(cfg), random.Random(0))
        k, n_train = cfg.data.prompts_per_step, cfg.rollout.n_train
        rows = []
        for i in range(steps):
            batch = setup.prompts[i * k:(i + 1) * k]
            row = step(ctx, batch)
            # Tokens the update trained on: each kept sample is its prompt plus its response.
            prompt_tokens = sum(len(ids) for ids in token_ids(setup.tokenizer, batch))
            row["check/train_tokens"] = n_train * (prompt_tokens + k * row.get("rollout/response_length", 0.0))
            rows.append(row)
    finally:
        rt.shutdown()
    from safetensors import safe_open

    n_params = 0
    for f in Path(setup.model_path).glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as fh:
            for name in fh.keys():
                shape = fh.get_slice(name).get_shape()
                count = 1
                for d in shape:
                    count *= d
                n_params += count
    return rows, n_params, weight_path, expected


def torch_level(device: str = "cuda") -> int:
    """The torch-level checks, in a process of their own (their module imports this one's table)."""
    import subprocess

    return subprocess.call([sys.executable, "-m", "ttrl.bench.gpu_torch_check", "--device", device])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="make gpu-check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a Hydra override of the run")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--full", action="store_true",
                      help="no fall back to the torch-level checks when vLLM or Ray is missing (they fail instead)")
    mode.add_argument("--torch-only", action="store_true",
                      help="only the torch-level checks (python -m ttrl.bench.gpu_torch_check), no vLLM or Ray")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                    help="cpu: for testing only, the torch-level checks' CPU self-test (gloo, /dev/shm, fp32)")
    args = ap.parse_args(argv)
    if args.device == "cpu":
        if args.full:
            ap.error("--device cpu runs the torch-level checks alone; --full needs a GPU")
        print("gpu-check: --device cpu: the torch-level checks' CPU self-test only (trainer and handoff on gloo "
              "and /dev/shm); this checks no GPU", file=sys.stderr)
        return torch_level("cpu")
    why = no_gpu_reason()
    if why is not None:
        print(f"gpu-check: no GPU to check on this machine ({why}); run it on a GPU node.", file=sys.stderr)
        return 2
    import importlib.util

    missing = [m for m in ("vllm", "ray") if importlib.util.find_spec(m) is None]
    if args.torch_only or (missing and not args.full):
        why_only = f"{' and '.join(missing)} not installed here" if missing else "--torch-only"
        print(f"gpu-check: {why_only}: running the torch-level checks only "
              "(python -m ttrl.bench.gpu_torch_check)" + ("; `make install` brings them" if missing else ""),
              file=sys.stderr)
        return torch_level()
    lines = install_lines()
    if all(x.verdict != "FAIL" for x in lines):
        copy_rate, matmul_rate = device_rates()
        with MemoryPeak() as mem:
            rows, n_params, weight_path, expected = gpu_steps(args.steps, args.set)
        lines += run_lines(rows, n_params, copy_rate, matmul_rate, mem.peak, mem.total, weight_path, expected)
    out = Path("outputs/gpu_check")
    out.mkdir(parents=True, exist_ok=True)
    (out / "latest.json").write_text(json.dumps([x.__dict__ for x in lines], indent=1))
    print(table(lines))
    failed = [x.measure for x in lines if x.verdict == "FAIL"]
    print(f"gpu-check: {'FAILED: ' + ', '.join(failed) if failed else 'ready'} (table in {out / 'latest.json'})",
          file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
