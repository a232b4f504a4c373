"""Answer types: the choice, number and custom extractors, and how their answers vote and grade."""

from __future__ import annotations

import pickle

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ttrl.labeling.extract import (
    EXTRACTORS,
    CustomExtractorError,
    configured_extractor,
    extract_answer,
    load_custom_extractor,
)
from ttrl.labeling.grade import equivalence_classes, grade_stats, is_equivalent, reset_stats
from ttrl.labeling.vote import majority_vote, majority_votes

pytestmark = pytest.mark.unit

BUILT_IN = ("boxed", "choice", "number")
HERE = __name__  # this module, importable by dotted path: the custom extractors below live here


# ── choice ─────────────────────────────────────────────────────────────────
@pytest.mark.parametrize(("text", "letter"), [
    ("The speed doubles, so the answer is (C).", "C"),
    ("The answer is (C) 42 m/s", "C"),
    (r"Therefore the answer is $\boxed{C}$.", "C"),
    (r"\boxed{(C)}", "C"),
    (r"\boxed{\text{(B)}}", "B"),
    (r"\boxed{\textbf{D}}", "D"),
    (r"\boxed{C) 42 m/s}", "C"),
    ("Let me think.\n\n**Answer:** C", "C"),
    ("**Answer: (D)**", "D"),
    ("Answer: **E**", "E"),
    ("Answer: C", "C"),
    ("ANSWER: D", "D"),
    ("Answer:\n\n(B)", "B"),
    ("the answer is c", "C"),
    ("The correct option is B.", "B"),
    ("The answer is option C", "C"),
    (r"answer is $\text{C}$", "C"),
    ("Final Answer: The final answer is $C$. I hope it is correct.", "C"),
    ("I'll go with (C).", "C"),
    ("The answer is B because the force is larger.", "B"),
    ("The answer is A because the ball is lighter.", "A"),
    ("I think the answer is I.", "I"),
    ("Answer: B, since the others fail.", "B"),
    ("Answer: J", "J"),
    # Only the last line, when nothing says "answer":
    ("The ball is in free fall for 2 s.\nC) 42 m/s", "C"),
    ("Using v = gt:\n(C) 42 m/s", "C"),
    ("Using v = gt:\n- (B) 19.6 m/s", "B"),
    ("Using v = gt:\nA. 9.8 m/s", "A"),
    ("Using v = gt:\n**C**", "C"),
    ("c", "C"),
    ("C  \n\n", "C"),
])
def test_choice_reads_the_letter(text, letter):
    assert extract_answer(text, "choice") == letter


@pytest.mark.parametrize(("text", "letter"), [
    # The last explicit statement wins over letters met in the reasoning.
    ("Option B is wrong because it ignores friction. Answer: (A)", "A"),
    ("At first the answer is B... wait, no. The answer is D.", "D"),
    ("Answer: B\n\nHmm, let me re-check: the correct answer is \\boxed{C}.", "C"),
    ("\\boxed{B} was my guess, but the answer is (D).", "D"),
    # A box that holds a value, not a letter, says nothing about letters.
    ("The answer is C.\n\\boxed{42}", "C"),
    # A statement outranks a last line that merely lists an option.
    ("The answer is (B).\nC) 42 m/s", "B"),
])
def test_choice_prefers_the_last_explicit_statement(text, letter):
    assert extract_answer(text, "choice") == letter


@pytest.mark.parametrize("text", [
    "",
    "   \n ",
    "no letter at all",
    "The answer is 42.",
    r"\boxed{42}",
    # No single letter:
    "A or B",
    "The answer is A or B.",
    "Answer: (A) or (B)",
    "Answer: B, C",
    "The answer is either A or B.",
    r"\boxed{A or B}",
    r"\boxed{A, C}",
    "The answer is none of the above.",
    "Answer: B. Actually, the answer is none of the above.",
    # "A" and "I" as words, and letters in formulas:
    "A ball falls from rest for 2 s.",
    "The answer is a ball.",
    "The answer is I think B",
    "$a$ is the side length",
    "A, B and C are collinear.",
    "The answer is $b^2$",
    "answer is b^2",
    "e.g. the answer",
    # Letters beyond J are no options.
    "The answer is K",
    "The answer is (K)",
])
def test_choice_gives_none_without_a_single_letter(text):
    assert extract_answer(text, "choice") is None


