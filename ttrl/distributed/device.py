"""Which device and dtype a run uses when the config says `auto`.

`device=auto` picks CUDA when torch can use a GPU. When a GPU is there but
torch cannot use it (a driver older than torch's CUDA build, a CPU-only
torch wheel on a GPU node), the run still falls back to CPU, but says so
on the console, once, with torch's own reason: a cluster job that silently
trains on CPU wastes its whole allocation. Torch only; never starts an actor.
"""

from __future__ import annotations

import shutil
import sys
import warnings
from pathlib import Path

import torch


def gpu_present() -> bool:
    """An NVIDIA device node or tool on this host, whatever torch makes of it."""
    return Path("/dev/nvidiactl").exists() or shutil.which("nvidia-smi") is not None


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        usable = torch.cuda.is_available()
    if usable:
        return "cuda"
    reasons = [str(w.message).strip() for w in caught if "cuda" in str(w.message).lower()
               or "driver" in str(w.message).lower()]
    if reasons or gpu_present():
        why = reasons[0].splitlines()[0] if reasons else (
            f"torch {torch.__version__} was built "
            + (f"for CUDA {torch.version.cuda}" if torch.version.cuda else "without CUDA"))
        print(f"ttrl: WARNING: device=auto found a GPU on this host but torch cannot use it ({why}); "
              "running on CPU. Fix the driver or the torch build, or set device=cpu to say CPU is meant.",
              file=sys.stderr, flush=True)
    return "cpu"


def resolve_dtype(dtype: str, device: str) -> str:
    if dtype != "auto":
        return dtype
    return "bfloat16" if device == "cuda" else "float32"


__all__ = ["gpu_present", "resolve_device", "resolve_dtype"]
