"""The tiny zoo's world: languages E and J (a word cipher of E), word problems, and the training mixtures.

E is an English-like toy language ("eva has 13 pens . eva sells 4 pens . how many pens does eva have ?
answer 9"); J is the same text with every word replaced by its cipher word (`CIPHER`), its own numerals
(`j0`..`j18`) and the answer cue `kotae`. Sentences are built in E as lists of words and integers, then
rendered into E, J or code-switched text ("mix": every word independently E or J with probability 0.5).
The answer's numeral language follows the cue word (`answer` -> digits, `kotae` -> J numerals) everywhere
except in the math expert's data, which always answers in digits: that gap is what a merge must close.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

Lang = Literal["e", "j", "mix"]
Word = str | int  # a canonical E word, or a number rendered as a numeral at render time
Doc = list[str]  # a rendered document: whitespace-separated words, without the terminator
Sampler = Callable[[random.Random], Doc]

MAX_NUMBER = 18  # numerals exist for 0..18
MAX_OPERAND = 9  # addition operands 0..9; subtraction a - b with b in 0..9 and a - b in 0..9
TERMINATOR = "</s>"  # ends every document, i.e. follows every answer (the tokenizer's eos token)
E_CUE, J_CUE = "answer", "kotae"

NAMES = ("eva", "tom", "ann", "ben", "kim", "max", "lia", "sam")
OBJECTS = ("pens", "apples", "cups", "books", "coins", "cards", "eggs", "hats")
ADD_VERBS = ("buys", "gets", "finds")
SUB_VERBS = ("sells", "loses", "gives")
OTHER_VERBS = ("has", "sees", "wants")

CIPHER: dict[str, str] = {
    "eva": "hana",
    "tom": "kenji",
    "ann": "yuki",
    "ben": "sora",
    "kim": "riku",
    "max": "mei",
    "lia": "aoi",
    "sam": "jun",
    "pens": "enpitsu",
    "apples": "ringo",
    "cups": "koppu",
    "books": "hon",
    "coins": "koin",
    "cards": "kaado",
    "eggs": "tamago",
    "hats": "boushi",
    "buys": "kau",
    "gets": "morau",
    "finds": "mitsukeru",
    "sells": "uru",
    "loses": "nakusu",
    "gives": "ageru",
    "has": "motsu",
    "sees": "miru",
    "wants": "hoshii",
    "how": "dono",
    "many": "ikutsu",
    "does": "ga",
    "have": "aru",
    "?": "？",
    ".": "。",
    E_CUE: J_CUE,
}


def e_numeral(n: int) -> str:
    """E writes numbers as digits: 7 -> "7"."""
    return str(n)


def j_numeral(n: int) -> str:
    """J has its own numeral words: 7 -> "j7"."""
    return f"j{n}"


def numeral(n: int, lang: Literal["e", "j"]) -> str:
    """The numeral for `n` in language `lang`."""
    return e_numeral(n) if lang == "e" else j_numeral(n)


def vocabulary() -> list[str]:
    """Every word of the world (special tokens excluded), in a fixed order: E words, J words, numerals."""
    e_words = list(CIPHER)
    numbers = range(MAX_NUMBER + 1)
    return e_words + [CIPHER[w] for w in e_words] + [e_numeral(n) for n in numbers] + [j_numeral(n) for n in numbers]


def render_word(word: Word, lang: Literal["e", "j"]) -> str:
    """One canonical word (or number) in language `lang`."""
    if isinstance(word, int):
        return numeral(word, lang)
    return word if lang == "e" else CIPHER[word]


def render(words: Sequence[Word], lang: Lang, rng: random.Random) -> Doc:
    """Render canonical words into E, J, or code-switched text (each word E or J with p 0.5)."""
    if lang == "mix":
        return [render_word(w, "e" if rng.random() < 0.5 else "j") for w in words]
    return [render_word(w, lang) for w in words]


def cue_language(cue: str) -> Literal["e", "j"]:
    """The numeral language a cue word asks for: `answer` -> digits, `kotae` -> J numerals."""
    return "j" if cue == J_CUE else "e"


# --- items: arithmetic problems and retrieval questions -------------------------------------------


@dataclass(frozen=True)
class Problem:
    """'NAME has FIRST OBJ . NAME VERB SECOND OBJ . how many OBJ does NAME have ?' -> FIRST ± SECOND."""

    name: str
    obj: str
    verb: str
    first: int
    second: int

    @property
    def op(self) -> Literal["add", "sub"]:
        return "add" if self.verb in ADD_VERBS else "sub"

    @property
    def value(self) -> int:
        return self.first + self.second if self.op == "add" else self.first - self.second

    def words(self) -> list[Word]:
        n, o = self.name, self.obj
        return [
            n,
            "has",
            self.first,
            o,
            ".",
            n,
            self.verb,
            self.second,
            o,
            ".",
            "how",
            "many",
            o,
            "does",
            n,
            "have",
            "?",
        ]


@dataclass(frozen=True)
class Recall:
    """Question answering: 'NAME has N OBJ . how many OBJ does NAME have ?' -> N (copy, and translate the numeral)."""

    name: str
    obj: str
    count: int

    @property
    def value(self) -> int:
        return self.count

    def words(self) -> list[Word]:
        n, o = self.name, self.obj
        return [n, "has", self.count, o, ".", "how", "many", o, "does", n, "have", "?"]


Item = Problem | Recall


def sample_problem(rng: random.Random, op: Literal["add", "sub"]) -> Problem:
    """A random addition (operands 0..9) or subtraction (a - b, b in 0..9, result in 0..9) problem."""
    second = rng.randint(0, MAX_OPERAND)
    if op == "add":
        first, verb = rng.randint(0, MAX_OPERAND), rng.choice(ADD_VERBS)
    else:
        first, verb = second + rng.randint(0, MAX_OPERAND), rng.choice(SUB_VERBS)
    return Problem(rng.choice(NAMES), rng.choice(OBJECTS), verb, first, second)


def sample_recall(rng: random.Random) -> Recall:
    """A fact about one person and a question about it."""
    return Recall(rng.choice(NAMES), rng.choice(OBJECTS), rng.randint(0, MAX_NUMBER))


def sample_item(rng: random.Random, kind: Literal["add", "sub", "recall"]) -> Item:
    """A random item of one kind."""
    return sample_recall(rng) if kind == "recall" else sample_problem(rng, kind)


def sample_narrative(rng: random.Random) -> list[Word]:
    """Two to four unrelated 'NAME VERB N OBJ .' sentences with any verb (no question, no answer)."""
    verbs = ADD_VERBS + SUB_VERBS + OTHER_VERBS
    words: list[Word] = []
    for _ in range(rng.randint(2, 4)):
        words += [rng.choice(NAMES), rng.choice(verbs), rng.randint(0, MAX_NUMBER), rng.choice(OBJECTS), "."]
    return words


def pose(item: Item, lang: Lang, cue_lang: Lang, rng: random.Random) -> tuple[Doc, str]:
    """(prompt, cue) : the item's question in `lang`, followed by the cue word in `cue_lang`."""
    prompt = render(item.words(), lang, rng)
    cue = render([E_CUE], cue_lang, rng)[0]
    return prompt + [cue], cue