# ── number ─────────────────────────────────────────────────────────────────
@pytest.mark.parametrize(("text", "value"), [
    ("She pays 1,234 dollars in total.", "1234"),
    (r"\boxed{1{,}234}", "1234"),
    (r"\boxed{1\,234}", "1234"),
    ("The temperature drops to -5 degrees.", "-5"),
    ("x = 10 - 5 = 5", "5"),
    ("3-5", "5"),  # a subtraction, not a negative number
    ("$-5.50$", "-5.5"),
    ("−3", "-3"),
    ("+7", "7"),
    ("-0", "0"),
    ("0.000", "0"),
    (".5", "0.5"),
    ("3.140", "3.14"),
    (r"\frac{3}{4}", "0.75"),
    (r"\dfrac{1}{3}", "1/3"),
    (r"-\frac{3}{4}", "-0.75"),
    (r"\frac{-6}{4}", "-1.5"),
    ("3/4", "0.75"),
    ("2/6", "1/3"),
    ("45%", "45"),  # the number of percent
    (r"45\%", "45"),
    ("The side is 12 cm.", "12"),
    ("It costs $5.", "5"),
    ("1.5e3", "1500"),
    ("Step 1: 2 + 2 = 4. Step 2: 4 * 3 = 12. So the answer is 12.", "12"),
    ("#### 72", "72"),
    (r"So 3 + 4 = 7 and \boxed{12} is the answer, not 7.", "12"),  # the box wins over later numbers
    (r"\boxed{x = 5\text{ cm}}", "5"),
    (r"\boxed{\$1,234.50}", "1234.5"),
    (r"the answer is \boxed{12", "12"),  # a box that never closes is no box
])
def test_number_reads_the_last_number_canonically(text, value):
    assert extract_answer(text, "number") == value


@pytest.mark.parametrize("text", ["", "no number here", r"\boxed{x}", r"\boxed{\text{no solution}} after 3 tries",
                                  "1/0", "-", "."])
def test_number_gives_none_without_a_number(text):
    assert extract_answer(text, "number") is None


# ── every built-in extractor: total, idempotent, linear ─────────────────────
TOKENS = ["\\boxed{", "}", "{", "(", ")", "(C)", "C)", "A", "a", "I", "answer", "Answer:", " is ", "**", "$", "\\frac{",
          "1", "2,345", "-", ".", "/", "%", "e", "\n", " ", "or", "none of the above", "\\text{", "é", "\x00"]
ANY_TEXT = st.one_of(st.text(max_size=300), st.lists(st.sampled_from(TOKENS), max_size=60).map("".join))


@settings(max_examples=150, deadline=None, database=None)
@given(ANY_TEXT)
def test_built_in_extractors_never_raise(text):
    for name in BUILT_IN:
        out = extract_answer(text, name)
        assert out is None or (isinstance(out, str) and out)
    letter = extract_answer(text, "choice")
    assert letter is None or letter in "ABCDEFGHIJ"


@settings(max_examples=150, deadline=None, database=None)
@given(ANY_TEXT)
def test_typed_answers_read_back_as_themselves(text):
    # A vote's representative is an extracted answer; grading it reads it again.
    for name in ("choice", "number"):
        out = extract_answer(text, name)
        if out is not None:
            assert extract_answer(out, name) == out


@pytest.mark.parametrize("name", BUILT_IN)
def test_huge_adversarial_inputs_finish(name):
    # Quadratic scans would take minutes on these; a linear one takes milliseconds.
    texts = ["(((" * 70_000, "answer is " * 20_000, "Answer: either " * 20_000, "I'll go with " * 20_000,
             "(C" * 100_000, "**" * 100_000, "\n" * 200_000, "1," * 100_000, "1{,}" * 100_000,
             "\\frac{" + " " * 200_000, "5" + " " * 200_000 + "x", "-" * 200_000 + "5", "\\boxed{" * 100_000]
    for text in texts:
        out = extract_answer(text, name)
        assert out is None or isinstance(out, str)
    assert extract_answer("9" * 200_000, "number") == "9" * 200_000  # too long to be an int: kept as text


def test_every_registered_extractor_is_documented_in_the_config():
    from pathlib import Path

    conf = (Path(__file__).resolve().parents[3] / "conf" / "label" / "default.yaml").read_text()
    for name in EXTRACTORS.names():
        assert f"#   {name}" in conf, name


