"""The GPU path's torch-level parts, on a machine with torch and DeepSpeed but no vLLM or Ray.

    python -m ttrl.bench.gpu_torch_check [--device cuda|cpu] [--skip-mfu]

`make gpu-check` runs real GRPO steps with vLLM's CUDA build and Ray; where
they are not installed (a bare GPU box, a container with torch alone), or
with `--torch-only`, it comes here and checks what does not need them, with
the project's own code (the worker gets the spec a run builds: a unit test
holds `spec` to ttrl.distributed.runtime's keys):

1. The trainer: `PolicyWorker` (the class a run's Ray actors host), created
   directly as rank 0 of a world of 1 over NCCL, bf16, on a small Qwen2
   model built here: two ZeRO-2 steps (finite loss and gradient norm, the
   optimizer step applied, the weights moved) and one ZeRO-3 step. After
   each, the worker's own weights handed over as `push_weights_shared` does
   (its bucket plan, its layer-by-layer gather, `pack_into` shared buffers)
   to a second process that opens them as the engines do (`plan_from_wire`,
   `open_shared`, `unpack_bucket`) and checks every tensor bit for bit.
2. Parity: the bf16 worker's `compute_logprobs` against an fp32 forward of
   the same weights, per response token: the bound the engine/trainer parity
   line of `make gpu-check` holds (bf16 against bf16 there; bf16 against
   fp32 here, so the gap is the bf16 rounding alone).
3. The colocated weight handoff (`ttrl.rollout.ipc`): a Qwen2.5-1.5B-shaped
   bf16 weight plan packed into buffers on this GPU, handed by CUDA IPC
   handle to a second process, which opens each with the engines' own
   `open_shared`, unpacks it as they do and checks every tensor bit for bit.
4. The NCCL path's bucket loop (`ttrl.bench.nccl_sync_check`, a loopback on
   one GPU: NCCL itself needs two).
5. Throughput: a randomly initialised Qwen2 model of about 0.4B parameters,
   bf16 ZeRO-2 through the same worker: tokens/s and MFU against this GPU's
   own measured bf16 matmul rate, and peak memory; beside it the same update
   (same loss, micro-batches and batch) as a bare torch loop (fp32 weights,
   bf16 autocast, fused AdamW, no DeepSpeed): what the worker's own
   overhead costs.

`--device cpu` runs 1-3 on CPU (gloo, fp32, /dev/shm buffers): the self-test
of this module in CI. It never imports vllm or ray, needs no network, and
writes only under outputs/gpu_check/ and a temporary dir.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ttrl.bench.gpu_check import MAX_LOGPROB_DIFF, Line, MemoryPeak, device_rates, table
from ttrl.distributed.ports import free_port

# (hidden, layers, heads, intermediate, vocab): the small model of checks 1-2 and the one of check 5.
SMALL = (256, 2, 4, 688, 512)
LARGE = (1024, 24, 16, 2816, 32000)


def build_model(root: Path, shape: tuple[int, int, int, int, int], dtype: str, seed: int = 0) -> tuple[str, int]:
    """A randomly initialised Qwen2 causal LM saved under `root` (never downloaded); (its dir, parameters)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    hidden, layers, heads, inter, vocab = shape
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=heads, intermediate_size=inter, max_position_embeddings=2048,
                      tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg).to(getattr(torch, dtype))
    path = root / f"qwen2-{hidden}x{layers}"
    model.save_pretrained(path)
    return str(path), sum(p.numel() for p in model.parameters())


def spec(device: str, dtype: str, zero_stage: int, micro: int, grad_accum: int, lr: float = 1e-3) -> dict:
    """The WorkerSpec a run builds (ttrl.distributed.runtime), for one rank."""
    return dict(device=device, dtype=dtype, seed=0, zero_stage=zero_stage, micro_batch_size=micro,
                grad_accum=grad_accum, betas=[0.9, 0.99], logprob_micro_batch_size=None, weight_decay=0.0,
                grad_clip=1.0, offload=False, lr=lr, critic_lr=lr, lr_schedule="constant", warmup_steps=0,
                min_lr_ratio=0.0, gradient_checkpointing=False, with_ref=False, lora=None, lora_path=None,
                base_path=None, backward_products="float32", autocast="float32", prompt_once=False)


