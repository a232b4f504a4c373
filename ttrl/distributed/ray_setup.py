"""Start or join a Ray cluster, and check it can hold what the run asks for.

`cluster.address` null starts a local cluster for this run (and it is shut
down at the end); "auto" or "host:port" joins one that is already running.
A run that asks for more than the cluster has fails here, naming the
resource ("asked for 8 GPUs, cluster has 4"), instead of hanging in
placement.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


class ClusterError(RuntimeError):
    """The cluster cannot hold the run; the message names the missing resource."""


@dataclass
class Needs:
    cpus: float
    gpus: float


def actor_env(device: str) -> dict[str, str]:
    """Environment every actor of the run gets."""
    env = {
        "TOKENIZERS_PARALLELISM": "false",
        # vLLM's engine core in the actor's own process (no extra spawn).
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING"),
        "PYTHONWARNINGS": "ignore",
    }
    if device == "cpu":
        env["DS_ACCELERATOR"] = "cpu"
    for key in ("TTRL_CACHE", "HF_HOME", "HF_HUB_OFFLINE", "WANDB_MODE"):
        if key in os.environ:
            env[key] = os.environ[key]
    return env


def start_ray(address: str | None, device: str, needs: Needs, num_cpus: int | None = None,
              num_gpus: int | None = None) -> bool:
    """Init Ray; return True when this run started (and so owns) the cluster."""
    import ray

    if ray.is_initialized():
        return False
    runtime_env = {"env_vars": actor_env(device)}
    started = address in (None, "local")
    if started:
        # Logical CPUs: on a small CPU box every actor still needs a slot, and
        # they mostly wait on each other, so oversubscribing is what we want.
        cpus = num_cpus if num_cpus is not None else max(os.cpu_count() or 1, int(needs.cpus + 0.999))
        ray.init(num_cpus=cpus, num_gpus=num_gpus, include_dashboard=False, runtime_env=runtime_env,
                 log_to_driver=os.environ.get("TTRL_RAY_LOGS", "0") == "1", configure_logging=False)
    else:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
    check_resources(needs)
    return started


def check_resources(needs: Needs) -> None:
    import ray

    have = ray.cluster_resources()
    if needs.gpus and have.get("GPU", 0) < needs.gpus:
        raise ClusterError(f"asked for {needs.gpus:g} GPUs, cluster has {have.get('GPU', 0):g}")
    if have.get("CPU", 0) < needs.cpus:
        raise ClusterError(f"asked for {needs.cpus:g} CPUs, cluster has {have.get('CPU', 0):g}")


def stop_ray(started: bool) -> None:
    import ray

    if started and ray.is_initialized():
        ray.shutdown()
