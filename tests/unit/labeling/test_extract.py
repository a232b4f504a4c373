"""extract_answer: the content of the last \\boxed{} / \\fbox{}, or None; extractors by name."""

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ttrl.labeling.extract import EXTRACTORS, extract_answer

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (r"so the answer is $\boxed{42}$.", "42"),
        (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
        (r"\boxed{\frac{\sqrt{3}}{2}} done", r"\frac{\sqrt{3}}{2}"),
        (r"first \boxed{1}, then \boxed{2}, finally \boxed{3}", "3"),
        (r"\fbox{7}", "7"),
        (r"\boxed{1} but \fbox{2}", "2"),
        (r"\boxed {  5 }", "5"),
        (r"the answer is \boxed 5.", "5"),
        (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),
        (r"\boxed{(1, 2]}", "(1, 2]"),
        (r"\boxed{\boxed{9}}", "9"),
        (r"\boxed{a \\ {b}}", r"a \\ {b}"),
    ],
)
def test_extracts_last_box(text: str, expected: str) -> None:
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "no box here, the answer is 42",
        "",
        r"\boxed{}",
        r"\boxed{   }",
        r"\boxed{1} and then \boxed{2",  # truncated: the last box never closes
        r"\boxed{\frac{1}{2}",
        r"\boxed{\}",  # an escaped brace does not close the box
        r"\boxedfoo{3}",  # some other macro
        r"\boxed",
    ],
)
def test_no_answer_gives_none(text: str) -> None:
    assert extract_answer(text) is None


@pytest.mark.parametrize("junk", [None, 42, b"\\boxed{1}", ["\\boxed{1}"]])
def test_never_raises_on_non_strings(junk: object) -> None:
    assert extract_answer(junk) is None  # type: ignore[arg-type]


TOKENS = ["\\boxed", "\\fbox", "{", "}", "\\", "\\{", "\\}", " ", "$", "a", "1", "\n", "é", "\x00"]


@settings(max_examples=200, deadline=None, database=None)
@given(st.one_of(st.text(), st.lists(st.sampled_from(TOKENS), max_size=40).map("".join)))
def test_fuzz_never_raises(text: str) -> None:
    result = extract_answer(text)
    assert result is None or (isinstance(result, str) and result == result.strip() and result)


def test_linear_time_on_adversarial_input() -> None:
    # Many unclosed boxes and deep nesting: a quadratic scan would take minutes.
    texts = ["\\boxed{" * 200_000, "{" * 500_000 + "\\boxed{" + "{" * 500_000, "\\boxed{" + "x" * 1_000_000]
    started = time.perf_counter()
    for text in texts:
        assert extract_answer(text) is None
    assert extract_answer("\\boxed{" + "{" * 100_000 + "}" * 100_001) == "{" * 100_000 + "}" * 100_000
    assert time.perf_counter() - started < 2.0


# ── extractors by name (label.extractor) ───────────────────────────────────
@pytest.mark.parametrize("text", [r"so $\boxed{42}$.", r"\fbox{7}", "no box", r"\boxed{1} then \boxed{2"])
def test_boxed_is_the_registered_default(text: str) -> None:
    assert "boxed" in EXTRACTORS.names()
    assert extract_answer(text, extractor="boxed") == extract_answer(text) == EXTRACTORS.get("boxed")(text)


def test_an_unknown_extractor_names_the_valid_ones() -> None:
    with pytest.raises(KeyError, match=r"unknown answer extractor 'boxd' \(did you mean 'boxed'\?\); valid choices: .*boxed"):
        extract_answer(r"\boxed{1}", extractor="boxd")
