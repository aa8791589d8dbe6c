"""Racing: score a candidate chunk by chunk and stop it once it cannot plausibly beat the incumbent.

The incumbent is the best fully scored trial; both are compared item by item on the same items (the first items
of the run's seeded item order, a random subset of the task's items). After each chunk the paired differences
``d_i = f_i(candidate) - f_i(incumbent)`` of per-item fitness (`evolve.items.item_fitness`) are tested:

- ``t`` (default): the items scored so far are a simple random sample of the N items, drawn without replacement,
  so the full-set mean difference D has the one-sided upper bound ``mean(d) + q * sd(d) / sqrt(n) * sqrt((N - n) /
  (N - 1))`` (finite-population correction), with q the t quantile at ``1 - alpha / L`` for the L looks at which the
  race may stop (Bonferroni over the looks, so the chance of stopping a candidate whose full-set fitness beats the
  incumbent's stays near alpha). Stop when the bound is below 0.
- ``wilcoxon``: Optuna's ``WilcoxonPruner`` semantics: stop when the one-sided Wilcoxon signed-rank p-value
  ("candidate worse") is below alpha at a look, with no correction for repeated looks.

Nothing stops before ``min_items`` items, and the last chunk always completes the candidate.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

TESTS = ("t", "wilcoxon")


@dataclass(frozen=True)
class Race:
    """What a worker needs to race one candidate: the incumbent's per-item fitness (per task, every item of the
    order) and the rule."""

    incumbent: dict[str, list[float]]
    incumbent_trial: int
    chunk: int
    alpha: float
    min_items: int
    test: str = "t"
    trial: int = -1  # the candidate's trial number (logs, the crash tests' fault hook)


def schedule(totals: Mapping[str, int], chunk: int) -> list[dict[str, int]]:
    """Items scored per task after each look: look k covers about k * chunk of all N items, spread over the tasks
    in proportion to their sizes (at least one item each); the last look covers every item."""
    grand = sum(totals.values())
    looks, k = [], chunk
    while k < grand:
        looks.append({t: max(1, math.ceil(n * k / grand)) for t, n in totals.items()})
        k += chunk
    looks.append(dict(totals))
    return looks


def stop_looks(looks: Sequence[Mapping[str, int]], min_items: int) -> int:
    """How many looks may stop the race: those before the last with at least `min_items` items."""
    return sum(sum(look.values()) >= min_items for look in looks[:-1])


def paired_differences(
    candidate: Mapping[str, Sequence[float]], incumbent: Mapping[str, Sequence[float]]
) -> np.ndarray:
    """The per-item differences on the items the candidate has scored (every task, in order)."""
    parts = [
        np.asarray(f, dtype=np.float64) - np.asarray(incumbent[t][: len(f)], dtype=np.float64)
        for t, f in candidate.items()
    ]
    return np.concatenate(parts) if parts else np.zeros(0)


def upper_bound(d: np.ndarray, total: int, level: float) -> float:
    """One-sided upper confidence bound at `level` on the mean of all `total` differences, from the `len(d)`
    sampled without replacement (t quantile, finite-population correction)."""
    from scipy.stats import t as student_t

    n = len(d)
    if n >= total:
        return float(d.mean())
    if n < 2:
        return math.inf
    se = float(d.std(ddof=1)) / math.sqrt(n) * math.sqrt((total - n) / (total - 1))
    return float(d.mean()) + float(student_t.ppf(level, n - 1)) * se


def wilcoxon_p(d: np.ndarray) -> float:
    """One-sided Wilcoxon signed-rank p-value for "the candidate is worse" (zero differences dropped, as Optuna)."""
    from scipy.stats import wilcoxon

    if not np.any(d != 0):
        return 1.0
    return float(wilcoxon(d, alternative="less", zero_method="wilcox").pvalue)


def stop_reason(race: Race, d: np.ndarray, total: int, looks: int) -> str | None:
    """Why the race stops the candidate now (None: go on). `looks` = how many looks may stop (for Bonferroni)."""
    n = len(d)
    if n < race.min_items or n >= total:
        return None
    if race.test == "wilcoxon":
        p = wilcoxon_p(d)
        if p < race.alpha:
            return (
                f"racing: after {n}/{total} items, worse than trial {race.incumbent_trial} "
                f"(Wilcoxon p={p:.3g} < {race.alpha:g})"
            )
        return None
    level = 1 - race.alpha / max(looks, 1)
    bound = upper_bound(d, total, level)
    if bound < 0:
        return (
            f"racing: after {n}/{total} items, the {level:.4g} upper bound of the mean paired difference to trial "
            f"{race.incumbent_trial} is {bound:.4f} < 0"
        )
    return None
