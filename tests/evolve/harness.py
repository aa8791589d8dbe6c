"""The search through the real CLI in a subprocess: a search config over the `world` fixture (tests/evolve/conftest.py),
`evolve` run from the repository root, and the SIGKILL harness (the EVOMERGE_FAULT hook kills the run right after a
chosen trial went to the worker; `resume` continues it)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from evals.base import ItemScores
from evolve.stats import LEVEL, bootstrap_metrics, interval

ROOT = Path(__file__).resolve().parents[2]
QUIET = ("--no-progress", "--no-final-table")


def write_config(tmp_path: Path, world: dict[str, str], **overrides: Any) -> Path:
    """`tmp_path/config.yaml`: a DARE-TIES CMA-ES search over the world; `overrides` set dotted keys."""
    cfg = {
        "name": "t",
        "seed": 3,
        "models": {
            "base": world["base"],
            "sources": [{"path": world["a"], "alias": "ja"}, {"path": world["b"], "alias": "math"}],
        },
        "search": {
            "space": {"method": "dare_ties", "layers_per_group": 2, "weight_bounds": [0.0, 1.5]},
            "optimizer": {"sampler": "cmaes", "sigma0": 0.3},
            "budget": {"max_trials": 6},
        },
        "evaluation": {
            "tasks": [
                {
                    "name": "words",
                    "type": "generation",
                    "task_dir": world["task"],
                    "split": "dev",
                    "limit": 20,
                    "batch_size": 20,
                    "max_new_tokens": 2,
                    "extract": "first_word",
                }
            ],
            "fitness": [{"metric": "words/acc"}, {"metric": "words/gold_logprob", "weight": 0.1}],
        },
        "execution": {"backend": "local", "device": "cpu"},
        "output_dir": str(tmp_path / "run"),
    }
    for dotted, value in overrides.items():
        node = cfg
        *keys, last = dotted.split(".")
        for k in keys:
            node = node.setdefault(k, {})
        node[last] = value
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def evolve_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """`python -m evolve.cli ARGS` from the repository root, offline."""
    return subprocess.run(
        [sys.executable, "-m", "evolve.cli", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
        timeout=timeout,
    )


def run_killed(cfg_path: Path, study: str, at: int, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`evolve run` SIGKILLed right after trial `at` of study `study` went to the worker."""
    fault = {"EVOMERGE_FAULT": f"sigkill-after-submit:{study}:{at}"}
    return evolve_cli("run", str(cfg_path), *QUIET, env={**(env or {}), **fault})


def resume(run_dir: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`evolve resume RUN_DIR`, no progress bar and no held-out table."""
    return evolve_cli("resume", str(run_dir), *QUIET, env=env)


def zoo_config_data(name: str, out_dir: Path, sampler: str, trials: int, popsize: int = 4) -> dict[str, Any]:
    """configs/tiny_jp_math.yaml over the committed zoo by absolute paths, with 4 parameters (layers in pairs, no
    embed/head groups), `sampler` (sigma0 0.3, `popsize`), a budget of `trials` and its run directory `out_dir`;
    every candidate scored on every item (the demo's racing is off: the racing tests set their own)."""
    data = yaml.safe_load((ROOT / "configs" / "tiny_jp_math.yaml").read_text())
    data["name"] = name
    data["output_dir"] = str(out_dir)
    data["models"]["base"] = str(ROOT / data["models"]["base"])
    for s in data["models"]["sources"]:
        s["path"] = str(ROOT / s["path"])
    for t in data["evaluation"]["tasks"]:
        t["task_dir"] = str(ROOT / t["task_dir"])
    data["search"]["space"].update(layers_per_group=2, embed_head_groups=False)
    data["search"]["optimizer"] = {"sampler": sampler, "sigma0": 0.3, "popsize": popsize}
    data["search"]["budget"] = {"max_trials": trials}
    data["evaluation"].pop("racing", None)
    return data


def mean_interval(values: Sequence[float], level: float = LEVEL) -> tuple[float, float]:
    """The bootstrap interval of a plain mean over items (`evolve.stats` on one task of one metric)."""
    return interval(bootstrap_metrics({"": ItemScores(0, {"v": list(values)})})["/v"], level)
