"""Held-out tables of the real-model searches (issue 24), from the committed results under data/real_results/.

    .venv/bin/python bench/real_search.py                     # print every target's table from the committed results
    .venv/bin/python bench/real_search.py --write             # ... and write them into bench/RESULTS.md
    .venv/bin/python bench/real_search.py skills fr_sum       # ... of these targets only
    .venv/bin/python bench/real_search.py score skills --grid 0.25 0.5 0.75 1   # score every row again (needs
                                                              # `python -m zoo real`; 31 min here for skills)
    .venv/bin/python bench/real_search.py score skills_ties --reuse skills  # score only the evolved rows, the
                                                              # others taken from a target of the same sources/tasks

A target's folder holds `config.yaml` (the search's config; its held-out split is the target's test items),
`recipe.evomerge.yaml` (the evolved merge, as `evolve export` writes it; `recipe-dfs.evomerge.yaml` for PS+DFS
where there is one), `study.db` (the search), and `heldout.json`, which `score` writes: every row's held-out
metrics and per-item record, the dev grid it chose its grid row from, and what each took.

Rows: the base, each source, the untuned merges (linear average, task arithmetic 1/1, TIES and DARE-TIES at
densities 0.5 and 0.7), the best one-coefficient-per-expert task-arithmetic grid point (chosen on the search's own
dev fitness, as the search picks), and the evolved merges. Columns: the target metric (the mean accuracy over the
target's tasks, every item weighted alike; 95% bootstrap interval over items), each task's accuracy (what each
source's skill became in the merge), and for the evolved rows McNemar's exact test against the best other row on the
same held-out items, pooled over the tasks.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from evolve.baselines import correct_per_item, untuned_recipes  # noqa: E402
from evolve.config import RunConfig, load_config  # noqa: E402
from evolve.fitness import FitnessTerm  # noqa: E402
from evolve.items import decode_items, encode_items, items_scored  # noqa: E402
from evolve.stats import mcnemar_exact, metric_intervals  # noqa: E402

RESULTS = ROOT / "data" / "real_results"
SECTION = "On a real model: evolved merges of SmolLM2 fine-tunes against every source and untuned merge (issue 24)"
INTRO = """`.venv/bin/python bench/real_search.py --write`, from the committed `data/real_results/<target>/heldout.json`
(each scored by `bench/real_search.py score`, whose commands are in its docstring), on a 2-core AMD EPYC (AVX-512)
shared with other jobs, 2026-12-06. Targets: `skills*` = several skills in one model (designs 1-3), `fr_sum*` =
composition (designs 3-5; designs 1-2 are issue 13's above). Goals: multi-skill, +0.05 over the best other row with
McNemar exact p < 0.05: met by design 3 (+0.050, p = 0.00029), missed by designs 1 (+0.012) and 2 (+0.030, p = 0.054);
composition, a significant win over every other row: missed by all three designs (0.005 at best, the same as the
`fr_num` source). Composition design 3 stopped at 113 of its 150 candidates (the machine restarted; not resumed:
none had more than 1 of 64 dev items right). A hand probe behind design 5 (`bench/fr_sum_layer_probe.py`: `arith`'s
layers 0..k-1 then `fr_num`'s k..29 as one data-flow path, k = 14, 18, 22, 26, on 32 dev items) got none right for
any k, the gold words' mean log-probability -11.3 to -23.3 (`fr_num` alone: -12.1)."""


def target_config(target: str) -> RunConfig:
    return load_config(RESULTS / target / "config.yaml")


def accuracy_columns(cfg: RunConfig) -> list[str]:
    return [f"{t.name}/acc" for t in cfg.evaluation.heldout_scored()]


def pooled_correct(items: dict, columns: list[str]) -> list[float]:
    """Every held-out item's 0/1 accuracy, task after task (the same order for every row)."""
    out: list[float] = []
    for column in columns:
        values = correct_per_item(items, column)
        if values is None:
            raise SystemExit(f"no per-item record for {column}")
        out += values
    return out


def same_rows(cfg: RunConfig, other: RunConfig) -> bool:
    """Whether `other`'s base, source and grid rows are this config's too: the same models and held-out tasks, the
    same dev tasks and fitness (the grid's pick)."""
    ev, oe = cfg.evaluation, other.evaluation
    return (
        cfg.models.base == other.models.base
        and [s.path for s in cfg.models.sources] == [s.path for s in other.models.sources]
        and ev.heldout_split == oe.heldout_split
        and [t.model_dump() for t in ev.tasks] == [t.model_dump() for t in oe.tasks]
        and ev.fitness == oe.fitness
    )


def score(target: str, grid: list[float], reuse: str | None = None) -> Path:
    """Score every row on the held-out split and write heldout.json (the grid is searched on the dev split). With
    `reuse`, another target of the same sources, tasks and fitness, its rows but the evolved ones are taken as they
    are and only this target's evolved rows are scored."""
    from demo_bar import grid_search

    from evolve.baselines import heldout_evaluators, score_checkpoint, score_recipes

    cfg = target_config(target)
    folder = RESULTS / target
    evaluators = heldout_evaluators(cfg)
    rows: list[dict[str, Any]] = []
    if reuse is not None:
        if not same_rows(cfg, target_config(reuse)):
            raise SystemExit(f"--reuse {reuse}: its sources, tasks or fitness differ from {target}'s")
        old = json.loads((RESULTS / reuse / "heldout.json").read_text())
        rows = [r for r in old["rows"] if not r["kind"].startswith("evolved")]
        record = {"config": str((folder / "config.yaml").relative_to(ROOT)), "split": old["split"], "rows_from": reuse}
        record |= {"grid": old["grid"]} if "grid" in old else {}
        return write_evolved(cfg, folder, evaluators, rows, record)

    models = [("base", "base", cfg.models.base)] + [
        (f"source {a}", "source", s.path) for a, s in zip(cfg.models.aliases(), cfg.models.sources)
    ]
    for label, kind, path in models:
        t0 = time.perf_counter()
        metrics, items = score_checkpoint(cfg, path, device=cfg.execution.device, evaluators=evaluators)
        rows.append(row(label, kind, metrics, items, time.perf_counter() - t0))
    recipes: dict[str, tuple[str, Any]] = {}
    for density in (0.5, 0.7):
        for label, recipe in untuned_recipes(cfg, density).items():
            recipes.setdefault(label, ("untuned", recipe))
    t0 = time.perf_counter()
    grid_rows, n_points = grid_search(cfg, grid)
    grid_seconds = time.perf_counter() - t0
    label = next(k for k in grid_rows if k.startswith("best global grid"))
    recipes[label] = ("grid", grid_rows[label])
    for label, (kind, recipe) in recipes.items():
        t0 = time.perf_counter()
        (metrics, items) = score_recipes(cfg, {label: recipe}, evaluators)[label]
        rows.append(row(label, kind, metrics, items, time.perf_counter() - t0, recipe.to_yaml()))
    record = {
        "config": str((folder / "config.yaml").relative_to(ROOT)),
        "split": cfg.evaluation.heldout_split,
        "grid": {"values": grid, "points": n_points, "seconds": round(grid_seconds, 1)},
    }
    return write_evolved(cfg, folder, evaluators, rows, record)


def row(label: str, kind: str, metrics: dict, items: dict, seconds: float, recipe: str | None = None) -> dict:
    """One row of heldout.json (its per-item record encoded), printed as it is scored."""
    print(f"{label}: {json.dumps({k: round(v, 4) for k, v in metrics.items() if k.endswith('/acc')})}", flush=True)
    record = encode_items(items, {task: s.n for task, s in items.items()}, soft="f64")
    return {"model": label, "kind": kind, "metrics": metrics, "items": record, "seconds": round(seconds, 1)} | (
        {"recipe": recipe} if recipe else {}
    )


def write_evolved(cfg: RunConfig, folder: Path, evaluators: Any, rows: list[dict], record: dict) -> Path:
    """Score the target's evolved recipes (`recipe.evomerge.yaml`: its search's pick, PS or DFS by its kind;
    `recipe-dfs.evomerge.yaml`: the PS+DFS pick) after `rows` and write them all to heldout.json."""
    from evolve.baselines import score_recipes
    from merge_core.recipe import DataFlowRecipe, load_recipe

    for name in ("recipe.evomerge.yaml", "recipe-dfs.evomerge.yaml"):
        if not (folder / name).is_file():
            continue
        recipe = load_recipe((folder / name).read_text())
        dfs = isinstance(recipe, DataFlowRecipe)
        label = "evolved PS+DFS" if name.startswith("recipe-dfs") else "evolved DFS" if dfs else "evolved PS"
        t0 = time.perf_counter()
        (metrics, items) = score_recipes(cfg, {label: recipe}, evaluators)[label]
        rows.append(row(label, "evolved", metrics, items, time.perf_counter() - t0, recipe.to_yaml()))
    out = folder / "heldout.json"
    out.write_text(json.dumps(record | {"rows": rows}, indent=1) + "\n")
    return out


def design(target: str, cfg: RunConfig) -> str:
    """What the search was: the leading comment of its config under configs/ (`smollm2_<target>.yaml`, else
    `<study name>.yaml`)."""
    path = ROOT / "configs" / f"smollm2_{target}.yaml"
    path = path if path.is_file() else ROOT / "configs" / f"{cfg.name}.yaml"
    lines = path.read_text().splitlines() if path.is_file() else []
    comment = [line.lstrip("# ").rstrip() for line in itertools.takewhile(lambda x: x.startswith("#"), lines)]
    return " ".join(x for x in comment if x and not x.startswith("Relative paths"))


def search_cost(target: str, cfg: RunConfig) -> str:
    """The search's cost from its committed study: candidates, how many racing stopped, items, minutes of trials."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=cfg.name, storage=f"sqlite:///{RESULTS / target / 'study.db'}")
    done = [t for t in study.get_trials(deepcopy=False) if t.datetime_complete is not None]
    pruned = sum(t.state == optuna.trial.TrialState.PRUNED for t in done)
    items = sum(items_scored(t.user_attrs.get("items")) for t in done)
    minutes = sum((t.datetime_complete - t.datetime_start).total_seconds() for t in done) / 60
    return (
        f"{cfg.name}: {len(done)} candidates ({pruned} stopped early by racing), {items:,} dev items scored, "
        f"{minutes:.0f} min of trials"
    )


def table(target: str) -> list[str]:
    """The target's held-out table (markdown) and its McNemar lines, from heldout.json."""
    cfg = target_config(target)
    record = json.loads((RESULTS / target / "heldout.json").read_text())
    columns = accuracy_columns(cfg)
    # the target: mean accuracy over the target's tasks (the search's fitness may add a soft term, as fr_sum's does)
    terms = [FitnessTerm(metric=c, weight=1 / len(columns)) for c in columns]
    rows = []
    for r in record["rows"]:
        items = decode_items(r["items"])
        ci = metric_intervals(items, terms)
        mix = sum(t.weight * r["metrics"][t.metric] for t in terms)
        rows.append({**r, "_items": items, "_ci": ci, "_mix": mix})
    head = ["model", "target (mean acc) [95% CI]", *columns]
    lines = [design(target, cfg), "", f"Search ({target}/study.db): {search_cost(target, cfg)}.", ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lo, hi = r["_ci"].get("fitness", (float("nan"),) * 2)
        label = f"**{r['model']}**" if r["kind"].startswith("evolved") else r["model"]
        cells = [label, f"{r['_mix']:.3f} [{lo:.3f}, {hi:.3f}]", *(f"{r['metrics'][c]:.3f}" for c in columns)]
        lines.append("| " + " | ".join(cells) + " |")
    n = sum(len(pooled_correct(rows[0]["_items"], [c])) for c in columns)
    lines.append("")
    lines.append(f"Held-out: {n} items ({cfg.evaluation.heldout_split} split of {', '.join(columns)}).")
    for evolved in (r for r in rows if r["kind"].startswith("evolved")):
        others = [r for r in rows if not r["kind"].startswith("evolved")]
        best = max(others, key=lambda r: r["_mix"])
        only_e, only_o, p = mcnemar_exact(
            pooled_correct(evolved["_items"], columns), pooled_correct(best["_items"], columns)
        )
        verdict = "beats it" if p < 0.05 and evolved["_mix"] > best["_mix"] else "no significant win"
        lines.append(
            f"- {evolved['model']} vs the best other row ({best['model']}): {evolved['_mix']:.3f} vs "
            f"{best['_mix']:.3f} ({evolved['_mix'] - best['_mix']:+.3f}); right only for the evolved merge on "
            f"{only_e} items, only for the other on {only_o}; McNemar exact p = {p:.3g}: {verdict}"
        )
    if "rows_from" in record:
        lines.append(f"- every row but the evolved ones: {record['rows_from']}'s (the same sources, items and fitness)")
    grid = record.get("grid")
    if grid:
        lines.append(
            f"- grid: {grid['points']} points ({', '.join(f'{v:g}' for v in grid['values'])} per expert) on the "
            f"dev split, {grid['seconds'] / 60:.0f} min"
        )
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("action", nargs="?", choices=["table", "score"], default="table")
    p.add_argument("targets", nargs="*", help="default: every folder under data/real_results with a heldout.json")
    p.add_argument("--grid", nargs="+", type=float, default=[0.5, 1.0, 1.5])
    p.add_argument("--reuse", metavar="TARGET", help="score: take every row but the evolved ones from TARGET's table")
    p.add_argument("--write", action="store_true", help="write the tables into bench/RESULTS.md")
    argv = sys.argv[1:]
    args = p.parse_args(
        argv if not argv or argv[0] in ("table", "score") or argv[0].startswith("-") else ["table", *argv]
    )
    if args.action == "score":
        for target in args.targets:
            print(f"wrote {score(target, args.grid, args.reuse)}")
        return 0
    targets = args.targets or sorted(p.parent.name for p in RESULTS.glob("*/heldout.json"))
    body = [INTRO, ""] if args.write else []
    for target in targets:
        body += [f"### {target}", "", *table(target), ""]
    print("\n".join(body))
    if args.write:
        from results import write_section

        write_section(SECTION, "\n".join(body))
    return 0


if __name__ == "__main__":
    sys.exit(main())
