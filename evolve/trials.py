"""A trial's record: what is written on it when it is told (metrics, per-item record, fitness, hypervolume), the
value told to the study, and what later trials read from the record (identical candidates' cache key, the
incumbent a race runs against, the values the stop rules replay)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from evolve.config import Evaluation, Racing
from evolve.fitness import FitnessTerm
from evolve.items import decode_items, encode_items, fully_scored, item_fitness
from evolve.pareto import HYPERVOLUME_ATTR, hypervolume, reference_point
from evolve.racing import Race
from evolve.study import best_first, set_user_attrs
from evolve.worker import Outcome

FITNESS_DIGITS = 10


def sampler_value(fitness: float) -> float:
    """The value told to the study (what samplers and `best_trial` see): the fitness rounded to FITNESS_DIGITS
    significant digits, so noise in the last bits of a float64 sum (summation order, library versions) never reaches
    the sampler, while any difference an evaluation can resolve (1 example in 10^9) still does. The exact fitness is
    kept in the trial's `fitness` user attr."""
    return float(f"{fitness:.{FITNESS_DIGITS}g}") if math.isfinite(fitness) else fitness


def metric_attrs(metrics: dict[str, float]) -> dict[str, float]:
    """Each metric also as a user attr of its own, named as the metric (`task/metric`; no other attr has a '/'), beside
    the `metrics` dict: a column optuna-dashboard shows, sorts and filters (it cannot look inside a dict)."""
    return dict(metrics)


def tell(study: optuna.Study, trial: optuna.Trial, outcome: Outcome, evaluation: Evaluation | None = None) -> None:
    """Record `outcome` on the trial (its attrs in one transaction, a race's estimates as intermediate values) and
    tell the study: the fitness, the objectives, PRUNED for a race stopped early, or FAIL."""
    attrs = {key: getattr(outcome, key) for key in ("metrics", "merge_seconds", "eval_seconds", "worker", "engine")}
    attrs |= metric_attrs(outcome.metrics)
    if outcome.scores:  # items scored and tokens generated are in it (`items_scored`, `tokens_generated`)
        attrs["items"] = encode_items(outcome.scores, outcome.totals)
    if outcome.ok and outcome.values is None:
        attrs["fitness"] = outcome.fitness
    if outcome.ok and outcome.stopped:
        attrs["stopped"] = outcome.stopped
    if not outcome.ok:
        attrs["fail_reason"] = outcome.error
    set_user_attrs(trial, attrs)  # one transaction
    for n, value in outcome.steps:  # a race's estimate after each chunk (optuna-dashboard plots these)
        if math.isfinite(value):
            trial.report(sampler_value(value), step=n)
    if outcome.ok and outcome.stopped:
        study.tell(trial, state=TrialState.PRUNED)  # its value: the last estimate reported
    elif outcome.ok and outcome.values is not None:  # several objectives: each told as it is
        values = [sampler_value(v) for v in outcome.values]
        record_hypervolume(study, trial, values, evaluation.reference_point if evaluation else None)
        study.tell(trial, values)
    elif outcome.ok:
        study.tell(trial, sampler_value(outcome.fitness))
    else:
        study.tell(trial, state=TrialState.FAIL)


def tell_cached(study: optuna.Study, trial: optuna.Trial, source: FrozenTrial) -> None:
    """Tell a duplicate of an evaluated candidate the score of that trial (`cached_from`), without evaluating it."""
    attrs = {key: source.user_attrs.get(key) for key in ("metrics", "fitness")}
    attrs |= metric_attrs(source.user_attrs.get("metrics") or {})
    set_user_attrs(trial, {**attrs, "cached_from": source.number})
    study.tell(trial, source.values)  # one value, or one per objective


def told_value(outcome: Outcome, sign: np.ndarray | None) -> float | tuple[float, ...]:
    """What the stop rules compare (`LoopState.record`): the fitness told, or the objectives (higher is better)."""
    if outcome.values is None:
        return sampler_value(outcome.fitness)
    return tuple(float(sampler_value(v) * s) for v, s in zip(outcome.values, sign))


def stored_value(t: FrozenTrial, sign: np.ndarray | None) -> float | tuple[float, ...]:
    """`told_value` of a trial in the record."""
    return t.value if sign is None else tuple(float(v * s) for v, s in zip(t.values, sign))


def record_hypervolume(
    study: optuna.Study, trial: optuna.Trial, values: list[float], configured: Sequence[float] | None
) -> None:
    """The study's hypervolume once `trial` is told `values` (trial user attr `hypervolume`; `evolve.pareto`)."""
    ref = reference_point(study, configured, pending=values)
    if ref is None:
        return
    told = [t.values for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    trial.set_user_attr(HYPERVOLUME_ATTR, hypervolume([*told, values], study.directions, ref))


def cache_key(trial: optuna.Trial | FrozenTrial) -> str:
    """Identical candidates share a score only when scored on the same items: the recipe hash, and under a
    protocol with batches, the batch."""
    batch = trial.user_attrs.get("batch")
    return trial.user_attrs["recipe_hash"] + (f"@batch{batch['index']}" if batch else "")


def incumbent(trials: list[FrozenTrial]) -> FrozenTrial | None:
    """The best complete trial whose every item was scored (what racing compares candidates with)."""
    return next((t for t in best_first(trials) if fully_scored(t.user_attrs.get("items"))), None)


def race_against_incumbent(study: optuna.Study, racing: Racing, terms: list[FitnessTerm], number: int) -> Race | None:
    """The race for the next candidate: against the incumbent's per-item fitness as stored (so a resumed search
    races exactly as an uninterrupted one); None (score every item) until a trial is fully scored."""
    best = incumbent(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    if best is None:
        return None
    items = best.user_attrs["items"]
    f = item_fitness(terms, decode_items(items), {t: int(r["of"]) for t, r in items.items()})
    return Race(
        incumbent={t: v.tolist() for t, v in f.items()},
        incumbent_trial=best.number,
        chunk=racing.chunk,
        alpha=racing.alpha,
        min_items=racing.min_items,
        test=racing.test,
        trial=number,
    )


def last_fail_reason(study: optuna.Study) -> str:
    """Why the last failed trial (not one a dead process left) failed."""
    fails = [
        t for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)) if not t.user_attrs.get("interrupted")
    ]
    return fails[-1].user_attrs.get("fail_reason", "unknown") if fails else "unknown"
