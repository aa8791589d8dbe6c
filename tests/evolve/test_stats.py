"""Bootstrap intervals and McNemar's exact test against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from evals.base import ItemScores
from evolve.fitness import FitnessTerm
from evolve.stats import Comparison, mcnemar_exact, metric_intervals
from tests.evolve.harness import mean_interval


def test_mcnemar_exact_by_hand() -> None:
    # 8 items right only for a, 1 only for b, 11 right or wrong for both: p = 2 * (C(9,0) + C(9,1)) / 2^9
    a = [1] * 8 + [0] + [1] * 6 + [0] * 5
    b = [0] * 8 + [1] + [1] * 6 + [0] * 5
    assert mcnemar_exact(a, b) == (8, 1, pytest.approx(2 * 10 / 512))
    assert mcnemar_exact(b, a) == (1, 8, pytest.approx(0.0390625))
    assert mcnemar_exact([1, 0, 1], [1, 0, 1]) == (0, 0, 1.0)  # no discordant item
    assert mcnemar_exact([1, 0], [0, 1])[2] == 1.0  # 2 * P(X <= 1 | n=2) = 1.5, capped
    # 30 discordant, 20 vs 10: 2 * sum_{k<=10} C(30, k) / 2^30
    p = 2 * sum(math.comb(30, k) for k in range(11)) / 2**30
    assert mcnemar_exact([1] * 20 + [0] * 10, [0] * 20 + [1] * 10)[2] == pytest.approx(p) and 0.09 < p < 0.1


def test_comparison_verdict() -> None:
    assert Comparison("t/acc", "source a", 0.7, 0.5, 8, 1, 0.039).verdict == "beats it"
    assert Comparison("t/acc", "source a", 0.5, 0.7, 1, 8, 0.039).verdict == "is worse"
    assert Comparison("t/acc", "source a", 0.6, 0.5, 20, 10, 0.099).verdict == "no significant difference"


def test_bootstrap_interval_by_hand() -> None:
    # two items 0 and 1: resampled means are 0, 1/2, 1 with probabilities 1/4, 1/2, 1/4 -> the 95% interval is [0, 1]
    assert mean_interval([0.0, 1.0]) == (0.0, 1.0)
    assert mean_interval([0.25] * 7) == (0.25, 0.25)
    # 300 of 500 right: the normal approximation p +- 1.96 sqrt(p (1 - p) / n) = 0.6 +- 0.0429
    lo, hi = mean_interval([1.0] * 300 + [0.0] * 200)
    assert lo == pytest.approx(0.6 - 0.0429, abs=0.006) and hi == pytest.approx(0.6 + 0.0429, abs=0.006)
    assert mean_interval([1.0] * 300 + [0.0] * 200) == (lo, hi)  # fixed seed: the same table every time


def test_fitness_and_weighted_intervals() -> None:
    rng = np.random.default_rng(1)
    acc = (rng.random(400) < 0.5).astype(float).tolist()
    gold = rng.random(400).tolist()
    scores = {"t": ItemScores(0, {"acc": acc, "gold_prob": gold})}
    terms = [FitnessTerm(metric="t/acc"), FitnessTerm(metric="t/gold_prob")]
    ci = metric_intervals(scores, terms)
    # the fitness is the mean of acc + gold per item: its interval is that mean's
    assert ci["fitness"] == pytest.approx(mean_interval([a + g for a, g in zip(acc, gold)]))
    lo, hi = ci["t/acc"]
    assert lo < np.mean(acc) < hi and hi - lo == pytest.approx(2 * 1.96 * 0.5 / math.sqrt(400), abs=0.01)
    # perplexity: token-weighted nll; a document with weight 0 never counts
    docs = {"p": ItemScores(0, {"nll": [2.0, 2.0, 50.0]}, weights=[3.0, 5.0, 0.0])}
    ci = metric_intervals(docs, [FitnessTerm(metric="p/ppl", direction="min")])
    assert ci["p/nll"] == pytest.approx((2.0, 2.0)) and ci["p/ppl"] == pytest.approx((math.exp(2), math.exp(2)))
    assert ci["fitness"] == pytest.approx((-math.exp(2), -math.exp(2)))


def test_heldout_comparisons_pair_the_evolved_merge_with_the_best_source_and_untuned_merge() -> None:
    from evolve.baselines import heldout_comparisons

    def row(label: str, kind: str, acc: list[float]) -> dict:
        return {
            "model": label,
            "t/acc": sum(acc) / len(acc),
            "_kind": kind,
            "_items": {"t": ItemScores(0, {"acc": acc})},
        }

    evolved = [1.0] * 12 + [0.0] * 8
    rows = [
        row("base", "base", [0.0] * 20),
        row("source a", "source", [1.0] * 3 + [0.0] * 17),
        row("source b", "source", [0.0] * 12 + [1.0] * 4 + [0.0] * 4),  # best source: 4 right, none shared
        row("TIES", "untuned", [1.0] * 11 + [0.0] * 9),  # best untuned: 1 discordant item
        row("evolved PS (trial 3)", "evolved", evolved),
    ]
    (label, vs_source), (_, vs_untuned) = heldout_comparisons(rows)
    assert label == "evolved PS (trial 3)" and vs_source.other == "source b" and vs_untuned.other == "TIES"
    assert (vs_source.only_evolved, vs_source.only_other) == (12, 4)
    assert vs_source.p == pytest.approx(2 * sum(math.comb(16, k) for k in range(5)) / 2**16)  # 0.0768
    assert vs_source.verdict == "no significant difference"
    assert (vs_untuned.only_evolved, vs_untuned.only_other, vs_untuned.p) == (1, 0, 1.0)
    assert "McNemar exact p=0.0768: no significant difference" in vs_source.line(label)
