"""A search worker: sources resident, one live model, evaluators built once; scores one recipe per call."""

from __future__ import annotations

import logging
import math
import time
import traceback
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from evals.base import ItemScores
from evolve.config import RunConfig, Task, parse_config
from evolve.faults import fault_point
from merge_core.checkpoint import Checkpoint
from merge_core.errors import EvomergeError
from merge_core.materialize import Materializer
from merge_core.merge import TORCH_DTYPES
from merge_core.recipe import DataFlowRecipe, MergeRecipe, Recipe, load_recipe

if TYPE_CHECKING:
    from evolve.protocol import TrialItems
    from evolve.racing import Race

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    """What one evaluation produced: metrics and fitness, or the reason it failed. ``scores``: per task, the items
    scored one by one (the first ones of each task's item order, out of ``totals``); ``steps``: (items scored,
    fitness so far) after each chunk of a race; ``stopped``: why a race stopped the candidate early (its metrics
    and fitness are then the partial estimate)."""

    worker: str
    metrics: dict[str, float] = field(default_factory=dict)
    fitness: float | None = None
    values: list[float] | None = None  # a multi-objective search's objectives (`evaluation.objectives`); no fitness
    merge_seconds: float = 0.0
    eval_seconds: float = 0.0
    error: str | None = None
    scores: dict[str, ItemScores] = field(default_factory=dict)
    totals: dict[str, int] = field(default_factory=dict)
    steps: list[tuple[int, float]] = field(default_factory=list)
    stopped: str | None = None

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
    return score_items(evaluators, model, tokenizer)[0]


def score_items(
    evaluators: list[tuple[str, Any]],
    model: Any,
    tokenizer: Any,
    upto: dict[str, int] | None = None,
    scored: dict[str, ItemScores] | None = None,
) -> tuple[dict[str, float], dict[str, ItemScores]]:
    """(metrics, per-item scores by task): every task's items scored one by one where its evaluator can
    (`score_items`; lm-eval tasks are scored whole). With `upto`, a task is scored up to that many items of its
    order, continuing the ItemScores in `scored` (racing scores chunk by chunk)."""
    metrics: dict[str, float] = {}
    out = dict(scored or {})
    for name, evaluator in evaluators:
        if hasattr(evaluator, "evaluate_items"):  # lm-eval: scored whole, its per-sample values kept by leaf task
            values, per_leaf = evaluator.evaluate_items(model, tokenizer)
            out |= {f"{name}/{leaf}": s for leaf, s in per_leaf.items()}
        elif not hasattr(evaluator, "score_items"):
            values = evaluator.evaluate(model, tokenizer)
        else:
            have = out[name].n if name in out else 0
            stop = None if upto is None else upto[name]
            if stop is None or stop > have:
                more = evaluator.score_items(model, tokenizer, have, stop)
                out[name] = out[name].extend(more) if name in out else more
            values = evaluator.aggregate(out[name])
        for key, value in values.items():
            metrics[f"{name}/{key}"] = float(value)
    return metrics, out


def item_totals(evaluators: list[tuple[str, Any]]) -> dict[str, int]:
    """Items per task of the evaluators that score item by item (an lm-eval task's per leaf task, `name/leaf`)."""
    totals = {name: len(ev.order) for name, ev in evaluators if hasattr(ev, "score_items")}
    for name, ev in evaluators:
        if hasattr(ev, "item_counts"):
            totals |= {f"{name}/{leaf}": n for leaf, n in ev.item_counts().items()}
    return totals


def evaluator_batch(cfg: RunConfig) -> tuple[int, int]:
    """(sequences, tokens each) of the configured task with the largest batch: what the memory plan reserves for
    the evaluator (a generation task: an assumed prompt plus max_new_tokens; perplexity: max_length)."""
    from merge_core.memplan import PROMPT_TOKENS

    sizes = [
        (task.batch_size, getattr(task, "max_length", None) or PROMPT_TOKENS + getattr(task, "max_new_tokens", 0))
        for task in cfg.evaluation.tasks
    ]
    return max(sizes, key=lambda s: s[0] * s[1], default=(0, 0))


