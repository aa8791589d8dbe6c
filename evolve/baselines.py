"""Held-out scoring: any checkpoint, any set of recipes, and the end-of-run table (sources, untuned merges, evolved)."""

from __future__ import annotations

import logging
from typing import Any

from evolve.config import RunConfig
from evolve.study import best_trial, load_study, trial_recipe
from evolve.worker import build_evaluators, score_metrics
from merge_core.errors import EvomergeError
from merge_core.merge import method_spec
from merge_core.recipe import DataFlowRecipe, MergeRecipe, OutputSlice, Recipe, SliceSource

log = logging.getLogger(__name__)


def heldout_evaluators(cfg: RunConfig, split: str | None = None, limit: int | None = None) -> list[tuple[str, Any]]:
    ev = cfg.evaluation
    return build_evaluators(
        ev.heldout_scored(),
        seed=cfg.seed,
        split=split or ev.heldout_split,
        limit=limit if limit is not None else ev.heldout_limit,
        heldout=True,
    )


def score_checkpoint(
    cfg: RunConfig,
    path: str,
    *,
    split: str | None = None,
    limit: int | None = None,
    device: str = "auto",
    evaluators: list | None = None,
) -> dict[str, float]:
    """Load an HF checkpoint with transformers and score it on the config's tasks."""
    from transformers import AutoTokenizer

    from evolve.worker import load_live_model, open_checkpoint

    cfg = cfg.model_copy(update={"execution": cfg.execution.model_copy(update={"device": device})})
    model = load_live_model(cfg, path)
    tokenizer = AutoTokenizer.from_pretrained(
        str(open_checkpoint(cfg, path).path), trust_remote_code=cfg.models.trust_remote_code
    )
    return score_metrics(evaluators or heldout_evaluators(cfg, split, limit), model, tokenizer)


def score_recipes(cfg: RunConfig, recipes: dict[str, Recipe], evaluators: list) -> dict[str, dict[str, float]]:
    """Score recipes in memory: one backend (Materializer, or models A and B) per group of compatible recipes."""
    from transformers import AutoTokenizer

    from evolve.worker import make_backend

    groups: dict[tuple, list[str]] = {}
    for label, r in recipes.items():
        key = (
            (r.model_a, r.model_b)
            if isinstance(r, DataFlowRecipe)
            else (method_spec(r).kind, r.models, r.base_model, r.dtype)
        )
        groups.setdefault(key, []).append(label)
    out: dict[str, dict[str, float]] = {}
    for labels in groups.values():
        backend = make_backend(cfg, recipes[labels[0]])
        tok = AutoTokenizer.from_pretrained(backend.tokenizer_path, trust_remote_code=cfg.models.trust_remote_code)
        for label in labels:
            backend.apply(recipes[label])
            out[label] = score_metrics(evaluators, backend.model, tok)
        del backend
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
    """Rows for the end-of-run table: base, each source, the untuned merges, and each stage's best trial."""
    evaluators = heldout_evaluators(cfg)
    rows: list[dict[str, Any]] = []
    models = ([("base", cfg.models.base)] if cfg.models.base else []) + [
        (f"source {a}", s.path) for a, s in zip(cfg.models.aliases(), cfg.models.sources)
    ]
    for label, path in models:
        rows.append({"model": label, **score_checkpoint(cfg, path, device=cfg.execution.device, evaluators=evaluators)})
    recipes: dict[str, Recipe] = dict(untuned_recipes(cfg))
    labels = {"ps": "evolved PS", "dfs": "evolved PS+DFS" if cfg.search.stages == ["ps", "dfs"] else "evolved DFS"}
    for stage in cfg.search.stages:
        best = best_trial(load_study(cfg, stage))
        recipes[f"{labels[stage]} (trial {best.number})"] = trial_recipe(best)
    for label, metrics in score_recipes(cfg, recipes, evaluators).items():
        rows.append({"model": label, **metrics})
    keep = _table_columns(cfg, rows)
    return [{"model": r["model"], **{k: r.get(k) for k in keep}} for r in rows]


def _table_columns(cfg: RunConfig, rows: list[dict[str, Any]]) -> list[str]:
    fitness_metrics = [t.metric for t in cfg.evaluation.fitness]
    accs = sorted({k for r in rows for k in r if k.endswith("/acc")})
    return list(dict.fromkeys([*accs, *fitness_metrics]))
