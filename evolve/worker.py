"""A search worker: sources resident, one live model, evaluators built once; scores one recipe per call."""

from __future__ import annotations

import logging
import math
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

import torch

from evolve.config import RunConfig, Task, parse_config
from merge_core.checkpoint import Checkpoint
from merge_core.errors import EvomergeError
from merge_core.materialize import Materializer
from merge_core.merge import TORCH_DTYPES
from merge_core.recipe import DataFlowRecipe, MergeRecipe, Recipe, load_recipe

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    """What one evaluation produced: metrics and fitness, or the reason it failed."""

    worker: str
    metrics: dict[str, float] = field(default_factory=dict)
    fitness: float | None = None
    merge_seconds: float = 0.0
    eval_seconds: float = 0.0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def build_evaluators(
    tasks: list[Task], *, seed: int, split: str | None = None, limit: int | None = None, heldout: bool = False
) -> list[tuple[str, Any]]:
    """(task name, evaluator) pairs; the held-out variant swaps the split and the sample limit."""
    from evals import build_evaluator

    out = []
    for task in tasks:
        spec = task.evaluator_spec()
        spec.setdefault("seed", seed)
        if heldout:
            if split is not None and getattr(task, "task_dir", None) is not None:  # a dataset task keeps its split
                spec["split"] = split
            spec["limit"] = limit
        spec.pop("name")
        out.append((task.name, build_evaluator(spec)))
    return out


def score_metrics(evaluators: list[tuple[str, Any]], model: Any, tokenizer: Any) -> dict[str, float]:
    metrics: dict[str, float] = {}
    for name, evaluator in evaluators:
        for key, value in evaluator.evaluate(model, tokenizer).items():
            metrics[f"{name}/{key}"] = float(value)
    return metrics


class MergeBackend:
    """Parameter-space candidates: a Materializer and one live model written in place per candidate."""

    def __init__(self, cfg: RunConfig, template: MergeRecipe):
        self.materializer = Materializer(
            template,
            device=cfg.execution.device,
            allow_pickle=cfg.models.allow_pickle,
            trust_remote_code=cfg.models.trust_remote_code,
        )
        self.model = self.materializer.new_model(dtype=TORCH_DTYPES[cfg.execution.dtype])
        self.tokenizer_path = str(self.materializer.reference.path)

    def apply(self, recipe: MergeRecipe) -> None:
        self.materializer.apply(recipe, self.model)


class DataFlowBackend:
    """Data-flow candidates: models A and B live (weights shared, never copied), the layer path swapped per
    candidate."""

    def __init__(self, cfg: RunConfig, template: DataFlowRecipe):
        from merge_core.dataflow import DataFlowModel

        self.model_a = load_live_model(cfg, template.model_a)
        self.model_b = load_live_model(cfg, template.model_b)
        self.model = DataFlowModel(self.model_a, self.model_b, template.path)
        self.tokenizer_path = str(open_checkpoint(cfg, template.model_a).path)
        self.template = template

    def apply(self, recipe: DataFlowRecipe) -> None:
        if (recipe.model_a, recipe.model_b) != (self.template.model_a, self.template.model_b):
            raise EvomergeError("recipe: a data-flow worker applies paths over the models A and B it was built with")
        self.model.set_path(recipe.path)


def open_checkpoint(cfg: RunConfig, ref: str) -> Checkpoint:
    """A checkpoint opened with the config's `allow_pickle` and `trust_remote_code`."""
    return Checkpoint.open(ref, allow_pickle=cfg.models.allow_pickle, trust_remote_code=cfg.models.trust_remote_code)


def load_live_model(cfg: RunConfig, ref: str):
    """An HF checkpoint loaded with transformers onto the execution device and dtype, in eval mode."""
    from transformers import AutoModelForCausalLM

    from merge_core.merge import resolve_device

    local = open_checkpoint(cfg, ref).path
    model = AutoModelForCausalLM.from_pretrained(
        str(local), dtype=TORCH_DTYPES[cfg.execution.dtype], trust_remote_code=cfg.models.trust_remote_code
    )
    return model.to(resolve_device(cfg.execution.device)).eval()


def make_backend(cfg: RunConfig, template: Recipe) -> MergeBackend | DataFlowBackend:
    return DataFlowBackend(cfg, template) if isinstance(template, DataFlowRecipe) else MergeBackend(cfg, template)


class Worker:
    """Built once per worker process/actor; ``evaluate`` puts a candidate into the live model and scores it."""

    def __init__(self, cfg: RunConfig | dict, template_yaml: str, worker_id: str = "local"):
        from transformers import AutoTokenizer

        from evolve.fitness import Fitness

        self.cfg = cfg if isinstance(cfg, RunConfig) else parse_config(cfg)
        self.worker_id = worker_id
        torch.manual_seed(self.cfg.seed)
        self.backend = make_backend(self.cfg, load_recipe(template_yaml))
        self.model = self.backend.model
        self.tokenizer = AutoTokenizer.from_pretrained(
            self.backend.tokenizer_path, trust_remote_code=self.cfg.models.trust_remote_code
        )
        self.evaluators = build_evaluators(list(self.cfg.evaluation.tasks), seed=self.cfg.seed)
        self.fitness = Fitness(self.cfg.evaluation.fitness)

    def evaluate(self, recipe_yaml: str) -> Outcome:
        out = Outcome(worker=self.worker_id)
        try:
            t0 = time.perf_counter()
            self.backend.apply(load_recipe(recipe_yaml))
            out.merge_seconds = time.perf_counter() - t0
            t1 = time.perf_counter()
            out.metrics = score_metrics(self.evaluators, self.model, self.tokenizer)
            out.eval_seconds = time.perf_counter() - t1
            out.fitness = self.fitness.score(out.metrics)
            if not math.isfinite(out.fitness):
                raise EvomergeError(f"fitness is {out.fitness}")
        except EvomergeError as e:
            out.error = " ".join(str(e).split())
        except Exception as e:  # a candidate must never take the search down: record why it failed
            log.debug("trial failed on %s:\n%s", self.worker_id, traceback.format_exc())
            out.error = f"{type(e).__name__}: {' '.join(str(e).split())}"[:500]
        return out

    def ping(self) -> str:
        return self.worker_id
