"""Answer extraction and number-normalized comparison on hand-written cases."""

from __future__ import annotations

import pytest

from evals.extract import (
    answers_match,
    extract_exact,
    extract_first_word,
    extract_last_number,
    extract_regex,
    make_extractor,
    normalize_answer,
)
from merge_core.errors import EvomergeError


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1,000", "1000"),  # Sakana's released regex read this as 0
        ("The answer is 1,234.", "1234"),
        ("So 3 apples and 12,345,678 pears", "12345678"),
        ("It is -7 degrees", "-7"),
        ("temperature −12 today", "-12"),  # U+2212 minus sign
        ("pages 3-5", "5"),  # a hyphen between numbers is not a minus
        ("答えは４２です", "42"),  # full-width digits
        ("合計は１，０００円", "1000"),  # full-width comma
        ("pi is about 3.14.", "3.14"),
        ("costs 1,000.50 dollars", "1000.50"),
        ("no number here", None),
        ("", None),
    ],
)
def test_last_number(text: str, expected: str | None) -> None:
    assert extract_last_number(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [(" j7 . w3", "j7"), ("7.", "7"), ("3.5 is it", "3.5"), ("kotae。", "kotae"), ("   ", None), ("j12", "j12")],
)
def test_first_word(text: str, expected: str | None) -> None:
    assert extract_first_word(text) == expected


def test_regex_takes_first_group_and_exact_strips() -> None:
    assert extract_regex("#### 42 and #### 43", r"#### (\d+)") == "42"
    assert extract_regex("answer: yes", r"answer: \w+") == "answer: yes"
    assert extract_regex("nothing", r"#### (\d+)") is None
    assert extract_exact("  Tokyo \n") == "Tokyo"


@pytest.mark.parametrize(
    ("predicted", "gold", "same"),
    [
        ("1000", "1,000", True),
        ("1000.0", "1000", True),
        ("１０００", "1000", True),
        ("-3.50", "-3.5", True),
        ("1000", "100", False),
        ("j7", "j7", True),
        ("j7", "7", False),
        (None, "7", False),
    ],
)
def test_answers_match(predicted: str | None, gold: str, same: bool) -> None:
    assert answers_match(predicted, gold) is same


def test_normalize_answer_keeps_text() -> None:
    assert normalize_answer(" Tokyo ") == "Tokyo"
    assert normalize_answer("1,000.500") == "1000.5"


def test_make_extractor_specs() -> None:
    assert make_extractor("last_number")("a 1,000 b") == "1000"
    assert make_extractor({"type": "regex", "pattern": r"kotae (j\d+)"})("w1 kotae j3 .") == "j3"
    with pytest.raises(EvomergeError, match="unknown extractor 'last_word'"):
        make_extractor("last_word")
    with pytest.raises(EvomergeError, match="not a valid regex"):
        make_extractor({"type": "regex", "pattern": "(unclosed"})
