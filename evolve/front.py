"""What status, the run summary, the end-of-run table and the report show of a multi-objective study: the Pareto
front's rows (objectives, balanced mark, recipe summary), the hypervolume line, and the front members' held-out
scores (kept in the study). The maths is `evolve.pareto`."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import optuna
from optuna.trial import FrozenTrial, TrialState

from evolve.baselines import heldout_evaluators, score_recipes
from evolve.config import RunConfig
from evolve.pareto import balanced, hypervolume, objective_names, pareto_front, reference_point
from evolve.study import trial_recipe
from merge_core.recipe import DataFlowRecipe, load_recipe
from search_spaces.ps import parse_param_name


def fmt_point(values: Sequence[float]) -> str:
    return "(" + ", ".join("nan" if not math.isfinite(v) else f"{v:.4g}" for v in values) + ")"


BALANCED_RULE = (
    "balanced: each objective scaled over the front to [0, 1] (1 = the front's best), the member whose worst scaled "
    "objective is highest"
)


def recipe_summary(t: FrozenTrial, width: int = 60) -> str:
    """A short line for a trial's recipe: a PS genome as each (source, parameter)'s mean over its groups (e.g.
    `ja.weight 1.21 math.weight 0.87`), a data-flow path as its hops."""
    if "recipe" in t.user_attrs:
        try:
            recipe = load_recipe(t.user_attrs["recipe"])
        except Exception:  # noqa: BLE001 - a summary must not fail on a recipe this version cannot read
            recipe = None
        if isinstance(recipe, DataFlowRecipe):
            text = f"{len(recipe.path.hops)} hops: {recipe.path.describe()}"
            return text if len(text) <= width else text[: width - 3] + "..."
    means: dict[str, list[float]] = {}
    for name, value in t.params.items():
        try:
            _, _, source, param = parse_param_name(name)
        except Exception:  # noqa: BLE001 - not a PS name
            source, param = None, name
        means.setdefault(f"{source}.{param}" if source else param, []).append(float(value))
    text = " ".join(f"{k} {sum(v) / len(v):.2f}" for k, v in means.items())
    return text if len(text) <= width else text[: width - 3] + "..."


def front_rows(study: optuna.Study) -> list[dict]:
    """One row per front member: trial, each objective, balanced mark, recipe summary."""
    trials = study.get_trials(deepcopy=False)
    front = pareto_front(trials, study.directions)
    if not front:
        return []
    pick = balanced(front, study.directions).number
    names = objective_names(study)
    return [
        {
            "trial": t.number,
            **dict(zip(names, t.values)),
            "balanced": "yes" if t.number == pick else "",
            "recipe (mean per source)": recipe_summary(t),
        }
        for t in front
    ]


def hypervolume_line(study: optuna.Study, configured: Sequence[float] | None) -> str:
    ref = reference_point(study, configured, store=False)
    if ref is None:
        return "hypervolume: no complete trial yet"
    complete = [t.values for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    how = "configured" if configured is not None else "derived"
    return f"hypervolume {hypervolume(complete, study.directions, ref):.4g} (reference point {fmt_point(ref)}, {how})"


def front_summary(study: optuna.Study, cfg: RunConfig) -> str:
    """The run's last line for several objectives: front size, hypervolume, the balanced member's objectives."""
    rows = front_rows(study)
    pick = next(r for r in rows if r["balanced"])
    names = objective_names(study)
    values = ", ".join(f"{n}={pick[n]:.4f}" for n in names)
    return (
        f"Pareto front: {len(rows)} trials; {hypervolume_line(study, cfg.evaluation.reference_point)}; "
        f"balanced member: trial {pick['trial']} ({values}); `evolve status` lists the front"
    )


def print_front(study: optuna.Study, cfg: RunConfig, print_table: Callable[[list[dict], list[str]], None]) -> None:
    """`evolve status` for several objectives: the front, the balanced member marked, and the hypervolume."""
    rows = front_rows(study)
    if not rows:
        print("no complete trial yet")
        return
    dirs = ", ".join(f"{n} ({d.name.lower()})" for n, d in zip(objective_names(study), study.directions))
    print(f"objectives: {dirs}; {hypervolume_line(study, cfg.evaluation.reference_point)}")
    print(f"Pareto front ({len(rows)} trials; {BALANCED_RULE}):")
    print_table(rows, list(rows[0]))


HELDOUT_KEY = "heldout:"  # + trial number: a study user attr, a front member's held-out metrics (computed once)


def front_heldout(cfg: RunConfig, study: optuna.Study) -> dict[int, dict[str, float]]:
    """Each front member's held-out metrics (the run's held-out split and limit), scored once and kept as a study
    user attr (`heldout:<trial>`), so a later report reuses them; {} when the config has no held-out split."""
    ev = cfg.evaluation
    if not ev.heldout_split or not ev.heldout_scored():
        return {}
    key = {"split": ev.heldout_split, "limit": ev.heldout_limit}
    attrs = study.user_attrs
    out, todo = {}, {}
    for t in pareto_front(study.get_trials(deepcopy=False), study.directions):
        got = attrs.get(f"{HELDOUT_KEY}{t.number}")
        if got is not None and {k: got.get(k) for k in key} == key:
            out[t.number] = got["metrics"]
        else:
            todo[str(t.number)] = trial_recipe(t)
    if todo:
        for label, (metrics, _) in score_recipes(cfg, todo, heldout_evaluators(cfg)).items():
            out[int(label)] = metrics
            study.set_user_attr(f"{HELDOUT_KEY}{label}", {**key, "metrics": metrics})
    return dict(sorted(out.items()))
