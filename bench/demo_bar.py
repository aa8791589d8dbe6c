"""The demo's bar (zoo issue): the evolved per-layer merge against every source, control and untuned merge, per seed.

    .venv/bin/python bench/demo_bar.py --config configs/tiny_jp_math.yaml --seeds 0 1 2 --write

For each search seed S, in fresh studies under bench/_work/demo_bar/ (each step reuses a finished study):
  evolved            the config's own search (`evolve run CONFIG --seed S`, in process);
  per-layer, one expert   the same search space, budget and seed over one expert alone (the config with one source);
  base + a*tau_i     the best a on the grid, for each expert alone;
  best global grid   the best (a_1, ..., a_n) on the grid: one coefficient per expert for the whole model.
Grid points are chosen by the search's own fitness (the config's fitness split and limit), exactly as the search
chooses its best trial; every row is then scored on the held-out split. The sources and untuned merges are the
end-of-run table's. The margin is the evolved merge's held-out accuracy minus the best of every other row.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from results import write_section  # noqa: E402  (bench/ is on sys.path: scripts run from it)

from evolve.baselines import global_recipe, heldout_evaluators, score_checkpoint, score_recipes, untuned_recipes  # noqa: E402
from evolve.config import RunConfig, load_config  # noqa: E402
from evolve.loop import run_search  # noqa: E402
from evolve.study import best_trial, trial_recipe  # noqa: E402
from evolve.worker import Worker  # noqa: E402

SECTION = "Demo bar (zoo issue): evolved merge vs sources, controls and untuned merges"


def variant(cfg: RunConfig, work: Path, name: str, seed: int, sources: list | None = None) -> RunConfig:
    models = cfg.models if sources is None else cfg.models.model_copy(update={"sources": sources})
    return cfg.model_copy(
        update={"name": name, "seed": seed, "models": models, "storage": None, "output_dir": str(work / name)}
    )


def search(cfg: RunConfig) -> tuple[Any, float]:
    t0 = time.perf_counter()
    study = run_search(cfg, progress=False).study
    return trial_recipe(best_trial(study)), time.perf_counter() - t0


def grid_search(cfg: RunConfig, grid: list[float]) -> tuple[dict[str, Any], int]:
    """Every point of grid^n scored by the search's fitness; the best global merge and the best per single expert."""
    paths = [s.path for s in cfg.models.sources]
    aliases = cfg.models.aliases()
    worker = Worker(cfg, global_recipe(cfg, "task_arithmetic", dict.fromkeys(paths, 1.0)).to_yaml())
    best: dict[str, tuple[float, str, Any]] = {}  # row -> (fitness, label with coefficients, recipe)

    def keep(row: str, label: str, fitness: float, recipe: Any) -> None:
        if row not in best or fitness > best[row][0]:
            best[row] = (fitness, label, recipe)

    points = list(itertools.product(grid, repeat=len(paths)))
    for point in points:
        recipe = global_recipe(cfg, "task_arithmetic", dict(zip(paths, point)))
        out = worker.evaluate(recipe.to_yaml())
        if not out.ok:
            raise SystemExit(f"grid point {point}: {out.error}")
        coeffs = ", ".join(f"{a}={w:g}" for a, w in zip(aliases, point))
        keep("best global grid", f"best global grid ({coeffs})", out.fitness, recipe)
        nonzero = [i for i, w in enumerate(point) if w != 0]
        if len(nonzero) == 1:  # base + a*tau_i: the other experts' coefficients are 0; written with that expert alone
            i = nonzero[0]
            keep(
                f"base + a*tau_{aliases[i]}",
                f"base + a*tau_{aliases[i]} (a={point[i]:g})",
                out.fitness,
                global_recipe(cfg, "task_arithmetic", {paths[i]: point[i]}),
            )
    del worker
    return {label: recipe for _, label, recipe in best.values()}, len(points)


def retarget(config: Path, zoo: Path | None, work: Path) -> RunConfig:
    """The config, or the config with its `data/zoo/` paths pointing at another world folder `zoo`."""
    if zoo is None:
        return load_config(config)
    text = config.read_text().replace("data/zoo/", f"{zoo.as_posix().rstrip('/')}/")
    work.mkdir(parents=True, exist_ok=True)
    copy = work / config.name
    copy.write_text(text)
    return load_config(copy)


