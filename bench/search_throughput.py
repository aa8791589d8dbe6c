"""Search throughput: candidates per minute for the local and Ray executors, split into merge and eval time.

    python bench/search_throughput.py --config configs/tiny_jp_math.yaml --trials 60 --write

Each backend runs a fresh study (same config, seed and budget) under bench/_work/search_throughput/. Setup time
(worker build: sources resident, live model, evaluators; Ray start) is reported apart from the steady rate.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import optuna
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from results import write_section  # noqa: E402  (bench/ is on sys.path: scripts run from it)

from evolve.config import load_config  # noqa: E402
from evolve.loop import run_search  # noqa: E402


def run_backend(config: Path, backend: str, workers: int, trials: int, work: Path) -> dict:
    cfg = load_config(config)
    execution = {**cfg.execution.model_dump(), "backend": backend, "workers": workers}
    cfg = cfg.model_copy(
        update={
            "name": f"{cfg.name}-{backend}{workers}",
            "output_dir": str(work / f"{backend}{workers}"),
            "storage": None,
            "execution": cfg.execution.model_copy(update=execution),
            "search": cfg.search.model_copy(
                update={"budget": cfg.search.budget.model_copy(update={"max_trials": trials})}
            ),
        }
    )
    for f in (work / f"{backend}{workers}").glob("study.db*"):
        f.unlink()
    t0 = time.perf_counter()
    study = run_search(cfg, progress=False).study
    wall = time.perf_counter() - t0
    trials_done = [t for t in study.get_trials() if "merge_seconds" in t.user_attrs]
    starts = sorted(t.datetime_start for t in study.get_trials() if t.datetime_start)
    ends = sorted(t.datetime_complete for t in study.get_trials() if t.datetime_complete)
    steady = (ends[-1] - starts[0]).total_seconds()
    return {
        "backend": f"{backend} ({workers} worker{'s' if workers > 1 else ''})",
        "trials": len(trials_done),
        "wall_s": wall,
        "setup_s": wall - steady,
        "per_min": 60 * len(trials_done) / steady,
        "merge_s": statistics.median(t.user_attrs["merge_seconds"] for t in trials_done),
        "eval_s": statistics.median(t.user_attrs["eval_seconds"] for t in trials_done),
        "best": study.best_value,
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| executor | trials | wall (s) | setup (s) | candidates/min (steady) "
        "| median merge (s) | median eval (s) | best fitness |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['backend']} | {r['trials']} | {r['wall_s']:.1f} | {r['setup_s']:.1f} | {r['per_min']:.1f} | "
            f"{r['merge_s']:.3f} | {r['eval_s']:.3f} | {r['best']:.4f} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "tiny_jp_math.yaml")
    ap.add_argument("--trials", type=int, default=60)
    ap.add_argument("--ray-workers", type=int, default=2)
    ap.add_argument("--work", type=Path, default=ROOT / "bench" / "_work" / "search_throughput")
    ap.add_argument("--write", action="store_true", help="write the table into bench/RESULTS.md")
    args = ap.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # as `evolve run` does
    rows = [
        run_backend(args.config, "local", 1, args.trials, args.work),
        run_backend(args.config, "ray", args.ray_workers, args.trials, args.work),
    ]
    cpu = next(
        (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
        platform.processor(),
    )
    config = args.config.resolve()
    shown = config.relative_to(ROOT) if config.is_relative_to(ROOT) else config
    body = (
        f"Command: `.venv/bin/python bench/search_throughput.py --config {shown} --trials {args.trials} --write`\n\n"
        f"Machine: {cpu}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, torch {torch.__version__}; "
        f"load average at the end {' '.join(f'{x:.2f}' for x in os.getloadavg())}.\n\n{table(rows)}\n\n"
        "Against mergekit-evolve (mergekit 0.1.5) on the same models, task data and method, same machine: see "
        "[mergekit_evolve.md](mergekit_evolve.md) (it needed four workarounds to run without a GPU; 40-50 "
        "candidates/min against evomerge's 167).\n"
    )
    print(body)
    if args.write:
        write_section("Search throughput", body)


if __name__ == "__main__":
    main()
