"""A real search (real Optuna storage, real checkpoints, real recipes) whose candidates are scored by a stand-in:
fast enough to build a finished run directory in a unit test."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from evolve.worker import Outcome


class HashScoreExecutor:
    """Scores a recipe by its content hash (deterministic, no model is loaded)."""

    slots = 1

    def __init__(self, cfg: Any, template: Any) -> None:
        self.pending: list[tuple[int, Any]] = []

    def submit(self, key: int, recipe: Any) -> None:
        self.pending.append((key, recipe))

    def wait(self) -> tuple[int, Outcome]:
        key, recipe = self.pending.pop(0)
        score = int(recipe.hash()[:6], 16) / 16**6
        return key, Outcome(worker="fake", metrics={"words/acc": score}, fitness=score)

    def close(self) -> None:
        pass


def config_dict(trio: tuple[Path, Path, Path], run_dir: Path, **top: Any) -> dict[str, Any]:
    base, a, b = trio
    cfg = {
        "name": "t",
        "seed": 1,
        "models": {"base": str(base), "sources": [{"path": str(a), "alias": "ja"}, {"path": str(b), "alias": "math"}]},
        "search": {
            "space": {"method": "ties", "layers_per_group": 2},
            "optimizer": {"sampler": "random"},
            "budget": {"max_trials": 4},
        },
        "evaluation": {
            "tasks": [
                {"name": "words", "type": "generation", "task_dir": str(run_dir.parent / "task"), "split": "dev"}
            ],
            "fitness": [{"metric": "words/acc"}],
            "heldout_split": None,
        },
        "execution": {"backend": "local", "device": "cpu"},
        "output_dir": str(run_dir),
    }
    cfg.update(top)
    return cfg


def write_config(path: Path, data: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data))
    return path
