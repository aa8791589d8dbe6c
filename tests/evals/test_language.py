"""Answer-language checks on hand-written Japanese, English and mixed strings."""

from __future__ import annotations

import pytest

from evals.language import JapaneseScript, WordPattern, japanese_share, make_language_check
from merge_core.errors import EvomergeError


@pytest.mark.parametrize(
    ("text", "share"),
    [
        ("答えは42です。", 1.0),  # digits and punctuation ignored
        ("カタカナとひらがなと漢字", 1.0),
        ("The answer is 42.", 0.0),
        ("答えはyesです", 5 / 8),  # 5 kana/kanji, 3 Latin letters
        ("123 !?", 0.0),  # no letters at all
        ("", 0.0),
    ],
)
def test_japanese_share(text: str, share: float) -> None:
    assert japanese_share(text) == pytest.approx(share)


def test_japanese_script_threshold() -> None:
    check = JapaneseScript(threshold=0.5)
    assert check("まず、りんごは3個です。答えは5です。")
    assert not check("First, 3 apples. The answer is 5.")
    assert not check("答え is the answer to this question")  # 2 of 23 letters
    with pytest.raises(EvomergeError, match="threshold"):
        JapaneseScript(threshold=0.0)


def test_word_pattern() -> None:
    first = WordPattern(r"^j\d+$")
    assert first("j7 .")
    assert first(" j12。 kotae")
    assert not first("7 .")
    assert not first("kotae j7")
    assert not first("")
    assert WordPattern(r"^j\d+$", word="last")("kotae j7 .")
    assert WordPattern(r"kotae j\d+", word="any")("w1 kotae j3 w2")


def test_make_language_check() -> None:
    assert make_language_check(None) is None
    assert make_language_check({"type": "japanese", "threshold": 0.8})("日本語です")
    assert make_language_check({"type": "pattern", "pattern": r"^j\d+$"})("j3")
    with pytest.raises(EvomergeError, match="language_check.type"):
        make_language_check({"type": "fasttext"})
    with pytest.raises(EvomergeError, match="bad fields"):
        make_language_check({"type": "japanese", "cutoff": 0.5})


@pytest.mark.parametrize(
    ("text", "french"),
    [
        ("Tom a 23 pommes et en reçoit 45 de plus, donc 23 + 45 = 68. La réponse est 68.", True),
        ("Tom has 23 apples and gets 45 more, so 23 + 45 = 68. The answer is 68.", False),
        ("Tom a 23 pommes. The answer is 68.", False),  # 0 French function words ("a" counts for neither), 3 English
        ("Il y a 6 boîtes, donc 6 * 8 = 48. The answer is 48.", False),  # il, y, donc vs the, answer, is: 0.5 < 0.6
        ("68", False),  # a bare number is no language
        ("Le chat.", False),  # one function word: under min_words
        ("L'herbe est verte.", True),  # apostrophes split: l, est
    ],
)
def test_function_word_share_tells_french_from_english(text: str, french: bool) -> None:
    check = make_language_check({"type": "words", "language": "fr"})
    assert check(text) is french


def test_function_word_check_rejects_unknown_languages_in_one_line() -> None:
    with pytest.raises(EvomergeError, match="language_check.language: no word list for 'xx'"):
        make_language_check({"type": "words", "language": "xx"})
    with pytest.raises(EvomergeError, match="language_check.min_words must be >= 1"):
        make_language_check({"type": "words", "language": "en", "min_words": 0})
