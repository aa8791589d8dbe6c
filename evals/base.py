"""The Evaluator protocol: score a live model, return named metrics.

An evaluator is built once per worker (data loaded, tasks indexed) and called once per candidate.
The same model object is passed again with its weights changed in place, so an evaluator must
never cache results across calls.
"""
from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from merge_core.errors import EvomergeError


@runtime_checkable
class Evaluator(Protocol):
    """Scores a model: ``evaluate(model, tokenizer) -> {metric: value}`` (keys without the evaluator's name)."""

    name: str

    def evaluate(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> dict[str, float]:
        ...


def evaluate_all(
    evaluators: Sequence[Evaluator], model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase
) -> dict[str, float]:
    """Run every evaluator and merge their metrics as ``"<evaluator name>/<metric>"``."""
    names = [e.name for e in evaluators]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise EvomergeError(f"evaluator names must be unique; repeated: {duplicates} (set 'name' in the config)")
    metrics: dict[str, float] = {}
    for evaluator in evaluators:
        for key, value in evaluator.evaluate(model, tokenizer).items():
            metrics[f"{evaluator.name}/{key}"] = float(value)
    return metrics
