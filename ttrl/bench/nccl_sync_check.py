"""Check and time the NCCL weight path's bucket loop on a GPU machine, torch only.

    python -m ttrl.bench.nccl_sync_check [--model qwen2.5-1.5b|qwen2.5-7b|tiny]
                                         [--bucket-mb 256] [--dtype bfloat16] [--iters 3]

With >= 2 GPUs: two processes (torch.multiprocessing), one NCCL group
(torch.distributed), rank 0 broadcasts a model-sized set of tensors to rank 1
through the very `plan_buckets` / `send_buckets` / `receive_buckets` /
`unpack_bucket` code of `ttrl.rollout.nccl_sync` (only the communicator
differs: PyNccl in a run), rank 1 checks every tensor bit for bit, and the
timed rounds report GB/s.

With 1 GPU: NCCL refuses two ranks on one device, so one process runs the
same loops over a device-to-device "loopback" copy instead of a broadcast:
pack/unpack verified bit for bit on CUDA, bandwidth of pack + copy only.
With no GPU the loopback runs on CPU (tiny model). The output says which.

It must never import vllm, ray or deepspeed (it runs where only torch is),
and never needs the network beyond 127.0.0.1.
"""

from __future__ import annotations

import argparse
import os
import time
from collections import deque
from datetime import timedelta

import torch

from ttrl.distributed.ports import free_port
from ttrl.rollout.nccl_sync import plan_buckets, receive_buckets, send_buckets

# (vocab, hidden, layers, intermediate, heads, kv_heads, head_dim, tied embeddings)
MODELS = {
    "qwen2.5-7b": (152064, 3584, 28, 18944, 28, 4, 128, False),
    "qwen2.5-1.5b": (151936, 1536, 28, 8960, 12, 2, 128, True),
    "tiny": (384, 128, 2, 512, 2, 2, 64, False),
}


def qwen2_shapes(model: str) -> list[tuple[str, tuple[int, ...]]]:
    """Parameter names and shapes of a Qwen2 decoder, in named_parameters() order."""
    V, H, L, inter, nh, nkv, hd, tied = MODELS[model]
    out = [("model.embed_tokens.weight", (V, H))]
    for i in range(L):
        p = f"model.layers.{i}."
        out += [(p + "self_attn.q_proj.weight", (nh * hd, H)), (p + "self_attn.q_proj.bias", (nh * hd,)),
                (p + "self_attn.k_proj.weight", (nkv * hd, H)), (p + "self_attn.k_proj.bias", (nkv * hd,)),
                (p + "self_attn.v_proj.weight", (nkv * hd, H)), (p + "self_attn.v_proj.bias", (nkv * hd,)),
                (p + "self_attn.o_proj.weight", (H, nh * hd)),
                (p + "mlp.gate_proj.weight", (inter, H)), (p + "mlp.up_proj.weight", (inter, H)),
                (p + "mlp.down_proj.weight", (H, inter)),
                (p + "input_layernorm.weight", (H,)), (p + "post_attention_layernorm.weight", (H,))]
    out.append(("model.norm.weight", (H,)))
    if not tied:
        out.append(("lm_head.weight", (V, H)))
    return out


