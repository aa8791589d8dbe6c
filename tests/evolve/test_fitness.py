"""Fitness: weighted, direction-aware sum and its errors."""

from __future__ import annotations

import math

import pytest

from evolve.fitness import Fitness, FitnessError, FitnessTerm


def test_score_with_directions() -> None:
    fitness = Fitness([("task/acc", 1.0, "max"), ("task/gold_prob", 0.5, "max"), ("wiki/ppl", 0.01, "min")])
    metrics = {"task/acc": 0.6, "task/gold_prob": 0.4, "wiki/ppl": 20.0, "unused": math.nan}
    assert fitness.score(metrics) == pytest.approx(0.6 + 0.2 - 0.2)
    assert fitness.objectives(metrics) == pytest.approx([0.6, 0.4, -20.0])


def test_terms_from_dicts_and_defaults() -> None:
    fitness = Fitness([{"metric": "a"}, FitnessTerm(metric="b", weight=2.0, direction="min")])
    assert fitness.score({"a": 1.0, "b": 0.25}) == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("metrics", "message"),
    [
        ({"task/acc": math.nan}, "fitness metric 'task/acc' is nan"),
        ({"task/acc": math.inf}, "fitness metric 'task/acc' is inf"),
        ({"other": 1.0}, r"fitness metric 'task/acc' is missing from the results \(have \['other'\]\)"),
    ],
)
def test_bad_metric_names_it(metrics: dict[str, float], message: str) -> None:
    with pytest.raises(FitnessError, match=message):
        Fitness([("task/acc", 1.0, "max")]).score(metrics)


def test_bad_terms() -> None:
    with pytest.raises(FitnessError, match="direction must be 'max' or 'min'"):
        Fitness([("ppl", 1.0, "lower")])
    with pytest.raises(FitnessError, match="'acc': weight must be a finite number, got inf"):
        Fitness([("acc", math.inf)])
    with pytest.raises(FitnessError, match="at least one term"):
        Fitness([])
