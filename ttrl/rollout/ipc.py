"""Same-device weight handoff for colocated engines: trainer rank i -> engine i, by handle.

Where rollout engine i and trainer rank i share a device
(`cluster.placement=colocate`), the rank packs each bucket of the weight plan
(`nccl_sync`'s layout) into a fresh buffer on that device and hands engine i a
*handle* to it: a CUDA IPC handle on a GPU, or, on CPU, the path of a
memory-mapped file in /dev/shm (the CPU stand-in, which runs the very same
rounds in CI). The engine opens the buffer in place, streams its tensors into
vLLM's layerwise reload (as the NCCL path's receiving end does) and closes
it. Nothing crosses the object store, and at most two buckets exist at once
on the trainer side (one being loaded, the next being packed).

Buffers are never reused: the layerwise reload may keep views of a bucket
until its layer is complete (a layer can straddle two buckets), so the
sender allocates a fresh buffer per bucket and only drops it when the engine
has returned. A dropped CUDA buffer that an engine still maps is kept alive
by torch's IPC reference counting; a CPU mapping outlives the file's unlink.

Handles are plain data (str, int, bytes, lists): they cross Ray and vLLM's
collective_rpc, where custom classes and tensors do not survive intact.

This module must never import ray, vllm or deepspeed, and must never open a
handle made on another device or node (it says so instead).
"""

from __future__ import annotations

import mmap
import os
import shutil
import socket
import tempfile
from typing import Any

import torch

from ttrl.rollout.nccl_sync import gpu_uuid


def _shm_dir(nbytes: int) -> str:
    """/dev/shm where it has room (RAM-backed, like the object store), else the temp dir."""
    shm = "/dev/shm"
    if os.path.isdir(shm) and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > 2 * nbytes:
        return shm
    return tempfile.gettempdir()


class SharedBuffer:
    """A flat uint8 buffer on `device` that another process on the same device opens by `handle()`."""

    def __init__(self, nbytes: int, device: torch.device | str):
        self.device = torch.device(device)
        self.nbytes = int(nbytes)
        self._mm: mmap.mmap | None = None
        self._path: str | None = None
        self.tensor: torch.Tensor | None = None
        if self.device.type == "cuda":
            self.tensor = torch.empty(self.nbytes, dtype=torch.uint8, device=self.device)
            return
        if self.device.type != "cpu":
            raise ValueError(f"weight sync: no shared buffers on {self.device.type} devices")
        fd, self._path = tempfile.mkstemp(prefix="ttrl-weights-", dir=_shm_dir(self.nbytes))
        try:
            os.ftruncate(fd, max(1, self.nbytes))
            self._mm = mmap.mmap(fd, max(1, self.nbytes))
        finally:
            os.close(fd)
        self.tensor = torch.frombuffer(self._mm, dtype=torch.uint8)[:self.nbytes]  # mapped >= 1 byte

    def handle(self) -> dict[str, Any]:
        """What the engine needs to open this buffer in place (plain data)."""
        if self.device.type == "cuda":
            from torch.multiprocessing.reductions import reduce_tensor

            # torch's own CUDA IPC export: it also registers the block so that
            # the allocator keeps it while a consumer still maps it.
            _, a = reduce_tensor(self.tensor)
            (_cls, _size, _stride, t_off, _scls, _dtype, _dev, h, s_bytes, s_off, _rg, rc_h, rc_off, ev_h,
             ev_sync) = a
            return {"kind": "cuda", "uuid": gpu_uuid(self.device), "nbytes": self.nbytes,
                    "ipc": [int(t_off), h, int(s_bytes), int(s_off), rc_h, int(rc_off), ev_h, bool(ev_sync)]}
        return {"kind": "file", "host": socket.gethostname(), "path": self._path, "nbytes": self.nbytes}

    def close(self) -> None:
        """Drop the buffer (an engine's open CUDA mapping keeps the memory until it lets go)."""
        self.tensor = None
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:  # a view of it is still alive here: let it go with that view
                pass
            self._mm = None
        if self._path is not None:
            try:
                os.unlink(self._path)
            except FileNotFoundError:
                pass
            self._path = None

    def __del__(self) -> None:
        # A buffer dropped on an error path must not leave its file in /dev/shm.
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown: nothing left to report to
            pass

    def __enter__(self) -> SharedBuffer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def open_shared(handle: dict[str, Any], device: torch.device | str) -> torch.Tensor:
    """The sender's buffer as a flat uint8 tensor on `device`, aliasing it (no copy).

    Refuses (ValueError, naming both sides) a handle from another GPU or node:
    colocated placement must have put the two processes on one device.
    """
    device = torch.device(device)
    kind = handle.get("kind")
    n = int(handle["nbytes"])
    if kind == "cuda":
        if device.type != "cuda":
            raise ValueError(f"weight sync: a CUDA IPC handle reached an engine on {device.type}")
        mine = gpu_uuid(device)
        if handle["uuid"] != mine:
            raise ValueError(f"weight sync: the trainer rank's buffer is on GPU {handle['uuid']}, this engine runs "
                             f"on {mine}; colocated placement must put rank i and engine i on one GPU")
        from torch.multiprocessing.reductions import rebuild_cuda_tensor

        t_off, h, s_bytes, s_off, rc_h, rc_off, ev_h, ev_sync = handle["ipc"]
        # The device index is this process's own (CUDA_VISIBLE_DEVICES may
        # number the same GPU differently in the two processes).
        index = device.index if device.index is not None else torch.cuda.current_device()
        return rebuild_cuda_tensor(torch.Tensor, (n,), (1,), t_off, torch.storage.TypedStorage, torch.uint8, index,
                                   h, s_bytes, s_off, False, rc_h, rc_off, ev_h, ev_sync)
    if kind == "file":
        if device.type != "cpu":
            raise ValueError(f"weight sync: a CPU shared-memory handle reached an engine on {device.type}")
        here = socket.gethostname()
        if handle["host"] != here:
            raise ValueError(f"weight sync: the trainer rank's buffer is on node {handle['host']}, this engine "
                             f"runs on {here}; colocated placement must put rank i and engine i on one node")
        try:
            fd = os.open(handle["path"], os.O_RDONLY)
        except FileNotFoundError:
            raise ValueError(f"weight sync: shared buffer {handle['path']} is gone (the sender dropped it "
                             "before this engine opened it)") from None
        try:
            size = os.fstat(fd).st_size
            if size < n:
                raise ValueError(f"weight sync: shared buffer {handle['path']} holds {size} bytes, "
                                 f"the handle says {n}")
            # Copy-on-write: writable for torch (no warning), and nothing is
            # copied unless someone writes, which the reload never does.
            mm = mmap.mmap(fd, max(1, n), access=mmap.ACCESS_COPY)
        finally:
            os.close(fd)
        return torch.frombuffer(mm, dtype=torch.uint8)[:n]
    raise ValueError(f"weight sync: unknown shared-buffer handle kind {kind!r}")


def probe_pattern(n: int, seed: int) -> torch.Tensor:
    """Known bytes for the start-up probe (the engine echoes their checksum)."""
    return ((torch.arange(n, dtype=torch.int64) * 131 + seed) % 251).to(torch.uint8)


def checksum(t: torch.Tensor) -> int:
    return int(t.to(torch.int64).mul(torch.arange(1, t.numel() + 1, device=t.device) % 7 + 1).sum())
