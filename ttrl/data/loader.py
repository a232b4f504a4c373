"""Load prompts: a synthetic task, a local file, or a Hugging Face dataset.

Every row is validated as it is read: a row without a usable problem or
answer is an error naming the file and line (or the dataset index), never a
silently skipped prompt. Answers are kept on the Prompt for metrics only.

With `data.choices.correct_key` set, rows hold option texts instead of an
answer (GPQA: "Correct Answer", "Incorrect Answer 1..3"): each becomes a
lettered multiple-choice question whose answer is the right option's letter
(ttrl/data/choices.py), and a row missing an option names the key.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ttrl.data.choices import ChoiceSpec, arrange, option_rng, render
from ttrl.types import Prompt

# data.name values generated in code rather than read (unless data.local_path is set).
SYNTHETIC_TASKS = ("synthetic", "synthetic_choice")


class DataError(ValueError):
    """A bad data row or file; the message names the file and line."""


def _row_to_prompt(row: Any, where: str, id_key: str, problem_key: str, answer_key: str,
                   default_id: str, choices: ChoiceSpec | None = None) -> Prompt:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    problem = row.get(problem_key)
    if not isinstance(problem, str) or not problem.strip():
        raise DataError(f"{where}: missing or empty '{problem_key}' (set data.problem_key if it is named differently)")
    if choices is not None:
        return _choice_prompt(row, where, str(row.get(id_key, default_id)), problem, choices)
    answer = row.get(answer_key)
    if answer is None or (isinstance(answer, str) and not answer.strip()):
        raise DataError(f"{where}: missing or empty '{answer_key}' (set data.answer_key if it is named differently)")
    if isinstance(answer, (int, float)):
        answer = str(answer)
    if not isinstance(answer, str):
        raise DataError(f"{where}: '{answer_key}' must be a string or number, got {type(answer).__name__}")
    return Prompt(id=str(row.get(id_key, default_id)), problem=problem, answer=answer.strip())


def _option(row: dict[str, Any], key: str, where: str, role: str) -> str:
    value = row.get(key)
    if isinstance(value, (int, float)):  # "42" read back as a number by JSON or parquet
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: missing or empty '{key}' ({role})")
    return value.strip()


def _choice_prompt(row: dict[str, Any], where: str, row_id: str, question: str, spec: ChoiceSpec) -> Prompt:
    """The row as a lettered question whose answer is the right option's letter."""
    correct = _option(row, spec.correct_key, where, "the right option, data.choices.correct_key")
    wrong = [_option(row, k, where, "a wrong option, one of data.choices.incorrect_keys")
             for k in spec.incorrect_keys]
    # Option texts are stripped: GPQA's carry stray newlines that would break the one-per-line list.
    options, letter = arrange(correct, wrong, spec.letters, option_rng(spec.seed, row_id))
    return Prompt(id=row_id, problem=render(question.strip(), options, spec.letters, spec.instruction),
                  answer=letter)


def iter_jsonl(p: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed row) for each non-blank line of a JSON Lines file; a bad line names file:line."""
    with p.open() as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{p}:{lineno}: not valid JSON ({err.msg})") from None


def iter_csv(p: Path) -> Iterator[tuple[int, dict[str, str]]]:
    """(line number where the record starts, row by header) for each record of a CSV file with a header.

    Records may span lines (GPQA's questions do), so the line is tracked
    rather than counted; a blank line between records is skipped.
    """
    with p.open(newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None:
            return
        end = reader.line_num
        for fields in reader:
            start, end = end + 1, reader.line_num
            if not fields:
                continue
            if len(fields) != len(header):
                raise DataError(f"{p}:{start}: {len(fields)} fields where the header names {len(header)}")
            yield start, dict(zip(header, fields))


def load_file(path: str, id_key: str = "id", problem_key: str = "problem", answer_key: str = "answer",
              choices: ChoiceSpec | None = None) -> list[Prompt]:
    """Prompts from a .jsonl, .json (an array or JSON Lines), .parquet or .csv file."""
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"data file {p} does not exist")
    keys = (id_key, problem_key, answer_key)
    prompts: list[Prompt] = []
    if p.suffix == ".parquet":
        import pyarrow.parquet as pq

        for i, row in enumerate(pq.read_table(p).to_pylist()):
            prompts.append(_row_to_prompt(row, f"{p} row {i}", *keys, default_id=str(i), choices=choices))
    elif p.suffix == ".json" and p.read_text().lstrip().startswith("["):
        rows = json.loads(p.read_text())
        for i, row in enumerate(rows):
            prompts.append(_row_to_prompt(row, f"{p} item {i}", *keys, default_id=str(i), choices=choices))
    elif p.suffix == ".csv":
        for i, (lineno, row) in enumerate(iter_csv(p)):
            prompts.append(_row_to_prompt(row, f"{p}:{lineno}", *keys, default_id=str(i), choices=choices))
    else:  # JSON Lines
        for lineno, row in iter_jsonl(p):
            prompts.append(_row_to_prompt(row, f"{p}:{lineno}", *keys, default_id=str(lineno - 1),
                                          choices=choices))
    if not prompts:
        raise DataError(f"data file {p} holds no rows")
    return prompts


def load_hub(name: str, split: str, subset: str | None, id_key: str, problem_key: str, answer_key: str,
             choices: ChoiceSpec | None = None) -> list[Prompt]:
    import datasets

    ds = datasets.load_dataset(name, subset, split=split)
    return [_row_to_prompt(dict(row), f"{name}[{split}] index {i}", id_key, problem_key, answer_key, str(i),
                           choices=choices)
            for i, row in enumerate(ds)]


def load_prompts(data_cfg: Any) -> list[Prompt]:
    """The configured prompts (answers attached for metrics), limited by data.limit."""
    # A config saved before data.choices existed has no such key: plain rows.
    choices_cfg = getattr(data_cfg, "choices", None)
    if data_cfg.name in SYNTHETIC_TASKS and not data_cfg.local_path:
        from ttrl.data.synthetic import arithmetic_problems, choice_problems

        s = data_cfg.synthetic
        if data_cfg.name == "synthetic":
            prompts = arithmetic_problems(s.num_problems, s.terms, s.digits, s.seed)
        else:
            c = choices_cfg
            prompts = choice_problems(s.num_problems, s.terms, s.digits, s.seed, letters=c.letters,
                                      choice_seed=c.seed, instruction=c.instruction)
    elif data_cfg.local_path:
        prompts = load_file(data_cfg.local_path, data_cfg.id_key, data_cfg.problem_key, data_cfg.answer_key,
                            choices=ChoiceSpec.from_config(choices_cfg))
    else:
        prompts = load_hub(data_cfg.hf_name, data_cfg.hf_split, data_cfg.hf_subset, data_cfg.id_key,
                           data_cfg.problem_key, data_cfg.answer_key, choices=ChoiceSpec.from_config(choices_cfg))
    if data_cfg.limit:
        prompts = prompts[: data_cfg.limit]
    return prompts
