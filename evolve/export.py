"""Export a trial: the merged HF checkpoint, its recipe (`recipe.evomerge.yaml`, and `mergekit.yaml` where mergekit can
express it), held-out scores with bootstrap intervals and paired tests against the sources, and a Hugging Face model
card (`README.md`, YAML front matter that `huggingface_hub.ModelCard` reads).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from evals.base import ItemScores
from evolve.backends import use_threads
from evolve.baselines import correct_per_item, heldout_evaluators, heldout_model_items, score_checkpoint
from evolve.config import RunConfig, hub_id_problem
from evolve.items import items_scored
from evolve.stats import LEVEL, Comparison, mcnemar_exact, metric_intervals
from evolve.study import best_trial, rescored, trial_recipe
from merge_core.dataflow import export_dataflow
from merge_core.errors import EvomergeError
from merge_core.merge import RECIPE_FILE, run_merge
from merge_core.recipe import DataFlowRecipe, MergeRecipe, OutputSlice, Recipe, SliceSource
from merge_core.writer import staged_output

MERGEKIT_FILE = "mergekit.yaml"  # the recipe for `mergekit-yaml`: models by Hub id where given, else absolute paths
SCORES_FILE = "evomerge_scores.json"
CARD_FILE = "README.md"
# mergekit draws its own DARE/DELLA masks: it reproduces these recipes, not these exact weights
OWN_MASKS = ("dare_ties", "dare_linear", "della", "della_linear")


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
    """All or nothing: everything (weights, config, generation config and tokenizer of the base or the recipe's
    tokenizer source, recipes, scores, model card) is written to a temporary sibling of `out` that takes its place
    once complete; `out` must be new or empty (or `overwrite`), and neither an input model (nor inside one) nor the
    run directory (nor holding it)."""
    check_out(cfg, out)
    use_threads(cfg)
    trial = best_trial(study, trial_number)
    recipe = trial_recipe(trial)
    with staged_output(out, overwrite=overwrite, inputs=models_read(cfg, recipe)) as tmp:
        if isinstance(recipe, DataFlowRecipe):  # a plain checkpoint with len(path) layers; scales folded into weights
            export_dataflow(
                recipe.path,
                recipe.model_a,
                recipe.model_b,
                tmp,
                allow_pickle=cfg.models.allow_pickle,
                trust_remote_code=cfg.models.trust_remote_code,
            )
            (tmp / RECIPE_FILE).write_text(with_hub_ids(cfg, recipe).to_yaml())
        else:  # run_merge writes RECIPE_FILE: the recipe as searched (its model strings key the DARE/DELLA masks)
            run_merge(
                recipe,
                tmp,
                device=device,
                allow_pickle=cfg.models.allow_pickle,
                trust_remote_code=cfg.models.trust_remote_code,
            )
            ids = cfg.models.hub_ids()
            if ids:  # the models by Hub id, so the recipe runs on another machine
                (tmp / RECIPE_FILE).write_text(with_hub_ids(cfg, recipe).to_yaml())
            rename_models(recipe, lambda m: ids.get(m) or _absolute(m)).save(tmp / MERGEKIT_FILE, mergekit=True)
        scored = heldout and cfg.evaluation.heldout_split and cfg.evaluation.heldout_scored()
        held = score_heldout(cfg, tmp, device) if scored else None
        (tmp / SCORES_FILE).write_text(json.dumps(scores_record(trial, held), indent=2))
        model_card(cfg, study, trial, recipe, held, (tmp / MERGEKIT_FILE).is_file()).save(tmp / CARD_FILE)
    return out


def check_out(cfg: RunConfig, out: Path) -> None:
    """An export never writes into the run directory (its study, a hybrid's `ps_best` that the DFS stage reads), nor
    replaces it: `out` that is, is inside, or holds the run directory is refused, with or without --overwrite."""
    run_dir, target = cfg.run_dir.resolve(), Path(out).expanduser().resolve()
    relation = (
        "is"
        if target == run_dir
        else "is inside"
        if run_dir in target.parents
        else "holds"
        if target in run_dir.parents
        else None
    )
    if relation:
        raise EvomergeError(
            f"--out {out}: {relation} the run directory {cfg.run_dir} (also refused with --overwrite); "
            "export to another directory, outside it"
        )


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


def with_hub_ids(cfg: RunConfig, recipe: Recipe) -> Recipe:
    """The recipe with each model the config gives a Hub id (`models.base_hub_id`, a source's `hub_id`) named by
    it; the others as searched."""
    ids = cfg.models.hub_ids()
    if isinstance(recipe, DataFlowRecipe):
        return dataclasses.replace(
            recipe, model_a=ids.get(recipe.model_a, recipe.model_a), model_b=ids.get(recipe.model_b, recipe.model_b)
        )
    return rename_models(recipe, lambda m: ids.get(m, m))


def rename_models(recipe: MergeRecipe, rename: Callable[[str], str]) -> MergeRecipe:
    """The recipe with every model string (slice sources, base, tokenizer source) passed through `rename`."""
    slices = tuple(
        OutputSlice(
            sources=tuple(
                SliceSource(model=rename(s.model), layer_range=s.layer_range, parameters=s.parameters)
                for s in sl.sources
            ),
            parameters=sl.parameters,
        )
        for sl in recipe.slices
    )
    tokenizer = recipe.tokenizer_source
    return recipe.replace(
        slices=slices,
        base_model=None if recipe.base_model is None else rename(recipe.base_model),
        tokenizer_source=tokenizer if tokenizer in (None, "base") else rename(tokenizer),
    )


# ---- names on the Hub ----------------------------------------------------------------------------------------------


def card_name(model: str) -> str:
    """How the card names a model (never a local path): a hub id as it is; a local directory by the hub id its
    config.json records (`_name_or_path`), else by its directory's name."""
    path = Path(model).expanduser()
    if not path.is_dir():
        return model
    try:
        recorded = json.loads((path / "config.json").read_text()).get("_name_or_path")
    except (OSError, ValueError, AttributeError):
        recorded = None
    if isinstance(recorded, str) and not hub_id_problem(recorded) and not Path(recorded).expanduser().exists():
        return recorded
    return path.resolve().name


def card_models(cfg: RunConfig, recipe: Recipe) -> dict[str, str]:
    """{model string as the run gives it: card name} for the base, the sources, and any other model the recipe
    reads, except a merge this run made itself (a hybrid's `ps_best`, built from the same base and sources). A
    model the config gives a Hub id is named by it."""
    ids = cfg.models.hub_ids()
    name = lambda m: ids.get(m) or card_name(m)  # noqa: E731
    names = {cfg.models.base: name(cfg.models.base)} if cfg.models.base else {}
    names |= {s.path: name(s.path) for s in cfg.models.sources}
    known = {_absolute(m) for m in names}
    run_dir = cfg.run_dir.resolve()
    read = [recipe.model_a, recipe.model_b] if isinstance(recipe, DataFlowRecipe) else list(recipe.models)
    for m in read:
        absolute = _absolute(m)
        if absolute not in known and run_dir not in Path(absolute).parents:
            names[m], known = card_name(m), known | {absolute}
    return names


# ---- held-out scores ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HeldOut:
    """The export scored on the held-out split, and the base and sources on the same items."""

    split: str
    metrics: dict[str, float]
    intervals: dict[str, tuple[float, float]]  # metric (and "fitness") -> bootstrap interval over items
    items: dict[str, int]  # task -> items scored
    others: dict[str, dict[str, float]]  # "base" / "source ALIAS" -> metrics
    other_intervals: dict[str, dict[str, tuple[float, float]]]
    comparisons: list[Comparison]  # against each source, on each accuracy column


def score_heldout(cfg: RunConfig, path: Path, device: str) -> HeldOut:
    """Score the checkpoint at `path`, the base and every source on the held-out split (the same items), with
    bootstrap intervals and McNemar's exact test against each source on each accuracy metric."""
    evaluators = heldout_evaluators(cfg)
    terms = cfg.evaluation.fitness or []
    metrics, items = score_checkpoint(cfg, str(path), device=device, evaluators=evaluators)
    others = ([("base", cfg.models.base)] if cfg.models.base else []) + [
        (f"source {alias}", s.path) for alias, s in zip(cfg.models.aliases(), cfg.models.sources)
    ]
    scored, intervals, comparisons = {}, {}, []
    for label, model in others:
        m, it = heldout_model_items(cfg, label, model, evaluators, device=device)  # scored once per run
        scored[label], intervals[label] = m, metric_intervals(it, terms)
        if label != "base":
            comparisons += accuracy_comparisons(metrics, items, label, m, it)
    return HeldOut(
        split=str(cfg.evaluation.heldout_split),
        metrics=metrics,
        intervals=metric_intervals(items, terms),
        items={task: s.n for task, s in items.items()},
        others=scored,
        other_intervals=intervals,
        comparisons=comparisons,
    )


def accuracy_comparisons(
    metrics: dict[str, float],
    items: dict[str, ItemScores],
    other: str,
    other_metrics: dict[str, float],
    other_items: dict[str, ItemScores],
) -> list[Comparison]:
    """McNemar's exact test on every accuracy-like metric both were scored on item by item (0/1 per item: the
    held-out table's rule, `evolve.baselines`)."""
    out = []
    for column in (k for k in metrics if k in other_metrics):
        mine, theirs = correct_per_item(items, column), correct_per_item(other_items, column)
        if mine is None or theirs is None:
            continue
        only_e, only_o, p = mcnemar_exact(mine, theirs)
        out.append(Comparison(column, other, metrics[column], other_metrics[column], only_e, only_o, p))
    return out


def scores_record(trial: FrozenTrial, held: HeldOut | None) -> dict[str, Any]:
    """evomerge_scores.json: the trial's search scores and, when scored, the held-out ones."""
    record: dict[str, Any] = {
        "trial": trial.number,
        "values": trial.values,
        "fitness": trial.user_attrs.get("fitness"),
        "search_metrics": trial.user_attrs.get("metrics", {}),
        "heldout_split": held.split if held else None,
        "heldout_metrics": held.metrics if held else {},
    }
    if held:
        record |= {
            "heldout_intervals": {k: list(v) for k, v in held.intervals.items()},
            "heldout_level": LEVEL,
            "heldout_items": held.items,
            "heldout_others": held.others,
            "heldout_comparisons": [dataclasses.asdict(c) | {"verdict": c.verdict} for c in held.comparisons],
        }
    return record


# ---- the model card ----------------------------------------------------------------------------------------------


def model_card(
    cfg: RunConfig, study: optuna.Study, trial: FrozenTrial, recipe: Recipe, held: HeldOut | None, mergekit: bool
):
    """A Hugging Face model card: front matter (library, the merged models as `base_model`, `base_model_relation:
    merge`, tags), then the recipe, how the search found it, the held-out results and which sources it beats."""
    from huggingface_hub import ModelCard, ModelCardData

    names = card_models(cfg, recipe)
    data = ModelCardData(
        library_name="transformers",
        pipeline_tag="text-generation",
        base_model=list(dict.fromkeys(names.values())),
        base_model_relation="merge",
        tags=["merge", "evomerge", *(["mergekit"] if mergekit else [])],
    )
    sections = [
        f"# {cfg.name} (evomerge trial {trial.number})",
        _summary(names, recipe, cfg.models.hub_ids()),
        "## Recipe\n\n" + _recipe_text(recipe, names, mergekit, bool(cfg.models.hub_ids())),
        "## How it was found\n\n" + _search_text(cfg, study, trial),
        "## Held-out results\n\n" + _heldout_text(held),
    ]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n")


def _summary(names: dict[str, str], recipe: Recipe, ids: dict[str, str]) -> str:
    local = [n for m, n in names.items() if Path(m).expanduser().is_dir() and m not in ids]
    lines = [
        f"A `{recipe.merge_method}` merge of {', '.join(f'`{n}`' for n in dict.fromkeys(names.values()))}, its "
        "coefficients found by an evolutionary search with evomerge on the tasks below."
    ]
    if local:
        lines.append(
            f"\n\nLocal models are named by their config's `_name_or_path` or their directory ({', '.join(local)}); "
            "replace these in `base_model` with their Hub ids before publishing (or give them in the run config: "
            "`models.base_hub_id`, a source's `hub_id`)."
        )
    return "".join(lines)


def _recipe_text(recipe: Recipe, names: dict[str, str], mergekit: bool, hub_ids: bool = False) -> str:
    rename = lambda m: names.get(m, card_name(m))  # noqa: E731
    if isinstance(recipe, DataFlowRecipe):
        shown = dataclasses.replace(recipe, model_a=rename(recipe.model_a), model_b=rename(recipe.model_b))
        return (
            f"Data-flow merge: a path of {len(recipe.path)} layers through model A (`{shown.model_a}`) and model B "
            f"(`{shown.model_b}`), each hop's input scaled (folded into the weights of this checkpoint): "
            f"`{recipe.path.describe()}`.\n\n```yaml\n{shown.to_yaml()}```\n\nThe exact recipe is `{RECIPE_FILE}`; "
            "mergekit cannot express scaled layer paths, so there is no `mergekit.yaml`."
        )
    text = f"```yaml\n{rename_models(recipe, rename).to_yaml()}```\n\n"
    stochastic = recipe.merge_method in OWN_MASKS
    if hub_ids:
        text += f"Models are shown by name; `{RECIPE_FILE}` names the models the run config gave Hub ids by them "
        text += f"(`evolve merge {RECIPE_FILE} --out OUT` on any machine with Hub access)"
        text += (
            "; its DARE/DELLA masks are seeded by the model names, so with Hub ids in place of the search's paths it "
            "reproduces the recipe, not these exact weights."
            if stochastic
            else "."
        )
    else:
        text += f"Models are shown by name; `{RECIPE_FILE}` is the recipe as searched (`evolve merge {RECIPE_FILE} "
        text += "--out OUT` from the directory the search ran in: its model strings seed the DARE/DELLA masks)."
    if mergekit:
        where = "models by Hub id where the run config gives one, else by" if hub_ids else "model"
        text += f" With mergekit: `mergekit-yaml {MERGEKIT_FILE} OUT` ({where} paths absolute on the exporting machine)"
        text += (
            "; mergekit draws its own DARE/DELLA masks, so it reproduces the recipe, not these exact weights."
            if stochastic
            else "."
        )
    return text


def _search_text(cfg: RunConfig, study: optuna.Study, trial: FrozenTrial) -> str:
    stage = study.user_attrs.get("stage", cfg.search.stages[0])
    space, optimizer, _ = cfg.search.stage(stage)
    trials = study.get_trials(deepcopy=False)
    states = {s: sum(t.state == s for t in trials) for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}
    searched = sum(items_scored(t.user_attrs.get("items")) for t in trials)
    rescores = rescored(study)
    again = sum(int(r.get("items_scored", 0)) for r in rescores.values())
    ev = cfg.evaluation
    if ev.objectives:
        goal = "objectives " + ", ".join(f"{o.metric} ({o.direction})" for o in ev.objectives)
        value = ", ".join(f"{n} {v:.4f}" for n, v in zip([o.metric for o in ev.objectives], trial.values))
    else:
        goal = "fitness = " + " + ".join(
            f"{t.weight:g} * {t.metric}" + (" (lower is better: negated)" if t.direction == "min" else "")
            for t in ev.fitness or []
        )
        value = f"fitness {trial.user_attrs.get('fitness', trial.value):.4f}"
    tasks = ", ".join(f"{t.name} ({getattr(t, 'split', None) or 'its split'})" for t in ev.tasks)
    lines = [
        f"- search: stage `{stage}`, sampler `{optimizer.sampler}`, seed {cfg.seed}, {len(study.trials)} trials "
        f"({states[TrialState.COMPLETE]} complete, {states[TrialState.PRUNED]} stopped early by racing, "
        f"{states[TrialState.FAIL]} failed), {len(trial.params)} parameters",
        f"- items scored: {searched or 'not recorded by this study'}"
        + (f" (+ {again} re-scoring {len(rescores)} elite trials)" if again else ""),
        f"- tasks searched on: {tasks}",
        f"- {goal}",
        f"- this trial ({trial.number}): {value}",
    ]
    if trial.number in rescores:
        r = rescores[trial.number]
        lines.append(f"- re-scored on {r['items_scored']} {r['split']} items: fitness {r['fitness']:.4f}")
    metrics = trial.user_attrs.get("metrics") or {}
    table = "\n".join(f"| {k} | {v:.4f} |" for k, v in metrics.items())
    return "\n".join(lines) + ("\n\nSearch metrics of this trial:\n\n| metric | value |\n|---|---|\n" + table)


def _heldout_text(held: HeldOut | None) -> str:
    if held is None:
        return "Not scored (exported with `--no-heldout`, or the run has no held-out split)."
    pct = f"{LEVEL:.0%}"
    models = ["this merge", *held.others]
    values = {"this merge": held.metrics, **held.others}
    cis = {"this merge": held.intervals, **held.other_intervals}
    rows = [f"| metric | {' | '.join(models)} |", "|---" * (len(models) + 1) + "|"]
    for metric in held.metrics:
        cells = []
        for m in models:
            v, ci = values[m].get(metric), cis[m].get(metric)
            cells.append("" if v is None else f"{v:.4f}" + (f" [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else ""))
        rows.append(f"| {metric} | {' | '.join(cells)} |")
    items = ", ".join(f"{t} {n}" for t, n in held.items.items())
    text = f"`{held.split}` split ({items} items), the same items for every model; [{pct} bootstrap interval over "
    text += "items].\n\n" + "\n".join(rows)
    if not held.comparisons:
        return text + "\n\nNo accuracy metric was scored item by item, so no paired test against the sources.\n"
    beats = [f"{c.other} on {c.metric}" for c in held.comparisons if c.verdict == "beats it"]
    text += f"\n\n{'Beats ' + '; '.join(beats) if beats else 'Beats no source significantly'} "
    text += f"(McNemar's exact test on the same items, p < {Comparison.alpha:g}):\n\n"
    text += "\n".join(f"- {c.line('this merge')}" for c in held.comparisons)
    return text
