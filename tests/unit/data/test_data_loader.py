"""Prompts in: the shipped benchmark files, the loader's row checks, the
synthetic task and the prompt sampler.

The benchmark tests read ../shared/data (skipped when it is absent) and pin
what SOURCES.md promises: the row counts, unique ids, and answers that the
labeling pipeline can read back and grade. A malformed file must fail loudly,
naming the file and line, never train on a silently shortened set.
"""

from __future__ import annotations

import itertools
import json
import random
import re
from pathlib import Path

import pytest

from tests.conftest import compose_config
from ttrl.config import ConfigError
from ttrl.data.loader import DataError, load_file, load_prompts
from ttrl.data.sampler import PromptSampler
from ttrl.data.synthetic import SLIPS, arithmetic_problems, easy_stream, scratchpad
from ttrl.data.templates import render_prompt
from ttrl.labeling.extract import extract_answer
from ttrl.labeling.grade import is_equivalent

pytestmark = pytest.mark.unit

# Rows per file, as ../shared/data/SOURCES.md lists them.
BENCHMARKS = {"aime24": 30, "amc": 83, "math500": 500}


# ── the shipped benchmark files ────────────────────────────────────────────
@pytest.fixture(scope="module")
def benchmark_prompts():
    """file name -> prompts, loaded once (MATH-500 is the slow one)."""
    cache: dict[str, list] = {}

    def get(shared: Path, name: str):
        if name not in cache:
            cache[name] = load_file(str(shared / f"{name}.jsonl"))
        return cache[name]

    return get


@pytest.mark.parametrize("name, rows", BENCHMARKS.items())
def test_benchmark_files_hold_what_sources_md_says(shared_data, benchmark_prompts, name, rows):
    prompts = benchmark_prompts(shared_data, name)
    assert len(prompts) == rows
    assert len({p.id for p in prompts}) == rows, "ids are unique"
    assert len({p.problem for p in prompts}) == rows, "no problem appears twice"
    assert all(p.problem.strip() and p.answer and p.answer.strip() for p in prompts)
    assert all(p.answer == p.answer.strip() for p in prompts)


@pytest.mark.parametrize("name", BENCHMARKS)
def test_every_answer_reads_back_and_grades(shared_data, benchmark_prompts, name):
    from math_verify import parse

    for p in benchmark_prompts(shared_data, name):
        # A model that writes exactly the reference answer in \boxed{} has it
        # extracted intact (balanced braces) and graded equivalent to itself.
        boxed = f"So the answer is \\boxed{{{p.answer}}}."
        assert extract_answer(boxed) == p.answer, p.id
        assert is_equivalent(p.answer, p.answer), p.id
        # math-verify understands every reference (including \text{Evelyn}).
        assert parse(boxed), f"{p.id}: math-verify cannot parse {p.answer!r}"


def test_aime_answers_are_integers_and_leading_zeros_do_not_matter(shared_data, benchmark_prompts):
    prompts = benchmark_prompts(shared_data, "aime24")
    assert all(p.answer.isdigit() and 0 <= int(p.answer) <= 999 for p in prompts)
    padded = [p for p in prompts if p.answer.startswith("0")]
    assert padded, 'SOURCES.md: "some with leading zeros"'
    # A model answering 25 to a reference of "025" is right.
    assert all(is_equivalent(str(int(p.answer)), p.answer) for p in padded)


def test_amc_float_answers_match_integer_predictions(shared_data, benchmark_prompts):
    prompts = benchmark_prompts(shared_data, "amc")
    # SOURCES.md: answers in float form ("142.0"); a model writes "142".
    assert all(re.fullmatch(r"-?\d+\.0", p.answer) for p in prompts)
    assert all(is_equivalent(str(int(float(p.answer))), p.answer) for p in prompts)


def test_math500_ids_are_the_original_math_file_names(shared_data, benchmark_prompts):
    prompts = benchmark_prompts(shared_data, "math500")
    assert prompts[0].id == "test/precalculus/807.json"  # original row order kept
    assert all(re.fullmatch(r"test/[a-z_]+/\d+\.json", p.id) for p in prompts)


@pytest.mark.parametrize("name", BENCHMARKS)
def test_benchmark_configs_load_the_shared_file(shared_data, benchmark_prompts, name):
    # data.local_path replaces the hub download; the configs' keys fit the file.
    extra = ["data.id_key=id"] if name == "math500" else []  # see conf/data/math500.yaml
    cfg = compose_config(f"data={name}", f"data.local_path={shared_data / f'{name}.jsonl'}", *extra)
    assert load_prompts(cfg.data) == benchmark_prompts(shared_data, name)