def fill(i: int, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Deterministic, finite, bit-rich values for tensor `i`; identical on any device.

    An integer hash of (i, position), written as the dtype's raw bits with the
    exponent's top bit cleared (so no inf/NaN). No RNG: torch's CUDA RNG may
    differ between GPU models, and the receiver must rebuild the same bits.
    """
    n = 1
    for d in shape:
        n *= d
    bits = {2: (torch.int16, 14), 4: (torch.int32, 30)}[dtype.itemsize]
    out = torch.empty(n, dtype=bits[0], device=device)
    chunk = 1 << 26
    for s in range(0, n, chunk):  # bounded int64 temporaries
        idx = torch.arange(s, min(n, s + chunk), device=device, dtype=torch.int64)
        h = (idx * 2654435761 + (i + 1) * 40503) & 0xFFFFFFFF
        h = ((h ^ (h >> 15)) * 0x2C1B3C6D) & 0xFFFFFFFF
        h = h ^ (h >> 12)
        w = 8 * dtype.itemsize
        h = (h & ((1 << w) - 1)) & ~(1 << bits[1])  # clear the exponent's top bit
        h = torch.where(h >= (1 << (w - 1)), h - (1 << w), h)  # two's complement, no overflow
        out[s:s + idx.numel()] = h.to(bits[0])
    return out.view(dtype).view(shape)


def _gbps(nbytes: int, seconds: float) -> float:
    return nbytes / max(seconds, 1e-9) / 1e9


def _verify(plan, received, shapes, dtype, device) -> int:
    """Compare each received bucket to the rebuilt source; return tensors checked."""
    index = {n: i for i, (n, _) in enumerate(shapes)}
    checked = 0
    for named in received:
        for name, t in named:
            i = index[name]
            want = fill(i, shapes[i][1], dtype, device)
            if t.dtype != dtype or tuple(t.shape) != shapes[i][1] or not torch.equal(
                    t.reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8)):
                raise AssertionError(f"{name}: received bits differ from what was sent")
            checked += 1
    if checked != len(shapes):
        raise AssertionError(f"received {checked} tensors of {len(shapes)}")
    return checked


# ── two GPUs: a real NCCL group ───────────────────────────────────────────
def _worker(rank: int, port: int, args: argparse.Namespace) -> None:
    import torch.distributed as dist

    if args.gloo:  # the script's own self-test on CPU: same code path, no NCCL
        device = torch.device("cpu")
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                                timeout=timedelta(seconds=300))
    else:
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                                timeout=timedelta(seconds=300), device_id=device)
    tag = "gloo-cpu" if args.gloo else "nccl"

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    dtype = getattr(torch, args.dtype)
    shapes = qwen2_shapes(args.model)
    plan = plan_buckets([(n, dtype, s) for n, s in shapes], args.bucket_mb << 20)
    total = sum(b.nbytes for b in plan)

    def bcast(buf: torch.Tensor) -> None:
        dist.broadcast(buf, src=0)

    if rank == 0:
        src = [(n, fill(i, s, dtype, device)) for i, (n, s) in enumerate(shapes)]
        sync()
        where = "CPU x2 (gloo: NOT NCCL)" if args.gloo else f"{torch.cuda.get_device_name(device)} x2"
        print(f"[{tag}] {args.model} {args.dtype}: {len(shapes)} tensors, {total / 1e9:.2f} GB in "
              f"{len(plan)} buckets of <= {args.bucket_mb} MB; {where}", flush=True)
        send_buckets(plan, iter(src), bcast, device)  # the verified round (rank 1 checks it)
        dist.barrier()
        times = []
        for _ in range(args.iters):
            dist.barrier()
            t0 = time.perf_counter()
            stats = send_buckets(plan, iter(src), bcast, device)
            times.append(time.perf_counter() - t0)
            assert not stats.nonfinite
        dist.barrier()
        best = min(times)
        print(f"[{tag}] broadcast rank0 -> rank1: best {best * 1e3:.1f} ms = {_gbps(total, best):.1f} GB/s "
              f"(mean {_gbps(total, sum(times) / len(times)):.1f} GB/s over {len(times)} rounds; "
              f"pack + broadcast, sender side, after GPU completion)", flush=True)
    else:
        n = _verify(plan, receive_buckets(plan, bcast, device), shapes, dtype, device)
        print(f"[{tag}] rank 1 verified {n} tensors bit for bit (names, dtypes, shapes, values)", flush=True)
        dist.barrier()
        times = []
        for _ in range(args.iters):
            dist.barrier()
            t0 = time.perf_counter()
            for _named in receive_buckets(plan, bcast, device):
                pass
            sync()
            times.append(time.perf_counter() - t0)
        dist.barrier()
        print(f"[{tag}] receiver side: best {_gbps(total, min(times)):.1f} GB/s", flush=True)
    dist.destroy_process_group()


# ── one device: loopback instead of NCCL ──────────────────────────────────
def _loopback(args: argparse.Namespace, device: torch.device) -> None:
    dtype = getattr(torch, args.dtype)
    shapes = qwen2_shapes(args.model)
    plan = plan_buckets([(n, dtype, s) for n, s in shapes], args.bucket_mb << 20)
    total = sum(b.nbytes for b in plan)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"[loopback] {args.model} {args.dtype}: {len(shapes)} tensors, {total / 1e9:.2f} GB in "
          f"{len(plan)} buckets of <= {args.bucket_mb} MB on {name}", flush=True)
    src = [(n, fill(i, s, dtype, device)) for i, (n, s) in enumerate(shapes)]
    wire: deque = deque()

    def send(buf):  # stands in for the broadcast: one device-to-device copy
        wire.append(buf.clone())

    def recv(buf):
        buf.copy_(wire.popleft())

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    send_buckets(plan, iter(src), send, device)
    n = _verify(plan, receive_buckets(plan, recv, device), shapes, dtype, device)
    assert not wire
    print(f"[loopback] verified {n} tensors bit for bit after pack -> copy -> unpack", flush=True)
    pack_t = []
    for _ in range(args.iters):
        sync()
        t0 = time.perf_counter()
        send_buckets(plan, iter(src), lambda b: None, device)
        sync()
        pack_t.append(time.perf_counter() - t0)
    print(f"[loopback] pack only: best {_gbps(total, min(pack_t)):.1f} GB/s", flush=True)
    print("[loopback] NCCL was NOT exercised (needs 2 GPUs); run this on a machine with >= 2 to time "
          "the broadcast", flush=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(MODELS), default=None,
                    help="shape set (default: qwen2.5-1.5b on GPU, tiny on CPU)")
    ap.add_argument("--bucket-mb", type=int, default=256)
    ap.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--loopback", action="store_true", help="skip NCCL even with 2 GPUs")
    ap.add_argument("--gloo", action="store_true",
                    help="self-test of this script: the two-process path on CPU over gloo (no GPU, no NCCL)")
    args = ap.parse_args(argv)
    gpus = torch.cuda.device_count()
    if args.model is None:
        args.model = "qwen2.5-1.5b" if gpus and not args.gloo else "tiny"
    if args.gloo or (gpus >= 2 and not args.loopback):
        import torch.multiprocessing as mp

        os.environ.setdefault("NCCL_DEBUG", "WARN")
        mp.spawn(_worker, args=(free_port(), args), nprocs=2, join=True)
    else:
        _loopback(args, torch.device("cuda", 0) if gpus else torch.device("cpu"))


if __name__ == "__main__":
    main()
