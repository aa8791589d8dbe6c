"""The study: its name, opening it (to search or to read), trials a dead process left RUNNING, which trials count,
the best trial, a trial's recipe, the run lock, and a failing storage in one line."""

from __future__ import annotations

import fcntl
import logging
import os
import shlex
import socket
import sqlite3
import time
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy.exc
from optuna.distributions import FloatDistribution
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy.engine import make_url

from evolve import optuna_api
from evolve.config import RunConfig, dump_config
from evolve.pareto import balanced, is_multi, pareto_front
from evolve.urls import redact_text, redact_url
from merge_core.errors import EvomergeError
from merge_core.recipe import load_recipe

CONNECT_TIMEOUT_S = 10
log = logging.getLogger(__name__)
# Optuna warns on every ask of a study whose storage has a heartbeat; ours keeps it (`Heartbeats`), as optimize does
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")


def study_name(cfg: RunConfig, stage: str) -> str:
    """The first stage's study is named after the run; later stages get a suffix (`NAME-dfs`)."""
    return cfg.name if stage == cfg.search.stages[0] else f"{cfg.name}-{stage}"


def open_study(
    cfg: RunConfig, space, sampler: optuna.samplers.BaseSampler | None = None, stage: str = "ps"
) -> optuna.Study:
    """Create or reopen a stage's study to search it; refuse one whose genome differs from this config's."""
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    name = study_name(cfg, stage)
    directions, metric_names = study_objectives(cfg)
    for attempt in range(3):  # two processes creating one new storage's schema at once: the loser retries
        try:
            study = optuna.create_study(
                study_name=name,
                storage=search_storage(cfg),
                directions=directions,
                sampler=sampler,
                load_if_exists=True,
            )
            break
        except Exception as e:  # storage errors carry the URL; never print its password
            if attempt < 2 and "IntegrityError" in type(e).__name__ + str(e):
                time.sleep(0.5)
                continue
            raise cannot_open(cfg.storage_url, e) from None
    check_objectives(study, cfg)
    if study.metric_names is None:  # optuna-dashboard and trials_dataframe name the values after these
        with warnings.catch_warnings():  # experimental since Optuna 3.2, unchanged since
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(metric_names)
    stored = study.user_attrs.get("space_names")
    if stored is None:
        study.set_user_attr("space_names", space.names)
        study.set_user_attr("config", dump_config(cfg))
        study.set_user_attr("stage", stage)
    elif stored != space.names:
        raise EvomergeError(
            f"study '{name}' in {redact_url(cfg.storage_url)} was made with another search space "
            f"({len(stored)} parameters, this config has {space.dim}); give the run a new name"
        )
    return study


def study_objectives(cfg: RunConfig) -> tuple[list[str], list[str]]:
    """(directions, metric names) a study of this config is created with: one per objective, or the fitness."""
    objectives = cfg.evaluation.objectives
    if objectives:
        return [o.study_direction for o in objectives], [o.metric for o in objectives]
    return ["maximize"], ["fitness"]


def check_objectives(study: optuna.Study, cfg: RunConfig) -> None:
    """A study keeps the objectives (directions and metric names) it was created with: another config's are refused,
    whatever else is accepted (`config_edits`)."""
    directions, metric_names = study_objectives(cfg)
    if [d.name.lower() for d in study.directions] != directions or study.metric_names not in (None, metric_names):
        names = study.metric_names or [f"values_{i}" for i in range(len(study.directions))]
        made = ", ".join(f"{n} ({d.name.lower()})" for n, d in zip(names, study.directions))
        raise EvomergeError(
            f"study '{study.study_name}' in {redact_url(cfg.storage_url)} was made with other objectives ({made}; "
            f"this config: {', '.join(f'{n} ({d})' for n, d in zip(metric_names, directions))}); give the run a "
            "new name"
        )


