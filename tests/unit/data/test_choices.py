"""Multiple-choice data: GPQA-style rows and the synthetic sums asked as lettered questions.

What must hold: a seed fixes every row's letters on every machine (pinned
here, and checked in a fresh process with another hash salt), the answer
letter always points at the right option's text, no letter is favoured, a
row missing an option names its file, line and key, and the configs that
produce letters refuse to run without an extractor that reads them.
"""

from __future__ import annotations

import collections
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import compose_config
from ttrl.config import ConfigError
from ttrl.data.choices import ChoiceSpec, arrange, option_rng, render
from ttrl.data.loader import DataError, load_file, load_prompts
from ttrl.data.synthetic import SLIPS, arithmetic_problems, choice_problems, slipped_totals
from ttrl.labeling.extract import extract_answer
from ttrl.labeling.grade import is_equivalent

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[3]
GPQA_KEYS = ("Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3")
SPEC = ChoiceSpec("Correct Answer", GPQA_KEYS[1:], "ABCD", 0, "Answer with the letter.")

# Three rows as GPQA's columns name them, options with the stray whitespace GPQA's have.
GPQA_ROWS = [
    {"Record ID": "rec001", "Question": "Which gas do plants take in?", "Correct Answer": "Carbon dioxide\n",
     "Incorrect Answer 1": "Helium", "Incorrect Answer 2": " Neon", "Incorrect Answer 3": "Argon",
     "Explanation": "never read"},
    {"Record ID": "rec002", "Question": "What is 6 x 7?", "Correct Answer": 42,
     "Incorrect Answer 1": 36, "Incorrect Answer 2": 48, "Incorrect Answer 3": 49},
    {"Record ID": "rec008", "Question": "Which particle has no charge?", "Correct Answer": "Neutron",
     "Incorrect Answer 1": "Proton", "Incorrect Answer 2": "Electron", "Incorrect Answer 3": "Positron"},
]
# The letters choices.seed=0 gives these ids, pinned: the same on every machine and Python build.
GPQA_LETTERS = {"rec001": "C", "rec002": "A", "rec008": "B"}


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _options(problem: str, letters: str = "ABCD") -> dict[str, str]:
    """letter -> option text, read back from a rendered problem (one option per line)."""
    found = dict(re.findall(rf"^([{letters}])\) (.*)$", problem, re.MULTILINE))
    assert list(found) == list(letters), problem
    return found


def _inline_options(problem: str) -> dict[str, str]:
    """letter -> option text of a one-line synthetic problem '37+48+12= A) 97 B) 87 ...'."""
    return dict(re.findall(r"([A-J])\) (\d+)", problem))


# ── the shuffle ────────────────────────────────────────────────────────────
def test_arrange_keeps_every_option_once_and_names_the_right_ones_letter():
    for i in range(200):
        options, letter = arrange("right", ["w1", "w2", "w3"], "ABCD", option_rng(7, f"row-{i}"))
        assert sorted(options) == ["right", "w1", "w2", "w3"]
        assert options["ABCD".index(letter)] == "right"


def test_same_seed_same_letters_other_seed_other_letters():
    ids = [f"row-{i}" for i in range(50)]

    def letters(seed):
        return [arrange("r", ["a", "b", "c"], "ABCD", option_rng(seed, i)) for i in ids]

    assert letters(3) == letters(3)
    assert letters(3) != letters(4)
    # Not just a relabelling of a few rows: most rows move.
    assert sum(x != y for x, y in zip(letters(3), letters(4))) > 25


def test_a_rows_letters_depend_on_its_id_only_not_on_its_neighbours(tmp_path):
    full = load_file(str(_write_jsonl(tmp_path / "all.jsonl", GPQA_ROWS)), "Record ID", "Question", choices=SPEC)
    last = load_file(str(_write_jsonl(tmp_path / "one.jsonl", GPQA_ROWS[2:])), "Record ID", "Question",
                     choices=SPEC)
    assert last == full[2:]


