"""In which order a run's actors come up.

vLLM sizes its KV cache from the free GPU memory it sees while it loads;
DeepSpeed allocating on the same GPU at that moment shrinks it under vLLM,
which then fails (or, worse, over-commits and dies at the first long
batch). So where engines and trainer ranks share GPUs (colocated on CUDA)
the engines load and size first, and only then do the trainers start;
everywhere else both start at once, which halves start-up. Pure ordering:
the callables it is given start and await the actors; it never imports ray.
"""

from __future__ import annotations

from collections.abc import Callable
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


__all__ = ["bring_up", "engines_size_first"]
