"""A weight-sync round whose engine dies or stalls ends in a clear error, on every side, in time.

The CPU stand-in of the NCCL path: three real processes in one gloo group
(torch.distributed), running the very send/receive loops of
`ttrl.rollout.nccl_sync` with async broadcasts: rank 0 is the trainer's
sending rank, ranks 1 and 2 two engine workers. Rank 2 dies (SIGKILL-like
`os._exit`) or stalls (sleeps) after the first bucket. NCCL would leave the
others waiting for ever; here the sender and the surviving receiver must each
raise EngineSyncError (a WeightSyncTimeout past `timeout_s`, or a broadcast
error when the transport notices the dead peer) well within the timeout plus
a margin — the driver then restarts and re-syncs (tests/integration/
test_reliability.py covers that part with real engines).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from datetime import timedelta

import pytest

from ttrl.distributed.ports import free_port

TIMEOUT_S = 4.0
BUCKET = 8 << 20  # larger than a socket's buffers: a send to a stalled peer blocks


def _plan():
    import torch

    from ttrl.rollout.nccl_sync import plan_buckets

    specs = [(f"model.layers.{i}.w", torch.float32, (1 << 21,)) for i in range(6)]  # 8 MiB each
    return specs, plan_buckets(specs, BUCKET)


def _rank(rank: int, port: int, victim: str, out: mp.Queue) -> None:
    import torch
    import torch.distributed as dist

    from ttrl.rollout.nccl_sync import receive_buckets, send_buckets

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=3,
                            timeout=timedelta(seconds=120))  # gloo's own limit, far beyond the round's

    def bcast(buf):
        return dist.broadcast(buf, src=0, async_op=True)

    specs, plan = _plan()
    out.put((rank, "ready", "", 0.0))
    t0 = time.monotonic()
    try:
        if rank == 0:
            named = ((n, torch.full(shape, float(i))) for i, (n, _, shape) in enumerate(specs))
            send_buckets(plan, named, bcast, "cpu", timeout_s=TIMEOUT_S)
        else:
            for k, _named in enumerate(receive_buckets(plan, bcast, "cpu", timeout_s=TIMEOUT_S)):
                if rank == 2 and k == 0:
                    if victim == "dies":
                        os._exit(1)  # no cleanup, like a killed process
                    time.sleep(600)  # stalls: alive, never receives again
        out.put((rank, "finished", "", time.monotonic() - t0))
    except Exception as e:  # noqa: BLE001 -- reported to the test, which judges it
        out.put((rank, type(e).__name__, str(e), time.monotonic() - t0))
    out.close()
    out.join_thread()
    os._exit(0)  # the group is broken: no destroy_process_group, which could wait on it


@pytest.mark.parametrize("victim", ["dies", "stalls"])
def test_a_round_with_a_dead_or_stalled_engine_ends_in_a_clear_error_on_every_survivor(victim):
    from ttrl.rollout.nccl_sync import WeightSyncTimeout
    from ttrl.rollout.weights import EngineSyncError

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank, args=(r, port, victim, out), daemon=True) for r in range(3)]
    for p in procs:
        p.start()
    try:
        results: dict[int, tuple[str, str, float]] = {}
        ready = 0
        deadline = time.monotonic() + 120 + TIMEOUT_S  # start-up (imports, rendezvous) + the round
        while len(results) < 2 and time.monotonic() < deadline:
            try:
                rank, kind, msg, secs = out.get(timeout=1)
            except Exception:  # noqa: BLE001 -- queue.Empty: keep waiting until the deadline
                continue
            if kind == "ready":
                ready += 1
            elif rank in (0, 1):
                results[rank] = (kind, msg, secs)
        assert ready >= 2, f"the gloo group did not come up ({ready} ranks ready)"
        assert set(results) == {0, 1}, f"a survivor hung: only ranks {sorted(results)} came back"
        names = {"WeightSyncTimeout", "EngineSyncError"}
        assert issubclass(WeightSyncTimeout, EngineSyncError)  # the driver's one "restart and re-sync" case
        for rank, (kind, msg, secs) in results.items():
            # Neither the sender nor the surviving engine may finish a round an engine missed.
            assert kind in names, f"rank {rank}: {kind} {msg}"
            assert msg.startswith("weight sync:"), msg
            assert secs < TIMEOUT_S + 10, f"rank {rank} took {secs:.1f}s to give up"
        if victim == "stalls":
            # Nothing tells a live-but-silent peer from a slow one but the clock.
            assert "rollout.sync_timeout_s" in results[0][1]
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(timeout=5)