_CHILD = """
import json, sys
from ttrl.data.loader import load_file
from ttrl.data.choices import ChoiceSpec
from ttrl.data.synthetic import choice_problems
spec = ChoiceSpec("Correct Answer", ("Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3"), "ABCD", 0, "")
gpqa = [p.answer for p in load_file(sys.argv[1], "Record ID", "Question", choices=spec)]
synth = [(p.problem, p.answer) for p in choice_problems(40, 3, 2, 1234, choice_seed=5)]
print(json.dumps([gpqa, synth]))
"""


def test_letters_are_the_same_in_a_fresh_process_with_another_hash_salt(tmp_path):
    path = _write_jsonl(tmp_path / "gpqa.jsonl", GPQA_ROWS)
    here = [[p.answer for p in load_file(str(path), "Record ID", "Question", choices=SPEC)],
            [[p.problem, p.answer] for p in choice_problems(40, 3, 2, 1234, choice_seed=5)]]
    for salt in ("1", "12345"):  # str hashes differ between these; the letters must not
        out = subprocess.run([sys.executable, "-c", _CHILD, str(path)], capture_output=True, text=True,
                             timeout=120, cwd=ROOT, env={**os.environ, "PYTHONHASHSEED": salt})
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout) == here


def test_no_letter_is_favoured():
    counts = collections.Counter(arrange("r", ["a", "b", "c"], "ABCD", option_rng(0, f"rec{i}"))[1]
                                 for i in range(2000))
    assert set(counts) == set("ABCD")
    assert all(400 <= n <= 600 for n in counts.values()), counts  # 500 each; 5 sigma is about 100
    synth = collections.Counter(p.answer for p in choice_problems(256, 3, 2, 1234))
    assert set(synth) == set("ABCD")
    assert all(40 <= n <= 90 for n in synth.values()), synth  # 64 each


def test_render_lists_options_one_per_line_or_on_one_line():
    assert render("Q?", ["x", "y"], "AB", "Pick one.") == "Q?\n\nA) x\nB) y\n\nPick one."
    assert render("Q?", ["x", "y"], "AB") == "Q?\n\nA) x\nB) y"
    assert render("1+2=", ["3", "4"], "AB", one_line=True) == "1+2= A) 3 B) 4"


# ── GPQA-style files ───────────────────────────────────────────────────────
def test_a_local_gpqa_file_loads_with_the_right_letters(tmp_path):
    path = _write_jsonl(tmp_path / "gpqa.jsonl", GPQA_ROWS)
    cfg = compose_config("data=gpqa_diamond", "label.extractor=choice", f"data.local_path={path}")
    prompts = load_prompts(cfg.data)
    assert [p.id for p in prompts] == ["rec001", "rec002", "rec008"]
    assert {p.id: p.answer for p in prompts} == GPQA_LETTERS
    for p, row in zip(prompts, GPQA_ROWS):
        assert p.problem.startswith(row["Question"] + "\n\nA) ")
        assert p.problem.endswith("\n\nAnswer with the letter (A, B, C or D) of the correct option.")
        options = _options(p.problem)
        # The letter points at the right option's text, stripped; the wrong ones fill the rest.
        assert options[p.answer] == str(row["Correct Answer"]).strip()
        assert sorted(options.values()) == sorted(str(row[k]).strip() for k in GPQA_KEYS)
        assert "never read" not in p.problem
        # What grading does with the reference: read it with the same extractor, compare exactly.
        assert extract_answer(p.answer, "choice") == p.answer
        assert is_equivalent(p.answer, p.answer, "choice")
        assert not is_equivalent("D" if p.answer != "D" else "A", p.answer, "choice")


def test_a_gpqa_csv_with_multi_line_questions_loads_the_same(tmp_path):
    import csv

    rows = [dict(r, Question=r["Question"].replace(" ", "\n", 1)) for r in GPQA_ROWS]
    path = tmp_path / "gpqa_diamond.csv"
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    prompts = load_file(str(path), "Record ID", "Question", choices=SPEC)
    assert {p.id: p.answer for p in prompts} == GPQA_LETTERS
    assert prompts[0].problem.startswith("Which\ngas do plants take in?\n\n")