def test_math500_config_without_the_id_override_still_loads(shared_data, benchmark_prompts):
    # The hub names the id `unique_id`; the shared file calls it `id`. Problems
    # and answers load regardless; only the ids fall back to row numbers.
    cfg = compose_config("data=math500", f"data.local_path={shared_data / 'math500.jsonl'}")
    prompts = load_prompts(cfg.data)
    expected = benchmark_prompts(shared_data, "math500")
    assert [(p.problem, p.answer) for p in prompts] == [(p.problem, p.answer) for p in expected]
    assert len({p.id for p in prompts}) == 500


def test_data_limit_keeps_the_first_rows(shared_data, benchmark_prompts):
    cfg = compose_config("data=amc", f"data.local_path={shared_data / 'amc.jsonl'}", "data.limit=5")
    assert load_prompts(cfg.data) == benchmark_prompts(shared_data, "amc")[:5]
    # A limit above the row count is no error: all rows.
    cfg = compose_config("data=aime24", f"data.local_path={shared_data / 'aime24.jsonl'}", "data.limit=1000")
    assert len(load_prompts(cfg.data)) == 30
    with pytest.raises(ConfigError, match=r"data\.limit=0"):
        compose_config("data=amc", f"data.local_path={shared_data / 'amc.jsonl'}", "data.limit=0")


# ── file formats ───────────────────────────────────────────────────────────
ROWS = [
    {"id": "a", "problem": "1+1=", "answer": "2"},
    {"id": "b", "problem": "Half of 1?", "answer": "\\frac{1}{2}"},
    {"id": "c", "problem": "3*4=", "answer": 12},  # numbers become strings
    {"id": "d", "problem": "0.5+1=", "answer": 1.5},
]
EXPECTED = [("a", "1+1=", "2"), ("b", "Half of 1?", "\\frac{1}{2}"), ("c", "3*4=", "12"), ("d", "0.5+1=", "1.5")]


def _triples(prompts):
    return [(p.id, p.problem, p.answer) for p in prompts]


def test_jsonl_loads_and_skips_blank_lines(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in ROWS[:2]) + "\n\n   \n" + "\n".join(json.dumps(r) for r in ROWS[2:]) + "\n")
    assert _triples(load_file(str(path))) == EXPECTED


def test_json_array_loads(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(ROWS, indent=2))
    assert _triples(load_file(str(path))) == EXPECTED


def test_parquet_loads(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "rows.parquet"
    # Parquet columns have one type: answers as strings, as `datasets` exports them.
    pq.write_table(pa.Table.from_pylist([{**r, "answer": str(r["answer"])} for r in ROWS]), path)
    assert _triples(load_file(str(path))) == EXPECTED


def test_custom_field_names_and_missing_ids(tmp_path):
    # A hub-style export: other column names, no id column (rows numbered from 0).
    path = tmp_path / "gsm.jsonl"
    path.write_text("\n".join(json.dumps({"question": r["problem"], "final": r["answer"]}) for r in ROWS))
    prompts = load_file(str(path), id_key="id", problem_key="question", answer_key="final")
    assert _triples(prompts) == [(str(i), q, a) for i, (_, q, a) in enumerate(EXPECTED)]
    cfg = compose_config("data=jsonl", f"data.local_path={path}", "data.problem_key=question",
                         "data.answer_key=final")
    assert load_prompts(cfg.data) == prompts


# ── malformed files fail loudly, naming the file and line ──────────────────
GOOD = json.dumps({"id": "0", "problem": "1+1=", "answer": "2"})
BAD_LINES = {
    "bad JSON": ('{"id": "1", "problem": "2+2=", "answer": "4"', "not valid JSON"),
    "missing problem": (json.dumps({"id": "1", "answer": "4"}), "'problem'"),
    "missing answer": (json.dumps({"id": "1", "problem": "2+2="}), "'answer'"),
    "empty answer": (json.dumps({"id": "1", "problem": "2+2=", "answer": "  "}), "'answer'"),
    "null answer": (json.dumps({"id": "1", "problem": "2+2=", "answer": None}), "'answer'"),
    "empty problem": (json.dumps({"id": "1", "problem": "", "answer": "4"}), "'problem'"),
    "list answer": (json.dumps({"id": "1", "problem": "2+2=", "answer": ["4"]}), "'answer'"),
    "non-object row": (json.dumps(["2+2=", "4"]), "JSON object"),
    "bare string row": (json.dumps("2+2=4"), "JSON object"),
}


@pytest.mark.parametrize("bad, reason", BAD_LINES.values(), ids=BAD_LINES.keys())
def test_a_bad_jsonl_row_names_file_and_line(tmp_path, bad, reason):
    path = tmp_path / "broken.jsonl"
    # Line 4 (after a blank line, which still counts: editors number it).
    path.write_text(f"{GOOD}\n{GOOD}\n\n{bad}\n{GOOD}\n")
    with pytest.raises(DataError) as err:
        load_file(str(path))
    msg = str(err.value)
    assert f"{path}:4:" in msg, msg
    assert reason in msg, msg
    assert "\n" not in msg


def test_a_bad_row_names_the_item_in_json_and_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"id": "0", "problem": "1+1=", "answer": "2"}, {"id": "1", "problem": "2+2=", "answer": ""}]
    as_json = tmp_path / "broken.json"
    as_json.write_text(json.dumps(rows))
    with pytest.raises(DataError, match=re.escape(f"{as_json} item 1")):
        load_file(str(as_json))
    as_parquet = tmp_path / "broken.parquet"
    pq.write_table(pa.Table.from_pylist(rows), as_parquet)
    with pytest.raises(DataError, match=re.escape(f"{as_parquet} row 1")):
        load_file(str(as_parquet))


