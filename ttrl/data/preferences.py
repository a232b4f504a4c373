"""Preference pairs and graded responses for reward-model training (SER).

Three sources, one shape:
- a local JSON Lines / JSON / parquet file, or a Hugging Face dataset, with
  configurable `prompt`, `chosen`, `rejected` fields (presets for HH-RLHF,
  UltraFeedback binarized, Summarize-from-feedback and StackExchange live in
  conf/ser/); every row is validated as it is read, and a bad one is an error
  naming the file and line (or the dataset index), never a skipped row;
- the synthetic preference task, generated here for CPU runs and tests:
  a correct vs a wrong answer to the arithmetic problems of
  ttrl/data/synthetic.py. The wrong answer is a plausible slip (off by 1 or
  2 in the units, by 10 in the tens, by 100, two digits swapped, a dropped
  carry) with the same number of digits as the right one and drawn so that
  it is above the right answer as often as below: length, position and
  "bigger/smaller" carry no signal, only the sum does;
- for the pointwise SER variant, graded (problem, response, correct) items.

`PreferencePair.chosen` is the better response. SER hides which one that is
for its unlabelled pool with `unordered()`, which shuffles each pair into an
(a, b) order and keeps the truth for metrics only. Pure Python: nothing
here imports torch, ray, vllm or deepspeed.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ttrl.data.loader import DataError, iter_jsonl
from ttrl.data.synthetic import format_completion, format_problem
from ttrl.labeling.extract import extract_answer

__all__ = [
    "DataError",
    "PointItem",
    "PreferencePair",
    "UnorderedPair",
    "grade_points",
    "load_point_file",
    "load_preference_file",
    "load_preference_hub",
    "load_preferences",
    "row_to_pair",
    "row_to_point",
    "split_pairs",
    "synthetic_points",
    "synthetic_preferences",
    "unordered",
    "worked_solution",
    "wrong_answer",
]


@dataclass(frozen=True)
class PreferencePair:
    """One labelled comparison: `chosen` is preferred to `rejected` for `prompt`."""

    id: str
    prompt: str
    chosen: str
    rejected: str


@dataclass(frozen=True)
class UnorderedPair:
    """A pair as SER sees its unlabelled pool: two responses, order random.

    `a_better` is the hidden truth (metrics only; None when unknown).
    """

    id: str
    prompt: str
    a: str
    b: str
    a_better: bool | None = None

    def as_labelled(self, a_better: bool) -> PreferencePair:
        """The pair with `a_better` deciding chosen/rejected (a self-label or the truth)."""
        return PreferencePair(self.id, self.prompt, self.a if a_better else self.b, self.b if a_better else self.a)


@dataclass(frozen=True)
class PointItem:
    """One (problem, response) for the pointwise variant.

    `answer` is the problem's ground truth (None when unknown); `correct` is
    the response's label: graded against `answer` (`grade_points`) or, in SER,
    the reward model's self-label.
    """

    id: str
    prompt: str
    response: str
    answer: str | None = None
    correct: bool | None = None


# ── rows from files and the hub ────────────────────────────────────────────
def _text(value: Any, key: str, where: str) -> str:
    """A field as text: a string, or a chat message list (the last assistant turn's content)."""
    if isinstance(value, list):
        turns = [m for m in value if isinstance(m, dict) and isinstance(m.get("content"), str)]
        assistant = [m for m in turns if m.get("role") == "assistant"]
        pick = assistant[-1] if assistant else (turns[-1] if turns else None)
        if pick is None:
            raise DataError(f"{where}: '{key}' is a list but holds no message with a string 'content'")
        value = pick["content"]
    if not isinstance(value, str):
        raise DataError(f"{where}: '{key}' must be a string or a list of chat messages, got {type(value).__name__}")
    return value


def _prompt_text(value: Any, key: str, where: str) -> str:
    """A prompt field: a string, or chat messages (all turns but a final assistant one, joined)."""
    if isinstance(value, list):
        turns = [m for m in value if isinstance(m, dict) and isinstance(m.get("content"), str)]
        if not turns:
            raise DataError(f"{where}: '{key}' is a list but holds no message with a string 'content'")
        return "\n\n".join(m["content"] for m in turns)
    if not isinstance(value, str):
        raise DataError(f"{where}: '{key}' must be a string, got {type(value).__name__}")
    return value


def _split_on(text: str, marker: str, key: str, where: str) -> tuple[str, str]:
    i = text.rfind(marker)
    if i < 0:
        raise DataError(f"{where}: '{key}' does not contain the prompt marker {marker!r} (ser.prompt_marker)")
    return text[: i + len(marker)], text[i + len(marker):]


def row_to_pair(row: Any, where: str, prompt_key: str | None = "prompt", chosen_key: str = "chosen",
                rejected_key: str = "rejected", prompt_marker: str | None = None,
                default_id: str = "0", id_key: str = "id") -> PreferencePair:
    """Validate one row and make it a pair; DataError names `where` and the field.

    Without a prompt field (`prompt_key` None, e.g. HH-RLHF), chosen and
    rejected are whole conversations: the prompt is everything up to and
    including the last `prompt_marker` ("\\n\\nAssistant:"), which must be
    the same in both.
    """
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    for key in (chosen_key, rejected_key) + ((prompt_key,) if prompt_key else ()):
        if key not in row or row[key] is None:
            raise DataError(f"{where}: missing field '{key}' (set ser.{_which(key, prompt_key, chosen_key)} "
                            f"if it is named differently); fields present: {sorted(row)}")
    chosen = _text(row[chosen_key], chosen_key, where)
    rejected = _text(row[rejected_key], rejected_key, where)
    if prompt_key:
        prompt = _prompt_text(row[prompt_key], prompt_key, where)
        if isinstance(row[chosen_key], list) and prompt and chosen.startswith(prompt):
            chosen = chosen[len(prompt):]
    elif prompt_marker:
        prompt, chosen = _split_on(chosen, prompt_marker, chosen_key, where)
        prompt_r, rejected = _split_on(rejected, prompt_marker, rejected_key, where)
        if prompt_r != prompt:
            raise DataError(f"{where}: '{chosen_key}' and '{rejected_key}' differ before the last "
                            f"{prompt_marker!r}: they must share the prompt")
    else:
        raise DataError(f"{where}: no prompt: set ser.prompt_key, or ser.prompt_marker for whole conversations")
    if not chosen.strip() or not rejected.strip():
        empty = chosen_key if not chosen.strip() else rejected_key
        raise DataError(f"{where}: '{empty}' is empty")
    if chosen == rejected:
        raise DataError(f"{where}: '{chosen_key}' and '{rejected_key}' are identical: nothing to prefer")
    return PreferencePair(str(row.get(id_key, default_id)), prompt, chosen, rejected)


def _which(key: str, prompt_key: str | None, chosen_key: str) -> str:
    return "prompt_key" if key == prompt_key else ("chosen_key" if key == chosen_key else "rejected_key")


def load_preference_file(path: str, **keys: Any) -> list[PreferencePair]:
    """Pairs from a .jsonl (default), .json (a list) or .parquet file; errors name file and line."""
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"preference file {p} does not exist")
    pairs: list[PreferencePair] = []
    if p.suffix == ".parquet":
        import pyarrow.parquet as pq

        for i, row in enumerate(pq.read_table(p).to_pylist()):
            pairs.append(row_to_pair(row, f"{p} row {i}", default_id=str(i), **keys))
    elif p.suffix == ".json" and p.read_text().lstrip().startswith("["):
        for i, row in enumerate(json.loads(p.read_text())):
            pairs.append(row_to_pair(row, f"{p} item {i}", default_id=str(i), **keys))
    else:
        for lineno, row in iter_jsonl(p):
            pairs.append(row_to_pair(row, f"{p}:{lineno}", default_id=str(lineno - 1), **keys))
    if not pairs:
        raise DataError(f"preference file {p} holds no rows")
    return pairs