def measure(base_cfg: RunConfig, seeds: list[int], grid: list[float], work: Path) -> list[dict[str, Any]]:
    """The bar's rows per search seed (see the module docstring)."""
    evaluators = heldout_evaluators(base_cfg)
    fixed: dict[str, dict[str, float]] = {}
    if base_cfg.models.base:
        fixed["base"], _ = score_checkpoint(
            base_cfg, base_cfg.models.base, device=base_cfg.execution.device, evaluators=evaluators
        )
    for alias, s in zip(base_cfg.models.aliases(), base_cfg.models.sources):
        fixed[f"source {alias}"], _ = score_checkpoint(
            base_cfg, s.path, device=base_cfg.execution.device, evaluators=evaluators
        )

    acc = ACC(base_cfg)
    per_seed: list[dict[str, Any]] = []
    grid_cache: tuple[dict[str, Any], int] | None = None
    for seed in seeds:
        cfg = variant(base_cfg, work, f"{base_cfg.name}-seed{seed}", seed)
        recipes: dict[str, Any] = dict(untuned_recipes(cfg))
        evolved, wall = search(cfg)
        print(f"seed {seed}: evolved search {wall:.0f} s", flush=True)
        for alias, source in zip(base_cfg.models.aliases(), base_cfg.models.sources):
            one = variant(base_cfg, work, f"{base_cfg.name}-seed{seed}-only-{alias}", seed, [source])
            recipes[f"per-layer search, {alias} alone"], _ = search(one)
        if grid_cache is None:  # task arithmetic on every dev item: the grid does not depend on the search seed
            t0 = time.perf_counter()
            grid_cache = grid_search(cfg, grid)
            print(f"grid of {grid_cache[1]} points {time.perf_counter() - t0:.0f} s", flush=True)
        grid_rows, n_points = grid_cache
        recipes.update(grid_rows)
        recipes[EVOLVED] = evolved
        scores = {
            label: metrics for label, (metrics, _) in score_recipes(cfg, recipes, heldout_evaluators(cfg)).items()
        }
        rows = {**fixed, **scores}
        others = max(v[acc] for k, v in rows.items() if not k.startswith("evolved"))
        per_seed.append(
            {
                "seed": seed,
                "rows": rows,
                "margin": rows[EVOLVED][acc] - others,
                "search_s": wall,
                "grid_points": n_points,
            }
        )
        print(f"seed {seed}: evolved {rows[EVOLVED][acc]:.3f}, best other {others:.3f}", flush=True)
    return per_seed


EVOLVED = "evolved (per-layer, both experts)"


