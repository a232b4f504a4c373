"""Promoted versions on disk: complete or absent, and fsynced before anyone records them."""

from __future__ import annotations

import os

import pytest

from ttrl.serve import versions as V
from ttrl.serve.versions import Versions


class FakeRuntime:
    """Writes what Runtime.save writes, in miniature: an HF export and a DeepSpeed folder."""

    def __init__(self, fail: bool = False):
        self.fail = fail

    def save(self, path: str, export_hf: bool = True) -> None:
        (p := V.Path(path) / "policy").mkdir(parents=True)
        (p / "model.safetensors").write_bytes(b"weights")
        (q := V.Path(path) / "policy_ds" / "global_step1").mkdir(parents=True)
        (q / "optim.pt").write_bytes(b"state")
        if self.fail:
            raise OSError("disk full")


def test_a_version_is_fsynced_file_by_file_and_folder_by_folder_before_it_appears(tmp_path, monkeypatch):
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(V.os, "fsync", fsync)
    disk = Versions(tmp_path / "versions")
    path = disk.save(FakeRuntime(), 1, parent=0)
    assert path == tmp_path / "versions" / "v1" and disk.exists(1)
    tmp = str(tmp_path / "versions" / ".tmp-v1")
    files = {f"{tmp}/policy/model.safetensors", f"{tmp}/policy_ds/global_step1/optim.pt", f"{tmp}/manifest.json"}
    folders = {tmp, f"{tmp}/policy", f"{tmp}/policy_ds", f"{tmp}/policy_ds/global_step1"}
    assert files | folders <= set(synced[:-1]), "every file and folder, before the rename"
    assert synced[-1] == str(tmp_path / "versions"), "then the parent, which holds the rename"


def test_a_save_that_fails_leaves_no_version_and_cleanup_removes_its_remains(tmp_path):
    disk = Versions(tmp_path / "versions")
    with pytest.raises(OSError):
        disk.save(FakeRuntime(fail=True), 2)
    assert not disk.exists(2) and disk.on_disk() == []
    assert list((tmp_path / "versions").glob(".tmp-v*")), "a killed save leaves a temporary folder ..."
    disk.cleanup(keep={0})
    assert not list((tmp_path / "versions").glob(".tmp-v*")), "... which the next start removes"


def test_a_rollback_waiting_on_a_round_that_prunes_its_version_is_a_404_naming_the_kept_ones(tmp_path):
    import asyncio
    import threading
    import time

    from ttrl.serve.protocol import RequestError
    from ttrl.serve.server import ServeController
    from ttrl.serve.store import Store

    store, disk = Store(tmp_path / "s.sqlite"), Versions(tmp_path / "versions")
    for v in (0, 1, 2):
        (disk.path(v) / "policy").mkdir(parents=True)
        (disk.path(v) / "manifest.json").write_text("{}")
        store.add_version(v, str(disk.path(v)), "base" if v == 0 else "promoted", serve=(v == 2))
    lock = threading.Lock()
    ctl = ServeController(None, store, disk, type("FakeRuntime", (), {"engine_dtype": "float32"})(), 2, lock)
    ctl.loop, ctl.pool = asyncio.new_event_loop(), object()
    out: dict = {}

    def admin():  # POST /admin/rollback {"version": 1} while a learning round holds the trainer
        try:
            out["r"] = ctl.rollback(1)
        except Exception as err:  # noqa: BLE001 - the test reports what came out
            out["r"] = err

    lock.acquire()
    th = threading.Thread(target=admin)
    th.start()
    time.sleep(0.2)
    disk.remove(1)  # the round prunes v1 (learner.prune) before it lets go of the trainer
    store.set_version_status(1, "pruned")
    lock.release()
    th.join(10)
    err = out["r"]
    assert isinstance(err, RequestError) and err.status == 404 and err.param == "version", err
    assert "kept versions: [0, 2]" in err.message
