"""Shared plumbing of the Hydra console scripts (`ttrl-train`, `ttrl-eval`, `ttrl-serve`).

Hydra reports a bad override as a multi-line message with a stack-trace
hint. Researchers mistype keys all day, so the scripts turn the usual
config mistakes (unknown key, wrong type, unknown group choice, a failed
`validate`) into one sentence that names the key, and exit with status 2.
Anything else is a real bug and keeps its full traceback. A library module
that the entry modules share: it must never import one of them
(tests/unit/test_imports.py), nor torch, ray, vllm or deepspeed: `--cfg job`
must stay instant.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def compose(overrides: list[str]):
    """The run config from conf/ with `overrides`, validated: for code that composes without a console script."""
    from hydra import compose as hcompose
    from hydra import initialize_config_dir

    from ttrl.config import register_configs, validate

    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = hcompose(config_name="config", overrides=overrides)
    validate(cfg)
    return cfg


def _suggest(err: BaseException, full_key: str) -> str:
    """'; did you mean rollout.n_votes?' when a close key exists; '; it is ser.rm.lr now.' for a moved one."""
    import difflib
    from dataclasses import is_dataclass

    from ttrl.config import moved_key

    head, _, leaf = full_key.rpartition(".")
    schema = getattr(err, "object_type", None)
    moved = moved_key(schema, head, leaf) if isinstance(schema, type) and is_dataclass(schema) else None
    if moved:
        return f"; it is {moved} now."
    parent = getattr(err, "parent_node", None) or getattr(err, "object_type", None)
    keys: list[str] = []
    if parent is not None and not isinstance(parent, type) and hasattr(parent, "keys"):
        keys = [str(k) for k in parent.keys()]
    elif isinstance(parent, type) and hasattr(parent, "__dataclass_fields__"):
        keys = list(parent.__dataclass_fields__)
    close = difflib.get_close_matches(leaf, keys, n=1)
    return f"; did you mean {head + '.' if head else ''}{close[0]}?" if close else ""


def _switched(cause: BaseException) -> str | None:
    """For a true/false given to a section that was a switch (ser.lora=true): the flag inside it, else None."""
    import typing
    from dataclasses import is_dataclass

    from ttrl.config import switched_key

    schema, leaf = getattr(cause, "object_type", None), getattr(cause, "key", None)
    if not (isinstance(schema, type) and is_dataclass(schema) and isinstance(leaf, str)):
        return None
    section = typing.get_type_hints(schema).get(leaf)
    return switched_key(section, getattr(cause, "value", None))


def _show(value: object) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def _one_sentence(err: BaseException) -> str | None:
    """The user-facing sentence for a config mistake, or None for other errors."""
    from hydra.errors import ConfigCompositionException, MissingConfigException
    from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

    from ttrl.config import ConfigError

    if isinstance(err, ConfigError):
        return f"config error: {err}"
    # Hydra wraps the OmegaConf error of an override; the cause holds the key.
    cause = err.__cause__ if isinstance(err, ConfigCompositionException) and err.__cause__ else err
    if isinstance(err, MissingConfigException):
        m = re.search(r"Could not find '([^']+)/([^']+)'", str(err))
        options = getattr(err, "options", None) or []
        if m:
            group, choice = m.groups()
            valid = ", ".join(sorted(options)) if options else "(none)"
            return f"config error: {group}={choice} is not a config in conf/{group}/; valid choices: {valid}."
        return f"config error: {str(err).splitlines()[0]}"
    if isinstance(cause, OmegaConfBaseException):
        key = getattr(cause, "full_key", None) or ""
        msg = str(cause).splitlines()[0]
        if isinstance(cause, ConfigKeyError) or "not in" in msg:
            if getattr(cause, "object_type", None) is dict and key:
                # A dict-valued key (cluster.trainer_resources): new entries need Hydra's +.
                return f"config error: {key} is a new key; add it with +{key}=VALUE."
            return f"config error: {key or msg} is not a known key{_suggest(cause, key) or '.'}"
        if isinstance(cause, ValidationError):
            switched = _switched(cause)
            if switched:
                value = _show(getattr(cause, "value", None))
                return f"config error: {key}={value} is {key}.{switched}={value} now ({key} is a section)."
            return f"config error: {key}: {msg}."
        return f"config error: {key + ': ' if key else ''}{msg}."
    if isinstance(err, ConfigCompositionException):
        return f"config error: {str(err).splitlines()[0]}"
    return None


def run_hydra(entry: Callable[[], None], prog: str) -> None:
    """Run a @hydra.main function, turning config mistakes into one sentence."""
    # Let Hydra raise instead of printing, so that we can word the message.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    # Like `python -m`: user code named in the config (reward.fn=my_mod:fn)
    # is importable from the directory the command runs in.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    # Before any tensor: the driver builds the warm start and runs in-process engines (ttrl.malloc).
    from ttrl.malloc import tune_malloc

    tune_malloc()
    try:
        entry()
    except SystemExit:
        raise
    except BaseException as err:  # noqa: BLE001 - we re-raise what we do not word
        sentence = _one_sentence(err)
        if sentence is None:
            raise
        print(f"{prog}: {sentence}", file=sys.stderr)
        sys.exit(2)