def search_storage(cfg: RunConfig) -> str | RDBStorage:
    """The storage a search writes: the URL, or for a shared study an RDBStorage with Optuna's heartbeat (every
    `execution.heartbeat_s`, stale after 3x that), so trials of a process that died are found (`take_over_stale`)."""
    if not cfg.execution.shared_study:
        return cfg.storage_url
    with warnings.catch_warnings():  # heartbeat_interval: experimental since Optuna 2.9, unchanged since
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        hb = cfg.execution.heartbeat_s
        return RDBStorage(cfg.storage_url, heartbeat_interval=hb, grace_period=3 * hb)


def take_over_stale(study: optuna.Study) -> list[int]:
    """In a shared study: fail each RUNNING trial whose heartbeat stopped (its process died), marked `interrupted`
    so it does not count against the budget, and enqueue its parameters again (user attr ``retry_of``) for whichever
    process asks next. Another process doing the same at once fails it first: the trial is then left to it. Returns
    the trial numbers taken over."""
    if not optuna_api.heartbeat_enabled(study):
        return []
    storage = optuna_api.storage(study)
    taken = []
    for trial_id in optuna_api.stale_trial_ids(study):
        try:
            storage.set_trial_user_attr(trial_id, "interrupted", True)
            if not storage.set_trial_state_values(trial_id, state=TrialState.FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
        t = storage.get_trial(trial_id)
        again = {"retry_of": t.number, **({"x0": True} if t.user_attrs.get("x0") else {})}
        study.enqueue_trial(t.params, user_attrs=again)
        log.warning("trial %d: its process stopped (no heartbeat); re-running its parameters", t.number)
        taken.append(t.number)
    return taken


class Heartbeats:
    """A shared study's heartbeat of each trial this process runs (Optuna's heartbeat thread, as `study.optimize`
    keeps one), and, at most once per interval, the take-over of trials whose process died (`take_over_stale`).
    Nothing for a study without heartbeat (one process owns it; `resume` continues its trials in place)."""

    def __init__(self, study: optuna.Study):
        self.study = study
        self.enabled = optuna_api.heartbeat_enabled(study)
        self.threads: dict[int, Any] = {}
        self.next_check = 0.0

    def check(self) -> None:
        if self.enabled and time.monotonic() >= self.next_check:
            take_over_stale(self.study)
            self.next_check = time.monotonic() + optuna_api.heartbeat_interval(self.study)

    def start(self, trial: optuna.Trial) -> None:
        # the first beat before anything else: a trial without one is never found stale (a process killed before
        # its thread's first beat would leave it RUNNING for good)
        if self.enabled:
            self.threads[trial.number] = optuna_api.record_heartbeat(self.study, trial)

    def stop(self, trial: optuna.Trial) -> None:
        thread = self.threads.pop(trial.number, None)
        if thread is not None:
            thread.join()

    def close(self) -> None:
        for thread in self.threads.values():
            thread.join()
        self.threads.clear()


def set_user_attrs(trial: optuna.Trial, attrs: dict[str, Any]) -> None:
    """A running trial's user attrs, in one transaction where the storage is an RDB (one commit, not one per attr:
    on SQLite each commit is a sync to disk; a trial records a dozen), else one by one. Optuna's cached storage
    writes a running trial's attrs straight to its backend too, so reads see them as with `set_user_attr`."""
    if not optuna_api.set_user_attrs_in_one_transaction(trial, attrs):
        for key, value in attrs.items():
            trial.set_user_attr(key, value)


def load_study(cfg: RunConfig, stage: str | None = None) -> optuna.Study:
    """An existing stage's study (default: the last stage's), to read; a server that does not answer fails within
    CONNECT_TIMEOUT_S, and a missing SQLite file is reported, not created."""
    name = study_name(cfg, stage or cfg.search.stages[-1])
    url = cfg.storage_url
    db = missing_database(url)
    if db:
        raise EvomergeError(f"no study '{name}': {db} does not exist; run `evolve run` first")
    try:
        return optuna.load_study(study_name=name, storage=read_storage(url))
    except KeyError:
        raise EvomergeError(f"no study '{name}' in {redact_url(url)}; run `evolve run` first") from None
    except Exception as e:  # noqa: BLE001 - unreachable server, missing driver, corrupt file: one line, no password
        raise cannot_open(url, e) from None


def read_storage(url: str) -> RDBStorage | str:
    """A storage to read existing studies from: a server that does not answer fails within CONNECT_TIMEOUT_S, and
    no tables are created."""
    if url.split(":", 1)[0].split("+", 1)[0] not in ("postgresql", "mysql"):
        return url
    connect = {"connect_args": {"connect_timeout": CONNECT_TIMEOUT_S}}
    return RDBStorage(url, engine_kwargs=connect, skip_table_creation=True)


def missing_database(url: str) -> str | None:
    """The SQLite file a storage URL names when it does not exist (reading must not create it, nor its directory)."""
    if not url.startswith("sqlite:///"):
        return None
    db = make_url(url).database
    return db if db and db != ":memory:" and not Path(db).is_file() else None


OVER_BUDGET = "over_budget"  # trial user attr: asked by a process of a shared study once its budget was taken


def counted(t: FrozenTrial) -> bool:
    """Trials that used the budget: finished ones (complete, failed, or stopped early by racing: PRUNED), except
    those an older evomerge marked `interrupted` (it re-ran them as new trials; trials a dead process leaves RUNNING
    now continue in place, see `resume_trial`), those a shared study's process failed as `interrupted` (its
    process died; `take_over_stale` re-runs them) and those it asked past the budget (`OVER_BUDGET`)."""
    finished = t.state in (TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED)
    return finished and not t.user_attrs.get("interrupted") and not t.user_attrs.get(OVER_BUDGET)


def budget_taken(trials: Iterable[FrozenTrial], before: int | None = None) -> int:
    """A shared study's budget taken, by every process: trials counted (`counted`) and trials running (each will
    be), those numbered below `before` when given. Enqueued trials not asked yet take none."""
    return sum((counted(t) or t.state == TrialState.RUNNING) and (before is None or t.number < before) for t in trials)


def resume_trial(study: optuna.Study, left: FrozenTrial, dists: dict[str, FloatDistribution]) -> optuna.Trial:
    """Take over a trial a dead process left RUNNING, in place: same number, its stored parameters as stored, the
    ones its ask had not set yet sampled now (an enqueued trial's from its fixed params). Like `study.ask`, the
    `Trial` calls `sampler.before_trial`; with `make_sampler`'s per-trial reseeding the missing values are the ones
    the dead process would have drawn."""
    trial = optuna_api.reopen_trial(study, left)
    for name, d in dists.items():
        trial.suggest_float(name, d.low, d.high, step=d.step, log=d.log)
    return trial


def best_first(trials: Iterable[FrozenTrial]) -> list[FrozenTrial]:
    """The complete trials, best first: the highest value, the lowest trial number among equal values. This is
    what "best trial" means everywhere (the search's summary, status, report, export, the held-out table) in a
    single-objective study; a multi-objective one has a front instead (`evolve.pareto`)."""
    return sorted((t for t in trials if t.state == TrialState.COMPLETE), key=lambda t: (-t.value, t.number))


def best_trial(study: optuna.Study, number: int | None = None) -> FrozenTrial:
    """The run's pick, or the complete trial with this number. The pick is the best complete trial (see
    `best_first`), unless elites were re-scored on more items (`rescored`): then the re-scored trial with the
    highest re-scored fitness (ties: the better search rank). With several objectives, the Pareto front's "balanced"
    member (`evolve.pareto.balanced`)."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        raise EvomergeError(f"study '{study.study_name}' has no complete trial yet")
    if number is None and is_multi(study.directions):  # several objectives: the front's balanced member
        return balanced(pareto_front(complete, study.directions), study.directions)
    if number is None:
        ranked = best_first(complete)
        scores = rescored(study)
        elites = [t for t in ranked if t.number in scores]
        if elites:
            return max(elites, key=lambda t: (scores[t.number]["fitness"], -ranked.index(t)))
        return ranked[0]
    for t in complete:
        if t.number == number:
            return t
    raise EvomergeError(f"--trial {number}: no complete trial with that number (complete: {len(complete)})")


def candidates_per_hour(trials: Iterable[FrozenTrial]) -> float | None:
    """Finished trials per hour of search time: the union of the trials' [start, complete] spans (so time between
    a stop and a resume does not count)."""
    spans = sorted((t.datetime_start, t.datetime_complete) for t in trials if t.datetime_start and t.datetime_complete)
    busy, end = 0.0, None
    for start, stop in spans:
        if end is None or start > end:
            busy, end = busy + (stop - start).total_seconds(), stop
        elif stop > end:
            busy, end = busy + (stop - end).total_seconds(), stop
    return len(spans) / (busy / 3600) if busy > 0 else None


RESCORE_KEY = "rescore:"  # + trial number: a study user attr (a finished trial's own attrs are read-only)


def rescored(study: optuna.Study) -> dict[int, dict]:
    """Trial number -> its re-scoring record ({"fitness", "metrics", "items", ...}), for the elites re-scored."""
    attrs = study.user_attrs
    return {int(k[len(RESCORE_KEY) :]): v for k, v in attrs.items() if k.startswith(RESCORE_KEY)}


def trial_recipe(t: FrozenTrial):
    """The trial's recipe: a MergeRecipe (ps) or a DataFlowRecipe (dfs)."""
    return load_recipe(t.user_attrs["recipe"], where=f"trial {t.number} recipe")