def test_a_row_missing_an_option_names_file_line_and_key(tmp_path):
    broken = dict(GPQA_ROWS[1])
    del broken["Incorrect Answer 2"]
    path = tmp_path / "gpqa.jsonl"
    # Line 3, after a blank line that still counts.
    path.write_text(f"{json.dumps(GPQA_ROWS[0])}\n\n{json.dumps(broken)}\n")
    cfg = compose_config("data=gpqa_diamond", "label.extractor=choice", f"data.local_path={path}")
    with pytest.raises(DataError) as err:
        load_prompts(cfg.data)
    msg = str(err.value)
    assert msg.startswith(f"{path}:3: missing or empty 'Incorrect Answer 2'"), msg
    assert "data.choices.incorrect_keys" in msg


@pytest.mark.parametrize("key, value", [("Correct Answer", "  "), ("Incorrect Answer 3", None),
                                        ("Question", "")])
def test_an_empty_option_or_question_is_an_error_too(tmp_path, key, value):
    path = _write_jsonl(tmp_path / "gpqa.jsonl", [GPQA_ROWS[0], {**GPQA_ROWS[2], key: value}])
    with pytest.raises(DataError, match=re.escape(f"{path}:2: missing or empty '{key}'")):
        load_file(str(path), "Record ID", "Question", choices=SPEC)


def test_a_csv_row_with_too_few_fields_names_its_line(tmp_path):
    path = tmp_path / "short.csv"
    path.write_text('Question,Correct Answer\n"two\nlines",x\nonly one field\n')
    with pytest.raises(DataError, match=re.escape(f"{path}:4: 1 fields where the header names 2")):
        load_file(str(path), problem_key="Question", answer_key="Correct Answer")


def test_gpqa_config_reads_the_hub_columns():
    d = compose_config("data=gpqa_diamond", "label.extractor=choice").data
    assert (d.hf_name, d.hf_subset, d.hf_split, d.local_path) == ("Idavidrein/gpqa", "gpqa_diamond", "train", None)
    assert (d.id_key, d.problem_key) == ("Record ID", "Question")
    assert (d.choices.correct_key, list(d.choices.incorrect_keys)) == (GPQA_KEYS[0], list(GPQA_KEYS[1:]))
    assert (d.choices.letters, d.choices.seed) == ("ABCD", 0)


def test_the_gpqa_experiment_reads_letters():
    cfg = compose_config("experiment=ttrl_gpqa_diamond_qwen2.5-math-1.5b")
    assert (cfg.data.name, cfg.label.extractor) == ("gpqa_diamond", "choice")


# ── config checks ──────────────────────────────────────────────────────────
@pytest.mark.parametrize("overrides, key", [
    (["data=gpqa_diamond"], r"^label\.extractor=boxed cannot read the letter answers of data\.name=gpqa_diamond"),
    (["data=synthetic_choice"], r"^label\.extractor=boxed .* data\.name=synthetic_choice"),
    (["data=gpqa_diamond", "label.extractor=number"], r"^label\.extractor=number"),
    (["data=gpqa_diamond", "label.extractor=choice", "data.choices.letters=ABC"],
     r"^data\.choices\.letters='ABC' must hold one letter per option: 4"),
    (["data=gpqa_diamond", "label.extractor=choice", "data.choices.letters=ABCA"], r"^data\.choices\.letters='ABCA'"),
    (["data=gpqa_diamond", "label.extractor=choice", "data.choices.letters=abcd"], r"^data\.choices\.letters='abcd'"),
    (["data=gpqa_diamond", "label.extractor=choice", "data.choices.incorrect_keys=[]"],
     r"^data\.choices\.incorrect_keys must name"),
    (["data=gpqa_diamond", "label.extractor=choice", "data.choices.incorrect_keys=[x,x,y]"],
     r"^data\.choices\.incorrect_keys=\['x', 'x', 'y'\] must name distinct"),
    (["data=gpqa_diamond", "label.extractor=choice", "data.choices.seed=-1"], r"^data\.choices\.seed=-1"),
    (["data=jsonl", "data.local_path=x.jsonl", "data.choices.incorrect_keys=[a,b,c]"],
     r"^data\.choices\.incorrect_keys is only read with data\.choices\.correct_key set"),
    (["data=synthetic", "data.choices.correct_key=right", "data.choices.incorrect_keys=[a,b,c]"],
     r"^data\.choices\.correct_key='right' names a field of file or hub rows"),
])
def test_bad_choice_configs_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key):
        compose_config(*overrides)


