"""The SearchSpace protocol: a box-bounded vector x in R^d -> a Recipe (ParameterSpace: MergeRecipe, DataFlowSpace:
DataFlowRecipe). Each space also has ``encode``, the inverse for its own recipe kind, which the loop does not use."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from merge_core.recipe import Recipe


class SearchSpace(Protocol):
    """What the search loop needs from a genome: names and bounds for the optimizer, and the decoding."""

    @property
    def dim(self) -> int: ...

    @property
    def names(self) -> list[str]:
        """One readable name per coordinate (the Optuna parameter names)."""

    @property
    def bounds(self) -> list[tuple[float, float]]: ...

    @property
    def x0(self) -> list[float]:
        """The starting point (evaluated first)."""

    def decode(self, x: Sequence[float]) -> Recipe: ...
