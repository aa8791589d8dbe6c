"""The evaluator contract: score a live model, return named metrics and the per-item records behind them.

An evaluator is built once per worker (data loaded, tasks indexed) and called once per candidate. The same model
object is passed again with its weights changed in place, so an evaluator must never cache results across calls.

- `Evaluator`: every evaluator. `evaluate_items(model, tokenizer)` scores the whole task: its metrics, and per-item
  records (`ItemScores`) keyed by record name ("" for the evaluator's own items, a sub-task's name for a family of
  tasks such as lm-eval's groups); `item_counts()` says how many items each record holds; `metric_names(**fields)`
  says which metrics a task built with these fields reports (None when only its task files know).
- `ItemEvaluator`: an evaluator that scores any stretch of one seeded item order shared by every candidate of a run
  (`item_order`): `score_items(model, tokenizer, start, stop)` and `aggregate(scores)`. Racing, item protocols and
  paired comparisons need it; the native evaluators are ItemEvaluators.
"""

from __future__ import annotations

import abc
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

OWN_ITEMS = ""  # the record name of an evaluator's own items


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


class Evaluator(abc.ABC):
    """Scores a model: metrics (keys without the evaluator's name) and per-item records."""

    name: str

    @classmethod
    @abc.abstractmethod
    def metric_names(cls, **fields: Any) -> tuple[str, ...] | None:
        """The keys `evaluate` returns for a task built with these constructor fields (checked before a search
        starts); None when only the task files know them."""

    @abc.abstractmethod
    def evaluate_items(
        self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase
    ) -> tuple[dict[str, float], dict[str, ItemScores]]:
        """The metrics, and the per-item records behind them by record name (`OWN_ITEMS` for the evaluator's own
        items)."""

    @abc.abstractmethod
    def item_counts(self) -> dict[str, int]:
        """Items per record name, as `evaluate_items` scores them."""

    def evaluate(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> dict[str, float]:
        return self.evaluate_items(model, tokenizer)[0]


class ItemEvaluator(Evaluator):
    """An evaluator that scores any stretch [start, stop) of its run-wide item order `order`."""

    order: Sequence[int]
    metrics: tuple[str, ...] = ()  # what `evaluate` returns, unless `metric_names` says otherwise

    @classmethod
    def metric_names(cls, **fields: Any) -> tuple[str, ...] | None:
        return cls.metrics

    @abc.abstractmethod
    def score_items(
        self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, start: int = 0, stop: int | None = None
    ) -> ItemScores:
        """Per-item scores of the items at positions [start, stop) of `order` (see `ItemScores`)."""

    @abc.abstractmethod
    def aggregate(self, scores: ItemScores) -> dict[str, float]:
        """The metrics of scored items."""

    def evaluate_items(
        self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase
    ) -> tuple[dict[str, float], dict[str, ItemScores]]:
        scores = self.score_items(model, tokenizer)
        return self.aggregate(scores), {OWN_ITEMS: scores}

    def item_counts(self) -> dict[str, int]:
        return {OWN_ITEMS: len(self.order)}