def ACC(cfg: RunConfig) -> str:  # noqa: N802
    return next(t.metric for t in cfg.evaluation.fitness if t.metric.endswith("/acc"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "tiny_jp_math.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--zoo",
        type=Path,
        nargs="+",
        help="world folders (`python -m zoo build --out DIR --seed N`) to run the config on instead of data/zoo; "
        "with several, a summary table across worlds is written too",
    )
    parser.add_argument(
        "--grid",
        type=float,
        nargs="+",
        default=[round(0.125 * i, 3) for i in range(21)],
        help="coefficients tried per expert (default 0, 0.125, ..., 2.5: the search's bounds)",
    )
    parser.add_argument("--work", type=Path, default=ROOT / "bench" / "_work" / "demo_bar")
    parser.add_argument("--write", action="store_true", help="write the table to bench/RESULTS.md")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # as `evolve run` does
    os.chdir(ROOT)
    command = shlex.join([".venv/bin/python", "bench/demo_bar.py", *sys.argv[1:]])
    work = args.work.resolve()
    if not args.zoo:
        base_cfg = load_config(args.config)
        per_seed = measure(base_cfg, args.seeds, args.grid, work)
        text = render(per_seed, ACC(base_cfg), command, base_cfg)
        print(text)
        if args.write:
            write_section(SECTION, text.split("\n", 1)[1])
        return
    worlds: list[tuple[str, dict, list[dict[str, Any]]]] = []
    for zoo in args.zoo:
        world_work = work / f"world-{zoo.name}"
        cfg = retarget(args.config, zoo, world_work)
        t0 = time.perf_counter()
        per_seed = measure(cfg, args.seeds, args.grid, world_work)
        record = json.loads((zoo / "zoo.json").read_text()) if (zoo / "zoo.json").exists() else {}
        print(render(per_seed, ACC(cfg), command, cfg), flush=True)
        print(f"world {zoo}: {time.perf_counter() - t0:.0f} s", flush=True)
        worlds.append((str(zoo), record, per_seed))
    text = render_worlds(worlds, ACC(load_config(args.config)), command)
    print(text)
    if args.write:
        write_section(WORLDS_SECTION, text.split("\n", 1)[1])


WORLDS_SECTION = "Demo bar across world seeds (issue 11)"


def render_worlds(worlds: list[tuple[str, dict, list[dict[str, Any]]]], acc: str, command: str) -> str:
    """One row per world: the best other row and the evolved merge per search seed, and the margins."""
    lines = [
        f"## {WORLDS_SECTION}",
        "",
        f"Measured with `{command}` on {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f'torch {torch.__version__}. Each cell: held-out `{acc}`; "best other" is the best of every source, '
        "untuned merge, single-expert control and the best global grid of that search seed (the full rows per world "
        "are printed by the command).",
        "",
        "| world (build seed) | best source | best untuned merge | best global grid | best single-expert row "
        "| evolved, search seeds | margin over best other, per search seed | bar (≥ +0.30 on every search seed) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    held = 0
    for zoo, record, per_seed in worlds:

        def best(prefixes: tuple[str, ...], rows: dict) -> float:
            return max((v[acc] for k, v in rows.items() if k.startswith(prefixes)), default=float("nan"))

        first = per_seed[0]["rows"]
        untuned = ("linear average", "task arithmetic 1/1", "TIES", "DARE-TIES")
        single = ("per-layer search, ", "base + a*tau")
        grid = "/".join(f"{best(('best global grid',), r['rows']):.3f}" for r in per_seed)
        singles = "/".join(f"{best(single, r['rows']):.3f}" for r in per_seed)
        untuned_cells = "/".join(f"{best(untuned, r['rows']):.3f}" for r in per_seed)  # DARE masks follow the seed
        evolved = "/".join(f"{r['rows'][EVOLVED][acc]:.3f}" for r in per_seed)
        margins = [r["margin"] for r in per_seed]
        ok = min(margins) >= 0.30
        held += ok
        seed = record.get("seed", "?")
        lines.append(
            f"| {seed} (`{zoo}`) | {best(('source',), first):.3f} | {untuned_cells} | {grid} | {singles} "
            f"| {evolved} | {' / '.join(f'{m:+.3f}' for m in margins)} | {'held' if ok else '**missed**'} |"
        )
    lines += ["", f"The bar holds on {held} of {len(worlds)} worlds."]
    return "\n".join(lines)


def render(per_seed: list[dict[str, Any]], acc: str, command: str, cfg: RunConfig) -> str:
    def short(k: str) -> str:
        return k.split(" (")[0] if k.startswith(("best global grid", "base + a*tau")) else k

    order = list(dict.fromkeys(short(k) for r in per_seed for k in r["rows"]))
    order = [k for k in order if not k.startswith("evolved")] + [k for k in order if k.startswith("evolved")]
    lines = [
        f"## {SECTION}",
        "",
        f"Measured with `{command}` on {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}, no other job running. Held-out: {cfg.evaluation.heldout_split} split, all items; "
        f"`{acc}` (cell) and, for the grid rows, the chosen coefficients.",
        "",
        "| row | " + " | ".join(f"seed {r['seed']}" for r in per_seed) + " |",
        "|---|" + "---|" * len(per_seed),
    ]
    for label in order:
        cells = []
        for r in per_seed:
            match = [(k, v) for k, v in r["rows"].items() if short(k) == label]
            if not match:
                cells.append("")
                continue
            k, v = match[0]
            note = k[len(label) :].strip()
            cells.append(f"{v[acc]:.3f}" + (f" {note}" if note else ""))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append(
        "| **margin: evolved − best other row** | " + " | ".join(f"**{r['margin']:+.3f}**" for r in per_seed) + " |"
    )
    lines.append("| evolved search wall time (s) | " + " | ".join(f"{r['search_s']:.0f}" for r in per_seed) + " |")
    margins = [r["margin"] for r in per_seed]
    verdict = "met" if min(margins) >= 0.30 else "**missed**"
    lines += [
        "",
        f"The bar (evolved ≥ 0.30 above every other row on each seed): {verdict}; smallest margin "
        f"{min(margins):+.3f}, mean {float(np.mean(margins)):+.3f}. Grid rows are chosen on the fitness split "
        f"({getattr(cfg.evaluation.tasks[0], 'split', None)}, "
        f"limit {getattr(cfg.evaluation.tasks[0], 'limit', None)}) over "
        f"{per_seed[0]['grid_points']} points, like the search's own best trial.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
