"""Load prompts: the synthetic task, a local file, or a Hugging Face dataset.

Every row is validated as it is read: a row without a usable problem or
answer is an error naming the file and line (or the dataset index), never a
silently skipped prompt. Answers are kept on the Prompt for metrics only.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ttrl.types import Prompt


class DataError(ValueError):
    """A bad data row or file; the message names the file and line."""


def _row_to_prompt(row: Any, where: str, id_key: str, problem_key: str, answer_key: str,
                   default_id: str) -> Prompt:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    problem = row.get(problem_key)
    if not isinstance(problem, str) or not problem.strip():
        raise DataError(f"{where}: missing or empty '{problem_key}' (set data.problem_key if it is named differently)")
    answer = row.get(answer_key)
    if answer is None or (isinstance(answer, str) and not answer.strip()):
        raise DataError(f"{where}: missing or empty '{answer_key}' (set data.answer_key if it is named differently)")
    if isinstance(answer, (int, float)):
        answer = str(answer)
    if not isinstance(answer, str):
        raise DataError(f"{where}: '{answer_key}' must be a string or number, got {type(answer).__name__}")
    return Prompt(id=str(row.get(id_key, default_id)), problem=problem, answer=answer.strip())


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


def load_file(path: str, id_key: str = "id", problem_key: str = "problem", answer_key: str = "answer") -> list[Prompt]:
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"data file {p} does not exist")
    keys = (id_key, problem_key, answer_key)
    prompts: list[Prompt] = []
    if p.suffix == ".parquet":
        import pyarrow.parquet as pq

        for i, row in enumerate(pq.read_table(p).to_pylist()):
            prompts.append(_row_to_prompt(row, f"{p} row {i}", *keys, default_id=str(i)))
    elif p.suffix == ".json" and p.read_text().lstrip().startswith("["):
        rows = json.loads(p.read_text())
        for i, row in enumerate(rows):
            prompts.append(_row_to_prompt(row, f"{p} item {i}", *keys, default_id=str(i)))
    else:  # JSON Lines
        for lineno, row in iter_jsonl(p):
            prompts.append(_row_to_prompt(row, f"{p}:{lineno}", *keys, default_id=str(lineno - 1)))
    if not prompts:
        raise DataError(f"data file {p} holds no rows")
    return prompts


def load_hub(name: str, split: str, subset: str | None, id_key: str, problem_key: str, answer_key: str) -> list[Prompt]:
    import datasets

    ds = datasets.load_dataset(name, subset, split=split)
    return [_row_to_prompt(dict(row), f"{name}[{split}] index {i}", id_key, problem_key, answer_key, str(i))
            for i, row in enumerate(ds)]


def load_prompts(data_cfg: Any) -> list[Prompt]:
    """The configured prompts (answers attached for metrics), limited by data.limit."""
    if data_cfg.name == "synthetic" and not data_cfg.local_path:
        from ttrl.data.synthetic import arithmetic_problems

        s = data_cfg.synthetic
        prompts = arithmetic_problems(s.num_problems, s.terms, s.digits, s.seed)
    elif data_cfg.local_path:
        prompts = load_file(data_cfg.local_path, data_cfg.id_key, data_cfg.problem_key, data_cfg.answer_key)
    else:
        prompts = load_hub(data_cfg.hf_name, data_cfg.hf_split, data_cfg.hf_subset, data_cfg.id_key,
                           data_cfg.problem_key, data_cfg.answer_key)
    if data_cfg.limit:
        prompts = prompts[: data_cfg.limit]
    return prompts