def test_any_file_can_be_multiple_choice_from_the_command_line(tmp_path):
    rows = [{"q": "2+2?", "good": "4", "bad1": "5", "bad2": "22"}]
    path = _write_jsonl(tmp_path / "mc.jsonl", rows)
    cfg = compose_config("data=jsonl", f"data.local_path={path}", "data.problem_key=q", "label.extractor=choice",
                         "data.choices.correct_key=good", "data.choices.incorrect_keys=[bad1,bad2]",
                         "data.choices.letters=ABC")
    (p,) = load_prompts(cfg.data)
    assert p.id == "0"
    assert _options(p.problem, "ABC")[p.answer] == "4"


# ── the synthetic task as multiple choice ──────────────────────────────────
def test_synthetic_choice_asks_the_arithmetic_sums_with_exactly_one_right_option():
    plain = arithmetic_problems(256, 3, 2, 1234)
    mc = choice_problems(256, 3, 2, 1234)
    # At most two slips of 1 or 10 away: what the careless teacher can write for a 3-number sum.
    reachable = {a + b for a in (0, *SLIPS) for b in (0, *SLIPS)} - {0}
    for p, q in zip(plain, mc):
        assert q.problem.startswith(p.problem + " A) ")
        options = _inline_options(q.problem)
        assert list(options) == list("ABCD")
        assert q.problem == p.problem + " " + " ".join(f"{k}) {v}" for k, v in options.items())
        values = [int(v) for v in options.values()]
        total = int(p.answer)
        assert len(set(values)) == 4, q.problem
        assert [v for v in values if v == total] == [total], "exactly one right option"
        assert int(options[q.answer]) == total
        assert all(v - total in reachable and v >= 0 for v in values if v != total), q.problem
    assert len({q.id for q in mc}) == 256


def test_synthetic_choice_is_seeded_apart_from_the_sums():
    a = choice_problems(64, 3, 2, 1234, choice_seed=0)
    assert a == choice_problems(64, 3, 2, 1234, choice_seed=0)
    b = choice_problems(64, 3, 2, 1234, choice_seed=1)
    assert [p.problem.split(" ")[0] for p in a] == [p.problem.split(" ")[0] for p in b], "same sums"
    assert [p.problem for p in a] != [p.problem for p in b]
    # A longer list extends a shorter one, as for the arithmetic task.
    assert choice_problems(128, 3, 2, 1234)[:64] == a


def test_slipped_totals_never_go_below_zero_and_reach_further_when_needed():
    rng = option_rng(0, "x")
    for total in (0, 1, 5, 9):
        wrong = slipped_totals(total, 9, 1, rng)  # a 2-number sum, ten letters
        assert len(set(wrong)) == 9 and total not in wrong and min(wrong) >= 0
    ten = choice_problems(30, 2, 1, 0, letters="ABCDEFGHIJ")
    for p in ten:
        values = [int(v) for v in _inline_options(p.problem).values()]
        assert len(values) == len(set(values)) == 10
        assert int(_inline_options(p.problem)[p.answer]) == sum(int(x) for x in p.problem.split("=")[0].split("+"))


def test_arithmetic_task_is_unchanged():
    # Its warm-start cache is keyed by these problems: they must never move.
    import hashlib

    text = "\n".join(f"{p.id}\t{p.problem}\t{p.answer}" for p in arithmetic_problems(256, 3, 2, 1234))
    assert hashlib.sha256(text.encode()).hexdigest() == \
        "365b44119c8119ff7f1790e188616666ce8e69da60ab35650612af5d25964aae"


def test_debug_run_on_synthetic_choice_composes_validates_and_loads():
    cfg = compose_config("experiment=debug", "data=synthetic_choice", "label.extractor=choice")
    assert (cfg.data.name, cfg.label.extractor) == ("synthetic_choice", "choice")
    prompts = load_prompts(cfg.data)
    assert len(prompts) == cfg.data.synthetic.num_problems == 16
    assert prompts == choice_problems(16, 3, 2, 1234)
    # The one-line problem carries no instruction: the tiny models read none.
    assert all(re.fullmatch(r"\d+(\+\d+)+= A\) \d+ B\) \d+ C\) \d+ D\) \d+", p.problem) for p in prompts)
