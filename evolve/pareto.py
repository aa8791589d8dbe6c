"""Multi-objective studies: the Pareto front, its "balanced" member, the hypervolume and its reference point.

A study searched with `evaluation.objectives` has one direction per objective and is told each metric as it is.
Everything here reads the study record, so status, report, export and a resumed search agree:

- the front: complete trials (cached duplicates left out) that no other complete trial dominates;
- the balanced member (the run's pick, `evolve.study.best_trial`): each objective normalized over the front to
  [0, 1] (1 = the front's best value on it), the member whose worst normalized objective is highest; ties go to the
  higher normalized sum, then the lower trial number. A one-member front is its own balanced member, and an
  objective on which every member scores the same counts 1 for all;
- the hypervolume: the volume the complete trials dominate, bounded by the reference point. The reference point is
  the config's `evaluation.reference_point`, else derived once and stored as the study user attr `reference_point`:
  for a proportion (`acc`, `acc_value`, `lang_ok`, `gold_prob`, `exact_match`, `acc_norm`) its worst possible value
  (0 when maximized, 1 when minimized); for any other metric the first complete trial's value (x0, the starting
  recipe), so the volume counts what beats it. A trial worse than the reference on some objective adds nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import optuna
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from evolve.fitness import is_proportion
from evolve.optuna_api import compute_hypervolume

REFERENCE_ATTR = "reference_point"  # study user attr: the hypervolume reference, one value per objective
HYPERVOLUME_ATTR = "hypervolume"  # trial user attr: the study's hypervolume once this trial was told


def is_multi(directions: Sequence[StudyDirection]) -> bool:
    """A study of several objectives (a front, no single best)."""
    return len(directions) > 1


def signs(directions: Sequence[StudyDirection]) -> np.ndarray:
    """+1 for a maximized objective, -1 for a minimized one (value * sign: higher is better)."""
    return np.array([1.0 if d == StudyDirection.MAXIMIZE else -1.0 for d in directions])


def dominates(a: Sequence[float], b: Sequence[float], sign: np.ndarray) -> bool:
    """`a` is at least as good as `b` on every objective and better on one."""
    x, y = np.asarray(a) * sign, np.asarray(b) * sign
    return bool(np.all(x >= y) and np.any(x > y))


def pareto_front(trials: Iterable[FrozenTrial], directions: Sequence[StudyDirection]) -> list[FrozenTrial]:
    """The complete trials no other complete trial dominates (cached duplicates left out), by trial number."""
    done = [t for t in trials if t.state == TrialState.COMPLETE and t.values and "cached_from" not in t.user_attrs]
    sign = signs(directions)
    front = [t for t in done if not any(dominates(o.values, t.values, sign) for o in done)]
    return sorted(front, key=lambda t: t.number)


def normalized(front: Sequence[FrozenTrial], directions: Sequence[StudyDirection]) -> np.ndarray:
    """Each member's objectives scaled over the front to [0, 1], 1 = the front's best (1 where all are equal)."""
    v = np.array([t.values for t in front], dtype=float) * signs(directions)
    lo, hi = v.min(axis=0), v.max(axis=0)
    span = np.where(hi > lo, hi - lo, 1.0)
    return np.where(hi > lo, (v - lo) / span, 1.0)


def balanced(front: Sequence[FrozenTrial], directions: Sequence[StudyDirection]) -> FrozenTrial:
    """The member whose worst normalized objective is highest (ties: higher normalized sum, then lower number)."""
    if not front:
        raise ValueError("an empty front has no balanced member")
    norm = normalized(front, directions)
    keys = [(-row.min(), -row.sum(), t.number) for row, t in zip(norm, front)]
    return front[min(range(len(front)), key=keys.__getitem__)]


def derived_reference(
    metrics: Sequence[str], directions: Sequence[StudyDirection], first: Sequence[float] | None
) -> list[float] | None:
    """The default reference point (see the module docstring) given the first complete trial's values; None while
    a non-proportion objective needs them and there are none."""
    ref = []
    for i, (metric, d) in enumerate(zip(metrics, directions)):
        if is_proportion(metric):
            ref.append(0.0 if d == StudyDirection.MAXIMIZE else 1.0)
        elif first is None:
            return None
        else:
            ref.append(float(first[i]))
    return ref


def reference_point(
    study: optuna.Study,
    configured: Sequence[float] | None = None,
    pending: Sequence[float] | None = None,
    store: bool = True,
) -> list[float] | None:
    """The study's hypervolume reference: `configured` (stored when it differs from the stored one), else the stored
    one, else derived now and stored. `pending`: the values of a trial about to be told, which is the first complete
    one when none is complete yet. None while it cannot be derived yet (nothing complete). `store=False`: for
    readers (status, report), which write nothing."""
    stored = study.user_attrs.get(REFERENCE_ATTR)
    if configured is not None:
        ref = [float(x) for x in configured]
    elif stored is not None:
        return [float(x) for x in stored]
    else:
        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        first = min(complete, key=lambda t: t.number).values if complete else pending
        ref = derived_reference(objective_names(study), study.directions, first)
        if ref is None:
            return None
    if store and stored != ref:
        study.set_user_attr(REFERENCE_ATTR, ref)
    return ref


def hypervolume(
    values: Iterable[Sequence[float]], directions: Sequence[StudyDirection], reference: Sequence[float]
) -> float:
    """The volume the points dominate up to `reference` (points not better than it on every objective add none)."""
    sign = signs(directions)
    ref = -np.asarray(reference, dtype=float) * sign  # as losses: Optuna's hypervolume minimizes
    loss = np.array([-np.asarray(v, dtype=float) * sign for v in values]).reshape(-1, len(sign))
    loss = loss[np.all(loss <= ref, axis=1)]
    return compute_hypervolume(loss, ref) if len(loss) else 0.0


def hypervolume_history(
    trials: Iterable[FrozenTrial], directions: Sequence[StudyDirection], reference: Sequence[float]
) -> list[tuple[int, float]]:
    """(trial number, hypervolume of the complete trials up to it) for each complete trial, in number order."""
    done = sorted((t for t in trials if t.state == TrialState.COMPLETE and t.values), key=lambda t: t.number)
    out, seen = [], []
    for t in done:
        seen.append(t.values)
        out.append((t.number, hypervolume(seen, directions, reference)))
    return out


def objective_names(study: optuna.Study) -> list[str]:
    """The objectives' names (`set_metric_names`), or values_0.. for a study without them."""
    return list(study.metric_names or [f"values_{i}" for i in range(len(study.directions))])
