"""A group of Ray actors that act as ranks of one torch.distributed world.

`WorkerGroup.call` runs a method on every rank and gathers the results;
`call_sharded` gives each rank its own argument (its shard of a batch).
Rank 0 is created first so that it can name the rendezvous address.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import ray
from ray.exceptions import RayActorError


class WorkerDiedError(RuntimeError):
    """A trainer rank died: its state is gone, the run must resume from a checkpoint."""


class WorkerGroup:
    def __init__(self, cls: type, world_size: int, spec: dict, name: str, num_cpus: float = 1,
                 num_gpus: float = 0, resources: dict | None = None,
                 placement: Callable[[int], dict[str, Any]] | None = None, max_restarts: int = 0):
        """`placement(rank)` gives that rank's Ray options (num_cpus, num_gpus, scheduling strategy)."""
        self.name, self.world_size = name, world_size
        remote_cls = ray.remote(cls)
        self.actors = []
        for rank in range(world_size):
            opts: dict[str, Any] = dict(num_cpus=num_cpus, num_gpus=num_gpus, name=f"{name}-{rank}",
                                        max_restarts=max_restarts)
            if resources:
                opts["resources"] = resources
            if placement is not None:
                opts |= placement(rank)
            self.actors.append(remote_cls.options(**opts).remote(rank, world_size, spec))
        self.master_addr, self.master_port = ray.get(self.actors[0].node_address.remote())

    def _get(self, refs: list[ray.ObjectRef], method: str) -> list[Any]:
        try:
            return ray.get(refs)
        except RayActorError as err:
            raise WorkerDiedError(
                f"a {self.name} rank died during {method}() ({type(err).__name__}); ZeRO shards cannot be"
                " rebuilt from the other ranks, so the run stops here: restart it with trainer.resume=auto"
                " to continue from the last checkpoint") from err

    def call(self, method: str, *args, **kwargs) -> list[Any]:
        return self._get(self.call_async(method, *args, **kwargs), method)

    def call_async(self, method: str, *args, **kwargs) -> list[ray.ObjectRef]:
        return [getattr(a, method).remote(*args, **kwargs) for a in self.actors]

    def call_sharded(self, method: str, shards: list[Any], *args, **kwargs) -> list[Any]:
        if len(shards) != self.world_size:
            raise ValueError(f"{self.name}: {len(shards)} shards for {self.world_size} ranks")
        return self._get([getattr(a, method).remote(s, *args, **kwargs) for a, s in zip(self.actors, shards)], method)

    def setup(self, *args) -> list[Any]:
        return self.call("setup", self.master_addr, self.master_port, *args)

    def kill(self) -> None:
        for a in self.actors:
            ray.kill(a)