def batch(rows: int, prompt_len: int, response_len: int, vocab: int, seed: int = 0) -> dict:
    """A GRPO-shaped batch of random tokens: ragged responses, advantages of both signs, behaviour log-probs."""
    import torch

    from ttrl.trainer.batch import pack_batch

    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(1, vocab, (prompt_len - i % 3,), generator=g).tolist() for i in range(rows)]
    lens = [max(1, response_len - (i * 7) % max(1, response_len // 2)) for i in range(rows)]
    responses = [torch.randint(1, vocab, (n,), generator=g).tolist() for n in lens]
    b = pack_batch(prompts, responses, pad_id=0, behavior_logps=[[-2.0] * n for n in lens])
    b["advantages"] = (torch.arange(rows, dtype=torch.float32) - (rows - 1) / 2).unsqueeze(1) \
        * b["response_mask"] / rows
    return b


def new_worker(device: str, dtype: str, zero_stage: int, micro: int, grad_accum: int, model_path: str,
               port: int) -> Any:
    from ttrl.trainer.worker import PolicyWorker

    w = PolicyWorker(0, 1, spec(device, dtype, zero_stage, micro, grad_accum))
    w.setup("127.0.0.1", port, model_path, total_opt_steps=10)
    return w


def fp32_logprobs(model_path: str, b: dict, device: str) -> Any:
    """Log-probs of the response tokens under an fp32 copy of the weights (plain transformers forward)."""
    import torch
    from transformers import AutoModelForCausalLM

    from ttrl.algos import logprobs_from_logits
    from ttrl.trainer.batch import response_slice

    model = AutoModelForCausalLM.from_pretrained(model_path, torch_dtype=torch.float32).to(device).eval()
    mb = {k: v.to(device) for k, v in b.items()}
    with torch.no_grad():
        logits = model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"],
                       position_ids=mb["position_ids"], use_cache=False).logits[:, response_slice(mb)].float()
    P, R = int(mb["prompt_width"]), mb["response_mask"].shape[1]
    out = logprobs_from_logits(logits, mb["input_ids"][:, P:P + R]).cpu()
    del model
    return out


def _digest(t: Any) -> str:
    """A tensor's dtype, shape and the SHA-256 of its bytes: equal digests are equal tensors, bit for bit."""
    import hashlib

    import torch

    raw = t.detach().contiguous().reshape(-1).view(torch.uint8).cpu().numpy().tobytes()
    return f"{str(t.dtype).removeprefix('torch.')}{list(t.shape)}:{hashlib.sha256(raw).hexdigest()}"


def _plan_receiver(q_in: Any, q_out: Any, device: str) -> None:
    """The engines' side of `push_weights_shared` (vllm_ext's ttrl_shared_begin / ttrl_shared_bucket, without
    vLLM): the plan from its wire form, each bucket opened in place by its handle and unpacked; each tensor's
    digest goes back. One job (wire plan, handles) at a time until None."""
    import torch

    from ttrl.rollout.ipc import open_shared
    from ttrl.rollout.nccl_sync import plan_from_wire, unpack_bucket

    dev = torch.device("cuda", 0) if device == "cuda" else torch.device("cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    while (job := q_in.get(timeout=600)) is not None:
        try:
            wire, handles = job
            plan = plan_from_wire(wire)
            got = {}
            for h, bucket in zip(handles, plan, strict=True):
                for name, view in unpack_bucket(open_shared(h, dev), bucket):
                    got[name] = _digest(view)
            q_out.put({"ok": True, "digests": got, "kinds": sorted({h["kind"] for h in handles})})
        except BaseException as err:  # noqa: BLE001 - reported to the parent as the finding
            q_out.put({"ok": False, "error": f"{type(err).__name__}: {err}"[:400]})


def _answer(q_out: Any, proc: Any, timeout_s: float) -> dict:
    """The receiving process's answer; a finding (not a hang) when it dies or stays silent."""
    import queue

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            return q_out.get(timeout=1)
        except queue.Empty:
            if not proc.is_alive():  # died (a crash opening a handle): say so, do not wait on
                return {"ok": False, "error": f"the receiving process died (exit code {proc.exitcode})"}
    return {"ok": False, "error": f"the receiving process gave no answer in {timeout_s:g} s"}


class PlanReceiver:
    """A second process standing in for a colocated engine (spawned once, fed one handoff per worker)."""

    def __init__(self, device: str):
        import torch.multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.q_in, self.q_out = ctx.Queue(), ctx.Queue()
        self.proc = ctx.Process(target=_plan_receiver, args=(self.q_in, self.q_out, device), daemon=True)
        self.proc.start()

    def receive(self, wire: list[dict], handles: list[dict], timeout_s: float = 300) -> dict:
        self.q_in.put((wire, handles))
        return _answer(self.q_out, self.proc, timeout_s)

    def close(self) -> None:
        self.q_in.put(None)
        self.proc.join(timeout=60)
        if self.proc.is_alive():
            self.proc.kill()


def worker_handoff_line(w: Any, receiver: PlanReceiver, label: str, engine_dtype: str = "bfloat16",
                        bucket_mb: int = 1) -> Line:
    """The trainer side of `PolicyWorker.push_weights_shared` on the worker itself, without Ray: its bucket plan
    (`_bucket_plan`), its layer-by-layer gather (`_gathered_by_layer`, a real ZeRO-3 gather under ZeRO-3), each
    tensor `pack_into` a fresh `SharedBuffer` in plan order (`_in_plan_order`); the receiver opens every buffer
    and its digests must equal those of the worker's tensors cast to the engines' dtype. Small buckets (1 MiB)
    so that layers straddle buckets as a real model's do."""
    import torch

    from ttrl.rollout.ipc import SharedBuffer
    from ttrl.rollout.nccl_sync import _in_plan_order, pack_into, to_dtype

    plan, wire = w._bucket_plan(engine_dtype, bucket_mb)
    dev = w._local_device()
    wire_dtype = to_dtype(engine_dtype)
    bufs: list[SharedBuffer] = []
    sent: dict[str, str] = {}
    measure = f"handoff of the worker's weights, {label}"
    goal = ("CUDA IPC" if dev.type == "cuda" else "shared file") + ", every tensor bit for bit"
    try:
        slots = _in_plan_order(plan, w._gathered_by_layer(keep=True))
        for bucket in plan:
            buf = SharedBuffer(bucket.nbytes, dev)
            bufs.append(buf)
            for _ in bucket.slots:
                s, t = next(slots)
                pack_into(buf.tensor, s, t)  # casts to the engines' dtype, as the worker does
                sent[s.name] = _digest(t.to(wire_dtype))
        next(slots, None)  # refuses a tensor the plan does not have
        if dev.type == "cuda":
            torch.cuda.current_stream().synchronize()  # packed before the receiver reads it
        res = receiver.receive(wire, [b.handle() for b in bufs])
    finally:
        for b in bufs:
            b.close()
    if not res["ok"]:
        return Line(measure, res["error"], goal, "FAIL")
    kind = "CUDA IPC" if res["kinds"] == ["cuda"] else "/dev/shm file" if res["kinds"] == ["file"] else str(res["kinds"])
    same = sum(res["digests"].get(n) == d for n, d in sent.items())
    ok = same == len(sent) == len(res["digests"]) > 0 and (kind == "CUDA IPC") == (dev.type == "cuda")
    return Line(measure, f"{same}/{len(sent)} tensors bit-exact in {len(plan)} buckets "
                f"({sum(b.nbytes for b in plan) / 1e6:.1f} MB {engine_dtype}) by {kind}", goal, "ok" if ok else "FAIL")


def trainer_lines(device: str, root: Path) -> list[Line]:
    """Checks 1 and 2: ZeRO-2 and ZeRO-3 steps of the real worker, and bf16 (or CPU fp32) log-prob parity."""
    import torch

    from ttrl.trainer.options import UpdateOptions

    dtype = "bfloat16" if device == "cuda" else "float32"
    path, _ = build_model(root, SMALL, dtype)
    b = batch(8, 12, 24, SMALL[4])
    normalizer = float(b["response_mask"].sum())
    opts = UpdateOptions(policy_loss="ppo_clip", loss_agg="token_mean")
    lines = []
    port = free_port()
    w = new_worker(device, dtype, 2, 4, 2, path, port)
    # Parity first, on the weights as loaded (the fp32 copy reads the same files).
    mine = w.compute_logprobs(b, temperature=1.0)
    ref = fp32_logprobs(path, b, "cuda" if device == "cuda" else "cpu")
    mask = b["response_mask"]
    diff = float(((mine - ref).abs() * mask).sum() / mask.sum())
    lines.append(Line(f"trainer log-probs ({dtype}) vs fp32", f"{diff:.4f} mean |diff| per token",
                      f"< {MAX_LOGPROB_DIFF}", "ok" if diff < MAX_LOGPROB_DIFF else "FAIL"))
    before = w.fingerprint()
    stats = [w.train_step(b, normalizer, opts) for _ in range(2)]
    after = w.fingerprint()
    finite = all(math.isfinite(s["pg_loss"]) and math.isfinite(s["grad_norm"]) for s in stats)
    applied = all(s["skipped"] == 0.0 for s in stats)
    moved = before is not None and after is not None and after != before
    lines.append(Line("DeepSpeed ZeRO-2 steps (PolicyWorker)",
                      f"pg_loss {stats[-1]['pg_loss']:+.4f}, grad norm {stats[-1]['grad_norm']:.3f}, "
                      f"applied {sum(s['skipped'] == 0.0 for s in stats)}/2, weights moved {moved}",
                      "finite, applied, moved", "ok" if finite and applied and moved else "FAIL"))
    receiver = PlanReceiver(device)
    try:
        lines.append(worker_handoff_line(w, receiver, "ZeRO-2"))
        del w
        if device == "cuda":
            torch.cuda.empty_cache()
        w3 = new_worker(device, dtype, 3, 4, 2, path, port)
        before3 = w3.fingerprint()
        s3 = w3.train_step(b, normalizer, opts)
        after3 = w3.fingerprint()
        moved3 = before3 is not None and after3 is not None and after3 != before3
        ok3 = (math.isfinite(s3["pg_loss"]) and math.isfinite(s3["grad_norm"]) and s3["skipped"] == 0.0
               and moved3)
        lines.append(Line("DeepSpeed ZeRO-3 step (PolicyWorker)",
                          f"pg_loss {s3['pg_loss']:+.4f}, grad norm {s3['grad_norm']:.3f}, "
                          f"applied {s3['skipped'] == 0}, weights moved {moved3}", "finite, applied, moved",
                          "ok" if ok3 else "FAIL"))
        lines.append(worker_handoff_line(w3, receiver, "ZeRO-3 (gathered layer by layer)"))
        del w3
    finally:
        receiver.close()
    return lines


# ── check 3: the same-device handoff, in a second process ─────────────────
def _receiver(q_in: Any, q_out: Any, model: str, dtype_name: str, bucket_mb: int, device: str) -> None:
    """The engine's side: open each handle with ipc.open_shared, unpack, check bit for bit."""
    try:
        import torch

        from ttrl.bench.nccl_sync_check import _verify, qwen2_shapes
        from ttrl.rollout.ipc import open_shared
        from ttrl.rollout.nccl_sync import plan_buckets, unpack_bucket

        dev = torch.device("cuda", 0) if device == "cuda" else torch.device("cpu")
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dtype = getattr(torch, dtype_name)
        shapes = qwen2_shapes(model)
        plan = plan_buckets([(n, dtype, s) for n, s in shapes], bucket_mb << 20)
        handles = q_in.get(timeout=600)
        t0 = time.perf_counter()
        # What an engine does: read the sender's memory in place, copy the tensors out.
        received = [[(n, t.clone()) for n, t in unpack_bucket(open_shared(h, dev), bk)]
                    for h, bk in zip(handles, plan, strict=True)]
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        seconds = time.perf_counter() - t0
        n = _verify(plan, received, shapes, dtype, dev)
        q_out.put({"ok": True, "tensors": n, "seconds": seconds, "kinds": sorted({h["kind"] for h in handles})})
    except BaseException as err:  # noqa: BLE001 - reported to the parent as the finding
        q_out.put({"ok": False, "error": f"{type(err).__name__}: {err}"[:400]})


def ipc_line(device: str) -> Line:
    import torch
    import torch.multiprocessing as mp

    from ttrl.bench.nccl_sync_check import fill, qwen2_shapes
    from ttrl.rollout.ipc import SharedBuffer
    from ttrl.rollout.nccl_sync import pack_into, plan_buckets

    model = "qwen2.5-1.5b" if device == "cuda" else "tiny"
    dtype_name, bucket_mb = "bfloat16", 256
    dev = torch.device("cuda", 0) if device == "cuda" else torch.device("cpu")
    dtype = getattr(torch, dtype_name)
    shapes = qwen2_shapes(model)
    plan = plan_buckets([(n, dtype, s) for n, s in shapes], bucket_mb << 20)
    total = sum(bk.nbytes for bk in plan)
    index = {n: i for i, (n, _) in enumerate(shapes)}
    bufs = []
    for bk in plan:
        buf = SharedBuffer(bk.nbytes, dev)
        for s in bk.slots:
            pack_into(buf.tensor, s, fill(index[s.name], shapes[index[s.name]][1], dtype, dev))
        bufs.append(buf)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    ctx = mp.get_context("spawn")
    q_in, q_out = ctx.Queue(), ctx.Queue()
    p = ctx.Process(target=_receiver, args=(q_in, q_out, model, dtype_name, bucket_mb, device))
    p.start()
    q_in.put([b.handle() for b in bufs])
    try:
        res = _answer(q_out, p, 300)
    finally:
        p.join(timeout=60)
        if p.is_alive():
            p.kill()
        for b in bufs:
            b.close()
    goal = "CUDA IPC, bit for bit" if device == "cuda" else "shared file, bit for bit"
    if not res["ok"]:
        return Line("colocated handoff (ipc.py)", res["error"], goal, "FAIL")
    kind = "CUDA IPC" if res["kinds"] == ["cuda"] else "/dev/shm file" if res["kinds"] == ["file"] else str(res["kinds"])
    ok = res["tensors"] == len(shapes) and (kind == "CUDA IPC") == (device == "cuda")
    return Line("colocated handoff (ipc.py)",
                f"{res['tensors']} tensors of {model}, {total / 1e9:.2f} GB by {kind}, bit-exact, "
                f"{total / max(res['seconds'], 1e-9) / 1e9:.1f} GB/s (open + copy out)", goal,
                "ok" if ok else "FAIL")


def nccl_loop_line() -> Line:
    """Check 4: the NCCL path's pack/unpack loop (`nccl_sync_check`), a loopback on one GPU."""
    proc = subprocess.run([sys.executable, "-m", "ttrl.bench.nccl_sync_check", "--model", "qwen2.5-1.5b"],
                          capture_output=True, text=True, timeout=600)
    out = [x for x in proc.stdout.splitlines() if x.startswith("[")]
    verified = next((x for x in out if "bit for bit" in x), None)
    speed = next((x.split(":", 1)[1].strip() for x in out if "best" in x), "")
    if proc.returncode != 0 or verified is None:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return Line("NCCL path's bucket loop", tail[:200], "bit for bit", "FAIL")
    return Line("NCCL path's bucket loop", f"{verified.split('] ', 1)[1]}; {speed}", "bit for bit", "ok")


def bare_step_seconds(path: str, b: dict, micro: int, repeats: int = 3) -> float:
    """Best seconds of one update of `b` in a bare torch loop: the reference the worker's step is put beside."""
    import torch
    from transformers import AutoModelForCausalLM

    from ttrl.algos import logprobs_from_logits
    from ttrl.trainer.batch import response_slice

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).cuda().train()
    model.config.use_cache = False
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, betas=(0.9, 0.99), fused=True)
    mb = {k: v.cuda() for k, v in b.items()}
    normalizer = mb["response_mask"].sum()
    P, R = int(mb["prompt_width"]), mb["response_mask"].shape[1]

    def update() -> None:
        for i in range(0, mb["input_ids"].shape[0], micro):
            part = {k: (v[i:i + micro] if v.dim() else v) for k, v in mb.items()}
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits = model(input_ids=part["input_ids"], attention_mask=part["attention_mask"],
                               position_ids=part["position_ids"], use_cache=False).logits[:, response_slice(part)]
            logp = logprobs_from_logits(logits.float(), part["input_ids"][:, P:P + R])
            loss = -(part["advantages"] * logp * part["response_mask"]).sum() / normalizer
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    update()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        update()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    model = opt = None  # noqa: F841 - free the GPU memory before the next check
    torch.cuda.empty_cache()
    return min(times)


def mfu_lines(root: Path, matmul_rate: float) -> list[Line]:
    """Check 5: tokens/s and MFU of bf16 ZeRO-2 train steps on the ~0.4B model, with peak memory."""
    import torch

    from ttrl.trainer.options import UpdateOptions

    path, n_params = build_model(root, LARGE, "bfloat16")
    rows, prompt, resp = 16, 256, 768
    b = batch(rows, prompt, resp, LARGE[4], seed=1)
    tokens = int(b["attention_mask"].sum())
    opts = UpdateOptions(policy_loss="ppo_clip", loss_agg="token_mean")
    with MemoryPeak() as mem:
        w = new_worker("cuda", "bfloat16", 2, 4, 4, path, free_port())
        normalizer = float(b["response_mask"].sum())
        w.train_step(b, normalizer, opts)  # warm-up: kernels chosen, optimizer state allocated
        torch.cuda.synchronize()
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            s = w.train_step(b, normalizer, opts)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        logprob_t = []
        for _ in range(2):  # the first pass in eval mode picks its kernels: the second is the figure
            t_log = time.perf_counter()
            w.compute_logprobs(b, temperature=1.0)
            torch.cuda.synchronize()
            logprob_t.append(time.perf_counter() - t_log)
        logprob_s = logprob_t[-1]
        del w
        torch.cuda.empty_cache()
    best = min(times)
    try:
        bare = bare_step_seconds(path, b, micro=4)
    except Exception as err:  # noqa: BLE001 - the reference failing is a finding, not the worker's
        bare = None
        bare_err = f"{type(err).__name__}: {str(err)[:200]}"
    mfu = 6 * n_params * tokens / best / matmul_rate
    finite = math.isfinite(s["pg_loss"]) and s["skipped"] == 0.0
    lines = [Line("trainer step, 0.4B bf16 ZeRO-2",
                  f"{n_params / 1e9:.2f}B params, {rows}x{prompt + resp} tokens: {best:.2f} s best of 3 "
                  f"({tokens / best:,.0f} tokens/s), log-prob pass {logprob_s:.2f} s",
                  "finite, applied", "ok" if finite else "FAIL"),
             Line("trainer MFU, 0.4B", f"{mfu:.1%} of the measured bf16 matmul {matmul_rate / 1e12:.0f} TFLOP/s",
                  "reported", "info"),
             Line("worker step vs bare torch step", "–, " + bare_err if bare is None else
                  f"{best / bare:.2f}x ({best:.2f} s vs {bare:.2f} s; bare MFU "
                  f"{6 * n_params * tokens / bare / matmul_rate:.1%})", "reported", "info")]
    for i, (p, t) in enumerate(zip(mem.peak, mem.total, strict=True)):
        lines.append(Line(f"peak memory, GPU {i}", f"{p / 2**30:.1f} of {t / 2**30:.0f} GiB", "reported", "info"))
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ttrl.bench.gpu_torch_check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                    help="cpu: the self-test (checks 1-3 on CPU, gloo, fp32)")
    ap.add_argument("--skip-mfu", action="store_true", help="leave out the 0.4B throughput check")
    args = ap.parse_args(argv)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        from ttrl.bench.gpu_check import no_gpu_reason

        print(f"gpu_torch_check: no GPU to check on this machine ({no_gpu_reason()}); --device cpu runs the "
              "self-test.", file=sys.stderr)
        return 2
    os.environ.setdefault("DS_BUILD_OPS", "0")
    lines: list[Line] = []
    if args.device == "cuda":
        import importlib.metadata as md

        lines.append(Line("torch / DeepSpeed", f"torch {torch.__version__} (CUDA {torch.version.cuda}), "
                          f"deepspeed {md.version('deepspeed')}, {torch.cuda.get_device_name(0)}", "a CUDA build",
                          "ok" if torch.version.cuda else "FAIL"))
    copy_rate = matmul_rate = None
    if args.device == "cuda":
        copy_rate, matmul_rate = device_rates()
        lines.append(Line("device rates", f"copy {copy_rate / 1e9:.0f} GB/s, bf16 matmul {matmul_rate / 1e12:.0f} "
                          "TFLOP/s", "measured here", "info"))
    checks = [("trainer", lambda root: trainer_lines(args.device, root)),
              ("ipc", lambda root: [ipc_line(args.device)])]
    if args.device == "cuda":
        checks.append(("nccl loop", lambda root: [nccl_loop_line()]))
        if not args.skip_mfu:
            checks.append(("mfu", lambda root: mfu_lines(root, matmul_rate)))
    with tempfile.TemporaryDirectory(prefix="ttrl-gpu-check-") as tmp:
        for name, run in checks:
            t0 = time.perf_counter()
            try:
                got = run(Path(tmp))
            except Exception as err:  # noqa: BLE001 - one check's failure is a line, the others still run
                got = [Line(f"{name} check", f"{type(err).__name__}: {str(err).strip()[:300]}", "runs", "FAIL")]
            lines += got
            print(f"gpu_torch_check: {name} done in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    out = Path("outputs/gpu_check")
    out.mkdir(parents=True, exist_ok=True)
    (out / f"torch_{args.device}.json").write_text(json.dumps([x.__dict__ for x in lines], indent=1))
    print(table(lines))
    failed = [x.measure for x in lines if x.verdict == "FAIL"]
    print(f"gpu_torch_check: {'FAILED: ' + ', '.join(failed) if failed else 'passed'} "
          f"(table in {out / f'torch_{args.device}.json'}; vLLM and Ray parts not run: `make gpu-check`)",
          file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