# ── equivalence per type ───────────────────────────────────────────────────
@pytest.mark.parametrize(("pred", "ref", "same"), [
    ("C", "C", True),
    ("C", "c", True),
    ("C", "(C)", True),
    ("C", "C) 42 m/s", True),
    ("C", "D", False),
    ("C", "none", False),
    ("none", "none", True),  # neither reads as a letter: the same text matches
    ("C", "", False),
])
def test_letters_compare_exactly(pred, ref, same):
    assert is_equivalent(pred, ref, extractor="choice") is same


@pytest.mark.parametrize(("pred", "ref", "same"), [
    ("1234", "1,234", True),
    ("0.75", r"\frac{3}{4}", True),
    ("0.75", "3/4", True),
    ("1/3", "0.3333333", True),  # within 1e-6
    ("1/3", "0.33", False),  # rounding is another answer
    ("0.3", "0.30000000000000004", True),
    ("45", "45%", True),
    ("45", "0.45", False),
    ("-5", "5", False),
    ("12", "12 cm", True),
    ("1000000", "1000001", True),  # relative: 1e-6 of a million is 1
    ("1000000", "1000002", False),
    ("0", "0.000001", False),  # no absolute tolerance around zero
    ("1e-300", "1.0000001e-300", True),  # exact arithmetic: tiny numbers do not all round to 0.0
    ("1e-300", "2e-300", False),
    ("7", "x", False),
    ("x", "x", True),
])
def test_numbers_compare_numerically(pred, ref, same):
    assert is_equivalent(pred, ref, extractor="number") is same


def test_boxed_stays_on_the_math_verify_path():
    # The default is unchanged: "C" and "(C)" are not the same expression, and sympy compares numbers.
    assert is_equivalent("C", "(C)") is is_equivalent("C", "(C)", extractor="boxed")
    assert is_equivalent("1/2", r"\frac{1}{2}") and is_equivalent("1/2", r"\frac{1}{2}", extractor="boxed")


def test_typed_checks_never_reach_math_verify():
    reset_stats()
    is_equivalent("3", "3.0", extractor="number")
    equivalence_classes(["A", "B", "A"], extractor="choice")
    assert grade_stats().calls == 0


@settings(max_examples=100, deadline=None, database=None)
@given(ANY_TEXT, ANY_TEXT)
def test_typed_equivalence_is_total_and_symmetric(a, b):
    for name in ("choice", "number"):
        assert is_equivalent(a, b, name) is is_equivalent(b, a, name)
        assert is_equivalent(a, a, name) is bool(a.strip())


# ── voting with typed extractors ───────────────────────────────────────────
def test_a_choice_vote_counts_letters():
    texts = ["The answer is (C).", r"\boxed{C}", "Answer: c", "The answer is B.", "no idea", "A or B"]
    answers = [extract_answer(t, "choice") for t in texts]
    assert answers == ["C", "C", "C", "B", None, None]
    vote = majority_vote(answers, extractor="choice")
    assert (vote.label, vote.ratio, vote.counts) == ("C", 0.5, {"C": 3, "B": 1})
    assert vote.assignment == [0, 0, 0, 1, None, None]


def test_a_number_vote_merges_equal_values():
    answers = ["0.5", "1/2", None, "0.50000001", "2", "2.0"]
    vote = majority_vote(answers, extractor="number")
    assert vote.label == "0.5" and vote.counts == {"0.5": 3, "2": 2}
    assert vote.assignment == [0, 0, None, 0, 1, 1]


def test_majority_votes_passes_the_extractor_on():
    lists = [["A", "B", "B"], ["3", "3.0", "4"]]
    assert [v.label for v in majority_votes(lists[:1], extractor="choice")] == ["B"]
    votes = majority_votes(lists[1:], extractor="number")
    assert votes[0].label == "3" and votes[0].ratio == pytest.approx(2 / 3)


@pytest.mark.parametrize("name", ["majority_vote", "ground_truth"])
def test_rewards_learn_the_extractor_from_build_reward(name):
    from ttrl.rewards import build_reward, compute_rewards
    from ttrl.types import Group, Prompt, Sample

    prompt = Prompt("p0", "Which? (A) 1 (B) 2 (C) 3", "(C)", "Which?")
    answers = ["C", "C", "B"]
    group = Group(prompt, [1], [Sample(text=a, token_ids=[1], logprobs=[0.0], answer=a) for a in answers])
    reward = build_reward(name, extractor="choice")
    assert reward.extractor == "choice"
    out = compute_rewards(reward, [group])
    assert out.rewards == [[1.0, 1.0, 0.0]]  # by the vote, or by "(C)" read as the letter C
    assert out.votes[0].label == "C"


