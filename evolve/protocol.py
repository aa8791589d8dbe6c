"""A stage's item protocol (`evolve.config.Protocol`): which items of each search task a trial scores.

Every evaluator that scores item by item has one seeded item order for the run (`evals.base.item_order`). A
protocol splits each task's items by position in the task (its rows in the order the data gives them): the last
``validation`` items are kept for the pick, the others are the search pool. In the pool, the run's item order
(restricted to the pool) is read as a ring: batch k is the stretch of ``batch`` items starting at position
``k * batch`` (mod the pool), so successive batches walk through every pool item before any repeats, and trials
``k * every`` .. ``(k + 1) * every - 1`` share batch k. A trial's ``items`` record then holds its batch, scored
out of the pool (``n`` of ``of``), and the trial's ``batch`` attr says which stretch it was.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from merge_core.errors import EvomergeError


@dataclass(frozen=True)
class TrialItems:
    """What one trial scores under a protocol: the pool without the last `validation` items of each task, all of
    it (`batch` None) or batch number `index` of `batch` items."""

    validation: int = 0
    batch: int | None = None
    index: int = 0
    where: str = "search.protocol"

    @classmethod
    def for_trial(cls, protocol: Any, number: int, where: str) -> TrialItems | None:
        if protocol is None:
            return None
        index = number // protocol.every if protocol.batch is not None else 0
        return cls(protocol.validation, protocol.batch, index, where)

    def attr(self) -> dict[str, int] | None:
        """The trial's ``batch`` user attr (None without batches)."""
        return None if self.batch is None else {"index": self.index, "size": self.batch}

    def order(self, order: Sequence[int], n: int, task: str) -> tuple[list[int], int | None]:
        """(the trial's item order, how many of its first items to score: None for all) for a task of `n` items."""
        search_items(n, self.validation, self.batch, task, self.where)
        pool = pool_order(order, n, self.validation, task, self.where)
        if self.batch is None:
            return pool, None
        start = (self.index * self.batch) % len(pool)
        return pool[start:] + pool[:start], self.batch


def search_items(n: int, validation: int, batch: int | None, task: str, where: str) -> int:
    """The protocol's rule for a task of `n` items (its limit applied), as the worker applies it to every trial and
    `evolve check` before the search: some items must be left for the search once the last `validation` are kept
    for the pick, and a batch must fit in them. Returns how many items a trial scores."""
    if validation >= n:
        raise EvomergeError(
            f"{where}.validation: {validation} items kept for the pick, but task '{task}' has {n}; "
            "keep fewer (or give the task more items)"
        )
    if batch is not None and batch > n - validation:
        raise EvomergeError(
            f"{where}.batch: {batch} items per trial, but task '{task}' has {n - validation} search items "
            f"({n} less {validation} for validation); lower batch"
        )
    return n - validation if batch is None else batch


def pool_order(order: Sequence[int], n: int, validation: int, task: str, where: str) -> list[int]:
    """The run's item order without the task's last `validation` items."""
    search_items(n, validation, None, task, where)
    return [i for i in order if i < n - validation]


def validation_order(order: Sequence[int], n: int, validation: int, task: str, where: str) -> list[int]:
    """The run's item order restricted to the task's last `validation` items."""
    pool_order(order, n, validation, task, where)  # the same check
    return [i for i in order if i >= n - validation]


def n_items(evaluator: Any) -> int:
    return len(getattr(evaluator, "items", None) or evaluator.documents)


@contextmanager
def trial_orders(evaluators: list[tuple[str, Any]], items: TrialItems | None) -> Iterator[dict[str, int] | None]:
    """Within the block, every evaluator reads the trial's item order; yields how many items of each task to
    score (None: all). The evaluators' own orders are restored after."""
    if items is None:
        yield None
        return
    saved = {name: ev.order for name, ev in evaluators}
    upto: dict[str, int] = {}
    try:
        for name, ev in evaluators:
            ev.order, stop = items.order(saved[name], n_items(ev), name)
            upto[name] = len(ev.order) if stop is None else stop
        yield upto
    finally:
        for name, ev in evaluators:
            ev.order = saved[name]


def use_validation(evaluators: list[tuple[str, Any]], validation: int, where: str) -> None:
    """Make freshly built evaluators read only their task's validation items (for re-scoring the elites)."""
    for name, ev in evaluators:
        ev.order = validation_order(ev.order, n_items(ev), validation, name, where)