def test_missing_and_empty_files_are_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_file(str(tmp_path / "nope.jsonl"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match=re.escape(f"{empty} holds no rows")):
        load_file(str(empty))


# ── prompt templates ───────────────────────────────────────────────────────
class _RecordingTokenizer:
    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        assert tokenize is False and add_generation_prompt is True
        return json.dumps(messages)


def test_chat_presets_send_the_system_prompt_and_the_bare_problem():
    model = compose_config("model=qwen2.5-math-1.5b").model
    messages = json.loads(render_prompt("What is 1+1?", model, _RecordingTokenizer()))
    assert messages == [
        {"role": "system", "content": "Please reason step by step, and put your final answer within \\boxed{}."},
        {"role": "user", "content": "What is 1+1?"},
    ]


def test_plain_preset_asks_for_a_boxed_answer():
    model = compose_config("model=plain", "model.path=Qwen/Qwen2.5-Math-1.5B").model
    text = render_prompt("What is 1+1?", model)
    assert "What is 1+1?" in text and "\\boxed{}" in text
    assert not text.endswith(" "), "a trailing space starts BPE models off-distribution"


# ── the synthetic task ─────────────────────────────────────────────────────
def test_synthetic_is_deterministic_by_seed():
    a = arithmetic_problems(64, terms=3, digits=2, seed=7)
    assert a == arithmetic_problems(64, terms=3, digits=2, seed=7)
    assert _triples(a) != _triples(arithmetic_problems(64, terms=3, digits=2, seed=8))
    # A longer list extends a shorter one: num_problems does not reshuffle.
    assert arithmetic_problems(128, terms=3, digits=2, seed=7)[:64] == a


@pytest.mark.parametrize("terms, digits", [(2, 1), (3, 2), (4, 3)])
def test_synthetic_problems_are_distinct_and_answers_correct(terms, digits):
    prompts = arithmetic_problems(50, terms=terms, digits=digits, seed=0)
    assert len(prompts) == 50
    assert len({p.problem for p in prompts}) == 50
    assert len({p.id for p in prompts}) == 50
    for p in prompts:
        assert p.problem.endswith("=")
        nums = [int(x) for x in p.problem[:-1].split("+")]
        assert len(nums) == terms
        assert all(len(str(n)) == digits for n in nums), p.problem
        assert p.answer == str(sum(nums))


def test_synthetic_uses_the_whole_space_and_refuses_more():
    # One 1-digit term: exactly 10 problems exist.
    prompts = arithmetic_problems(10, terms=1, digits=1, seed=0)
    assert sorted(int(p.answer) for p in prompts) == list(range(10))
    with pytest.raises(ValueError, match="only 10 distinct problems"):
        arithmetic_problems(11, terms=1, digits=1, seed=0)


def test_synthetic_config_loads_through_load_prompts():
    cfg = compose_config("data=synthetic", "data.synthetic.num_problems=20", "data.synthetic.seed=3")
    assert load_prompts(cfg.data) == arithmetic_problems(20, cfg.data.synthetic.terms, cfg.data.synthetic.digits, 3)


def _steps(solution: str) -> tuple[list[tuple[int, int, int]], int]:
    body, boxed = solution.split(" \\boxed{")
    steps = [tuple(int(x) for x in st.replace("=", "+").split("+")) for st in body.split(",")]
    return steps, int(boxed.rstrip("}"))


def test_scratchpad_adds_one_number_at_a_time_and_boxes_the_total():
    assert scratchpad((37, 48, 12)) == "37+48=85,85+12=97 \\boxed{97}"
    assert extract_answer(scratchpad((5, 6))) == "11"


def test_careless_scratchpad_slips_by_the_named_amounts_and_carries_the_slip_through():
    rng = random.Random(0)
    wrong, n = 0, 2000
    for _ in range(n):
        nums = tuple(rng.randint(10, 99) for _ in range(3))
        steps, boxed = _steps(scratchpad(nums, slip=0.3, rng=rng))
        # Each step starts from what the previous one wrote, and the box holds the last total.
        assert [a for a, _, _ in steps] == [nums[0], steps[0][2]]
        assert [b for _, b, _ in steps] == list(nums[1:])
        assert boxed == steps[-1][2]
        for a, b, total in steps:
            assert total - (a + b) in (0, *SLIPS)
        wrong += boxed != sum(nums)
    # Two steps, each wrong 30% of the time (two slips can cancel): about 1 - 0.7^2.
    assert 0.45 < wrong / n < 0.55


def test_easy_stream_never_yields_a_test_problem_and_is_seeded():
    test = {p.problem for p in arithmetic_problems(200, terms=3, digits=2, seed=1)}
    pairs = list(itertools.islice(easy_stream(3, 2, 0.5, seed=4, exclude=test, slip=0.3), 3000))
    assert not {p for p, _ in pairs} & test
    assert {len(p[:-1].split("+")) for p, _ in pairs} == {2, 3}
    assert pairs[:50] == list(itertools.islice(easy_stream(3, 2, 0.5, seed=4, exclude=test, slip=0.3), 50))


# ── the sampler ────────────────────────────────────────────────────────────
def _epoch(sampler: PromptSampler) -> list[list[int]]:
    return [sampler.next_batch() for _ in range(sampler.steps_per_epoch())]


@pytest.mark.parametrize("n, batch", [(12, 4), (500, 32), (83, 8), (30, 8), (7, 7)])
def test_sampler_epoch_covers_each_prompt_at_most_once(n, batch):
    s = PromptSampler(n, batch, shuffle=True, seed=0)
    assert s.steps_per_epoch() == n // batch
    for _ in range(3):
        batches = _epoch(s)
        assert all(len(b) == batch for b in batches)
        seen = [i for b in batches for i in b]
        assert len(seen) == len(set(seen)) == (n // batch) * batch
        assert set(seen) <= set(range(n))
        if n % batch == 0:
            assert sorted(seen) == list(range(n)), "every prompt once per epoch"


def test_sampler_reshuffles_each_epoch_and_covers_everything_over_epochs():
    s = PromptSampler(30, 8, shuffle=True, seed=0)
    epochs = [_epoch(s) for _ in range(6)]
    assert epochs[0] != epochs[1], "a new order every epoch"
    # The dropped tail differs between epochs, so no prompt is left out for good.
    assert {i for e in epochs for b in e for i in b} == set(range(30))


def test_sampler_without_shuffle_walks_in_order():
    s = PromptSampler(6, 2, shuffle=False, seed=0)
    assert [s.next_batch() for _ in range(4)] == [[0, 1], [2, 3], [4, 5], [0, 1]]


def test_sampler_small_sets_wrap_within_a_batch():
    s = PromptSampler(3, 8, shuffle=True, seed=0)
    for _ in range(3):
        b = s.next_batch()
        assert len(b) == 8 and set(b) == {0, 1, 2}


def test_sampler_is_deterministic_by_seed():
    def run(seed):
        s = PromptSampler(50, 8, shuffle=True, seed=seed)
        return [s.next_batch() for _ in range(20)]

    assert run(1) == run(1)
    assert run(1) != run(2)


@pytest.mark.parametrize("stop_after", [0, 1, 5, 6, 13])  # 6 batches per epoch: stops at and across the boundary
def test_sampler_state_dict_resumes_the_exact_sequence(stop_after):
    make = lambda: PromptSampler(50, 8, shuffle=True, seed=3)  # noqa: E731
    reference = make()
    expected = [reference.next_batch() for _ in range(stop_after + 20)]

    first = make()
    for _ in range(stop_after):
        first.next_batch()
    # The checkpoint stores the state as JSON (trainer_state.json).
    state = json.loads(json.dumps(first.state_dict()))
    resumed = make()
    resumed.load_state_dict(state)
    assert [resumed.next_batch() for _ in range(20)] == expected[stop_after:]


def test_sampler_refuses_an_empty_set():
    with pytest.raises(ValueError):
        PromptSampler(0, 8, shuffle=True, seed=0)


def test_sampler_does_not_touch_global_random_state():
    # Shuffling must not consume the global RNG that other code seeds.
    random.seed(123)
    before = random.random()
    random.seed(123)
    s = PromptSampler(50, 8, shuffle=True, seed=0)
    _epoch(s)
    assert random.random() == before