def load_preference_hub(name: str, split: str, subset: str | None = None, data_dir: str | None = None,
                        limit: int | None = None, **keys: Any) -> list[PreferencePair]:
    """Pairs from a Hugging Face dataset (downloaded by `datasets`, or read from its cache)."""
    import datasets

    ds = datasets.load_dataset(name, subset, split=split, data_dir=data_dir)
    if limit:
        ds = ds.select(range(min(limit, len(ds))))
    return [row_to_pair(dict(row), f"{name}[{split}] index {i}", default_id=str(i), **keys)
            for i, row in enumerate(ds)]


def _keys(s: Any) -> dict[str, Any]:
    return {"prompt_key": s.prompt_key, "chosen_key": s.chosen_key, "rejected_key": s.rejected_key,
            "prompt_marker": s.prompt_marker}


def load_preferences(s: Any, seed: int = 0) -> tuple[list[PreferencePair], list[PreferencePair], list[PreferencePair]]:
    """(train, held-out, test) pairs from the `ser` config section.

    The held-out pairs come from `ser.eval_split` (hub) or `ser.eval_path`
    (file) when set, else from `ser.eval_fraction` of the data (a seeded
    split by pair, never shared with training). Only the synthetic task has
    a separate test split (`ser.synthetic_num_test`): held-out pairs pick
    SER's best round, test pairs measure it without that selection bias.
    """
    held: list[PreferencePair] | None = None
    if s.source == "synthetic":
        n, n_eval = s.synthetic_num_pairs, s.synthetic_num_eval
        pairs = synthetic_preferences(n + n_eval + s.synthetic_num_test, s.synthetic_terms,
                                      s.synthetic_digits, s.synthetic_seed, s.synthetic_style)
        return pairs[:n], pairs[n:n + n_eval], pairs[n + n_eval:]
    if s.source == "jsonl":
        pairs = load_preference_file(s.local_path, **_keys(s))
        if s.eval_path:
            held = load_preference_file(s.eval_path, **_keys(s))
    elif s.source == "hf":
        pairs = load_preference_hub(s.hf_name, s.hf_split, s.hf_subset, s.hf_data_dir, s.limit, **_keys(s))
        if s.eval_split:
            held = load_preference_hub(s.hf_name, s.eval_split, s.hf_subset, s.hf_data_dir, s.limit, **_keys(s))
    else:
        raise DataError(f"ser.source={s.source!r} is not one of synthetic, jsonl, hf")
    if s.limit:
        pairs = pairs[: s.limit]
    if held is None:
        pairs, held = split_pairs(pairs, s.eval_fraction, seed)
    return pairs, held, []