def test_build_reward_keeps_the_extractor_from_rewards_that_take_none():
    from ttrl.rewards import build_reward

    assert build_reward("random", extractor="choice", p=0.5, seed=1) is not None


# ── custom ─────────────────────────────────────────────────────────────────
def after_hash(text: str) -> str | None:
    """A user's extractor: whatever follows the last '####'."""
    _, sep, tail = text.rpartition("####")
    return tail.strip() if sep else None


def explodes(text: str) -> str | None:
    raise ZeroDivisionError("the user's bug")


def returns_a_number(text: str) -> int:
    return 42


def needs_two(text: str, other: str) -> str:
    return text + other


NOT_A_FUNCTION = 3


class _Label:
    def __init__(self, extractor: str, custom_extractor: str | None = None):
        self.extractor, self.custom_extractor = extractor, custom_extractor


def test_a_custom_extractor_travels_with_its_path():
    spec = configured_extractor(_Label("custom", f"{HERE}:after_hash"))
    assert spec == f"custom:{HERE}:after_hash"
    assert extract_answer("work...\n#### 72 ", spec) == "72"
    assert extract_answer("no marker", spec) is None
    assert extract_answer(None, spec) is None  # type: ignore[arg-type]
    assert configured_extractor(_Label("boxed")) == "boxed"
    # Its answers compare like boxed ones.
    assert majority_vote(["72", "72.0", "5"], extractor=spec).counts == {"72": 2, "5": 1}


def test_the_dotted_form_of_the_path_works_too():
    assert extract_answer("#### 9", configured_extractor(_Label("custom", f"{HERE}.after_hash"))) == "9"


@pytest.mark.parametrize(("path", "words"), [
    ("not a path", ["label.custom_extractor='not a path'", "'package.module:function'"]),
    ("no_such_module_xyz:read", ["label.custom_extractor='no_such_module_xyz:read'", "cannot import module",
                                 "'no_such_module_xyz'"]),
    (f"{HERE}:no_such_function", [f"label.custom_extractor='{HERE}:no_such_function'", "no attribute"]),
    (f"{HERE}:NOT_A_FUNCTION", [f"label.custom_extractor='{HERE}:NOT_A_FUNCTION'", "not a function"]),
    (f"{HERE}:needs_two", [f"label.custom_extractor='{HERE}:needs_two'", "fn(text)"]),
])
def test_a_bad_custom_path_is_named(path, words):
    with pytest.raises(ValueError) as err:
        configured_extractor(_Label("custom", path))
    for word in words:
        assert word in str(err.value)


def test_custom_without_a_function_is_named():
    with pytest.raises(ValueError, match="label.custom_extractor must name a function"):
        configured_extractor(_Label("custom"))


def test_the_bare_name_custom_reads_nothing():
    with pytest.raises(ValueError, match=r"configured_extractor\(cfg.label\)"):
        extract_answer("#### 1", "custom")


def test_a_raising_custom_extractor_names_the_function_and_the_prompt():
    spec = configured_extractor(_Label("custom", f"{HERE}:explodes"))
    with pytest.raises(CustomExtractorError) as err:
        extract_answer("any text", spec, prompt="p17")
    assert f"'{HERE}:explodes'" in str(err.value)
    assert "ZeroDivisionError: the user's bug" in str(err.value)
    assert "'p17'" in str(err.value)
    assert (err.value.function, err.value.prompt) == (f"{HERE}:explodes", "p17")
    assert isinstance(err.value.__cause__, ZeroDivisionError)


def test_a_custom_extractor_returning_a_non_string_is_an_error():
    spec = configured_extractor(_Label("custom", f"{HERE}:returns_a_number"))
    with pytest.raises(CustomExtractorError, match=r"returned int 42, not a str or None"):
        extract_answer("text", spec)


def test_the_custom_error_survives_a_process_boundary():
    err = CustomExtractorError("pkg.mod:fn", "raised KeyError: 'x'", "p3")
    again = pickle.loads(pickle.dumps(err))
    assert (str(again), again.function, again.prompt) == (str(err), "pkg.mod:fn", "p3")


def test_a_custom_extractor_is_imported_once():
    assert load_custom_extractor(f"{HERE}:after_hash") is load_custom_extractor(f"{HERE}:after_hash")
