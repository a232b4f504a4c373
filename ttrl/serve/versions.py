"""Promoted weights on disk: <serve.dir>/versions/v<N>/.

Each version dir is what `Runtime.save` writes: `policy/` (a Hugging Face
export, which is what the serving engines load) and `policy_ds/` (the
DeepSpeed state with the optimizer, which is what the trainer rolls back
to). It is written under a temporary name, every file and folder of it
fsynced, and renamed into place (the parent fsynced too), all before the
store records it: a version dir that exists is complete, and one the store
names survives a power cut. v0 is the starting weights, written once when a
serve dir is first used.

`blobs(v)` packs a version's HF export into the buckets an engine's
`load_weights` takes: hot swaps, rollbacks, restarts and engine recoveries
all load from here, so what is served is always a version on disk.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from ttrl.serve.faults import crash_point


def fsync_tree(root: Path) -> int:
    """fsync every file under `root`, then every folder bottom-up (entries are data too); returns files synced."""
    files = 0
    for dirpath, _, filenames in os.walk(root, topdown=False):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            files += 1
        fsync_dir(Path(dirpath))
    return files


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Versions:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, version: int) -> Path:
        return self.root / f"v{version}"

    def hf_dir(self, version: int) -> Path:
        return self.path(version) / "policy"

    def exists(self, version: int) -> bool:
        return (self.path(version) / "manifest.json").exists()

    def on_disk(self) -> list[int]:
        return sorted(int(p.name[1:]) for p in self.root.glob("v*") if p.name[1:].isdigit()
                      and (p / "manifest.json").exists())

    def save(self, rt: Any, version: int, **manifest: Any) -> Path:
        """Write the trainer's weights and state as `version` (atomically)."""
        final = self.path(version)
        tmp = self.root / f".tmp-v{version}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        t0 = time.perf_counter()
        rt.save(str(tmp))
        info = {"version": version, "created": time.time(), "save_s": time.perf_counter() - t0, **manifest}
        (tmp / "manifest.json").write_text(json.dumps(info, indent=1, default=str))
        crash_point("version_saving")
        fsync_tree(tmp)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        fsync_dir(self.root)  # the rename itself
        return final

    def manifest(self, version: int) -> dict[str, Any]:
        return json.loads((self.path(version) / "manifest.json").read_text())

    def blobs(self, version: int, dtype: str = "float32", bucket_mb: int = 256) -> list[bytes]:
        """The version's weights, cast to the engine dtype, packed for `VLLMEngine.load_weights`."""
        import torch
        from safetensors.torch import load_file

        from ttrl.rollout.weights import iter_buckets

        d = self.hf_dir(version)
        files = sorted(d.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"version v{version}: no safetensors in {d}")
        td = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]

        def named():
            for f in files:
                for name, t in load_file(str(f)).items():
                    yield name, t.to(td)

        return list(iter_buckets(named(), bucket_mb << 20))

    def remove(self, version: int) -> None:
        shutil.rmtree(self.path(version), ignore_errors=True)

    def cleanup(self, keep: set[int]) -> list[int]:
        """Remove half-written dirs and versions not in `keep`; returns the removed versions."""
        for tmp in self.root.glob(".tmp-v*"):
            shutil.rmtree(tmp, ignore_errors=True)
        removed = [v for v in self.on_disk() if v not in keep]
        for v in removed:
            self.remove(v)
        return removed


__all__ = ["Versions", "fsync_dir", "fsync_tree"]
