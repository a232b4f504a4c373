"""In which order a run's actors come up.

vLLM sizes its KV cache from the free GPU memory it sees while it loads;
DeepSpeed allocating on the same GPU at that moment shrinks it under vLLM,
which then fails (or, worse, over-commits and dies at the first long
batch). So where engines and trainer ranks share GPUs (colocated on CUDA)
the engines load and size first, and only then do the trainers start;
everywhere else both start at once, which halves start-up. Pure ordering:
the callables it is given start and await the actors; it never imports ray.

`Phases` records where the start-up went (each actor reports wall-clock
times: when its process was created, when its heavy imports were done, when
it was ready) and says it in one line.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

Waiter = Callable[[], Any]


def engines_size_first(gpu: bool, colocate: bool) -> bool:
    """Whether engines must be ready before any trainer rank starts."""
    return gpu and colocate


def bring_up(start_engines: Callable[[], Waiter], start_trainers: Callable[[], Waiter],
             engines_first: bool) -> tuple[Any, Any]:
    """Start both sides (each `start_*` returns a function that waits until its actors are ready)."""
    wait_engines = start_engines()
    if engines_first:
        engines = wait_engines()
        return engines, start_trainers()()
    wait_trainers = start_trainers()
    return wait_engines(), wait_trainers()


def process_created() -> float:
    """When this process was created (wall clock): how long Ray took to give an actor its process."""
    try:
        import psutil

        return psutil.Process().create_time()
    except Exception:  # noqa: BLE001 - a figure for the start-up line only
        return time.time()


@dataclass
class ActorTimes:
    """One actor's start, in wall-clock seconds (time.time()) of its node."""

    submitted: float  # the driver asked Ray for it
    spawned: float  # its worker process was created
    imported: float  # its heavy imports (vLLM, or DeepSpeed and transformers) were done
    ready: float  # it answered that it is up (engine built, or ZeRO rank set up)

    def parts(self) -> tuple[float, float, float]:
        """(waiting for a process, process start and imports, building) in seconds; none below 0."""
        return (max(0.0, self.spawned - self.submitted), max(0.0, self.imported - max(self.spawned, self.submitted)),
                max(0.0, self.ready - self.imported))


@dataclass
class Phases:
    """Where a run's start-up went, phase by phase."""

    ray_s: float = 0.0
    engines: list[ActorTimes] = field(default_factory=list)
    ranks: list[ActorTimes] = field(default_factory=list)
    after: dict[str, float] = field(default_factory=dict)  # later phases by name (first sync, anchor votes ...)
    t0: float = 0.0  # wall clock when the runtime began

    def as_dict(self) -> dict[str, float]:
        out = {"startup/ray_s": self.ray_s}
        for name, actors in (("engine", self.engines), ("rank", self.ranks)):
            if actors:
                out[f"startup/{name}s_s"] = max(a.ready for a in actors) - min(a.submitted for a in actors)
                for label, i in (("wait", 0), ("import", 1), ("build", 2)):
                    out[f"startup/{name}_{label}_s"] = max(a.parts()[i] for a in actors)
        out |= {f"startup/{k}_s": v for k, v in self.after.items()}
        return out

    def line(self) -> str:
        """E.g. 'Ray 4.1 s; 1 engine 12.3 s (process + imports 8.0, vLLM 3.9); 2 ranks 14.0 s (...)'."""
        bits = [f"Ray {self.ray_s:.1f} s"]
        for name, build, actors in (("engine", "vLLM", self.engines), ("rank", "DeepSpeed", self.ranks)):
            if not actors:
                continue
            total = max(a.ready for a in actors) - min(a.submitted for a in actors)
            wait, imp, b = (max(a.parts()[i] for a in actors) for i in range(3))
            waited = f"waiting {wait:.1f}, " if wait >= 0.5 else ""
            bits.append(f"{len(actors)} {name}{'s' if len(actors) > 1 else ''} {total:.1f} s ({waited}process + "
                        f"imports {imp:.1f}, {build} {b:.1f})")
        bits += [f"{k.replace('_', ' ')} {v:.1f} s" for k, v in self.after.items()]
        return "; ".join(bits)


__all__ = ["ActorTimes", "Phases", "bring_up", "engines_size_first", "process_created"]
