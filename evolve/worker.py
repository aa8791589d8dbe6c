"""A search worker: a `Scorer` built once (sources resident, one live model, the evaluators) and the fitness;
`evaluate` scores one recipe per call, every item or raced against the incumbent."""

from __future__ import annotations

import logging
import math
import time
import traceback
from dataclasses import dataclass, field

import torch

from evals.base import ItemScores
from evolve.config import RunConfig, parse_config
from evolve.faults import fault_point
from evolve.fitness import Fitness, Objectives
from evolve.items import item_fitness
from evolve.protocol import TrialItems, trial_orders
from evolve.racing import Race, paired_differences, schedule, stop_looks, stop_reason
from evolve.scoring import Scorer, build_evaluators
from merge_core.errors import EvomergeError
from merge_core.recipe import load_recipe

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
    engine: str = "native"  # what generated: "native", or "vllm <version>" (merge_seconds includes its weight swap)

    @property
    def ok(self) -> bool:
        return self.error is None


class Worker:
    """Built once per worker process/actor; ``evaluate`` puts a candidate into the live model and scores it."""

    def __init__(self, cfg: RunConfig | dict, template_yaml: str, worker_id: str = "local"):
        self.cfg = cfg if isinstance(cfg, RunConfig) else parse_config(cfg)
        self.worker_id = worker_id
        torch.manual_seed(self.cfg.seed)
        ev = self.cfg.evaluation
        evaluators = build_evaluators(list(ev.tasks), seed=self.cfg.seed)
        self.scorer = Scorer.for_recipes(self.cfg, load_recipe(template_yaml), evaluators)
        self.model = self.scorer.model
        self.fitness = None if ev.multi_objective else Fitness(ev.fitness)
        self.objectives = Objectives(ev.objectives) if ev.multi_objective else None

    def evaluate(self, recipe_yaml: str, race: Race | None = None, items: TrialItems | None = None) -> Outcome:
        """Score one recipe: every item, or chunk by chunk against the incumbent in `race` (stopped early when it
        cannot plausibly beat it: `evolve.racing`); under a stage protocol, the trial's `items` only."""
        out = Outcome(worker=self.worker_id, engine=self.scorer.engine_name)
        try:
            t0 = time.perf_counter()
            self.scorer.apply(load_recipe(recipe_yaml))
            out.merge_seconds = time.perf_counter() - t0
            t1 = time.perf_counter()
            with trial_orders(self.scorer.evaluators, items) as upto:
                out.totals = self.scorer.totals()
                if race is None:
                    out.metrics, out.scores = self.scorer.score(upto)
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
        looks = schedule(out.totals, race.chunk)
        may_stop = stop_looks(looks, race.min_items)
        grand = sum(out.totals.values())
        for look, upto in enumerate(looks):
            out.metrics, out.scores = self.scorer.score(upto, out.scores)
            fault_point(f"sigkill-in-race:{race.trial}:{look}")
            n = sum(upto.values())
            out.steps.append((n, self.fitness.score(out.metrics)))
            f = item_fitness(self.fitness.terms, out.scores, out.totals)
            out.stopped = stop_reason(race, paired_differences(f, race.incumbent), grand, may_stop)
            if out.stopped:
                return

    def ping(self) -> str:
        return self.worker_id
