"""is_equivalent: equivalence families, non-equivalence, time bounds, never raising;
and the parts it is built from (normalise.py, sandbox.py, the Grader and its options)."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ttrl.labeling import grade, sandbox
from ttrl.labeling.grade import (
    GradeOptions,
    Grader,
    configure,
    grade_stats,
    is_equivalent,
    normalize_answer,
    reset_stats,
)

pytestmark = pytest.mark.unit

# A check may overrun its bound by the time a stuck C call takes to notice
# the alarm, plus process scheduling on a loaded CI box.
MARGIN_S = 1.5


@pytest.fixture(scope="module", autouse=True)
def _worker_started():
    grade.warm_up()  # pay the worker's import once, outside the timed tests
    yield


@pytest.fixture(autouse=True)
def _default_settings():
    configure(timeout_s=5.0, backend="process")
    reset_stats()
    yield
    configure(timeout_s=5.0, backend="process")


EQUIVALENT = [
    # fractions and decimals
    ("1/2", "0.5"),
    (r"\frac{1}{2}", "0.5"),
    (r"\dfrac12", "1/2"),
    (r"\frac12", r"\frac{1}{2}"),
    ("0.333333", r"\frac{1}{3}"),  # math-verify rounds floats to 6 places
    ("142.0", "142"),
    ("025", "25"),
    ("-0.25", r"-\frac{1}{4}"),
    # LaTeX variants
    (r"$\frac{\sqrt{3}}{2}$", r"\frac{\sqrt3}{2}"),
    (r"2\sqrt{3}", r"\sqrt{12}"),
    (r"\left( x+1 \right)^2", "x^2+2x+1"),
    (r"1\,000", "1000"),
    # intervals and sets
    ("(1, 2]", r"\left(1,2\right]"),
    (r"[0, \infty)", r"\left[0,\infty\right)"),
    (r"\{1,2\}", r"\{2,1\}"),
    # equations with the answer on the right
    ("x = 3", "3"),
    ("3", "x=3"),
    # units and text around numbers
    (r"5\text{ cm}", "5"),
    (r"\$10", "10"),
    (r"10\%", "10"),
    (r"90^\circ", "90"),
]

NOT_EQUIVALENT = [
    ("2", "3"),
    ("1/2", "1/3"),
    ("0.333", r"\frac{1}{3}"),
    ("(1,2)", "[1,2]"),
    ("(1, 2]", "[1, 2)"),
    (r"\{1,2\}", r"\{1,3\}"),
    ("x = 3", "4"),
    (r"5\text{ cm}", "6"),
    (r"-\infty", r"\infty"),
    (r"\sqrt{2}", "1.4142"),
    ("1 2", "12"),  # a space between digits is not a thousands separator
    ("A", "B"),
]


@pytest.mark.parametrize(("pred", "ref"), EQUIVALENT)
def test_equivalent(pred: str, ref: str) -> None:
    assert is_equivalent(pred, ref)


@pytest.mark.parametrize(("pred", "ref"), NOT_EQUIVALENT)
def test_not_equivalent(pred: str, ref: str) -> None:
    assert not is_equivalent(pred, ref)
    assert not is_equivalent(ref, pred)


def test_fast_verdicts() -> None:
    from ttrl.labeling.normalise import MAX_ANSWER_CHARS, fast_verdict

    assert fast_verdict("0.5", "1/2") is True and fast_verdict("2", "3") is False
    assert fast_verdict("0.5", "1/3") is None, "non-integers that differ go to math-verify (it rounds)"
    assert fast_verdict("x", "y") is None
    long = "1" * (MAX_ANSWER_CHARS + 1)
    assert fast_verdict(long, long) is True and fast_verdict(long, long + "2") is False


def test_normalisation_is_light() -> None:
    assert normalize_answer(r" $\left( 1 ,\! 2 \right]$ ") == "(1,2]"
    assert normalize_answer(r"\dfrac{1}{2}") == r"\frac{1}{2}"
    assert normalize_answer(r"\$10") == r"\$10"  # an escaped dollar is not a math delimiter
    assert normalize_answer("1 2") == "1 2"


def test_fast_paths_skip_math_verify() -> None:
    pairs = [
        ("0.5", "1/2"),
        ("142.0", "142"),
        ("025", "25"),
        ("2", "3"),
        ("$x$", "x"),
        (r"\left(1,2\right)", "(1,2)"),
    ]
    for pred, ref in pairs:
        is_equivalent(pred, ref)
    stats = grade_stats()
    assert stats.calls == len(pairs) and stats.fast_path == len(pairs) and stats.verify_calls == 0


def test_results_are_cached() -> None:
    assert is_equivalent("x^2 - 1", "(x-1)(x+1)")
    assert is_equivalent("x^2 - 1", "(x-1)(x+1)")
    assert is_equivalent(" x^2-1 ", "$(x-1)(x+1)$")  # same normalised pair
    assert grade_stats().verify_calls == 1


@pytest.mark.parametrize(
    "junk",
    [
        None,
        3,
        "",
        "   ",
        "$",
        "$$",
        r"\frac{",
        "}{",
        "\\",
        "{" * 10_000,
        "{" * 10_000 + "}" * 10_000,
        "\x00\xff",
        "é∞",
    ],
)
def test_never_raises_on_garbage(junk: object) -> None:
    assert is_equivalent(junk, "1") in (True, False)  # type: ignore[arg-type]
    assert is_equivalent("1", junk) in (True, False)  # type: ignore[arg-type]


LATEX_TOKENS = [
    "\\frac",
    "{",
    "}",
    "1",
    "2",
    "x",
    "^",
    "_",
    "(",
    ")",
    "[",
    "]",
    ",",
    "=",
    "\\{",
    "\\}",
    "$",
    "\\sqrt",
    " ",
    "\\left",
    "\\",
]


@settings(max_examples=80, deadline=None, database=None)
@given(
    st.lists(st.sampled_from(LATEX_TOKENS), max_size=12).map("".join),
    st.sampled_from(["1", "x", "(1,2)", r"\frac{1}{2}"]),
)
def test_fuzz_never_raises(pred: str, ref: str) -> None:
    assert is_equivalent(pred, ref) in (True, False)


@pytest.mark.parametrize(
    "monster",
    [
        "9^{9^{9^9}}",  # sympy tries to evaluate it
        r"(10^{7})!",
        "{" * 900 + "1" + "}" * 900,  # deeply nested, under the length cap
        r"\frac{" * 150 + "1" + "}{2}" * 150,
        "1" * 100_000,  # over the length cap: compared as a string only
    ],
)
def test_pathological_input_returns_within_bound(monster: str) -> None:
    configure(timeout_s=1.0)
    started = time.monotonic()
    assert not is_equivalent(monster, "7")
    assert time.monotonic() - started < 1.0 + MARGIN_S


def test_a_slow_answer_costs_its_parse_time_once() -> None:
    # In a vote, a new answer meets every class representative in turn; a
    # slow-to-parse one must not pay its timeout again for each of them.
    configure(timeout_s=1.0)
    monster = "{" * 900 + "x" + "}" * 900
    assert not is_equivalent(monster, "1")
    started = time.monotonic()
    for ref in ["2", "3", "y", r"\frac{1}{2}"]:
        assert not is_equivalent(monster, ref)
    assert time.monotonic() - started < 0.5


def test_bounded_outside_the_main_thread() -> None:
    configure(timeout_s=1.0)
    results: dict[str, object] = {}

    def run() -> None:
        started = time.monotonic()
        results["slow"] = is_equivalent("9^{9^{9^9}}", "1")
        results["slow_s"] = time.monotonic() - started
        results["easy"] = is_equivalent(r"\frac{\sqrt{2}}{2}", r"\sqrt{2}/2")

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(timeout=10)
    assert not thread.is_alive()
    assert results["slow"] is False and results["easy"] is True
    assert results["slow_s"] < 1.0 + MARGIN_S


def test_thread_pool() -> None:
    # A bound roomy enough that an easy check never times out on a busy machine.
    configure(timeout_s=2.5)
    cases = [(p, r, True) for p, r in EQUIVALENT[:8]] + [(p, r, False) for p, r in NOT_EQUIVALENT[:6]]
    cases.append(("2^{3^{4^{5}}}", "1", False))
    grade.warm_up(workers=6)  # a worker's start is not charged to the bound
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=6) as pool:
        got = list(pool.map(lambda case: is_equivalent(case[0], case[1]), cases))
    assert got == [expected for _, _, expected in cases]
    # The slow check holds one worker for its bound; the others keep grading.
    assert time.monotonic() - started < 2 * 2.5 + MARGIN_S


def test_a_stuck_worker_is_killed_and_replaced(monkeypatch: pytest.MonkeyPatch) -> None:
    # A worker stuck where its own alarm cannot reach it (a long C call):
    # simulated by one that answers "ready" and then never replies.
    stuck = "import sys, time; print('ready', flush=True); sys.stdin.readline(); time.sleep(600)"
    monkeypatch.setattr(sandbox, "WORKER_MAIN", stuck)
    pool = sandbox.WorkerPool(1, "ttrl.labeling.mathverify:verify_here")
    try:
        started = time.monotonic()
        with pytest.raises(sandbox.WorkerTimedOut):
            pool.call(["1", "2"], timeout_s=0.5)
        assert time.monotonic() - started < 0.5 + MARGIN_S
        (replacement,) = pool._idle
        assert replacement.proc.poll() is None  # a fresh worker is already starting
    finally:
        monkeypatch.undo()
        pool.close()


def test_a_stuck_worker_is_a_timeout_for_the_grader(monkeypatch: pytest.MonkeyPatch) -> None:
    stuck = "import sys, time; print('ready', flush=True); sys.stdin.readline(); time.sleep(600)"
    monkeypatch.setattr(sandbox, "WORKER_MAIN", stuck)
    g = Grader(GradeOptions(timeout_s=0.5, max_workers=1))
    try:
        assert not g.is_equivalent("x+1", "1+x")
        assert g.stats().timeouts == 1
    finally:
        monkeypatch.undo()
        g.close()


def test_a_warm_up_beside_a_running_call_starts_only_the_free_slots() -> None:
    pool = sandbox.WorkerPool(2, "ttrl.labeling.normalise:fast_verdict")
    try:
        assert pool._slots.acquire(blocking=False)  # a call holds one slot
        assert pool.warm_up(2)
        assert len(pool._idle) == 1  # one worker for the free slot, not two
        pool._slots.release()
        assert pool.warm_up(2)
        assert len(pool._idle) == 2  # never more than the pool's size
    finally:
        pool.close()


def test_the_grader_warms_up_in_the_background_without_holding_anything_up() -> None:
    g = grade.use(grade.GradeOptions(max_workers=2))
    try:
        thread = grade.warm_up_in_background()
        thread.join(timeout=60)
        assert not thread.is_alive()
        assert len(g._pool._idle) == g.parallel_checks() == 2  # ready for the first checks
        assert g.equivalence_classes(["x+1", "1+x"])[1] == [0, 0]  # math-verify, in a warm worker
    finally:
        g.close()


def test_the_sandbox_runs_any_target_and_reports_its_failures() -> None:
    pool = sandbox.WorkerPool(1, "ttrl.labeling.normalise:fast_verdict")
    try:
        # fast_verdict(pred, ref, budget) is called with one argument too many: the worker says so.
        assert pool.call(["1", "1"], timeout_s=5.0) == sandbox.FAILED
    finally:
        pool.close()
    pool = sandbox.WorkerPool(1, "ttrl.labeling.mathverify:verify_here")
    try:
        assert pool.warm_up(1)
        assert pool.call(["x+1", "1+x"], timeout_s=5.0) == "1"
    finally:
        pool.close()


def test_falls_back_in_process_when_no_worker_can_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sandbox.sys, "executable", "/nonexistent/python")
    g = Grader(GradeOptions(timeout_s=5.0))
    assert g.is_equivalent(r"\frac{\pi}{2}", r"\pi/2")
    assert g.process_backend_broken and g.parallel_checks() == 1
    g.close()


def test_inline_backend_is_bounded_in_the_main_thread() -> None:
    configure(timeout_s=1.0, backend="inline")
    started = time.monotonic()
    assert not is_equivalent("9^{9^{9^9}}", "2")
    assert time.monotonic() - started < 1.0 + MARGIN_S
    assert is_equivalent("x = 3", "3")


def test_options_reject_bad_values() -> None:
    with pytest.raises(ValueError, match="timeout_s"):
        GradeOptions(timeout_s=0)
    with pytest.raises(ValueError, match="backend"):
        GradeOptions(backend="gpu")
    with pytest.raises(ValueError, match="max_workers"):
        GradeOptions(max_workers=0)
    with pytest.raises(ValueError, match="timeout_s"):
        configure(timeout_s=0)


def test_use_sets_the_process_grader_and_keeps_its_workers() -> None:
    before = grade.grader()
    before.warm_up()
    pool = before._pool
    now = grade.use(GradeOptions(timeout_s=2.0, max_workers=before.options.max_workers))
    assert grade.grader() is now and now.options.timeout_s == 2.0
    assert now._pool is pool and before._pool is None, "the same workers, handed over"
    assert is_equivalent("x^2-1", "(x-1)(x+1)") and grade_stats().verify_calls == 1


def test_graders_are_independent() -> None:
    """Two graders with different bounds keep their own cache and counters."""
    a = Grader(GradeOptions(timeout_s=3.0, backend="inline"))
    b = Grader(GradeOptions(timeout_s=1.0, backend="inline"))
    assert a.is_equivalent("2x", "x+x") and b.is_equivalent("2x", "x+x")
    assert a.is_equivalent("2x", "x+x")
    assert a.stats().verify_calls == 1 and b.stats().verify_calls == 1 and a.stats().calls == 2