def split_pairs(pairs: list[PreferencePair], fraction: float, seed: int) -> tuple[list, list]:
    """A seeded (rest, held-out) split; the held-out share is `fraction` (at least one pair)."""
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    n_held = max(1, round(fraction * len(pairs))) if fraction > 0 else 0
    held = sorted(order[:n_held])
    held_set = set(held)
    return [p for i, p in enumerate(pairs) if i not in held_set], [pairs[i] for i in held]


def unordered(pairs: list[PreferencePair], seed: int) -> list[UnorderedPair]:
    """Each pair in a random (a, b) order; the truth stays in `a_better` (metrics only)."""
    rng = random.Random(seed)
    out = []
    for p in pairs:
        a_better = rng.random() < 0.5
        a, b = (p.chosen, p.rejected) if a_better else (p.rejected, p.chosen)
        out.append(UnorderedPair(p.id, p.prompt, a, b, a_better))
    return out


# ── the synthetic preference task ──────────────────────────────────────────
_SLIPS = ("units_1", "units_2", "tens", "hundreds", "swap", "carry")


def _dropped_carry(nums: tuple[int, ...]) -> int | None:
    """The sum written digit by digit with one carry forgotten (a classic slip)."""
    width = max(len(str(n)) for n in nums)
    digits = [[(n // 10**i) % 10 for n in nums] for i in range(width)]
    out, carry, dropped = 0, 0, False
    for i, col in enumerate(digits):
        total = sum(col) + carry
        carry = total // 10
        if carry and not dropped and i < width - 1:
            carry, dropped = 0, True
        out += (total % 10) * 10**i
    out += carry * 10**width
    return out if dropped else None


def wrong_answer(nums: tuple[int, ...], rng: random.Random, slips: tuple[str, ...] = _SLIPS) -> int:
    """A plausible wrong sum of `nums` with as many digits as the right one."""
    right = sum(nums)
    n_digits = len(str(right))
    for _ in range(100):
        slip = rng.choice(slips)
        sign = rng.choice((-1, 1))
        if slip == "units_1":
            w = right + sign
        elif slip == "units_2":
            w = right + 2 * sign
        elif slip == "tens":
            w = right + 10 * sign
        elif slip == "hundreds":
            w = right + 100 * sign
        elif slip == "swap":
            s = list(str(right))
            i = rng.randrange(len(s) - 1) if len(s) > 1 else 0
            if len(s) < 2 or s[i] == s[i + 1]:
                continue
            s[i], s[i + 1] = s[i + 1], s[i]
            w = int("".join(s))
        else:  # carry
            c = _dropped_carry(nums)
            if c is None:
                continue
            w = c
        if w != right and w >= 0 and len(str(w)) == n_digits and not (n_digits > 1 and str(w)[0] == "0"):
            return w
    return right + 1 if len(str(right + 1)) == n_digits else right - 1


def _problems(num: int, terms: int, digits: int, seed: int) -> list[tuple[int, ...]]:
    rng = random.Random(seed)
    lo, hi = (10 ** (digits - 1) if digits > 1 else 0), 10**digits - 1
    space = (hi - lo + 1) ** terms
    if num > space:
        raise DataError(f"synthetic preferences: only {space} distinct problems exist, {num} asked for")
    seen: set[tuple[int, ...]] = set()
    out = []
    while len(out) < num:
        nums = tuple(rng.randint(lo, hi) for _ in range(terms))
        if nums not in seen:
            seen.add(nums)
            out.append(nums)
    return out


def worked_solution(nums: tuple[int, ...], rng: random.Random | None = None, slip_at: int | None = None) -> str:
    """'37+48=85,85+12=97 \\boxed{97}': one number at a time, then the boxed total.

    With `slip_at` = k, step k's sum is a plausible slip (a dropped carry,
    off by 1 or 10, two digits swapped) and the later steps go on, correctly,
    from the wrong running total, so the boxed answer is wrong too. The same
    format as the worked solutions of ttrl/data/synthetic.py.
    """
    total, steps = nums[0], []
    for k, x in enumerate(nums[1:]):
        s = total + x
        if k == slip_at and rng is not None:
            s = wrong_answer((total, x), rng, slips=("units_1", "tens", "swap", "carry"))
        steps.append(f"{total}+{x}={s}")
        total = s
    return ",".join(steps) + " " + format_completion(str(total))


def _wrong_worked(nums: tuple[int, ...], right: str, rng: random.Random) -> str:
    """A worked solution with one slip, as long as the right one, with a wrong final answer."""
    for _ in range(100):
        text = worked_solution(nums, rng, slip_at=rng.randrange(len(nums) - 1))
        if len(text) == len(right) and extract_answer(text) != str(sum(nums)):
            return text
    return worked_solution(nums, rng, slip_at=len(nums) - 2)


def synthetic_preferences(num_pairs: int, terms: int = 3, digits: int = 2, seed: int = 7,
                          style: str = "boxed") -> list[PreferencePair]:
    """`num_pairs` pairs on distinct problems, a right and a plausibly wrong response each.

    style "boxed": chosen '\\boxed{right}', rejected '\\boxed{wrong}'; style
    "worked": worked solutions ('37+48=85,85+12=97 \\boxed{97}'), the rejected
    one with a slip in one step carried through to its answer. The prompt is
    the problem text ("37+48+12="), the responses what the policy writes after
    it, so the reward model reads exactly what a policy sample looks like.
    Wrong answers are above and below the right one equally often (a coin
    decides the direction of every slip) and as long as the right ones.
    """
    if style not in ("boxed", "worked"):
        raise DataError(f"synthetic preferences: style={style!r} is not one of boxed, worked")
    rng = random.Random(seed + 1)
    out = []
    for i, nums in enumerate(_problems(num_pairs, terms, digits, seed)):
        if style == "worked":
            right = worked_solution(nums)
            wrong = _wrong_worked(nums, right, rng)
        else:
            right, wrong = format_completion(str(sum(nums))), format_completion(str(wrong_answer(nums, rng)))
        out.append(PreferencePair(f"pref-{i}", format_problem(nums), right, wrong))
    return out


def synthetic_points(num_problems: int, per_problem: int = 2, terms: int = 3, digits: int = 2,
                     seed: int = 7, correct_share: float = 0.5, style: str = "boxed") -> list[PointItem]:
    """Responses to the arithmetic problems, each right with probability `correct_share`, with
    the ground-truth answer attached and graded by `grade_points` (not by construction)."""
    rng = random.Random(seed + 2)
    out = []
    for i, nums in enumerate(_problems(num_problems, terms, digits, seed)):
        for j in range(per_problem):
            ok = rng.random() < correct_share
            if style == "worked":
                right = worked_solution(nums)
                text = right if ok else _wrong_worked(nums, right, rng)
            else:
                text = format_completion(str(sum(nums) if ok else wrong_answer(nums, rng)))
            out.append(PointItem(f"point-{i}-{j}", format_problem(nums), text, str(sum(nums))))
    return grade_points(out)


def grade_points(items: list[PointItem]) -> list[PointItem]:
    """Label each item by its answer: the response's last \\boxed{} equivalent to the ground truth."""
    from dataclasses import replace

    from ttrl.labeling.grade import is_equivalent

    out = []
    for it in items:
        if it.answer is None:
            out.append(it)
            continue
        pred = extract_answer(it.response)
        out.append(replace(it, correct=pred is not None and is_equivalent(pred, it.answer)))
    return out


def row_to_point(row: Any, where: str, prompt_key: str = "problem", response_key: str = "response",
                 answer_key: str = "answer", default_id: str = "0", id_key: str = "id") -> PointItem:
    """Validate one pointwise row (problem, response, ground-truth answer); errors name `where`."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    vals = {}
    for key, what in ((prompt_key, "prompt_key"), (response_key, "response_key"), (answer_key, "answer_key")):
        v = row.get(key)
        if isinstance(v, (int, float)) and key == answer_key:
            v = str(v)
        if not isinstance(v, str) or (key != response_key and not v.strip()):
            raise DataError(f"{where}: missing or empty '{key}' (set ser.{what} if it is named differently)")
        vals[key] = v
    return PointItem(str(row.get(id_key, default_id)), vals[prompt_key], vals[response_key], vals[answer_key].strip())


def load_point_file(path: str, **keys: Any) -> list[PointItem]:
    """Graded (problem, response, answer) items from a .jsonl file; errors name file and line."""
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"pointwise data file {p} does not exist")
    items = [row_to_point(row, f"{p}:{lineno}", default_id=str(lineno - 1), **keys) for lineno, row in iter_jsonl(p)]
    if not items:
        raise DataError(f"pointwise data file {p} holds no rows")
    return grade_points(items)
