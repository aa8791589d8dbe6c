"""Per-item records of a trial: stored compactly as a user attr, read back, and turned into per-item fitness.

A trial's ``items`` attr maps each task to what its evaluator scored item by item (`evals.base.ItemScores`, the
first ``n`` positions of the run's item order): ``{"n", "of", "tokens", "values": {metric: code}, "weights"?}``.
A metric whose values are all 0 or 1 is stored as a packed bit array (``"bits:<base64>"``, 25 bytes for 200
items), any other as float16 (``"f16:<base64>"``); weights (perplexity's token counts) as float32.

Per-item fitness: with every fitness term a mean over one task's items (accuracy-like and soft scores, not ppl),
``fitness = sum_t sum_{terms of t} w * sign * mean_i m_ti = mean over all N items of f``, where item i of task t
has ``f_ti = (N / n_t) * sum_{terms of t} w * sign * m_ti``. Two candidates compare item by item on these.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from evals.base import ItemScores
from evolve.fitness import FitnessTerm
from merge_core.errors import EvomergeError

# metrics that are not a plain mean over items (perplexity's nll is token-weighted; ppl is exp of that)
NOT_ITEM_MEANS = ("ppl", "nll")


SOFT_TYPES = {"f16": "<f2", "f32": "<f4", "f64": "<f8"}


def encode_values(values: Sequence[float], soft: str = "f16") -> str:
    """0/1 values as packed bits, others as float16 (`soft`: "f64" for scores kept to be shown again exactly)."""
    arr = np.asarray(values, dtype=np.float64)
    if np.all((arr == 0) | (arr == 1)):
        return "bits:" + base64.b64encode(np.packbits(arr.astype(np.uint8)).tobytes()).decode()
    return f"{soft}:" + base64.b64encode(arr.astype(SOFT_TYPES[soft]).tobytes()).decode()


def decode_values(code: str, n: int) -> np.ndarray:
    kind, _, data = code.partition(":")
    raw = base64.b64decode(data)
    if kind == "bits":
        return np.unpackbits(np.frombuffer(raw, dtype=np.uint8))[:n].astype(np.float64)
    if kind == "f16":
        return np.frombuffer(raw, dtype="<f2").astype(np.float64)
    if kind in ("f32", "f64"):
        return np.frombuffer(raw, dtype=SOFT_TYPES[kind]).astype(np.float64)
    raise EvomergeError(f"per-item record: unknown encoding {kind!r}")


def encode_scores(scores: ItemScores, total: int, soft: str = "f16") -> dict[str, Any]:
    """One task's record: `scores` (positions 0..n-1 of its order) out of `total` items."""
    if scores.start != 0:
        raise ValueError("a stored record starts at the first item of the order")
    record: dict[str, Any] = {
        "n": scores.n,
        "of": total,
        "tokens": scores.tokens,
        "values": {k: encode_values(v, soft) for k, v in scores.values.items()},
    }
    if scores.weights is not None:
        record["weights"] = "f32:" + base64.b64encode(np.asarray(scores.weights, dtype="<f4").tobytes()).decode()
    return record


def decode_scores(record: Mapping[str, Any]) -> ItemScores:
    n = int(record["n"])
    values = {k: decode_values(c, n).tolist() for k, c in record["values"].items()}
    weights = decode_values(record["weights"], n).tolist() if "weights" in record else None
    return ItemScores(0, values, weights, int(record.get("tokens", 0)))


def encode_items(scores: Mapping[str, ItemScores], totals: Mapping[str, int], soft: str = "f16") -> dict[str, Any]:
    """The ``items`` user attr: every task's record."""
    return {task: encode_scores(s, totals[task], soft) for task, s in scores.items()}


def decode_items(attr: Mapping[str, Any] | None) -> dict[str, ItemScores]:
    return {task: decode_scores(record) for task, record in (attr or {}).items()}


def items_scored(attr: Mapping[str, Any] | None) -> int:
    """Items a trial scored, over all its tasks."""
    return sum(int(r["n"]) for r in (attr or {}).values())


def tokens_generated(attr: Mapping[str, Any] | None) -> int:
    return sum(int(r.get("tokens", 0)) for r in (attr or {}).values())


def fully_scored(attr: Mapping[str, Any] | None) -> bool:
    """Every task's items all scored (not a raced trial stopped early)."""
    return bool(attr) and all(int(r["n"]) == int(r["of"]) for r in attr.values())


def check_item_fitness(terms: Sequence[FitnessTerm]) -> None:
    """Per-item fitness needs every term to be a mean over items."""
    for term in terms:
        if term.metric.split("/", 1)[1] in NOT_ITEM_MEANS:
            raise EvomergeError(
                f"evaluation.racing: fitness metric {term.metric!r} is not a mean over items; racing and elite "
                "comparisons need accuracy-like or per-item soft metrics (e.g. acc, gold_prob, gold_logprob)"
            )


def item_fitness(terms: Sequence[FitnessTerm], scores: Mapping[str, ItemScores], totals: Mapping[str, int]) -> dict:
    """Per task, each scored item's fitness contribution ``f_ti`` (see the module docstring), as numpy arrays."""
    check_item_fitness(terms)
    grand = sum(totals.values())
    out: dict[str, np.ndarray] = {}
    for task, s in scores.items():
        f = np.zeros(s.n)
        for term in terms:
            name, metric = term.metric.split("/", 1)
            if name != task:
                continue
            if metric not in s.values:
                raise EvomergeError(f"fitness metric {term.metric!r} has no per-item values (have {sorted(s.values)})")
            sign = 1.0 if term.direction == "max" else -1.0
            f += term.weight * sign * np.asarray(s.values[metric], dtype=np.float64)
        out[task] = f * (grand / totals[task])
    return out
