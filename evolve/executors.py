"""Executors: where candidates are scored.

`local` runs one in-process Worker; `ray` keeps one resident Worker per actor.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

from evolve.config import RunConfig
from evolve.protocol import TrialItems
from evolve.racing import Race
from evolve.worker import Outcome, Worker
from merge_core.errors import EvomergeError
from merge_core.recipe import Recipe

log = logging.getLogger(__name__)


class Executor(Protocol):
    """Submit up to ``slots`` recipes at once (each raced against an incumbent when `race` is given: see
    `evolve.racing`); ``wait`` returns the next finished (key, outcome)."""

    slots: int

    def submit(self, key: int, recipe: Recipe, race: Race | None = None, items: TrialItems | None = None) -> None: ...

    def wait(self) -> tuple[int, Outcome]: ...

    def close(self) -> None: ...


class LocalExecutor:
    """One Worker in this process: ``wait`` runs the pending candidate."""

    slots = 1

    def __init__(self, cfg: RunConfig, template: Recipe):
        self.worker = Worker(cfg, template.to_yaml(), worker_id="local")
        self._pending: list[tuple[int, Recipe, Race | None, TrialItems | None]] = []

    def submit(self, key: int, recipe: Recipe, race: Race | None = None, items: TrialItems | None = None) -> None:
        self._pending.append((key, recipe, race, items))

    def wait(self) -> tuple[int, Outcome]:
        key, recipe, race, items = self._pending.pop(0)
        return key, self.worker.evaluate(recipe.to_yaml(), race, items)

    def close(self) -> None:
        self._pending.clear()


class RayExecutor:
    """One actor per worker, each holding its Worker resident; a dead actor is replaced and its candidate re-run."""

    def __init__(self, cfg: RunConfig, template: Recipe):
        import ray

        self.ray = ray
        self.cfg, self.template_yaml = cfg, template.to_yaml()
        ex = cfg.execution
        address = ex.ray_address or os.environ.get("RAY_ADDRESS")
        if not ray.is_initialized():
            if address:
                try:
                    ray.init(address=address, log_to_driver=False)
                except (ConnectionError, ray.exceptions.AuthenticationError) as e:
                    raise EvomergeError(
                        ray_auth_hint(address)
                        or f"execution.ray_address '{address}': cannot join the "
                        f"Ray cluster ({' '.join(str(e).split())[:300]})"
                    ) from None
            else:  # a private local cluster: dashboard off, short temp dir, enough CPUs for fractional actors
                ray.init(
                    num_cpus=max(os.cpu_count() or 1, 1),
                    include_dashboard=False,
                    log_to_driver=False,
                    _temp_dir=os.path.join(tempfile.gettempdir(), "ray_evo"),
                )
        self._remote = ray.remote(num_cpus=ex.cpus_per_worker, num_gpus=ex.gpus_per_worker, max_restarts=0)(Worker)
        self.slots = ex.workers
        self._generation = 0
        self.actors = {i: self._start(i) for i in range(self.slots)}
        ray.get([a.ping.remote() for a in self.actors.values()])  # surface build errors before the search starts
        self._free = list(self.actors)
        self._running: dict[object, tuple[int, int, Recipe, Race | None, TrialItems | None]] = {}

    def actor_name(self, slot: int) -> str:
        return f"evomerge-{self.cfg.name}-w{slot}-{self._generation}"

    def _start(self, slot: int):
        self._generation += 1
        return self._remote.options(name=self.actor_name(slot)).remote(
            self.cfg.model_dump(mode="json"), self.template_yaml, f"ray-{slot}"
        )

    def submit(self, key: int, recipe: Recipe, race: Race | None = None, items: TrialItems | None = None) -> None:
        if not self._free:
            raise EvomergeError("ray executor: no free worker (the loop submitted more than `slots`)")
        slot = self._free.pop(0)
        ref = self.actors[slot].evaluate.remote(recipe.to_yaml(), race, items)
        self._running[ref] = (slot, key, recipe, race, items)

    def wait(self) -> tuple[int, Outcome]:
        while True:
            ready, _ = self.ray.wait(list(self._running), num_returns=1)
            ref = ready[0]
            slot, key, recipe, race, items = self._running.pop(ref)
            try:
                outcome = self.ray.get(ref)
            except (self.ray.exceptions.RayActorError, self.ray.exceptions.WorkerCrashedError) as e:
                log.warning(
                    "worker %d died during trial %d (%s); replacing it and re-running the trial",
                    slot,
                    key,
                    type(e).__name__,
                )
                self.actors[slot] = self._start(slot)
                self._free.append(slot)
                self.submit(key, recipe, race, items)
                continue
            self._free.append(slot)
            return key, outcome

    def close(self) -> None:
        for actor in self.actors.values():
            self.ray.kill(actor)
        self._running.clear()


def ray_auth_hint(address: str, environ: Mapping[str, str] = os.environ, home: Path | None = None) -> str | None:
    """The fix, in one line, when joining ``address`` failed because Ray did not send the token it has here.

    Ray 2.60 (``ray/_private/worker.py``, ``init``) turns token authentication on by itself only when it starts a
    cluster or finds a local one (``address`` None or ``"auto"``): "an explicit address (argument or RAY_ADDRESS)
    never does". ``ray start --head`` with ``~/.ray/auth_token`` present and ``RAY_AUTH_MODE`` unset starts a
    token cluster, and a driver joining it by ``host:port`` connects without the token (``InvalidAuthToken``,
    then ``ConnectionError`` after 30 s). evomerge does not switch token mode on for you, as that would send this
    machine's token to whatever address the config names; None when no token is set up here or the mode is set.
    """
    if not address or address == "auto" or environ.get("RAY_AUTH_MODE"):
        return None
    home = Path.home() if home is None else home
    token_path = environ.get("RAY_AUTH_TOKEN_PATH")
    if environ.get("RAY_AUTH_TOKEN"):
        source = "RAY_AUTH_TOKEN"
    elif token_path and Path(token_path).is_file():
        source = token_path
    elif (home / ".ray" / "auth_token").is_file():
        source = "~/.ray/auth_token"
    else:
        return None
    return (
        f"execution.ray_address '{address}': the cluster refused to connect; a Ray auth token is set up here "
        f"({source}) but RAY_AUTH_MODE is unset, and Ray sends the token to an explicit address only with "
        "RAY_AUTH_MODE=token: run with RAY_AUTH_MODE=token (the cluster's token), or use ray_address: auto "
        "for a cluster started on this machine"
    )


RAY_JOB_ENV = ("RAY_JOB_ID", "RAY_JOB_CONFIG_JSON_ENV_VAR")


def check_ray_job_storage(cfg: RunConfig, environ: Mapping[str, str] = os.environ, cwd: Path | None = None) -> None:
    """Inside a Ray job, refuse a SQLite study that would land in the job's temporary working directory.

    ``ray job submit --working-dir .`` runs the command in a copy of that directory unpacked under Ray's session
    dir (``.../runtime_resources/working_dir_files/_ray_pkg_<hash>``), deleted with the session and absent on
    other nodes: a relative ``output_dir`` (the default ``runs/NAME``), run directory or SQLite path writes the
    study there, silently and unresumably. A job is recognised by ``RAY_JOB_CONFIG_JSON_ENV_VAR`` (Ray 2.60 sets
    it for a submitted entrypoint and strips ``RAY_JOB_ID`` from it) or ``RAY_JOB_ID`` (a Ray worker). SQLite is
    accepted there only by an absolute path, as written in the config or on the command line, that is not inside
    Ray's own directories; PostgreSQL is the storage for a cluster.
    """
    if not any(environ.get(k) for k in RAY_JOB_ENV):
        return
    url = cfg.storage_url
    if not url.startswith("sqlite"):
        return
    from sqlalchemy.engine import make_url

    if cfg.storage is not None:
        field, given = "storage", make_url(url).database or ":memory:"
    else:  # the default study.db in the run directory, as given (output_dir, runs/NAME, or a RUN_DIR argument)
        field, given = "output_dir", str(cfg.run_dir / "study.db")
    path = Path(given)
    cwd = Path.cwd() if cwd is None else cwd
    problem = None
    if given == ":memory:":
        problem = "is in memory and is lost when the job ends"
    elif not path.is_absolute():
        problem = f"is relative to the job's working directory {cwd}"
    elif "runtime_resources" in path.parts or any(p.startswith("_ray_pkg_") for p in path.parts):
        problem = "is inside Ray's session directory"
    elif _job_has_working_dir(environ) and path.resolve().is_relative_to(cwd.resolve()):
        problem = f"is inside the job's working directory {cwd}"
    if problem is not None:
        raise EvomergeError(
            f"{field}: inside a Ray job the SQLite study '{given}' {problem}, a temporary copy Ray deletes and other "
            "nodes cannot see; set storage: to a postgresql:// URL, or give output_dir (or storage: sqlite:////...) "
            "as an absolute path on a disk the cluster shares"
        )


def _job_has_working_dir(environ: Mapping[str, str]) -> bool:
    try:
        job = json.loads(environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
    except ValueError:
        return False
    return isinstance(job, dict) and bool((job.get("runtime_env") or {}).get("working_dir"))


def make_executor(cfg: RunConfig, template: Recipe) -> Executor:
    if cfg.execution.backend == "ray":
        return RayExecutor(cfg, template)
    return LocalExecutor(cfg, template)
