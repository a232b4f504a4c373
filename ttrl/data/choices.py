"""Multiple-choice questions: options put into lettered places drawn from a recorded seed.

A row with one right and several wrong option texts (GPQA's "Correct
Answer" and "Incorrect Answer 1..3") becomes a problem that lists its
options as "A) ...", "B) ...", one per line, then an instruction; its answer
is the letter the right option landed on, so `label.extractor=choice` reads
and compares what the model writes. The synthetic task's sums become
questions the same way (`choice_problems` in ttrl/data/synthetic.py), on one
line.

Where the options land comes from `random.Random(f"{seed}:{row id}")`.
`random` hashes a string seed with SHA-512, never with Python's salted
`hash()`, so a seed and an id give the same letters on every machine and in
every process, and a row keeps its letters when rows around it are added,
dropped or reordered. Every order is equally likely, so is every letter as
the answer: a model cannot score by always writing "A".

This module only writes questions: it never reads a model's output, and it
never decides which answer counts as right (the row says so).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

# What label.extractor=choice can read back (ttrl/labeling/extract.py).
READABLE_LETTERS = "ABCDEFGHIJ"


@dataclass(frozen=True)
class ChoiceSpec:
    """How rows become questions: the `data.choices` config section, as plain values."""

    correct_key: str
    incorrect_keys: tuple[str, ...]
    letters: str
    seed: int
    instruction: str

    @classmethod
    def from_config(cls, choices_cfg: Any) -> ChoiceSpec | None:
        """The spec of a `data.choices` section; None when it is absent or off (correct_key null)."""
        if choices_cfg is None or choices_cfg.correct_key is None:
            return None
        return cls(str(choices_cfg.correct_key), tuple(str(k) for k in choices_cfg.incorrect_keys),
                   str(choices_cfg.letters), int(choices_cfg.seed), str(choices_cfg.instruction))


def option_rng(seed: int, row_id: str) -> random.Random:
    """The generator that places one row's options; depends on nothing but the seed and the id."""
    return random.Random(f"{seed}:{row_id}")


def arrange(correct: str, wrong: Sequence[str], letters: str, rng: random.Random) -> tuple[list[str], str]:
    """The options in display order (one per letter) and the letter of the right one."""
    if len(wrong) + 1 != len(letters):
        raise ValueError(f"{len(wrong) + 1} options need as many letters, got {letters!r}")
    options = [correct, *wrong]
    order = list(range(len(options)))
    rng.shuffle(order)
    # order[i] is the option shown at letter i; the right option is option 0.
    return [options[j] for j in order], letters[order.index(0)]


def render(question: str, options: Sequence[str], letters: str, instruction: str = "",
           one_line: bool = False) -> str:
    """'question\\n\\nA) x\\nB) y\\n\\ninstruction', or 'question A) x B) y instruction' with one_line."""
    listed = [f"{letter}) {option}" for letter, option in zip(letters, options, strict=True)]
    if one_line:
        return " ".join([question, *listed, *([instruction] if instruction else [])])
    return "\n\n".join([question, "\n".join(listed), *([instruction] if instruction else [])])
