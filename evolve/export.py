"""Export a trial: the merged HF checkpoint, its recipe (evomerge and mergekit YAML), held-out scores and a model card."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import optuna

from evolve.config import RunConfig
from merge_core.merge import run_merge
from search_spaces.dfs import DataFlowRecipe


def export_trial(cfg: RunConfig, study: optuna.Study, out: Path, *, trial_number: Optional[int] = None,
                 device: str = "auto", heldout: bool = True) -> Path:
    from evolve.baselines import score_checkpoint
    from evolve.loop import best_trial, trial_recipe

    trial = best_trial(study, trial_number)
    recipe = trial_recipe(trial)
    if isinstance(recipe, DataFlowRecipe):  # a plain checkpoint with len(path) layers; scales folded into weights
        from merge_core.dataflow import LayerPath, export_dataflow

        export_dataflow(LayerPath(hops=recipe.hops, scales=recipe.scales), recipe.model_a, recipe.model_b, out)
        (out / "recipe.evomerge.yaml").write_text(recipe.to_yaml())
    else:
        run_merge(recipe, out, device=device, allow_pickle=cfg.models.allow_pickle, trust_remote_code=cfg.models.trust_remote_code)
        recipe.save(out / "recipe.evomerge.yaml")
        recipe.save(out / "mergekit.yaml", mergekit=True)
    scores = score_checkpoint(cfg, str(out), device=device) if heldout and cfg.evaluation.heldout_split else {}
    (out / "evomerge_scores.json").write_text(json.dumps({
        "trial": trial.number, "fitness": trial.value, "search_metrics": trial.user_attrs.get("metrics", {}),
        "heldout_split": cfg.evaluation.heldout_split if scores else None, "heldout_metrics": scores}, indent=2))
    (out / "README.md").write_text(model_card(cfg, trial, recipe, scores))
    return out


def model_card(cfg: RunConfig, trial, recipe, scores: dict[str, float]) -> str:
    sources = "\n".join(f"- `{s.path}`" + (f" ({s.alias})" if s.alias else "") for s in cfg.models.sources)
    search = "\n".join(f"| {k} | {v:.4f} |" for k, v in (trial.user_attrs.get("metrics") or {}).items())
    held = "\n".join(f"| {k} | {v:.4f} |" for k, v in scores.items()) or "| (not scored) | |"
    return f"""---
tags: [merge, evomerge]
base_model: {cfg.models.base or cfg.models.sources[0].path}
---
# {cfg.name} (evomerge trial {trial.number})

An evolved merge found by evomerge with `{cfg.search.optimizer.sampler}` over a
{recipe.to_dict()["merge_method"]} search space ({len(trial.params)} parameters).

- base: `{cfg.models.base}`
- sources:
{sources}
- method: `{recipe.to_dict()["merge_method"]}`
- search fitness: {trial.value:.4f} (trial {trial.number}; fitness = {' + '.join(f'{t.weight}*{t.metric}' + (' (min)' if t.direction == 'min' else '') for t in cfg.evaluation.fitness)})

## Search metrics (the split the search optimized)
| metric | value |
|---|---|
{search}

## Held-out ({cfg.evaluation.heldout_split} split)
| metric | value |
|---|---|
{held}

{"Layer path: " + recipe.describe() if isinstance(recipe, DataFlowRecipe) else "Reproduce with mergekit: `mergekit-yaml mergekit.yaml OUT`; with evomerge: `evolve merge recipe.evomerge.yaml --out OUT`."}
"""
