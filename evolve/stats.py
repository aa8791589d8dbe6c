"""Uncertainty of scores measured on a finite item set: bootstrap intervals over items and McNemar's exact test.

Both read per-item records (`evals.base.ItemScores`). The bootstrap resamples each task's items with replacement
(a fixed seed, so a table is reproducible) and recomputes the statistic (a metric, or the fitness over several
tasks); the interval is the percentile interval of the resampled statistic. McNemar's exact test compares two
models on the same items by accuracy: only the items one gets right and the other wrong count; under "equally
good" each of those n is a fair coin, so the two-sided p-value is ``min(1, 2 * P(Binomial(n, 1/2) <= min(b, c)))``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from evals.base import ItemScores
from evolve.fitness import FitnessTerm

BOOTSTRAP_SAMPLES = 2000
BOOTSTRAP_SEED = 0
LEVEL = 0.95


def bootstrap_metrics(
    scores: Mapping[str, ItemScores], *, samples: int = BOOTSTRAP_SAMPLES, seed: int = BOOTSTRAP_SEED
) -> dict[str, np.ndarray]:
    """``{"task/metric": the metric on each of `samples` resamples}``: each task's items drawn with replacement
    (the same draws for every model with the same item counts), each metric the mean of its per-item values (the
    weighted mean where the items carry weights, and ``ppl = exp(nll)`` for perplexity)."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for task, s in scores.items():
        pick = rng.integers(0, s.n, (samples, s.n))
        weights = None if s.weights is None else np.asarray(s.weights)[pick]
        for metric, values in s.values.items():
            drawn = np.asarray(values, dtype=np.float64)[pick]
            if weights is None:
                out[f"{task}/{metric}"] = drawn.mean(axis=1)
            else:
                total = weights.sum(axis=1)  # a resample of only empty documents has no value (NaN, left out)
                with np.errstate(invalid="ignore", divide="ignore"):
                    out[f"{task}/{metric}"] = np.where(total > 0, (drawn * weights).sum(axis=1) / total, np.nan)
        if s.weights is not None and "nll" in s.values:
            out[f"{task}/ppl"] = np.exp(out[f"{task}/nll"])
    return out


def interval(draws: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """The percentile interval of bootstrap draws."""
    tail = (1 - level) / 2
    lo, hi = np.nanquantile(draws, [tail, 1 - tail])
    return float(lo), float(hi)


def fitness_draws(terms: Sequence[FitnessTerm], draws: Mapping[str, np.ndarray]) -> np.ndarray | None:
    """The fitness on each resample (None when a term's metric has no per-item values)."""
    if any(t.metric not in draws for t in terms):
        return None
    return sum(t.weight * (draws[t.metric] if t.direction == "max" else -draws[t.metric]) for t in terms)


def metric_intervals(
    scores: Mapping[str, ItemScores], terms: Sequence[FitnessTerm] = (), level: float = LEVEL, **kwargs
) -> dict[str, tuple[float, float]]:
    """The `level` bootstrap interval of every per-item metric, and of the fitness (key ``"fitness"``)."""
    draws = bootstrap_metrics(scores, **kwargs)
    out = {k: interval(v, level) for k, v in draws.items()}
    fit = fitness_draws(terms, draws) if terms else None
    if fit is not None:
        out["fitness"] = interval(fit, level)
    return out


def mcnemar_exact(a: Sequence[float], b: Sequence[float]) -> tuple[int, int, float]:
    """(items only `a` gets right, items only `b` gets right, two-sided exact p-value), on paired 0/1 scores."""
    if len(a) != len(b):
        raise ValueError(f"paired scores differ in length: {len(a)} and {len(b)}")
    only_a = sum(1 for x, y in zip(a, b) if x and not y)
    only_b = sum(1 for x, y in zip(a, b) if y and not x)
    n = only_a + only_b
    if n == 0:
        return 0, 0, 1.0
    tail = sum(math.comb(n, k) for k in range(min(only_a, only_b) + 1)) / 2**n
    return only_a, only_b, min(1.0, 2 * tail)


@dataclass(frozen=True)
class Comparison:
    """The evolved merge against another model on the same held-out items, by accuracy."""

    metric: str
    other: str
    evolved: float
    other_value: float
    only_evolved: int
    only_other: int
    p: float
    alpha: float = 0.05

    @property
    def verdict(self) -> str:
        if self.p >= self.alpha:
            return "no significant difference"
        return "beats it" if self.only_evolved > self.only_other else "is worse"

    def line(self, evolved_label: str) -> str:
        return (
            f"{evolved_label} vs {self.other} on {self.metric}: {self.evolved:.4f} vs {self.other_value:.4f}; "
            f"right only for the evolved merge on {self.only_evolved} items, only for the other on {self.only_other}; "
            f"McNemar exact p={self.p:.3g}: {self.verdict} (at {self.alpha:g})"
        )
