"""Checkpoints of a run: write one atomically, find the one to resume from, prune old ones.

    <run dir>/checkpoints/step_N/
        policy/              Hugging Face export of the policy (what ttrl-eval reads)
        policy_ds/, critic_ds/   DeepSpeed states (weights, optimizer, schedule)
        trainer_state.json   step, prompt sampler, weights version and fingerprint, eval pass@1
        rng.pt               the driver's Python and torch random states

A checkpoint is written into `.tmp-step_N` and renamed when complete, so a
crash mid-write never leaves a `step_N` that looks whole: only a dir with
`trainer_state.json` counts. Must never decide when to save (the run does)
nor touch the engines.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import torch

from ttrl.distributed.seam import StepRuntime

STATE = "trainer_state.json"


def step_of(path: Path) -> int:
    return int(path.name.split("_")[-1])


def complete(run_dir: Path) -> list[Path]:
    """The run's complete checkpoints, oldest first."""
    return sorted((p for p in (run_dir / "checkpoints").glob("step_*") if (p / STATE).exists()), key=step_of)


def find(run_dir: Path, resume: str) -> Path | None:
    """The checkpoint `trainer.resume` names: the newest complete one ("auto"), none ("none"), or a path."""
    if resume == "none":
        return None
    if resume != "auto":
        p = Path(resume)
        if not (p / STATE).exists():
            raise FileNotFoundError(f"trainer.resume={resume}: no {STATE} there")
        return p
    found = complete(run_dir)
    return found[-1] if found else None


def save(rt: StepRuntime, run_dir: Path, step_no: int, sampler_state: dict, rng: random.Random, keep_last: int,
         eval_pass1: float | None = None, protect: Path | None = None) -> Path:
    """Write checkpoints/step_N (tmp dir, then rename), then keep only the last `keep_last`.

    `protect` (the guard's rollback target) survives pruning.
    """
    final = run_dir / "checkpoints" / f"step_{step_no}"
    tmp = final.with_name(f".tmp-step_{step_no}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    rt.save(str(tmp))
    state = {"step": step_no, "sampler": sampler_state, "weights_version": rt.weights_version,
             "weights_fingerprint": rt.fingerprint(), "eval_pass1": eval_pass1}
    (tmp / STATE).write_text(json.dumps(state))
    torch.save({"python": rng.getstate(), "torch": torch.get_rng_state()}, tmp / "rng.pt")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    prune(run_dir, keep_last, protect)
    return final


def prune(run_dir: Path, keep_last: int, protect: Path | None = None) -> None:
    """Remove all but the newest `keep_last` complete checkpoints, never `protect`."""
    for old in complete(run_dir)[:-keep_last]:
        if protect is None or old.resolve() != protect.resolve():
            shutil.rmtree(old, ignore_errors=True)


def restore(rt: StepRuntime, path: Path, rng: random.Random) -> dict[str, Any]:
    """Load the trainer state and the driver's random states from `path`; returns trainer_state.json.

    The engines still hold the old weights: the caller syncs them.
    """
    state = json.loads((path / STATE).read_text())
    rt.load(str(path))
    # weights_only: a checkpoint folder is data, never code to run (a pickle could run anything).
    rs = torch.load(path / "rng.pt", weights_only=True)
    rng.setstate(rs["python"])
    torch.set_rng_state(rs["torch"])
    return state


__all__ = ["complete", "find", "prune", "restore", "save", "step_of"]
