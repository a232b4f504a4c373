"""Where each actor runs: one Ray placement group, one bundle per device slot.

colocate: slot i (one GPU) hosts rollout engine i and rank i of every trainer
group, each with a fraction of the GPU, so generation and training take
turns on the same devices. split: every engine and every trainer rank gets
its own slot. On CPU the same layout is used with CPU-only bundles (that
keeps this code path exercised by the CPU tests).

A placement that cannot be satisfied fails after `cluster.placement_timeout_s`
with a message naming what was asked and what the cluster has, instead of
hanging.
"""

from __future__ import annotations

from typing import Any

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from ttrl.distributed.ray_setup import ClusterError


class Placement:
    def __init__(self, *, gpu: bool, colocate: bool, world_size: int, n_groups: int, engines: int, tp: int,
                 timeout_s: float, extra: dict[str, float] | None = None,
                 trainer_extra: dict[str, float] | None = None, engine_extra: dict[str, float] | None = None):
        """`extra` goes into every bundle; `trainer_extra`/`engine_extra` into the bundles of trainer
        ranks / engines (custom resources of `ray start --resources`, e.g. {"trainer": 1}, to pin them)."""
        if colocate and tp > 1:
            raise ClusterError("cluster.placement=colocate needs rollout.tensor_parallel_size=1 "
                               "(a TP engine spans several GPUs); use cluster.placement=split")
        self.gpu, self.colocate = gpu, colocate
        self.W, self.G, self.E, self.tp = world_size, n_groups, engines, tp
        if colocate:
            self.slots = max(world_size, engines)
            # Actors sharing slot i: engine i (if any) and rank i of each group (if any).
            per_slot = [int(i < engines) + n_groups * int(i < world_size) for i in range(self.slots)]
            bundles = [{"CPU": float(n), **({"GPU": 1.0} if gpu else {}),
                        **((engine_extra or {}) if i < engines else {}),
                        **((trainer_extra or {}) if i < world_size else {})} for i, n in enumerate(per_slot)]
            self.share = 1.0 / (n_groups + 1)
        else:
            self.slots = engines + world_size * n_groups
            bundles = [{"CPU": 1.0, **({"GPU": float(tp)} if gpu else {}), **(engine_extra or {})}
                       for _ in range(engines)]
            bundles += [{"CPU": 1.0, **({"GPU": 1.0} if gpu else {}), **(trainer_extra or {})}
                        for _ in range(world_size * n_groups)]
            self.share = 1.0
        if extra:
            bundles = [{**b, **extra} for b in bundles]
        self.bundles = bundles
        self.pg = placement_group(bundles, strategy="PACK")
        try:
            ray.get(self.pg.ready(), timeout=timeout_s)
        except ray.exceptions.GetTimeoutError:
            remove_placement_group(self.pg)
            raise ClusterError(self._shortfall(timeout_s)) from None

    def _shortfall(self, timeout_s: float) -> str:
        asked: dict[str, float] = {}
        for b in self.bundles:
            for k, v in b.items():
                asked[k] = asked.get(k, 0.0) + v
        have = ray.available_resources()
        short = [f"asked for {v:g} {k}s, cluster has {have.get(k, 0.0):g} free" for k, v in asked.items()
                 if have.get(k, 0.0) < v]
        what = "; ".join(short) or f"{len(self.bundles)} bundles that no node can hold ({self.bundles[0]})"
        return f"could not place the run's actors within {timeout_s:.0f}s: {what}"

    def _opts(self, bundle: int, cpus: float, gpus: float) -> dict[str, Any]:
        return {"num_cpus": cpus, "num_gpus": gpus if self.gpu else 0,
                "scheduling_strategy": PlacementGroupSchedulingStrategy(
                    placement_group=self.pg, placement_group_bundle_index=bundle)}

    def engine(self, i: int) -> dict[str, Any]:
        if self.colocate:
            return self._opts(i, 1.0, self.share)
        return self._opts(i, 1.0, float(self.tp))

    def trainer(self, group: int, rank: int) -> dict[str, Any]:
        if self.colocate:
            return self._opts(rank, 1.0, self.share)
        return self._opts(self.E + group * self.W + rank, 1.0, 1.0)

    def remove(self) -> None:
        remove_placement_group(self.pg)