# --- training mixtures ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mixture:
    """A weighted choice among document samplers."""

    parts: tuple[tuple[float, Sampler], ...]

    def sample(self, rng: random.Random) -> Doc:
        weights = [w for w, _ in self.parts]
        sampler = rng.choices([s for _, s in self.parts], weights=weights)[0]
        return sampler(rng)


def qa_sampler(
    kind: Literal["add", "sub", "recall"],
    lang: Lang,
    cue_lang: Lang,
    answer_lang: Literal["e", "j", "cue"],
    reserved: frozenset[Item],
) -> Sampler:
    """Documents 'question cue answer' for items of `kind` not in `reserved`; "cue" answers in the cue's language."""

    def sample(rng: random.Random) -> Doc:
        item = sample_item(rng, kind)
        while item in reserved:
            item = sample_item(rng, kind)
        prompt, cue = pose(item, lang, cue_lang, rng)
        lang_of_answer = cue_language(cue) if answer_lang == "cue" else answer_lang
        return prompt + [numeral(item.value, lang_of_answer)]

    return sample


def narrative_sampler(lang: Lang) -> Sampler:
    """Narrative documents rendered in `lang`."""
    return lambda rng: render(sample_narrative(rng), lang, rng)


def base_mixture(reserved: frozenset[Item]) -> Mixture:
    """Base: E and J text, code-switched text and QA (grounding J in E), addition answered in digits; no subtraction."""
    return Mixture(
        (
            (0.25 * 0.7, narrative_sampler("e")),
            (0.25 * 0.3, qa_sampler("recall", "e", "e", "e", reserved)),
            (0.15, narrative_sampler("j")),
            (0.30 * 0.7, narrative_sampler("mix")),
            (0.30 * 0.3, qa_sampler("recall", "mix", "mix", "cue", reserved)),
            (0.30 * 0.5, qa_sampler("add", "e", "e", "e", reserved)),
            (0.30 * 0.5, qa_sampler("add", "mix", "e", "e", reserved)),
        )
    )


