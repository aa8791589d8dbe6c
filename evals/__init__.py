"""evals: evaluators that score a live model: native fast paths and the lm-eval backend.

The package's names load on first use (PEP 562): `evals.spec`, which the config layer reads, costs nothing to
import, while the evaluators bring torch, transformers and lm-eval."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from evals import spec
from merge_core.errors import EvomergeError

if TYPE_CHECKING:
    from evals.base import Evaluator, ItemEvaluator
    from evals.lm_eval_backend import LmEvalEvaluator
    from evals.native import ChoiceEvaluator, GenerationEvaluator, PerplexityEvaluator

_WHERE = {
    "Evaluator": "evals.base",
    "ItemEvaluator": "evals.base",
    "GenerationEvaluator": "evals.native",
    "ChoiceEvaluator": "evals.native",
    "PerplexityEvaluator": "evals.native",
    "LmEvalEvaluator": "evals.lm_eval_backend",
}
_CLASS_OF_TYPE = {
    spec.GENERATION: "GenerationEvaluator",
    spec.CHOICE: "ChoiceEvaluator",
    spec.PERPLEXITY: "PerplexityEvaluator",
    spec.LM_EVAL: "LmEvalEvaluator",
}


def __getattr__(name: str) -> Any:
    if name == "EVALUATOR_TYPES":  # task type -> evaluator class, in `spec.TASK_TYPES` order
        return {kind: __getattr__(_CLASS_OF_TYPE[kind]) for kind in spec.TASK_TYPES}
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'evals' has no attribute {name!r}")


def evaluator_class(kind: str) -> type[Evaluator]:
    """The evaluator class of a task type (`spec.TASK_TYPES`)."""
    if kind not in _CLASS_OF_TYPE:
        raise EvomergeError(f"evaluator.type: {kind!r} is not one of {sorted(_CLASS_OF_TYPE)}")
    return __getattr__(_CLASS_OF_TYPE[kind])


def build_evaluator(fields: Mapping[str, Any]) -> Evaluator:
    """An evaluator from a task's fields as `evolve.config` validated them: ``{"type": ..., **constructor kwargs}``."""
    fields = dict(fields)
    return evaluator_class(fields.pop("type", None))(**fields)


__all__ = [
    "EVALUATOR_TYPES",
    "ChoiceEvaluator",
    "Evaluator",
    "GenerationEvaluator",
    "ItemEvaluator",
    "LmEvalEvaluator",
    "PerplexityEvaluator",
    "build_evaluator",
    "evaluator_class",
]
