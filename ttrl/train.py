"""`ttrl-train`: compose the config with Hydra, validate it, run the training run.

Validation happens before any Ray actor, vLLM engine or DeepSpeed worker
starts, and the resolved config is written into the run dir first, so a
bad value costs a second, not a cluster allocation. This is an entry
module: the library never imports it (tests/unit/test_imports.py). It must
not import the engine at module level (`ttrl-train --cfg job` stays instant)
and does nothing at import: the config schema is registered when `main()`
runs, before Hydra composes.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from ttrl.cli import CONF_DIR, run_hydra
from ttrl.config import ConfigError, register_configs, validate
from ttrl.rundir import write_resolved_config


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def _main(cfg: DictConfig) -> float | None:
    try:
        validate(cfg)
    except ConfigError as err:
        # Exit here rather than raise: Hydra would add its own log line.
        print(f"ttrl-train: config error: {err}", file=sys.stderr)
        sys.exit(2)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    write_resolved_config(cfg, run_dir)
    from ttrl.distributed.group import WorkerDiedError  # heavy imports (torch, ray) only now
    from ttrl.parts import SetupError
    from ttrl.run import RunStopped, run

    try:
        if cfg.ser.enabled:
            from ttrl.ser import run_ser_then_policy

            return run_ser_then_policy(cfg, run_dir)
        return run(cfg, run_dir)
    except SetupError as err:
        print(f"ttrl-train: cannot start: {err}", file=sys.stderr)
        sys.exit(2)
    except (RunStopped, WorkerDiedError) as err:
        print(f"ttrl-train: stopped: {err}", file=sys.stderr)
        sys.exit(3)


def print_memory_estimate(argv: list[str]) -> None:
    """After `--cfg job` (or `all`): the model states' memory per GPU, as YAML comments below the config.

    Hydra prints the config and never calls the task, so the config is
    composed once more here; an invalid one (already printed) gets no estimate.
    """
    from hydra._internal.utils import get_args_parser

    args, _ = get_args_parser().parse_known_args(argv)
    if args.cfg not in ("job", "all") or args.multirun:
        return
    from ttrl.cli import compose
    from ttrl.trainer.memory import describe

    try:
        cfg = compose(args.overrides)
    except Exception:  # noqa: BLE001 - the composed config above says what it is; nothing to size
        return
    print("\n".join(f"# {line}" for line in describe(cfg)))


def main() -> None:
    # Registered here, not at import: the schema must be in Hydra's ConfigStore
    # before it composes, and a SLURM sweep (submitit) ships the ConfigStore's
    # state to its jobs with the launcher, so nothing needs it earlier.
    register_configs()
    run_hydra(_main, "ttrl-train")
    print_memory_estimate(sys.argv[1:])


if __name__ == "__main__":
    main()