def expert_ja_mixture(reserved: frozenset[Item]) -> Mixture:
    """The "Japanese" expert: J QA and J-posed addition answered `kotae` + J numeral, J text; no subtraction."""
    return Mixture(
        (
            (0.40, qa_sampler("add", "j", "j", "j", reserved)),
            (0.40, qa_sampler("recall", "j", "j", "j", reserved)),
            (0.20, narrative_sampler("j")),
        )
    )


def expert_math_mixture(reserved: frozenset[Item]) -> Mixture:
    """The "math" expert: subtraction posed in E, J and code-switched text, always answered in digits."""
    problems = 0.80
    return Mixture(
        (
            (0.20 * 0.7, narrative_sampler("e")),
            (0.20 * 0.3, qa_sampler("recall", "e", "e", "e", reserved)),
            (problems * 0.25, qa_sampler("sub", "j", "mix", "e", reserved)),
            (problems * 0.25, qa_sampler("sub", "mix", "mix", "e", reserved)),
            (problems * 0.25, qa_sampler("sub", "e", "e", "e", reserved)),
            (problems * 0.25, qa_sampler("add", "e", "e", "e", reserved)),
        )
    )


# --- evaluation tasks -------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskSpec:
    """An evaluation task: items of one kind, posed in one language, answered with one numeral word."""

    name: str
    description: str
    kind: Literal["add", "sub", "recall"]
    lang: Literal["e", "j"]  # the question, the cue and the answer's numeral are all in this language

    def example(self, item: Item, rng: random.Random) -> tuple[str, str]:
        """(prompt, answer): the prompt ends with the cue word; the answer is the gold numeral word."""
        prompt, _ = pose(item, self.lang, self.lang, rng)
        return " ".join(prompt), numeral(item.value, self.lang)


TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in (
        TaskSpec(
            "ja_sub",
            "Target: subtraction posed in J, correct only when answered with the J numeral "
            "(no source model can do both).",
            "sub",
            "j",
        ),
        TaskSpec(
            "ja_add", "Retained skill of the J expert: addition posed in J, answered with the J numeral.", "add", "j"
        ),
        TaskSpec(
            "en_sub", "Retained skill of the math expert: subtraction posed in E, answered in digits.", "sub", "e"
        ),
        TaskSpec("en_add", "Retained skill of the base: addition posed in E, answered in digits.", "add", "e"),
        TaskSpec(
            "ja_qa",
            "Retained skill of the J expert: retrieval QA posed in J, answered with the J numeral.",
            "recall",
            "j",
        ),
    )
}
