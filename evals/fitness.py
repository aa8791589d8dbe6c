"""Fitness: a weighted sum of named metrics, each with a direction ("max" or "min"), to be maximized.

A "min" metric (perplexity, loss) is negated here, so users never encode direction as a negative
weight. A missing, NaN or infinite metric raises `FitnessError` naming it; the search marks that
trial FAIL with the message.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, Mapping, Sequence

from merge_core.errors import EvomergeError

Direction = Literal["max", "min"]


class FitnessError(EvomergeError):
    """A metric the fitness needs is missing or not a finite number."""


@dataclass(frozen=True)
class FitnessTerm:
    """One named metric, its weight and whether higher ("max") or lower ("min") is better."""

    metric: str
    weight: float = 1.0
    direction: Direction = "max"

    def __post_init__(self) -> None:
        if self.direction not in ("max", "min"):
            raise FitnessError(f"fitness term {self.metric!r}: direction must be 'max' or 'min', got {self.direction!r}")
        if not math.isfinite(self.weight):
            raise FitnessError(f"fitness term {self.metric!r}: weight must be a finite number, got {self.weight}")

    def value(self, metrics: Mapping[str, float]) -> float:
        """The metric, sign-flipped for "min", checked to be present and finite."""
        if self.metric not in metrics:
            raise FitnessError(f"fitness metric {self.metric!r} is missing from the results (have {sorted(metrics)})")
        value = float(metrics[self.metric])
        if not math.isfinite(value):
            raise FitnessError(f"fitness metric {self.metric!r} is {value} (not a finite number)")
        return value if self.direction == "max" else -value


def _as_term(term: FitnessTerm | Sequence[Any] | Mapping[str, Any]) -> FitnessTerm:
    if isinstance(term, FitnessTerm):
        return term
    if isinstance(term, Mapping):
        return FitnessTerm(**term)
    return FitnessTerm(*term)


class Fitness:
    """``score(metrics) = sum_i weight_i * (+metric_i if "max" else -metric_i)``; higher is better."""

    def __init__(self, terms: Sequence[FitnessTerm | Sequence[Any] | Mapping[str, Any]]) -> None:
        if not terms:
            raise FitnessError("fitness needs at least one term (metric, weight, direction)")
        self.terms = [_as_term(t) for t in terms]

    def score(self, metrics: Mapping[str, float]) -> float:
        """The weighted, direction-signed sum."""
        return sum(t.weight * t.value(metrics) for t in self.terms)

    def objectives(self, metrics: Mapping[str, float]) -> list[float]:
        """Each term's direction-signed metric (unweighted), all to be maximized: for multi-objective search."""
        return [t.value(metrics) for t in self.terms]
