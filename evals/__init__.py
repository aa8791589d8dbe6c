"""evals: evaluators that score a live model: native fast paths and the lm-eval backend."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from evals.base import Evaluator
from evals.lm_eval_backend import LmEvalEvaluator
from evals.native import ChoiceEvaluator, GenerationEvaluator, PerplexityEvaluator
from merge_core.errors import EvomergeError

EVALUATOR_TYPES: dict[str, type] = {
    "generation": GenerationEvaluator,
    "choice": ChoiceEvaluator,
    "perplexity": PerplexityEvaluator,
    "lm_eval": LmEvalEvaluator,
}


def build_evaluator(spec: Mapping[str, Any]) -> Evaluator:
    """An evaluator from a task's fields as `evolve.config` validated them: ``{"type": ..., **constructor kwargs}``."""
    fields = dict(spec)
    kind = fields.pop("type", None)
    if kind not in EVALUATOR_TYPES:
        raise EvomergeError(f"evaluator.type: {kind!r} is not one of {sorted(EVALUATOR_TYPES)}")
    return EVALUATOR_TYPES[kind](**fields)


__all__ = [
    "EVALUATOR_TYPES",
    "ChoiceEvaluator",
    "Evaluator",
    "GenerationEvaluator",
    "LmEvalEvaluator",
    "PerplexityEvaluator",
    "build_evaluator",
]
