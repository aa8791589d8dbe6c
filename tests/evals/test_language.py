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
