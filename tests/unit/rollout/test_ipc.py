"""The colocated path's handles (ttrl.rollout.ipc), across real processes on this machine.

A buffer's handle, opened in another process, aliases the sender's memory
(what the sender writes afterwards is seen, nothing was copied); a handle
that cannot be opened says why; closing drops the file.
"""

from __future__ import annotations

import multiprocessing as mp
import os

import pytest
import torch

from ttrl.rollout.ipc import SharedBuffer, checksum, open_shared, probe_pattern


def _reader(handle, device, start, go, out):
    t = open_shared(handle, device)
    out.put(("opened", checksum(t)))
    start.set()
    go.wait(30)
    if t.is_cuda:
        torch.cuda.synchronize()
    out.put(("after", t[:8].tolist()))


@pytest.mark.parametrize("device", [
    "cpu",
    pytest.param("cuda:0", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                    reason="CUDA IPC handles need a GPU")),
])
def test_a_handle_opened_in_another_process_aliases_the_buffer(device):
    ctx = mp.get_context("spawn")
    pattern = probe_pattern(1 << 16, seed=3)
    with SharedBuffer(pattern.numel(), device) as buf:
        buf.tensor.copy_(pattern)
        if buf.tensor.is_cuda:
            torch.cuda.synchronize()
        start, go, out = ctx.Event(), ctx.Event(), ctx.Queue()
        p = ctx.Process(target=_reader, args=(buf.handle(), device, start, go, out))
        p.start()
        try:
            assert start.wait(60), "the reader did not open the handle"
            assert out.get(timeout=30) == ("opened", checksum(pattern))
            # Written after the reader mapped it: seen there, so the reader holds no copy.
            buf.tensor[:8] = torch.arange(8, dtype=torch.uint8, device=buf.tensor.device) + 200
            if buf.tensor.is_cuda:
                torch.cuda.synchronize()
            go.set()
            assert out.get(timeout=30) == ("after", list(range(200, 208)))
        finally:
            p.join(30)
        assert p.exitcode == 0


def test_a_buffer_dropped_without_close_leaves_no_file():
    import gc

    buf = SharedBuffer(1024, "cpu")
    path = buf.handle()["path"]
    del buf  # an error path that never reached close()
    gc.collect()
    assert not os.path.exists(path)


def test_close_removes_the_file_and_a_late_open_says_so():
    buf = SharedBuffer(1024, "cpu")
    handle = buf.handle()
    assert os.path.exists(handle["path"])
    buf.close()
    assert not os.path.exists(handle["path"])
    with pytest.raises(ValueError, match="is gone"):
        open_shared(handle, "cpu")


def test_a_handle_from_another_node_or_kind_is_refused_with_the_reason():
    with SharedBuffer(64, "cpu") as buf:
        handle = buf.handle()
        with pytest.raises(ValueError, match="on node elsewhere.*colocated placement"):
            open_shared({**handle, "host": "elsewhere"}, "cpu")
        with pytest.raises(ValueError, match="unknown shared-buffer handle kind"):
            open_shared({**handle, "kind": "pigeon"}, "cpu")
        with pytest.raises(ValueError, match="holds 64 bytes, the handle says 128"):
            open_shared({**handle, "nbytes": 128}, "cpu")


def test_an_empty_bucket_still_has_a_handle():
    with SharedBuffer(0, "cpu") as buf:
        assert open_shared(buf.handle(), "cpu").numel() == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA IPC handles need a GPU")
def test_a_cuda_handle_from_another_gpu_is_refused_naming_both():
    with SharedBuffer(64, "cuda:0") as buf:
        handle = {**buf.handle(), "uuid": "GPU-elsewhere"}
        with pytest.raises(ValueError, match="GPU-elsewhere.*colocated placement"):
            open_shared(handle, "cuda:0")