class MergeBackend:
    """Parameter-space candidates: a Materializer and one live model written in place per candidate."""

    def __init__(self, cfg: RunConfig, template: MergeRecipe):
        self.materializer = Materializer(
            template,
            device=cfg.execution.device,
            allow_pickle=cfg.models.allow_pickle,
            trust_remote_code=cfg.models.trust_remote_code,
            live_dtype=TORCH_DTYPES[cfg.execution.dtype],
            evaluator_batch=evaluator_batch(cfg),
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


def use_threads(cfg: RunConfig) -> None:
    """`execution.threads` torch CPU threads in this process (unchanged when not set)."""
    if cfg.execution.threads is not None and torch.get_num_threads() != cfg.execution.threads:
        torch.set_num_threads(cfg.execution.threads)


def load_live_model(cfg: RunConfig, ref: str):
    """An HF checkpoint loaded with transformers onto the execution device and dtype, in eval mode."""
    from transformers import AutoModelForCausalLM

    use_threads(cfg)

    from merge_core.merge import resolve_device

    local = open_checkpoint(cfg, ref).path
    model = AutoModelForCausalLM.from_pretrained(
        str(local), dtype=TORCH_DTYPES[cfg.execution.dtype], trust_remote_code=cfg.models.trust_remote_code
    )
    return model.to(resolve_device(cfg.execution.device)).eval()


def make_backend(cfg: RunConfig, template: Recipe) -> MergeBackend | DataFlowBackend:
    use_threads(cfg)
    return DataFlowBackend(cfg, template) if isinstance(template, DataFlowRecipe) else MergeBackend(cfg, template)


class Worker:
    """Built once per worker process/actor; ``evaluate`` puts a candidate into the live model and scores it."""

    def __init__(self, cfg: RunConfig | dict, template_yaml: str, worker_id: str = "local"):
        from transformers import AutoTokenizer

        from evolve.fitness import Fitness, Objectives

        self.cfg = cfg if isinstance(cfg, RunConfig) else parse_config(cfg)
        self.worker_id = worker_id
        torch.manual_seed(self.cfg.seed)
        self.backend = make_backend(self.cfg, load_recipe(template_yaml))
        self.model = self.backend.model
        self.tokenizer = AutoTokenizer.from_pretrained(
            self.backend.tokenizer_path, trust_remote_code=self.cfg.models.trust_remote_code
        )
        self.evaluators = build_evaluators(list(self.cfg.evaluation.tasks), seed=self.cfg.seed)
        ev = self.cfg.evaluation
        self.fitness = Fitness(ev.fitness) if ev.fitness else None
        self.objectives = Objectives(ev.objectives) if ev.objectives else None

    def evaluate(self, recipe_yaml: str, race: Race | None = None, items: TrialItems | None = None) -> Outcome:
        """Score one recipe: every item, or chunk by chunk against the incumbent in `race` (stopped early when it
        cannot plausibly beat it: `evolve.racing`); under a stage protocol, the trial's `items` only."""
        from evolve.protocol import trial_orders

        out = Outcome(worker=self.worker_id)
        try:
            t0 = time.perf_counter()
            self.backend.apply(load_recipe(recipe_yaml))
            out.merge_seconds = time.perf_counter() - t0
            t1 = time.perf_counter()
            with trial_orders(self.evaluators, items) as upto:
                out.totals = item_totals(self.evaluators)
                if race is None:
                    out.metrics, out.scores = score_items(self.evaluators, self.model, self.tokenizer, upto)
                else:
                    self._race(out, race)
            out.eval_seconds = time.perf_counter() - t1
            if self.objectives is not None:
                out.values = self.objectives.values(out.metrics)
                return out
            out.fitness = self.fitness.score(out.metrics)
            if not math.isfinite(out.fitness):
                raise EvomergeError(f"fitness is {out.fitness}")
        except EvomergeError as e:
            out.error = " ".join(str(e).split())
        except Exception as e:  # a candidate must never take the search down: record why it failed
            log.debug("trial failed on %s:\n%s", self.worker_id, traceback.format_exc())
            out.error = f"{type(e).__name__}: {' '.join(str(e).split())}"[:500]
        return out

    def _race(self, out: Outcome, race: Race) -> None:
        from evolve.items import item_fitness
        from evolve.racing import paired_differences, schedule, stop_looks, stop_reason

        looks = schedule(out.totals, race.chunk)
        may_stop = stop_looks(looks, race.min_items)
        grand = sum(out.totals.values())
        for look, upto in enumerate(looks):
            out.metrics, out.scores = score_items(self.evaluators, self.model, self.tokenizer, upto, out.scores)
            fault_point(f"sigkill-in-race:{race.trial}:{look}")
            n = sum(upto.values())
            out.steps.append((n, self.fitness.score(out.metrics)))
            f = item_fitness(self.fitness.terms, out.scores, out.totals)
            out.stopped = stop_reason(race, paired_differences(f, race.incumbent), grand, may_stop)
            if out.stopped:
                return

    def ping(self) -> str:
        return self.worker_id
