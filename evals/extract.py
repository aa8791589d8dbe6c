"""Answer extraction from generated text, and answer comparison with number normalization.

An extractor maps a response to the answer it states (or None when it states none):
`regex` (first group of the first match), `last_number` (Sakana's MGSM rule, but "1,000" is 1000,
not 0), `first_word`, `exact` (the stripped response). `answers_match` compares an extracted answer
with the gold string after normalization, so 1000 == "1,000" == "1000.0" == "１０００".
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

from merge_core.errors import EvomergeError

Extractor = Callable[[str], "str | None"]

# A number: optional minus (not a hyphen between digits), thousands groups of exactly three, decimals.
NUMBER_PATTERN = r"(?:(?<!\d)-)?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"
# The first whitespace-separated word, without trailing sentence punctuation ("7." -> "7", "3.5" stays).
FIRST_WORD_PATTERN = r"^\s*(\S+?)[.,!?;:。、．，？！]*(?:\s|$)"
_MINUS_SIGNS = str.maketrans({"\u2212": "-", "\u2012": "-", "\u2013": "-", "\uff0d": "-"})


def to_ascii(text: str) -> str:
    """NFKC-normalize (full-width digits and punctuation become ASCII) and unify minus signs."""
    return unicodedata.normalize("NFKC", text).translate(_MINUS_SIGNS)


def extract_regex(text: str, pattern: str | re.Pattern[str]) -> str | None:
    """The first capture group of the first match of `pattern` (the whole match if it has no group)."""
    match = re.search(pattern, text)
    if match is None:
        return None
    return (match.group(1) if match.re.groups else match.group(0)).strip()


def extract_last_number(text: str) -> str | None:
    """The last number in `text`, commas removed ("The answer is 1,234." -> "1234")."""
    numbers = re.findall(NUMBER_PATTERN, to_ascii(text))
    return numbers[-1].replace(",", "") if numbers else None


def extract_first_word(text: str) -> str | None:
    """The first word of `text` without trailing punctuation ("j7 ." -> "j7")."""
    return extract_regex(text, FIRST_WORD_PATTERN)


def extract_exact(text: str) -> str | None:
    """The whole response, stripped."""
    return text.strip()


def normalize_answer(answer: str) -> str:
    """Canonical form for comparison: NFKC + strip; numbers as plain decimals ("1,000.0" -> "1000")."""
    text = to_ascii(answer).strip()
    if not re.fullmatch(NUMBER_PATTERN, text):
        return text
    try:
        value = Decimal(text.replace(",", ""))
    except InvalidOperation:
        return text
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def answers_match(predicted: str | None, gold: str) -> bool:
    """Whether an extracted answer equals the gold answer after `normalize_answer`."""
    return predicted is not None and normalize_answer(predicted) == normalize_answer(gold)


@dataclass(frozen=True)
class RegexExtractor:
    """Extracts the first group of `pattern` (compiled once)."""

    pattern: str

    def __post_init__(self) -> None:
        try:
            re.compile(self.pattern)
        except re.error as err:
            raise EvomergeError(f"extract.pattern {self.pattern!r} is not a valid regex: {err}") from err

    def __call__(self, text: str) -> str | None:
        return extract_regex(text, self.pattern)


NAMED_EXTRACTORS: dict[str, Extractor] = {
    "last_number": extract_last_number,
    "first_word": extract_first_word,
    "exact": extract_exact,
}


def make_extractor(spec: str | Mapping[str, Any] | Extractor) -> Extractor:
    """An extractor from a name ("last_number"), {"type": "regex", "pattern": ...}, or a callable."""
    if callable(spec):
        return spec
    if isinstance(spec, str):
        if spec in NAMED_EXTRACTORS:
            return NAMED_EXTRACTORS[spec]
        raise EvomergeError(
            f"extract: unknown extractor {spec!r} (choose one of {sorted(NAMED_EXTRACTORS)} or "
            "{type: regex, pattern: ...})"
        )
    fields = dict(spec)
    kind = fields.pop("type", None)
    if kind == "regex":
        if set(fields) != {"pattern"}:
            raise EvomergeError(f"extract: a regex extractor takes exactly one field 'pattern', got {sorted(fields)}")
        return RegexExtractor(str(fields["pattern"]))
    if kind in NAMED_EXTRACTORS and not fields:
        return NAMED_EXTRACTORS[kind]
    raise EvomergeError(f"extract.type: unknown or malformed extractor {dict(spec)!r}")
