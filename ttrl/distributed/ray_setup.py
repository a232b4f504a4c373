"""Start or join a Ray cluster, and check it can hold what the run asks for.

`cluster.address` null (or "local") starts a fresh local cluster for this run
and shuts it down at the end, so each job of a `-m` sweep gets its own; it
never attaches to a cluster someone else started on this machine. "auto" or
"host:port" joins one that is already running (`ray start`, SLURM, `ray job
submit`); at the end the run only disconnects and the cluster lives on.
A run that asks for more than the cluster has fails here, naming the
resource ("asked for 8 GPUs, cluster has 4"), instead of hanging in
placement.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field


class ClusterError(RuntimeError):
    """The cluster cannot hold the run; the message names the missing resource."""


@dataclass
class Needs:
    cpus: float
    gpus: float
    # Custom resources (cluster.trainer_resources / engine_resources), summed over actors.
    resources: dict[str, float] = field(default_factory=dict)


# How this process holds Ray: "started" (a local cluster of ours), "joined" (a
# connection of ours to someone's cluster) or None (not ours, or not at all).
_HELD: str | None = None


def actor_env(device: str) -> dict[str, str]:
    """Environment every actor of the run gets."""
    from ttrl.malloc import malloc_env

    env = {
        "TOKENIZERS_PARALLELISM": "false",
        # vLLM's engine core in the actor's own process (no extra spawn).
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING"),
        "PYTHONWARNINGS": "ignore",
    }
    if device == "cpu":
        env["DS_ACCELERATOR"] = "cpu"
    # glibc reads these when the actor's process starts: its steps reuse freed memory (ttrl.malloc).
    env.update(malloc_env())
    for key in ("HF_HOME", "HF_HUB_OFFLINE", "WANDB_MODE"):
        if key in os.environ:
            env[key] = os.environ[key]
    if "TTRL_CACHE" in os.environ:
        from ttrl.models.tiny import cache_root

        # As the driver reads it (absolute): a relative one would name another dir in each actor's own cwd.
        env["TTRL_CACHE"] = str(cache_root())
    return env


def usable_cpus() -> int:
    """CPUs this process may run on (a SLURM job's or container's share, not the whole node)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def start_ray(address: str | None, device: str, needs: Needs, num_cpus: int | None = None,
              num_gpus: int | None = None) -> bool:
    """Init Ray; return True when this run started (and so owns) the cluster."""
    global _HELD
    import ray

    if ray.is_initialized():
        if _HELD is None:
            return False  # the caller's own Ray session: use it, leave it alone
        # Ours, left over by a run of this process that failed before its
        # shutdown (a sweep job that crashed): start clean.
        ray.shutdown()
        _HELD = None
    runtime_env = {"env_vars": actor_env(device)}
    started = address in (None, "local")
    if started:
        # Logical CPUs: on a small CPU box every actor still needs a slot, and
        # they mostly wait on each other, so oversubscribing is what we want.
        cpus = num_cpus if num_cpus is not None else max(usable_cpus(), int(needs.cpus + 0.999))
        # address="local": a new cluster even when `ray start` runs on this machine.
        init_local(ray, num_cpus=cpus, num_gpus=num_gpus, include_dashboard=False,
                   runtime_env=runtime_env, log_to_driver=os.environ.get("TTRL_RAY_LOGS", "0") == "1",
                   configure_logging=False)
    else:
        try:
            ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
        except ConnectionError as err:
            raise ClusterError(
                f"cluster.address={address}: no Ray cluster to join ({err}); start one with `ray start --head`"
                " (or set RAY_ADDRESS), or use cluster=local to start one for this run") from err
    _HELD = "started" if started else "joined"
    try:
        check_resources(needs)
    except ClusterError:
        stop_ray(started)
        raise
    return started


# Ray waits a fixed 30 s for its new raylet to register with the GCS. On a
# loaded 2-core box (the previous run's engines still exiting) that wait can
# lapse although nothing is wrong; a second start then succeeds.
_STARTUP_TIMEOUT = "timed out during startup"


def init_local(ray, attempts: int = 3, pause_s: float = 2.0, **kwargs) -> None:
    """ray.init(address="local") that retries a start-up timeout, and says so, before giving up."""
    import time

    for attempt in range(1, attempts + 1):
        try:
            ray.init(address="local", **kwargs)
            return
        except Exception as err:  # Ray raises a bare Exception for this one
            if _STARTUP_TIMEOUT not in str(err):
                raise
            ray.shutdown()  # kills what the half-started node left running
            if attempt == attempts:
                raise ClusterError(
                    f"the local Ray cluster did not start in {attempts} tries ({err}); is the machine"
                    " overloaded, or are old raylets still running (`ray stop`)?") from err
            print(f"!! Ray's local node timed out during start-up (try {attempt} of {attempts});"
                  " starting it again", flush=True)
            time.sleep(pause_s)


def check_resources(needs: Needs) -> None:
    import ray

    have = ray.cluster_resources()
    if needs.gpus and have.get("GPU", 0) < needs.gpus:
        raise ClusterError(f"asked for {needs.gpus:g} GPUs, cluster has {have.get('GPU', 0):g}")
    if have.get("CPU", 0) < needs.cpus:
        raise ClusterError(f"asked for {needs.cpus:g} CPUs, cluster has {have.get('CPU', 0):g}")
    for name, amount in needs.resources.items():
        if have.get(name, 0) < amount:
            raise ClusterError(
                f"asked for {amount:g} of the custom resource {name!r}, cluster has {have.get(name, 0):g}"
                f" (give nodes some with `ray start --resources='{{\"{name}\": 1}}'`)")


def stop_ray(started: bool) -> None:
    """Shut down a cluster this run started; disconnect from one it joined."""
    global _HELD
    import ray

    if (started or _HELD == "joined") and ray.is_initialized():
        ray.shutdown()
    if started or _HELD == "joined":
        _HELD = None


def engine_cpu_threads(cpus: int, engines: int, trainer_ranks: int, overlap: bool) -> int:
    """Torch threads per CPU engine when `rollout.cpu_threads` is null.

    Synchronous: the trainer ranks wait while the engines generate, so the
    engines share every CPU. Overlapped: the trainer ranks (one thread each)
    work at the same time, so the engines get what they leave; more threads
    than cores made the demo's overlapped step 3.06 s against 2.37 s.
    """
    free = cpus - trainer_ranks if overlap else cpus
    return max(1, free // max(engines, 1))
