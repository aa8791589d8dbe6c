"""Three short-answer skills for the multi-skill target: one expert per skill, the target is their mix.

SmolLM2-135M-Instruct half-knows each of them (it talks about the question, and gets the bare answer right almost
never); a light LoRA fine-tune teaches one skill and the short answer form. Every answer is checkable by exact
match, and short (at most a dozen tokens), so a candidate is scored on hundreds of items in seconds.

    arith   "What is 47 + 38? Answer with the number only."                       -> "85"
    days    "Today is Monday. What day of the week will it be in 3 days? ..."      -> "Thursday"
    rev     "Reverse the order of this list: apple, river, chair. ..."             -> "chair, river, apple"

`skill_pairs(skill, n, seed)` is an expert's training text; `skill_items(skill, n, seed)` a dev or test split,
with no item whose prompt is a training prompt. Everything comes from seeded RNGs, deterministically.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable
from pathlib import Path

SKILLS = ("arith", "days", "rev")
TRAIN_EXAMPLES, TRAIN_SEED = 2000, 0
TASK_SEEDS = {"dev": 101, "test": 202}  # never the training seed
TASK_SIZES = {"dev": 64, "test": 200}  # per skill: the target's test split holds 600 items

DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
WORDS = (
    "apple", "river", "chair", "cloud", "tiger", "lamp", "bread", "stone", "garden", "music", "paper", "horse",
    "window", "candle", "forest", "bottle", "pencil", "island", "mirror", "rabbit", "basket", "guitar", "ocean",
    "ticket", "winter", "button", "castle", "dragon", "feather", "lemon", "planet", "rocket", "silver", "tomato",
    "violin", "wallet", "yellow", "zebra", "anchor", "blanket",
)  # fmt: skip

Pair = tuple[str, str]


def _arith(rng: random.Random, train: bool = True) -> Pair:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    if rng.random() < 0.5:
        return f"What is {a} + {b}? Answer with the number only.", str(a + b)
    a, b = max(a, b), min(a, b)
    return f"What is {a} - {b}? Answer with the number only.", str(a - b)


DAY_TEMPLATES = {
    1: (
        "Today is {day}. What day of the week will it be in {k} days? Answer with the day only.",
        "What day of the week comes {k} days after {day}? Answer with the day only.",
        "If it is {day} today, which day will it be {k} days from now? Answer with the day only.",
    ),
    -1: (
        "Today is {day}. What day of the week was it {k} days ago? Answer with the day only.",
        "What day of the week comes {k} days before {day}? Answer with the day only.",
        "If it is {day} today, which day was it {k} days earlier? Answer with the day only.",
    ),
}
DAYS_HELD_OUT = 0.3  # share of (day, offset, direction) triples that only dev/test items use


def _held_out_triple(today: int, k: int, sign: int) -> bool:
    return random.Random(f"days-split/{today}/{k}/{sign}").random() < DAYS_HELD_OUT


def _days(rng: random.Random, train: bool = True) -> Pair:
    """Weekday arithmetic; training and test items use disjoint (day, offset, direction) triples, so the expert
    must count, not remember."""
    while True:
        today, k, sign = rng.randrange(7), rng.randint(1, 30), rng.choice((1, -1))
        if _held_out_triple(today, k, sign) != train:
            break
    q = rng.choice(DAY_TEMPLATES[sign]).format(day=DAYS[today], k=k)
    return q, DAYS[(today + sign * k) % 7]


def _rev(rng: random.Random, train: bool = True) -> Pair:
    words = rng.sample(WORDS, rng.randint(3, 5))
    q = f"Reverse the order of this list: {', '.join(words)}. Answer with the list only."
    return q, ", ".join(reversed(words))


MAKERS: dict[str, Callable[[random.Random, bool], Pair]] = {"arith": _arith, "days": _days, "rev": _rev}


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
        prompt, answer = MAKERS[skill](rng, False)
        if prompt in seen or prompt in _training_prompts(skill):
            continue
        seen.add(prompt)
        items.append({"id": f"{skill}-{seed}-{len(items):03d}", "prompt": prompt, "answer": answer})
    return items


def write_skill_tasks(root: str | Path) -> dict[str, Path]:
    """data/real_tasks/skills/<skill>/{dev,test}.jsonl (deterministic; what the multi-skill configs read); no test
    item is a dev item."""
    from evals.data import write_jsonl

    root = Path(root)
    out = {}
    for skill in SKILLS:
        dev = skill_items(skill, TASK_SIZES["dev"], TASK_SEEDS["dev"])
        test = skill_items(skill, TASK_SIZES["test"], TASK_SEEDS["test"], exclude=frozenset(i["prompt"] for i in dev))
        for split, items in (("dev", dev), ("test", test)):
            out[f"{skill}/{split}"] = write_jsonl(root / skill / f"{split}.jsonl", items)
    return out


__all__ = ["SKILLS", "skill_items", "skill_pairs", "write_skill_tasks"]
