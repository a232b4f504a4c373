"""`ttrl-serve`: compose conf/serve.yaml with Hydra, validate it, serve and learn.

    ttrl-serve experiment=demo                         # the demo model on http://127.0.0.1:8000/v1
    ttrl-serve experiment=demo serve.votes=8           # self-consistency over 8 samples
    ttrl-serve experiment=demo serve.port=0 serve.dir=/tmp/serve_demo
    ttrl-serve --cfg job                               # print the config, start nothing

Validation runs before Ray, vLLM or DeepSpeed start: a bad value costs a
second and gets one sentence naming the key (exit status 2). `python -m
ttrl.serve` is the same command. An entry module: the library never
imports it, and importing it does nothing (the schema is registered in
`main()`, before Hydra composes).
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from ttrl.cli import CONF_DIR, run_hydra
from ttrl.config import ConfigError
from ttrl.rundir import write_resolved_config
from ttrl.serve.config import register_serve_configs, secret_on_command_line, validate_serve


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="serve")
def _main(cfg: DictConfig) -> None:
    try:
        validate_serve(cfg)
    except ConfigError as err:
        print(f"ttrl-serve: config error: {err}", file=sys.stderr)
        sys.exit(2)
    serve_dir = Path(cfg.serve.dir).expanduser().resolve()  # Ray workers write versions there too
    write_resolved_config(cfg, serve_dir)
    from ttrl.distributed.group import WorkerDiedError  # heavy imports (torch, ray) only now
    from ttrl.models.resolve import ModelError
    from ttrl.parts import SetupError
    from ttrl.serve.server import run_server

    try:
        run_server(cfg, serve_dir)
    except (SetupError, ModelError, FileNotFoundError, ValueError) as err:
        print(f"ttrl-serve: cannot start: {err}", file=sys.stderr)
        sys.exit(2)
    except WorkerDiedError as err:
        print(f"ttrl-serve: stopped: {err}", file=sys.stderr)
        sys.exit(3)


def main() -> None:
    refused = secret_on_command_line(sys.argv[1:])
    if refused:  # before Hydra, which would write the value into <serve.dir>/.hydra/overrides.yaml
        print(f"ttrl-serve: config error: {refused}", file=sys.stderr)
        sys.exit(2)
    register_serve_configs()  # at call, not import: see ttrl/train.py's main()
    run_hydra(_main, "ttrl-serve")


if __name__ == "__main__":
    main()
