"""A user's reward function, named by dotted path, with TRL's calling convention.

    fn(prompts: list[str], completions: list[str], **kwargs) -> list[float | None]

Lists are flat over all samples of the step (prompt p's problem repeated once
per sample). kwargs: `answers` (extracted answers, None where a completion
has none), `prompt_ids`, and `ground_truth` only when the config sets
`needs_ground_truth` (the run is then not label-free). A None reward becomes
0.0 and is counted in `RewardOutput.none_count`.

The function is imported and its signature checked when the reward is built,
so that a typo fails at start-up with one sentence naming the dotted path,
not after the first rollout. This module must not read `prompt.answer`
unless `needs_ground_truth` is set.
"""

from __future__ import annotations

import importlib
import inspect
import math
import numbers
from collections.abc import Callable
from typing import Any

from ttrl.rewards.base import REWARDS, Reward, RewardError, RewardOutput
from ttrl.types import Prompt

__all__ = ["CustomReward", "load_function"]


def _ids(prompts: list[Prompt]) -> str:
    """The distinct prompt ids, in order, shortened: where an error happened."""
    ids = list(dict.fromkeys(p.id for p in prompts))
    return ", ".join(map(repr, ids[:5])) + (f" and {len(ids) - 5} more" if len(ids) > 5 else "")


@REWARDS.register("custom")
class CustomReward(Reward):
    def __init__(self, fn: str, needs_ground_truth: bool = False):
        self.path = fn
        self.fn = load_function(fn)
        self.needs_ground_truth = bool(needs_ground_truth)
        self._check_signature()

    def __call__(
        self,
        prompts: list[Prompt],
        completions: list[list[str]],
        answers: list[list[str | None]],
    ) -> RewardOutput:
        flat_prompts = [p for p, row in zip(prompts, completions, strict=True) for _ in row]
        flat_completions = [c for row in completions for c in row]
        kwargs: dict[str, Any] = {
            "answers": [a for row in answers for a in row],
            "prompt_ids": [p.id for p in flat_prompts],
        }
        if self.needs_ground_truth:
            missing = [p.id for p in prompts if p.answer is None]
            if missing:
                raise ValueError(
                    f"reward function {self.path!r} asks for ground truth (needs_ground_truth), "
                    f"but {len(missing)} prompts have no answer (first: {missing[0]!r})"
                )
            kwargs["ground_truth"] = [p.answer for p in flat_prompts]

        try:
            values = self.fn(prompts=[p.problem for p in flat_prompts], completions=flat_completions, **kwargs)
        except Exception as err:  # noqa: BLE001 - the user's code: name it and where, skip the step
            raise RewardError(f"reward function {self.path!r} raised {type(err).__name__}: {err} "
                              f"(on the step's prompts {_ids(prompts)})") from err
        flat, none_count = self._validate(values, expected=len(flat_completions), prompts=flat_prompts)

        rewards, start = [], 0
        for row in completions:
            rewards.append(flat[start : start + len(row)])
            start += len(row)
        return RewardOutput(rewards=rewards, votes=None, none_count=none_count)

    def _check_signature(self) -> None:
        names = ["answers", "prompt_ids"] + (["ground_truth"] if self.needs_ground_truth else [])
        try:
            signature = inspect.signature(self.fn)
        except (TypeError, ValueError):
            return  # some builtins and C callables have none to check
        try:
            signature.bind(prompts=[], completions=[], **{name: [] for name in names})
        except TypeError as err:
            raise ValueError(
                f"reward function {self.path!r} cannot be called as "
                f"fn(prompts=..., completions=..., {'=..., '.join(names)}=...): {err}. "
                f"Give it a **kwargs parameter to ignore what it does not use."
            ) from None

    def _validate(self, values: Any, expected: int, prompts: list[Prompt]) -> tuple[list[float], int]:
        try:
            values = list(values)
        except TypeError:
            raise RewardError(
                f"reward function {self.path!r} must return a list of float | None, "
                f"got {type(values).__name__} (on the step's prompts {_ids(prompts)})"
            ) from None
        if len(values) != expected:
            raise RewardError(
                f"reward function {self.path!r} returned {len(values)} rewards for {expected} completions "
                f"(on the step's prompts {_ids(prompts)})"
            )
        flat, none_count = [], 0
        for i, value in enumerate(values):
            if value is None:
                # TRL's convention for "this function does not apply here".
                none_count += 1
                flat.append(0.0)
            elif isinstance(value, numbers.Real) and math.isfinite(value):
                flat.append(float(value))
            else:
                raise RewardError(
                    f"reward function {self.path!r} returned {value!r} at index {i} (prompt {prompts[i].id!r}); "
                    f"rewards must be finite numbers or None"
                )
        return flat, none_count


def load_function(path: str) -> Callable[..., Any]:
    """Import `"package.module:function"` (or `"package.module.function"`)."""
    if ":" in path:
        module_name, _, attr_path = path.partition(":")
    else:
        module_name, _, attr_path = path.rpartition(".")
    if not module_name or not attr_path:
        raise ValueError(f"reward function {path!r} must be a dotted path like 'package.module:function'")

    try:
        target: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name and (module_name == err.name or module_name.startswith(err.name + ".")):
            raise ValueError(
                f"reward function {path!r}: module {module_name!r} not found (is it on PYTHONPATH?)"
            ) from None
        # The module exists but one of its own imports failed.
        raise ValueError(f"reward function {path!r}: importing {module_name!r} failed: {err}") from err
    except Exception as err:
        raise ValueError(f"reward function {path!r}: importing {module_name!r} failed: {err!r}") from err

    for part in attr_path.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise ValueError(
                f"reward function {path!r}: {module_name!r} has no attribute {attr_path!r}"
            ) from None
    if not callable(target):
        raise ValueError(f"reward function {path!r} is a {type(target).__name__}, not a function")
    return target
