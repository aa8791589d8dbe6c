"""Three short-answer skills for the multi-skill target: one expert per skill, the target is their mix.

SmolLM2-135M-Instruct half-knows each of them (it talks about the question, and gets the bare answer right almost
never); a light LoRA fine-tune teaches one skill and the short answer form. Every answer is checkable by exact
match, and short (at most a dozen tokens), so a candidate is scored on hundreds of items in seconds.

    arith   "What is 47 + 38? Answer with the number only."                       -> "85"
    units   "How many grams are in 47 kilograms? Answer with the number only."    -> "47000"
    rev     "Reverse the order of this list: apple, river, chair. ..."             -> "chair, river, apple"

(A fourth skill, counting weekdays forward and back by up to 30 days on held-out (day, offset, direction) triples,
did not train: its answer-token loss stayed at chance, 0.63-0.66, from step 11 to step 71; bench/RESULTS.md.)

`skill_pairs(skill, n, seed)` is an expert's training text; `skill_items(skill, n, seed)` a dev or test split,
with no item whose prompt is a training prompt. Everything comes from seeded RNGs, deterministically.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable
from pathlib import Path

SKILLS = ("arith", "units", "rev")
TRAIN_EXAMPLES, TRAIN_SEED = 2000, 0
TASK_SEEDS = {"dev": 101, "test": 202, "val": 303}  # never the training seed
# per skill: the target's test split holds 600 items; `val` (multi-skill only) is for re-scoring a search's elites
TASK_SIZES = {"dev": 64, "test": 200, "val": 200}

WORDS = (
    "apple", "river", "chair", "cloud", "tiger", "lamp", "bread", "stone", "garden", "music", "paper", "horse",
    "window", "candle", "forest", "bottle", "pencil", "island", "mirror", "rabbit", "basket", "guitar", "ocean",
    "ticket", "winter", "button", "castle", "dragon", "feather", "lemon", "planet", "rocket", "silver", "tomato",
    "violin", "wallet", "yellow", "zebra", "anchor", "blanket",
)  # fmt: skip

Pair = tuple[str, str]


def _arith(rng: random.Random) -> Pair:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    if rng.random() < 0.5:
        return f"What is {a} + {b}? Answer with the number only.", str(a + b)
    a, b = max(a, b), min(a, b)
    return f"What is {a} - {b}? Answer with the number only.", str(a - b)


UNITS = (  # (larger unit, smaller unit, smaller units per larger one)
    ("kilometers", "meters", 1000),
    ("meters", "centimeters", 100),
    ("kilograms", "grams", 1000),
    ("liters", "milliliters", 1000),
    ("centimeters", "millimeters", 10),
    ("meters", "millimeters", 1000),
)


def _units(rng: random.Random) -> Pair:
    """A unit conversion by a power of ten, either way: how many small units in N large ones, or large in small."""
    big, small, factor = rng.choice(UNITS)
    n = rng.randint(2, 999)
    if rng.random() < 0.5:
        return f"How many {small} are in {n} {big}? Answer with the number only.", str(n * factor)
    return f"How many {big} are in {n * factor} {small}? Answer with the number only.", str(n)


def _rev(rng: random.Random) -> Pair:
    words = rng.sample(WORDS, rng.randint(3, 5))
    q = f"Reverse the order of this list: {', '.join(words)}. Answer with the list only."
    return q, ", ".join(reversed(words))


MAKERS: dict[str, Callable[[random.Random], Pair]] = {"arith": _arith, "units": _units, "rev": _rev}


def skill_pairs(skill: str, n: int, seed: int) -> list[Pair]:
    """`n` (prompt, answer) pairs of `skill` (an expert's training text)."""
    rng = random.Random(f"{skill}/{seed}")
    return [MAKERS[skill](rng) for _ in range(n)]


@functools.cache
def _training_prompts(skill: str) -> frozenset[str]:
    return frozenset(q for q, _ in skill_pairs(skill, TRAIN_EXAMPLES, TRAIN_SEED))


def skill_items(skill: str, n: int, seed: int, exclude: frozenset[str] = frozenset()) -> list[dict[str, str]]:
    """`n` distinct items of `skill`, none of them a training prompt nor in `exclude`: {"id", "prompt", "answer"}."""
    rng = random.Random(f"{skill}-items/{seed}")
    seen: set[str] = set(exclude)
    items: list[dict[str, str]] = []
    while len(items) < n:
        prompt, answer = MAKERS[skill](rng)
        if prompt in seen or prompt in _training_prompts(skill):
            continue
        seen.add(prompt)
        items.append({"id": f"{skill}-{seed}-{len(items):03d}", "prompt": prompt, "answer": answer})
    return items


def write_skill_tasks(root: str | Path) -> dict[str, Path]:
    """data/real_tasks/skills/<skill>/{dev,test,val}.jsonl (deterministic; what the multi-skill configs read): the
    three splits share no prompt, and none is a training prompt."""
    from evals.data import write_jsonl

    root = Path(root)
    out = {}
    for skill in SKILLS:
        splits: dict[str, list[dict[str, str]]] = {}
        for split in ("dev", "test", "val"):  # each excludes the splits before it (dev and test as first written)
            taken = frozenset(i["prompt"] for items in splits.values() for i in items)
            splits[split] = skill_items(skill, TASK_SIZES[split], TASK_SEEDS[split], exclude=taken)
        for split, items in splits.items():
            out[f"{skill}/{split}"] = write_jsonl(root / skill / f"{split}.jsonl", items)
    return out


# ---------------------------------------------------------------- composition: arithmetic answered in French words

UNITS_FR = (
    "zéro", "un", "deux", "trois", "quatre", "cinq", "six", "sept", "huit", "neuf", "dix", "onze", "douze", "treize",
    "quatorze", "quinze", "seize",
)  # fmt: skip
TENS_FR = {2: "vingt", 3: "trente", 4: "quarante", 5: "cinquante", 6: "soixante"}


def french_words(n: int) -> str:
    """`n` (0-199) in French words, traditional spelling with hyphens under a hundred ("soixante-et-onze",
    "quatre-vingts", "quatre-vingt-dix-sept", "cent vingt-et-un")."""
    if not 0 <= n < 200:
        raise ValueError(f"{n} is outside 0-199")
    if n >= 100:
        return "cent" if n == 100 else f"cent {french_words(n - 100)}"
    if n < 17:
        return UNITS_FR[n]
    if n < 20:
        return f"dix-{UNITS_FR[n - 10]}"
    if n < 70:
        tens, unit = divmod(n, 10)
        return TENS_FR[tens] + ("" if unit == 0 else "-et-un" if unit == 1 else f"-{UNITS_FR[unit]}")
    if n < 80:
        return "soixante-et-onze" if n == 71 else f"soixante-{french_words(n - 60)}"
    return "quatre-vingts" if n == 80 else f"quatre-vingt-{french_words(n - 80)}"


FR_NUM_TEMPLATES = (
    "Écris le nombre {n} en toutes lettres.",
    "Comment écrit-on {n} en lettres ?",
    "Donne le nombre {n} en toutes lettres, sans chiffres.",
)


def fr_num_pairs(n: int, seed: int) -> list[Pair]:
    """The form expert's training text: a number (0-199) written in French words; no arithmetic."""
    rng = random.Random(f"fr_num/{seed}")
    pairs = []
    for _ in range(n):
        k = rng.randrange(200)
        pairs.append((rng.choice(FR_NUM_TEMPLATES).format(n=k), french_words(k)))
    return pairs


def fr_sum_items(n: int, seed: int, exclude: frozenset[str] = frozenset()) -> list[dict[str, str]]:
    """The composition target: two-digit additions and subtractions asked in French, answered in French words
    (the arithmetic is `arith`'s skill, the words `fr_num`'s form). No item is an `arith` training question."""
    rng = random.Random(f"fr_sum-items/{seed}")
    seen: set[str] = set(exclude)
    items: list[dict[str, str]] = []
    while len(items) < n:
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        if rng.random() < 0.5:
            english, value = f"What is {a} + {b}? Answer with the number only.", a + b
            prompt = f"Combien font {a} + {b} ? Réponds en toutes lettres."
        else:
            a, b = max(a, b), min(a, b)
            english, value = f"What is {a} - {b}? Answer with the number only.", a - b
            prompt = f"Combien font {a} - {b} ? Réponds en toutes lettres."
        if prompt in seen or english in _training_prompts("arith"):
            continue
        seen.add(prompt)
        items.append({"id": f"fr_sum-{seed}-{len(items):03d}", "prompt": prompt, "answer": french_words(value)})
    return items


def write_fr_sum_tasks(root: str | Path) -> dict[str, Path]:
    """data/real_tasks/fr_sum/{dev,test}.jsonl (deterministic); no test item is a dev item."""
    from evals.data import write_jsonl

    root = Path(root)
    dev = fr_sum_items(TASK_SIZES["dev"], TASK_SEEDS["dev"])
    test = fr_sum_items(TASK_SIZES["test"], TASK_SEEDS["test"], exclude=frozenset(i["prompt"] for i in dev))
    return {
        f"fr_sum/{split}": write_jsonl(root / "fr_sum" / f"{split}.jsonl", items)
        for split, items in (("dev", dev), ("test", test))
    }


__all__ = [
    "SKILLS", "fr_num_pairs", "fr_sum_items", "french_words", "skill_items", "skill_pairs", "write_fr_sum_tasks",
    "write_skill_tasks",
]  # fmt: skip
