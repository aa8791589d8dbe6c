"""Answer-language checks: is a response Japanese (script share), French or English (function-word share), or is
its answer word in a vocabulary.

Sakana's MGSM-JA score counted an answer only if the response was Japanese (they used fastText
lid.176); here a script-share test stands in for Japanese, and a function-word vote for languages that share the
Latin script. A check maps a response to a bool.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from merge_core.errors import EvomergeError

LanguageCheck = Callable[[str], bool]


def _is_japanese_char(char: str) -> bool:
    """Hiragana, katakana (full and half width, incl. the prolonged sound mark) or a CJK ideograph."""
    code = ord(char)
    return (
        0x3040 <= code <= 0x30FF  # hiragana, katakana
        or 0x31F0 <= code <= 0x31FF  # katakana phonetic extensions
        or 0xFF66 <= code <= 0xFF9F  # half-width katakana
        or 0x4E00 <= code <= 0x9FFF  # CJK unified ideographs
        or 0x3400 <= code <= 0x4DBF  # CJK extension A
        or 0xF900 <= code <= 0xFAFF  # CJK compatibility ideographs
        or char == "々"
    )


def japanese_share(text: str) -> float:
    """Share of kana/kanji among the letters of `text` (digits, punctuation, spaces, symbols ignored); 0 if none."""
    japanese = letters = 0
    for char in text:
        if _is_japanese_char(char):
            japanese += 1
            letters += 1
        elif unicodedata.category(char).startswith("L"):
            letters += 1
    return japanese / letters if letters else 0.0


@dataclass(frozen=True)
class JapaneseScript:
    """True when at least `threshold` of the response's letters are kana or kanji."""

    threshold: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold <= 1.0:
            raise EvomergeError(f"language_check.threshold must be in (0, 1], got {self.threshold}")

    def __call__(self, response: str) -> bool:
        return japanese_share(response) >= self.threshold


@dataclass(frozen=True)
class WordPattern:
    """True when the response's `word` ("first"/"last" whitespace-separated word, trailing punctuation
    dropped; "any": the whole response searched) matches `pattern` (e.g. ``^j\\d+$`` for J numerals)."""

    pattern: str
    word: Literal["first", "last", "any"] = "first"

    def __post_init__(self) -> None:
        if self.word not in ("first", "last", "any"):
            raise EvomergeError(f"language_check.word must be 'first', 'last' or 'any', got {self.word!r}")
        try:
            re.compile(self.pattern)
        except re.error as err:
            raise EvomergeError(f"language_check.pattern {self.pattern!r} is not a valid regex: {err}") from err

    def __call__(self, response: str) -> bool:
        if self.word == "any":
            return re.search(self.pattern, response) is not None
        words = [w.rstrip(".,!?;:。、．，？！") for w in response.split()]
        words = [w for w in words if w]
        if not words:
            return False
        return re.search(self.pattern, words[0] if self.word == "first" else words[-1]) is not None


# Frequent words of each language that the others do not use as words (ambiguous ones such as "a", "on", "plus",
# "est" in English math, "son", "pour" left out); lower case, accents kept, apostrophe-split ("l'eau" -> "l", "eau").
FUNCTION_WORDS: dict[str, frozenset[str]] = {
    "fr": frozenset(
        "le la les l un une des de du d et il elle ils elles je tu nous vous ce cette ces qui que qu quoi dans "
        "pour par avec sur au aux ne pas reste combien chaque donc alors mais ou leur leurs sa ses mon ma mes notre "
        "votre très aussi y lui est sont ont avait était fait en réponse".split()
    ),
    "en": frozenset(
        "the an of and is are was were has have had he she it they we you this that these those which who what "
        "in for with by at to from not no each how many much left so then but or their his her its my our your "
        "very also does did do there answer".split()
    ),
}
_WORD = re.compile(r"[^\W\d_]+", re.UNICODE)


def function_word_counts(text: str) -> dict[str, int]:
    """Per language, how many of `text`'s words are its function words."""
    words = [w.lower() for w in _WORD.findall(text)]
    return {lang: sum(w in vocab for w in words) for lang, vocab in FUNCTION_WORDS.items()}


@dataclass(frozen=True)
class FunctionWordShare:
    """True when `language`'s function words are at least `threshold` of the function words of every known
    language in the response, and at least `min_words` of them (a bare number is no language)."""

    language: str
    threshold: float = 0.6
    min_words: int = 2

    def __post_init__(self) -> None:
        if self.language not in FUNCTION_WORDS:
            raise EvomergeError(
                f"language_check.language: no word list for {self.language!r} (choose one of {sorted(FUNCTION_WORDS)})"
            )
        if not 0.0 < self.threshold <= 1.0:
            raise EvomergeError(f"language_check.threshold must be in (0, 1], got {self.threshold}")
        if self.min_words < 1:
            raise EvomergeError(f"language_check.min_words must be >= 1, got {self.min_words}")

    def __call__(self, response: str) -> bool:
        counts = function_word_counts(response)
        mine, total = counts[self.language], sum(counts.values())
        return mine >= self.min_words and mine >= self.threshold * total


def make_language_check(spec: Mapping[str, Any] | LanguageCheck | None) -> LanguageCheck | None:
    """A check from {"type": "japanese", "threshold": 0.5}, {"type": "words", "language": "fr", "threshold": 0.6}
    or {"type": "pattern", "pattern": ..., "word": ...}."""
    if spec is None or callable(spec):
        return spec
    fields = dict(spec)
    kind = fields.pop("type", None)
    kinds: dict[str, type] = {"japanese": JapaneseScript, "words": FunctionWordShare, "pattern": WordPattern}
    if kind not in kinds:
        raise EvomergeError(f"language_check.type: unknown check {kind!r} (choose one of {sorted(kinds)})")
    try:
        return kinds[kind](**fields)
    except TypeError as err:
        raise EvomergeError(f"language_check ({kind}): bad fields {sorted(fields)}: {err}") from err
