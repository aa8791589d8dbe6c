"""The Evaluator protocol: score a live model, return named metrics.

An evaluator is built once per worker (data loaded, tasks indexed) and called once per candidate.
The same model object is passed again with its weights changed in place, so an evaluator must
never cache results across calls.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from transformers import PreTrainedModel, PreTrainedTokenizerBase


@runtime_checkable
class Evaluator(Protocol):
    """Scores a model: ``evaluate(model, tokenizer) -> {metric: value}`` (keys without the evaluator's name)."""

    name: str

    def evaluate(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> dict[str, float]: ...
