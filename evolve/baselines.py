"""Held-out scoring: any checkpoint, any set of recipes, and the end-of-run table (sources, untuned merges, evolved)."""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

from evals.base import ItemScores
from evolve import optuna_api
from evolve.config import RunConfig
from evolve.items import decode_items, encode_items
from evolve.pareto import is_multi, pareto_front
from evolve.scoring import Evaluators, Scorer, build_evaluators
from evolve.stats import Comparison, mcnemar_exact, metric_intervals
from evolve.study import best_trial, load_study, trial_recipe
from merge_core.errors import EvomergeError
from merge_core.merge import resolve_device
from merge_core.plan import method_spec
from merge_core.recipe import DataFlowRecipe, MergeRecipe, OutputSlice, Recipe, SliceSource

log = logging.getLogger(__name__)
Scores = tuple[dict[str, float], dict[str, ItemScores]]  # metrics, and the per-item scores behind them


def heldout_evaluators(
    cfg: RunConfig, split: str | None = None, limit: int | None = None, limit_mode: str | None = None
) -> Evaluators:
    ev = cfg.evaluation
    return build_evaluators(
        ev.heldout_scored(),
        seed=cfg.seed,
        split=split or ev.heldout_split,
        limit=limit if limit is not None else ev.heldout_limit,
        heldout=True,
        limit_mode=limit_mode,
    )


def score_checkpoint(
    cfg: RunConfig,
    path: str,
    *,
    split: str | None = None,
    limit: int | None = None,
    limit_mode: str | None = None,
    device: str = "auto",
    evaluators: Evaluators | None = None,
) -> Scores:
    """Load an HF checkpoint with transformers and score it on the config's held-out tasks (or `evaluators`)."""
    cfg = cfg.model_copy(update={"execution": cfg.execution.model_copy(update={"device": device})})
    evaluators = evaluators or heldout_evaluators(cfg, split, limit, limit_mode)
    return Scorer.for_checkpoint(cfg, path, evaluators).score()


MODEL_SCORES_KEY = "heldout-model:"  # + label: a study user attr, a base's or source's held-out metrics, kept
MODEL_ITEMS_KEY = "heldout-items:"  # + label: a study system attr, the per-item record behind them


def heldout_model_items(
    cfg: RunConfig, label: str, path: str, evaluators: Evaluators, *, device: str = "auto"
) -> Scores:
    """`score_checkpoint` of a base or source on the held-out split, scored once per run: kept in the first
    stage's study under the checkpoint, the held-out tasks, split, limit, seed, device and dtype, and reused while
    they match (the end-of-run table, every `evolve export` and `report` score the same sources: at 7B each is a full
    held-out evaluation). The key and metrics are the user attr ``heldout-model:<label>`` (a short line in
    optuna-dashboard); the per-item record (kilobytes of packed scores) is the study system attr
    ``heldout-items:<label>``, which the dashboard does not lay out (studies of an earlier evomerge kept it in the
    user attr, and are still read)."""
    ev = cfg.evaluation
    spec = [t.model_dump(mode="json") for t in ev.heldout_scored()]
    key = {
        "path": str(path),
        "tasks": hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16],
        "split": ev.heldout_split,
        "limit": ev.heldout_limit,
        "seed": cfg.seed,
        "device": str(resolve_device(device if device != "auto" else cfg.execution.device)),
        "dtype": cfg.execution.dtype,
    }
    try:
        study = load_study(cfg, cfg.search.stages[0])
    except EvomergeError:  # no search yet (`evolve eval`-like use): score, keep nothing
        study = None
    got = study.user_attrs.get(f"{MODEL_SCORES_KEY}{label}") if study is not None else None
    if got is not None and got.get("key") == key:
        record = got.get("items") or optuna_api.study_system_attrs(study).get(f"{MODEL_ITEMS_KEY}{label}")
        if record is not None:
            return got["metrics"], decode_items(record)
    metrics, items = score_checkpoint(cfg, path, device=device, evaluators=evaluators)
    if study is not None:
        record = encode_items(items, {task: s.n for task, s in items.items()}, soft="f64")
        optuna_api.set_study_system_attr(study, f"{MODEL_ITEMS_KEY}{label}", record)
        study.set_user_attr(f"{MODEL_SCORES_KEY}{label}", {"key": key, "metrics": metrics})
    return metrics, items


