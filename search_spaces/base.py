"""The SearchSpace protocol: a box-bounded vector x in R^d <-> a MergeRecipe."""
from __future__ import annotations

from typing import Protocol, Sequence

from merge_core.recipe import MergeRecipe


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

    def decode(self, x: Sequence[float]) -> MergeRecipe: ...

    def encode(self, recipe: MergeRecipe) -> list[float]: ...
