"""Per-item records: compact encoding, round trip, and per-item fitness whose mean is the fitness."""

from __future__ import annotations

import numpy as np
import pytest

from evals.base import ItemScores
from evolve.fitness import Fitness, FitnessTerm
from evolve.items import (
    decode_items,
    encode_items,
    encode_values,
    fully_scored,
    item_fitness,
    items_scored,
    tokens_generated,
)
from merge_core.errors import EvomergeError


def test_accuracy_is_stored_as_bits_and_soft_scores_as_float16() -> None:
    acc = [1.0, 0.0, 1.0] * 67  # 201 items
    code = encode_values(acc)
    assert code.startswith("bits:") and len(code) < 50  # 26 bytes -> 36 base64 characters
    soft = list(np.linspace(0, 1, 200))
    assert encode_values(soft).startswith("f16:")
    scores = {"t": ItemScores(0, {"acc": acc[:200], "gold_prob": soft}, tokens=37)}
    record = encode_items(scores, {"t": 500})
    back = decode_items(record)["t"]
    assert back.values["acc"] == acc[:200] and back.tokens == 37
    assert np.allclose(back.values["gold_prob"], soft, atol=5e-4)
    assert items_scored(record) == 200 and tokens_generated(record) == 37 and not fully_scored(record)
    assert fully_scored(encode_items(scores, {"t": 200}))


def test_weights_round_trip() -> None:
    scores = ItemScores(0, {"nll": [1.5, 2.25]}, weights=[3.0, 0.0])
    back = decode_items(encode_items({"p": scores}, {"p": 2}))["p"]
    assert back.weights == [3.0, 0.0] and back.values["nll"] == [1.5, 2.25]


def test_item_fitness_mean_is_the_fitness_over_two_tasks() -> None:
    """f_ti = (N / n_t) * sum of the task's weighted terms: its mean over all N items is the fitness."""
    terms = [FitnessTerm(metric="a/acc"), FitnessTerm(metric="a/gold_prob", weight=0.5), FitnessTerm(metric="b/acc")]
    a = ItemScores(0, {"acc": [1.0, 0.0, 1.0, 1.0], "gold_prob": [0.5, 0.1, 0.9, 0.3]})
    b = ItemScores(0, {"acc": [0.0, 1.0]})
    f = item_fitness(terms, {"a": a, "b": b}, {"a": 4, "b": 2})
    # hand: N = 6; task a items: 6/4 * (acc + 0.5 gold); task b items: 6/2 * acc
    assert f["a"].tolist() == pytest.approx([1.5 * 1.25, 1.5 * 0.05, 1.5 * 1.45, 1.5 * 1.15])
    assert f["b"].tolist() == pytest.approx([0.0, 3.0])
    metrics = {"a/acc": 0.75, "a/gold_prob": 0.45, "b/acc": 0.5}
    assert np.concatenate(list(f.values())).mean() == pytest.approx(Fitness(terms).score(metrics))
    lower = item_fitness([FitnessTerm(metric="a/acc", direction="min")], {"a": a}, {"a": 4})
    assert lower["a"].tolist() == [-1.0, 0.0, -1.0, -1.0]


def test_item_fitness_refuses_metrics_that_are_not_item_means() -> None:
    with pytest.raises(EvomergeError, match="'p/ppl' is not a mean over items"):
        item_fitness([FitnessTerm(metric="p/ppl", direction="min")], {}, {})
