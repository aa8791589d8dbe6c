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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "tiny_jp_math.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
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
    base_cfg = load_config(args.config)
    work = args.work.resolve()

    evaluators = heldout_evaluators(base_cfg)
    fixed: dict[str, dict[str, float]] = {}
    if base_cfg.models.base:
        fixed["base"] = score_checkpoint(
            base_cfg, base_cfg.models.base, device=base_cfg.execution.device, evaluators=evaluators
        )
    for alias, s in zip(base_cfg.models.aliases(), base_cfg.models.sources):
        fixed[f"source {alias}"] = score_checkpoint(
            base_cfg, s.path, device=base_cfg.execution.device, evaluators=evaluators
        )

    acc = next(t.metric for t in base_cfg.evaluation.fitness if t.metric.endswith("/acc"))
    per_seed: list[dict[str, Any]] = []
    for seed in args.seeds:
        cfg = variant(base_cfg, work, f"{base_cfg.name}-seed{seed}", seed)
        recipes: dict[str, Any] = dict(untuned_recipes(cfg))
        evolved, wall = search(cfg)
        print(f"seed {seed}: evolved search {wall:.0f} s", flush=True)
        for alias, source in zip(base_cfg.models.aliases(), base_cfg.models.sources):
            one = variant(base_cfg, work, f"{base_cfg.name}-seed{seed}-only-{alias}", seed, [source])
            recipes[f"per-layer search, {alias} alone"], _ = search(one)
        t0 = time.perf_counter()
        grid, n_points = grid_search(cfg, args.grid)
        print(f"seed {seed}: grid of {n_points} points {time.perf_counter() - t0:.0f} s", flush=True)
        recipes.update(grid)
        recipes["evolved (per-layer, both experts)"] = evolved
        scores = score_recipes(cfg, recipes, heldout_evaluators(cfg))
        rows = {**fixed, **scores}
        others = max(v[acc] for k, v in rows.items() if not k.startswith("evolved"))
        per_seed.append(
            {
                "seed": seed,
                "rows": rows,
                "margin": rows["evolved (per-layer, both experts)"][acc] - others,
                "search_s": wall,
                "grid_points": n_points,
            }
        )
        print(
            f"seed {seed}: evolved {rows['evolved (per-layer, both experts)'][acc]:.3f}, best other {others:.3f}",
            flush=True,
        )

    text = render(per_seed, acc, command, base_cfg)
    print(text)
    if args.write:
        write_section(SECTION, text.split("\n", 1)[1])


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
