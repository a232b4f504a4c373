"""The files a run dir (or `ttrl-serve`'s serve dir) holds that several commands write.

`write_resolved_config(cfg, run_dir)` writes `config.yaml`, the resolved
config that `ttrl-compare` and a resumed run read back; `write_atomic`
is how every small state file here is written (a crash leaves the old file
or the new one, never half of one). `ttrl-train`, `ttrl-serve` and the SER
stage (which rewrites `reward.path`) share these, so they live in the
library rather than in an entry module. Must never import torch, ray,
vllm or deepspeed, or an entry module (ttrl/train.py, ttrl/serve/cli.py ...).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["CONFIG_FILE", "write_atomic", "write_resolved_config"]

CONFIG_FILE = "config.yaml"


def write_atomic(path: Path, text: str) -> Path:
    """Write `text` to `path` through a temporary file and a rename (atomic on POSIX)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path


def write_resolved_config(cfg: Any, run_dir: Path) -> Path:
    """Write the resolved config as `<run_dir>/config.yaml`, creating the dir; returns the file."""
    from omegaconf import OmegaConf

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return write_atomic(run_dir / CONFIG_FILE, OmegaConf.to_yaml(cfg, resolve=True))
