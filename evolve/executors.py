"""Executors: where candidates are scored. `local` runs one in-process Worker; `ray` keeps one resident Worker per actor."""
from __future__ import annotations

import logging
import os
import tempfile
from typing import Protocol

from evolve.config import RunConfig
from evolve.worker import Outcome, Worker
from merge_core.errors import EvomergeError
from merge_core.recipe import MergeRecipe

log = logging.getLogger(__name__)


class Executor(Protocol):
    """Submit up to ``slots`` recipes at once; ``wait`` returns the next finished (key, outcome)."""

    slots: int

    def submit(self, key: int, recipe: MergeRecipe) -> None: ...

    def wait(self) -> tuple[int, Outcome]: ...

    def close(self) -> None: ...


class LocalExecutor:
    """One Worker in this process: ``wait`` runs the pending candidate."""

    slots = 1

    def __init__(self, cfg: RunConfig, template: MergeRecipe):
        self.worker = Worker(cfg, template.to_yaml(), worker_id="local")
        self._pending: list[tuple[int, MergeRecipe]] = []

    def submit(self, key: int, recipe: MergeRecipe) -> None:
        self._pending.append((key, recipe))

    def wait(self) -> tuple[int, Outcome]:
        key, recipe = self._pending.pop(0)
        return key, self.worker.evaluate(recipe.to_yaml())

    def close(self) -> None:
        self._pending.clear()


class RayExecutor:
    """One actor per worker, each holding its Worker resident; a dead actor is replaced and its candidate re-run."""

    def __init__(self, cfg: RunConfig, template: MergeRecipe):
        import ray

        self.ray = ray
        self.cfg, self.template_yaml = cfg, template.to_yaml()
        ex = cfg.execution
        address = ex.ray_address or os.environ.get("RAY_ADDRESS")
        if not ray.is_initialized():
            if address:
                ray.init(address=address, log_to_driver=False)
            else:  # a private local cluster: dashboard off, short temp dir, enough CPUs for fractional actors
                ray.init(num_cpus=max(os.cpu_count() or 1, 1), include_dashboard=False, log_to_driver=False,
                         _temp_dir=os.path.join(tempfile.gettempdir(), "ray_evo"))
        self._remote = ray.remote(num_cpus=ex.cpus_per_worker, num_gpus=ex.gpus_per_worker, max_restarts=0)(Worker)
        self.slots = ex.workers
        self._generation = 0
        self.actors = {i: self._start(i) for i in range(self.slots)}
        ray.get([a.ping.remote() for a in self.actors.values()])  # surface build errors before the search starts
        self._free = list(self.actors)
        self._running: dict[object, tuple[int, int, MergeRecipe]] = {}

    def actor_name(self, slot: int) -> str:
        return f"evomerge-{self.cfg.name}-w{slot}-{self._generation}"

    def _start(self, slot: int):
        self._generation += 1
        return self._remote.options(name=self.actor_name(slot)).remote(
            self.cfg.model_dump(mode="json"), self.template_yaml, f"ray-{slot}")

    def submit(self, key: int, recipe: MergeRecipe) -> None:
        if not self._free:
            raise EvomergeError("ray executor: no free worker (the loop submitted more than `slots`)")
        slot = self._free.pop(0)
        ref = self.actors[slot].evaluate.remote(recipe.to_yaml())
        self._running[ref] = (slot, key, recipe)

    def wait(self) -> tuple[int, Outcome]:
        while True:
            ready, _ = self.ray.wait(list(self._running), num_returns=1)
            ref = ready[0]
            slot, key, recipe = self._running.pop(ref)
            try:
                outcome = self.ray.get(ref)
            except (self.ray.exceptions.RayActorError, self.ray.exceptions.WorkerCrashedError) as e:
                log.warning("worker %d died during trial %d (%s); replacing it and re-running the trial", slot, key, type(e).__name__)
                self.actors[slot] = self._start(slot)
                self._free.append(slot)
                self.submit(key, recipe)
                continue
            self._free.append(slot)
            return key, outcome

    def close(self) -> None:
        for actor in self.actors.values():
            self.ray.kill(actor)
        self._running.clear()


def make_executor(cfg: RunConfig, template: MergeRecipe) -> Executor:
    if cfg.execution.backend == "ray":
        return RayExecutor(cfg, template)
    return LocalExecutor(cfg, template)
