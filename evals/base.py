"""The Evaluator protocol: score a live model, return named metrics.

An evaluator is built once per worker (data loaded, tasks indexed) and called once per candidate. Native
evaluators also score item by item (`score_items`) over a stretch of one seeded item order shared by every
candidate of a run (`item_order`), for paired comparisons, racing and intervals.
The same model object is passed again with its weights changed in place, so an evaluator must
never cache results across calls.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from transformers import PreTrainedModel, PreTrainedTokenizerBase


@runtime_checkable
class Evaluator(Protocol):
    """Scores a model: ``evaluate(model, tokenizer) -> {metric: value}`` (keys without the evaluator's name)."""

    name: str

    def evaluate(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> dict[str, float]: ...


@dataclass
class ItemScores:
    """One evaluator's results item by item, for a stretch of its run-wide item order (`item_order`).

    ``values[metric][j]`` is the score of the item at order position ``start + j`` (0/1 for correctness, a float
    for soft scores); the evaluator's metric is the mean of these over the items (a ``weights``-weighted mean where
    given: perplexity weighs each document by its predicted tokens). ``tokens`` counts the tokens generated.
    """

    start: int
    values: dict[str, list[float]]
    weights: list[float] | None = None
    tokens: int = 0

    @property
    def n(self) -> int:
        return len(next(iter(self.values.values()), []))

    def extend(self, more: ItemScores) -> ItemScores:
        """These items followed by `more` (the next stretch of the order)."""
        if more.start != self.start + self.n:
            raise ValueError(f"items {more.start}.. do not follow items {self.start}..{self.start + self.n - 1}")
        weights = None if self.weights is None else self.weights + list(more.weights or [])
        values = {k: v + more.values[k] for k, v in self.values.items()}
        return ItemScores(self.start, values, weights, self.tokens + more.tokens)


def item_order(n: int, seed: int) -> list[int]:
    """The run's order of a task's `n` items: a permutation seeded by the run seed, the same for every candidate,
    so any prefix is a random subset and any two candidates compare item by item."""
    order = list(range(n))
    random.Random(f"evomerge-item-order-{seed}").shuffle(order)
    return order
