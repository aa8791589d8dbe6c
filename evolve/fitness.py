"""Fitness: a weighted sum of named metrics, each with a direction ("max" or "min"), to be maximized; or, for a
multi-objective search, `Objectives`: several metrics told to the study as they are, each with its direction.

A "min" metric (perplexity, loss) is negated here, so users never encode direction as a negative
weight. A missing, NaN or infinite metric raises `FitnessError` naming it; the search marks that
trial FAIL with the message. `FitnessTerm` is also the config's `evaluation.fitness` entry.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from merge_core.errors import EvomergeError

PROPORTIONS = ("acc", "acc_value", "lang_ok", "gold_prob", "exact_match", "acc_norm")  # values in [0, 1]
# the values a metric can take, by its name's last part: a proportion in [0, 1], a log-probability <= 0, ...
METRIC_RANGES = {
    **dict.fromkeys(PROPORTIONS, (0.0, 1.0)),
    "gold_logprob": (-math.inf, 0.0),
    "nll": (0.0, math.inf),
    "ppl": (1.0, math.inf),
}


def metric_range(metric: str) -> tuple[float, float] | None:
    """(lowest, highest) value a metric can take, from its name (`task/acc`, `lm/task/exact_match,filter`); None
    when the name does not say."""
    return METRIC_RANGES.get(metric.rsplit("/", 1)[-1].split(",", 1)[0])


def is_proportion(metric: str) -> bool:
    """A metric whose values lie in [0, 1] (`PROPORTIONS`)."""
    return metric_range(metric) == (0.0, 1.0)


def unreachable_reference(metric: str, direction: str, value: float) -> str | None:
    """Why a hypervolume reference `value` no trial can beat on this objective (every hypervolume would be 0), or
    None: a maximized metric's reference at or above its highest possible value, a minimized one's at or below its
    lowest."""
    bounds = metric_range(metric)
    if bounds is None:
        return None
    lo, hi = bounds
    if direction == "max" and value >= hi:
        worst = f"e.g. {lo:g}, its lowest" if math.isfinite(lo) else "e.g. the first trial's value"
        return (
            f"{value:g} for {metric}, maximized, which is at most {hi:g}: no trial can be better than the reference, "
            f"so every hypervolume would be 0; give the worst value that should still count ({worst})"
        )
    if direction == "min" and value <= lo:
        worst = f"e.g. {hi:g}, its highest" if math.isfinite(hi) else "e.g. the first trial's value"
        return (
            f"{value:g} for {metric}, minimized, which is at least {lo:g}: no trial can be better than the "
            f"reference, so every hypervolume would be 0; give the worst value that should still count ({worst})"
        )
    return None


class FitnessError(EvomergeError):
    """A metric the fitness needs is missing or not a finite number."""


class FitnessTerm(BaseModel):
    """One named metric, its weight and whether higher ("max") or lower ("min") is better."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    metric: str = Field(description="'<task>/<metric>' as the evaluator reports it")
    weight: float = 1.0
    direction: Literal["max", "min"] = "max"

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
    fields = dict(term) if isinstance(term, Mapping) else dict(zip(FitnessTerm.model_fields, term))
    try:
        return FitnessTerm(**fields)
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(map(str, err["loc"]))
        rule = _TERM_RULES.get(field, err["msg"])
        raise FitnessError(f"fitness term {fields.get('metric')!r}: {field} {rule}, got {err['input']!r}") from None


_TERM_RULES = {"metric": "must be a string", "weight": "must be a finite number", "direction": "must be 'max' or 'min'"}


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


class Objective(BaseModel):
    """One objective of a multi-objective search (`evaluation.objectives`): a named metric and its direction. The
    study is told the metric as it is (not sign-flipped) and created with this direction."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    metric: str = Field(description="'<task>/<metric>' as the evaluator reports it")
    direction: Literal["max", "min"] = "max"

    @property
    def study_direction(self) -> str:
        return "maximize" if self.direction == "max" else "minimize"


class Objectives:
    """Several metrics told to the study as they are, one value per objective (Optuna multi-objective)."""

    def __init__(self, objectives: Sequence[Objective]) -> None:
        self.objectives = list(objectives)

    @property
    def names(self) -> list[str]:
        return [o.metric for o in self.objectives]

    @property
    def directions(self) -> list[str]:
        return [o.study_direction for o in self.objectives]

    def values(self, metrics: Mapping[str, float]) -> list[float]:
        """Each objective's metric, checked to be present and finite (FitnessError otherwise)."""
        out = []
        for o in self.objectives:
            if o.metric not in metrics:
                raise FitnessError(f"objective {o.metric!r} is missing from the results (have {sorted(metrics)})")
            value = float(metrics[o.metric])
            if not math.isfinite(value):
                raise FitnessError(f"objective {o.metric!r} is {value} (not a finite number)")
            out.append(value)
        return out
