"""The tiny model zoo: a base, a J-language expert and a math expert whose per-layer merge beats all three.

`build_zoo(out_dir, seed, size)` trains the three 1.1M-parameter Llama checkpoints on CPU and writes the
evaluation tasks (`ja_sub` is the target); `data/zoo/` holds the committed seed-0 build.
"""
from __future__ import annotations

from typing import Any

from evolve.zoo.world import TASKS, TERMINATOR, TaskSpec

__all__ = ["build_zoo", "TASKS", "TERMINATOR", "TaskSpec"]


def __getattr__(name: str) -> Any:
    # Imported lazily so that `python -m evolve.zoo.build` does not import the module twice.
    if name == "build_zoo":
        from evolve.zoo.build import build_zoo

        return build_zoo
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
