"""Name -> object registries for pluggable parts (advantages, losses, KL, rewards).

A new algorithm piece is one function plus one decorator; configs refer to it
by name. Lookups of an unknown name raise one error that lists the valid
names and, for a near miss, the name that was probably meant. This module
must stay dependency-free: the pure core imports it.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

T = TypeVar("T")


def close_match(name: object, choices: Iterable[object]) -> str | None:
    """The choice a mistyped `name` most likely meant ('ppo_clp' -> 'ppo_clip'), or None.

    A name that is the start of exactly one choice means that choice
    ('majority' -> 'majority_vote', though 'soft_majority' is as close by
    edit distance); otherwise the closest by difflib's ratio.
    """
    options = [str(c) for c in choices]
    starts = [c for c in options if c.startswith(str(name))]
    if len(starts) == 1 and name:
        return starts[0]
    found = difflib.get_close_matches(str(name), options, n=1)
    return found[0] if found else None


def did_you_mean(name: object, choices: Iterable[object]) -> str:
    """A `; did you mean 'ppo_clip'?` to end a sentence on a near miss, else an empty string."""
    match = close_match(name, choices)
    return f"; did you mean {match!r}?" if match is not None else ""


class Registry(Generic[T]):
    """A named table of callables, filled by the `register` decorator."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = obj
            return obj

        return deco

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            valid = ", ".join(sorted(self._items))
            match = close_match(name, self._items)
            hint = f" (did you mean {match!r}?)" if match is not None else ""
            raise KeyError(f"unknown {self.kind} {name!r}{hint}; valid choices: {valid}") from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items