def score_recipes(cfg: RunConfig, recipes: dict[str, Recipe], evaluators: Evaluators) -> dict[str, Scores]:
    """Score recipes in memory: one Scorer (a Materializer, or models A and B) per group of compatible recipes."""
    groups: dict[tuple, list[str]] = {}
    for label, r in recipes.items():
        key = (
            (r.model_a, r.model_b)
            if isinstance(r, DataFlowRecipe)
            else (method_spec(r).kind, r.models, r.base_model, r.dtype)
        )
        groups.setdefault(key, []).append(label)
    out: dict[str, Scores] = {}
    for labels in groups.values():
        scorer = Scorer.for_recipes(cfg, recipes[labels[0]], evaluators)
        for label in labels:
            scorer.apply(recipes[label])
            out[label] = scorer.score()
        del scorer
    return out


def global_recipe(cfg: RunConfig, method: str, weights: dict[str, float], density: float | None = None) -> MergeRecipe:
    """One coefficient per expert for the whole model (the sources named in ``weights``, by path), over the base."""
    base = cfg.models.base
    if base is None:
        raise EvomergeError("models.base: a global merge of task vectors needs a base model")
    per_density = (("density", density),) if density is not None else ()
    sources = tuple(SliceSource(model=p, parameters=(("weight", w),) + per_density) for p, w in weights.items())
    return MergeRecipe(
        merge_method=method,
        slices=(OutputSlice(sources=sources + (SliceSource(model=base),)),),
        base_model=base,
        dtype=cfg.search.space.dtype,
        seed=cfg.seed,
    )


def untuned_recipes(cfg: RunConfig, density: float = 0.7) -> dict[str, MergeRecipe]:
    """The merges a user would try without search: linear average of the sources, task arithmetic 1/1, TIES,
    DARE-TIES."""
    if cfg.models.base is None:
        return {}
    paths = [s.path for s in cfg.models.sources]
    n = len(paths)
    return {
        "linear average (task arithmetic 1/n)": global_recipe(cfg, "task_arithmetic", dict.fromkeys(paths, 1.0 / n)),
        "task arithmetic 1/1": global_recipe(cfg, "task_arithmetic", dict.fromkeys(paths, 1.0)),
        f"TIES d={density}": global_recipe(cfg, "ties", dict.fromkeys(paths, 1.0), density),
        f"DARE-TIES d={density}": global_recipe(cfg, "dare_ties", dict.fromkeys(paths, 1.0), density),
    }