class RunLock:
    """One `evolve run` per run directory at a time (fcntl lock, released when the process dies)."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / ".lock"
        self._fh = open(self.path, "a+")
        try:
            fcntl.flock(self._fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._fh.seek(0)
            holder = self._fh.read().strip() or "another process"
            self._fh.close()
            raise EvomergeError(
                f"{run_dir}: a search is already running on this study ({holder}); "
                "wait for it, or set execution.shared_study: true to add workers to it"
            ) from None
        self._fh.seek(0)
        self._fh.truncate()
        self._fh.write(f"pid {os.getpid()} on {socket.gethostname()}")
        self._fh.flush()

    def release(self) -> None:
        fcntl.flock(self._fh, fcntl.LOCK_UN)
        self._fh.close()


@contextmanager
def storage_errors(cfg: RunConfig) -> Iterator[None]:
    """The storage failing mid-run (deleted, corrupted, full, unreachable): one line naming it and the real cause
    (Optuna reports every failed commit as "invalid data ... e.g. exceeding max length"). Trials in flight stay
    RUNNING in the storage and continue in place on the next `evolve resume`."""
    try:
        yield
    except (optuna.exceptions.StorageInternalError, sqlalchemy.exc.SQLAlchemyError, sqlite3.Error) as e:
        url = cfg.storage_url
        gone = url.startswith("sqlite:///") and not Path(url[len("sqlite:///") :]).exists()
        raise EvomergeError(
            f"storage {redact_url(url)} failed during the search: {storage_cause(e, url)}"
            f"{' (the database file was deleted or moved)' if gone else ''}; the search stopped, and "
            f"once the storage works again `evolve resume {shlex.quote(str(cfg.run_dir))}` continues"
        ) from None


def cannot_open(url: str, e: BaseException) -> EvomergeError:
    """The one-line error for a storage that could not be opened."""
    return EvomergeError(f"storage {redact_url(url)}: cannot open ({storage_cause(e, url)})")


def storage_cause(e: BaseException, url: str) -> str:
    """What went wrong with a storage, in one line and without its password: the innermost cause (the DB-API error
    under SQLAlchemy's and Optuna's wrappers, e.g. `sqlite3.OperationalError: database or disk is full`), or the
    driver module that is missing and how to install it."""
    while True:
        inner = getattr(e, "orig", None) or e.__cause__
        if not isinstance(inner, BaseException):
            break
        e = inner
    if isinstance(e, ModuleNotFoundError) and e.name:
        fix = (
            'pip install "evomerge[postgres]"'
            if e.name.split(".")[0] in ("psycopg", "psycopg2")
            else "install the driver this URL names"
        )
        return f"the database driver module '{e.name}' is not installed; {fix}"
    kind = type(e).__name__ if type(e).__module__ == "builtins" else f"{type(e).__module__}.{type(e).__name__}"
    text = " ".join(redact_text(str(e), url).split())
    return f"{kind}: {text[:300]}" if text else kind
