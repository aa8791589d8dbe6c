"""Multi-objective samplers on the tiny zoo: hypervolume against trials for nsga2, tpe, gp and random.

Each cell is a real `evolve` search of configs/tiny_jp_math_pareto.yaml (ja_sub accuracy against en_add accuracy,
reference point (0, 0)), in process with the local executor, for one sampler and seed and the same trial budget.
The hypervolume after each trial is read back from the study (`evolve.pareto.hypervolume_history`, the figure
`evolve status` prints). Runs are kept under bench/_work/pareto/ and reused when complete, so an interrupted
benchmark continues. Prints a markdown table (hypervolume at checkpoints, mean and range over seeds; front size;
wall time) and writes bench/_work/pareto/results.json.

    OMP_NUM_THREADS=1 python bench/pareto.py --samplers nsga2 tpe gp random --seeds 0 1 2 --trials 100
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import optuna  # noqa: E402
import yaml  # noqa: E402

from evolve.config import parse_config  # noqa: E402
from evolve.loop import run_search  # noqa: E402
from evolve.pareto import hypervolume_history, pareto_front  # noqa: E402
from evolve.study import counted, load_study  # noqa: E402

WORK = ROOT / "bench" / "_work" / "pareto"
CONFIG = ROOT / "configs" / "tiny_jp_math_pareto.yaml"


def cell_config(sampler: str, seed: int, trials: int, popsize: int | None) -> dict:
    data = yaml.safe_load(CONFIG.read_text())
    name = f"{sampler}-s{seed}-t{trials}"
    data.update(name=name, seed=seed, output_dir=str(WORK / name))
    data["models"]["base"] = str(ROOT / data["models"]["base"])
    for s in data["models"]["sources"]:
        s["path"] = str(ROOT / s["path"])
    for t in data["evaluation"]["tasks"]:
        t["task_dir"] = str(ROOT / t["task_dir"])
    data["search"]["optimizer"] = {"sampler": sampler, **({"popsize": popsize} if sampler == "nsga2" else {})}
    data["search"]["budget"]["max_trials"] = trials
    return data


def run_cell(sampler: str, seed: int, trials: int, popsize: int | None) -> dict:
    cfg = parse_config(cell_config(sampler, seed, trials, popsize))
    done = WORK / cfg.name / "cell.json"
    if done.is_file():
        return json.loads(done.read_text())
    t0 = time.perf_counter()
    run_search(cfg, progress=False)
    wall = time.perf_counter() - t0
    study = load_study(cfg)
    trials_ = study.get_trials(deepcopy=False)
    history = hypervolume_history(trials_, study.directions, cfg.evaluation.reference_point)
    front = pareto_front(trials_, study.directions)
    cell = {
        "sampler": sampler,
        "seed": seed,
        "trials": sum(counted(t) for t in trials_),
        "wall_s": round(wall, 1),
        "history": history,
        "front": [[t.number, *t.values] for t in front],
    }
    done.write_text(json.dumps(cell))
    return cell


def at(history: list, n: int) -> float:
    """The hypervolume once the first n trials were told (0 before any)."""
    values = [h for number, h in history if number < n]
    return values[-1] if values else 0.0


def table(cells: list[dict], checkpoints: list[int]) -> str:
    samplers = list(dict.fromkeys(c["sampler"] for c in cells))
    head = ["sampler", *[f"HV @ {n}" for n in checkpoints], "front size", "wall s / run"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in samplers:
        mine = [c for c in cells if c["sampler"] == s]
        row = [f"{s} ({len(mine)} seeds)"]
        for n in checkpoints:
            v = np.array([at(c["history"], n) for c in mine])
            row.append(f"{v.mean():.3f} [{v.min():.3f}, {v.max():.3f}]")
        sizes = [len(c["front"]) for c in mine]
        row.append(f"{np.mean(sizes):.1f}")
        row.append(f"{np.mean([c['wall_s'] for c in mine]):.0f}")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samplers", nargs="+", default=["nsga2", "tpe", "gp", "random"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--popsize", type=int, default=20, help="NSGA-II population")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    WORK.mkdir(parents=True, exist_ok=True)
    cells = []
    for seed in args.seeds:
        for sampler in args.samplers:
            cell = run_cell(sampler, seed, args.trials, args.popsize)
            print(f"{sampler} seed {seed}: HV {at(cell['history'], args.trials):.4f}, {cell['wall_s']} s", flush=True)
            cells.append(cell)
    (WORK / "results.json").write_text(json.dumps(cells))
    checkpoints = sorted({max(1, args.trials // 4), args.trials // 2, args.trials})
    print(table(cells, checkpoints))


if __name__ == "__main__":
    main()