def heldout_table(cfg: RunConfig) -> list[dict[str, Any]]:
    """Rows for the end-of-run table: base, each source, the untuned merges, and each stage's pick (`best_trial`).

    Each row: ``model``, the table's metrics, and private keys: ``_kind`` (base, source, untuned, evolved),
    ``_ci`` (metric -> bootstrap 95% interval over the held-out items, `evolve.stats`) and ``_items`` (per-item
    scores, for `heldout_comparisons`)."""
    evaluators = heldout_evaluators(cfg)
    rows: list[dict[str, Any]] = []
    models = ([("base", "base", cfg.models.base)] if cfg.models.base else []) + [
        ("source", f"source {a}", s.path) for a, s in zip(cfg.models.aliases(), cfg.models.sources)
    ]
    for kind, label, path in models:
        metrics, items = heldout_model_items(cfg, label, path, evaluators, device=cfg.execution.device)
        rows.append({"model": label, **metrics, "_kind": kind, "_items": items})
    recipes: dict[str, Recipe] = dict(untuned_recipes(cfg))
    kinds = dict.fromkeys(recipes, "untuned")
    labels = {"ps": "evolved PS", "dfs": "evolved PS+DFS" if cfg.search.stages == ["ps", "dfs"] else "evolved DFS"}
    for stage in cfg.search.stages:
        study = load_study(cfg, stage)
        best = best_trial(study)
        if is_multi(study.directions):  # several objectives: every member of the front, the balanced one marked
            for t in pareto_front(study.get_trials(deepcopy=False), study.directions):
                label = f"{labels[stage]} front trial {t.number}" + (" (balanced)" if t.number == best.number else "")
                recipes[label], kinds[label] = trial_recipe(t), "evolved"
            continue
        label = f"{labels[stage]} (trial {best.number})"
        recipes[label], kinds[label] = trial_recipe(best), "evolved"
    for label, (metrics, items) in score_recipes(cfg, recipes, evaluators).items():
        rows.append({"model": label, **metrics, "_kind": kinds[label], "_items": items})
    keep = _table_columns(cfg, rows)
    table = []
    for r in rows:
        ci = metric_intervals(r["_items"])
        table.append(
            {
                "model": r["model"],
                **{k: r.get(k) for k in keep},
                "_kind": r["_kind"],
                "_ci": {k: ci[k] for k in keep if k in ci},
                "_items": r["_items"],
            }
        )
    return table


def heldout_comparisons(rows: list[dict[str, Any]]) -> list[tuple[str, Comparison]]:
    """(evolved label, comparison) of each evolved row against the best source and the best untuned merge, on each
    accuracy column scored item by item (McNemar's exact test on the same held-out items)."""

    def per_item(row: dict[str, Any], column: str) -> list[float] | None:
        return correct_per_item(row.get("_items") or {}, column)

    out = []
    for evolved in (r for r in rows if r.get("_kind") == "evolved"):
        for column in (k for k in evolved if not k.startswith("_") and per_item(evolved, k) is not None):
            if evolved.get(column) is None:
                continue
            for kind in ("source", "untuned"):
                others = [
                    r
                    for r in rows
                    if r.get("_kind") == kind and r.get(column) is not None and per_item(r, column) is not None
                ]
                if not others:
                    continue
                best = max(others, key=lambda r: r[column])
                only_e, only_o, p = mcnemar_exact(per_item(evolved, column), per_item(best, column))
                out.append(
                    (
                        evolved["model"],
                        Comparison(column, best["model"], evolved[column], best[column], only_e, only_o, p),
                    )
                )
    return out


def correct_per_item(items: dict[str, ItemScores], column: str) -> list[float] | None:
    """The per-item 0/1 values behind an accuracy-like column (a native task's ``acc``, or an lm-eval leaf task's
    mean-aggregated metric such as ``exact_match,<filter>`` scored 0/1 per document); None when there are none."""
    for key, s in items.items():
        metric = column[len(key) + 1 :] if column.startswith(f"{key}/") else None
        if metric in s.values and (metric == "acc" or "," in metric):
            values = s.values[metric]
            return values if all(v in (0.0, 1.0) for v in values) else None
    return None


def _table_columns(cfg: RunConfig, rows: list[dict[str, Any]]) -> list[str]:
    """Accuracy columns, each held-out lm-eval task's metrics (``<task>/<leaf>/<metric>,<filter>``, e.g. MGSM-JA's
    exact_match under both of its filters), and the fitness metrics."""
    fitness_metrics = [metric for _, _, metric in cfg.evaluation.named_metrics()]
    accs = sorted({k for r in rows for k in r if k.endswith("/acc")})
    lm_eval = [t.name for t in cfg.evaluation.heldout_scored() if t.type == "lm_eval"]
    lm_columns = sorted({k for r in rows for k in r if "," in k and k.split("/", 1)[0] in lm_eval})
    return list(dict.fromkeys([*accs, *lm_columns, *fitness_metrics]))
