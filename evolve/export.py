"""Export a trial: the merged HF checkpoint, its recipe (evomerge and mergekit YAML), held-out scores and a model
card.
"""

from __future__ import annotations

import json
from pathlib import Path

import optuna

from evolve.config import RunConfig
from evolve.study import best_trial, trial_recipe
from merge_core.checkpoint import staged_output
from merge_core.errors import EvomergeError
from merge_core.merge import RECIPE_FILE, run_merge
from merge_core.recipe import DataFlowRecipe, MergeRecipe, OutputSlice, Recipe, SliceSource


def export_trial(
    cfg: RunConfig,
    study: optuna.Study,
    out: Path,
    *,
    trial_number: int | None = None,
    device: str = "auto",
    heldout: bool = True,
    overwrite: bool = False,
) -> Path:
    """All or nothing: everything (weights, config, tokenizer, recipes, scores, model card) is written to a temporary
    sibling of `out` that takes its place once complete; `out` must be new or empty (or `overwrite`), and neither an
    input model (nor inside one) nor the run directory (nor holding it)."""
    from evolve.baselines import score_checkpoint

    trial = best_trial(study, trial_number)
    recipe = trial_recipe(trial)
    run_dir, target = cfg.run_dir.resolve(), Path(out).expanduser().resolve()
    if target == run_dir or target in run_dir.parents:
        raise EvomergeError(
            f"--out {out}: {'is' if target == run_dir else 'holds'} the run directory {cfg.run_dir}; "
            "export to another directory"
        )
    with staged_output(out, overwrite=overwrite, inputs=models_read(cfg, recipe)) as tmp:
        if isinstance(recipe, DataFlowRecipe):  # a plain checkpoint with len(path) layers; scales folded into weights
            from merge_core.dataflow import export_dataflow

            export_dataflow(
                recipe.path,
                recipe.model_a,
                recipe.model_b,
                tmp,
                allow_pickle=cfg.models.allow_pickle,
                trust_remote_code=cfg.models.trust_remote_code,
            )
            (tmp / RECIPE_FILE).write_text(recipe.to_yaml())
        else:  # run_merge writes RECIPE_FILE: the recipe as searched (its model strings key the DARE/DELLA masks)
            run_merge(
                recipe,
                tmp,
                device=device,
                allow_pickle=cfg.models.allow_pickle,
                trust_remote_code=cfg.models.trust_remote_code,
            )
            absolute_paths(recipe).save(tmp / "mergekit.yaml", mergekit=True)
        scored = heldout and cfg.evaluation.heldout_split and cfg.evaluation.heldout_scored()
        scores = score_checkpoint(cfg, str(tmp), device=device) if scored else {}
        (tmp / "evomerge_scores.json").write_text(
            json.dumps(
                {
                    "trial": trial.number,
                    "fitness": trial.value,
                    "search_metrics": trial.user_attrs.get("metrics", {}),
                    "heldout_split": cfg.evaluation.heldout_split if scores else None,
                    "heldout_metrics": scores,
                },
                indent=2,
            )
        )
        (tmp / "README.md").write_text(model_card(cfg, trial, recipe, scores))
    return out


def models_read(cfg: RunConfig, recipe: Recipe) -> list[str]:
    """Every model the export reads: the config's base and sources, the recipe's models and tokenizer source."""
    models = [cfg.models.base, *(s.path for s in cfg.models.sources)]
    if isinstance(recipe, DataFlowRecipe):
        models += [recipe.model_a, recipe.model_b]
    else:
        models += [*recipe.models, recipe.tokenizer_source]
    return [m for m in models if m not in (None, "base")]


def _absolute(model: str) -> str:
    """A local model directory as an absolute path; a hub id as it is."""
    path = Path(model).expanduser()
    return str(path.resolve()) if path.exists() else model


def absolute_paths(recipe: MergeRecipe) -> MergeRecipe:
    """The recipe with local model paths made absolute, so `mergekit-yaml` finds them from any directory."""
    slices = tuple(
        OutputSlice(
            sources=tuple(
                SliceSource(model=_absolute(s.model), layer_range=s.layer_range, parameters=s.parameters)
                for s in sl.sources
            ),
            parameters=sl.parameters,
        )
        for sl in recipe.slices
    )
    tokenizer = recipe.tokenizer_source
    return recipe.replace(
        slices=slices,
        base_model=None if recipe.base_model is None else _absolute(recipe.base_model),
        tokenizer_source=tokenizer if tokenizer in (None, "base") else _absolute(tokenizer),
    )


def model_card(cfg: RunConfig, trial, recipe: Recipe, scores: dict[str, float]) -> str:
    sources = "\n".join(f"- `{s.path}`" + (f" ({s.alias})" if s.alias else "") for s in cfg.models.sources)
    search = "\n".join(f"| {k} | {v:.4f} |" for k, v in (trial.user_attrs.get("metrics") or {}).items())
    held = "\n".join(f"| {k} | {v:.4f} |" for k, v in scores.items()) or "| (not scored) | |"
    fitness = " + ".join(
        f"{t.weight}*{t.metric}" + (" (min)" if t.direction == "min" else "") for t in cfg.evaluation.fitness
    )
    if isinstance(recipe, DataFlowRecipe):
        reproduce = "Layer path: " + recipe.path.describe()
    else:
        reproduce = (
            "Reproduce with mergekit: `mergekit-yaml mergekit.yaml OUT` (model paths absolute); with evomerge: "
            "`evolve merge recipe.evomerge.yaml --out OUT` from the directory the search ran in (its model paths are "
            "the search's; DARE/DELLA masks depend on them)."
        )
    return f"""---
tags: [merge, evomerge]
base_model: {cfg.models.base or cfg.models.sources[0].path}
---
# {cfg.name} (evomerge trial {trial.number})

An evolved merge found by evomerge with `{cfg.search.optimizer.sampler}` over a
{recipe.merge_method} search space ({len(trial.params)} parameters).

- base: `{cfg.models.base}`
- sources:
{sources}
- method: `{recipe.merge_method}`
- search fitness: {trial.value:.4f} (trial {trial.number}; fitness = {fitness})

## Search metrics (the split the search optimized)
| metric | value |
|---|---|
{search}

## Held-out ({cfg.evaluation.heldout_split} split)
| metric | value |
|---|---|
{held}

{reproduce}
"""
