"""The search: ask the study for a vector, decode it to a recipe, have a worker score it, tell the study. Resumable."""
from __future__ import annotations

import fcntl
import logging
import math
import os
import shlex
import signal
import socket
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import optuna
import sqlalchemy.exc
from optuna.distributions import FloatDistribution
from optuna.trial import FrozenTrial, TrialState

from evolve.config import RunConfig, dump_config, redact_url
from evolve.urls import has_secret, redact_text
from evolve.executors import Executor, check_ray_job_storage, make_executor
from evolve.samplers import make_sampler
from evolve.worker import Outcome
from merge_core.checkpoint import Checkpoint
from merge_core.errors import EvomergeError
from search_spaces.dfs import DataFlowSpace, load_recipe
from search_spaces.ps import ParameterSpace

log = logging.getLogger(__name__)
optuna.logging.set_verbosity(optuna.logging.WARNING)


def build_space(cfg: RunConfig, stage: str = "ps"):
    """The genome of one stage: PS over the sources, or DFS over models A and B."""
    return build_ps_space(cfg) if stage == "ps" else build_dfs_space(cfg)


def resolve_model(cfg: RunConfig, ref: str) -> str:
    """A source alias -> its path; anything else is a path or hub id."""
    aliases = dict(zip(cfg.models.aliases(), (s.path for s in cfg.models.sources)))
    return aliases.get(ref, ref)


def dfs_model_a(cfg: RunConfig) -> str:
    """Model A of the DFS stage: as configured, else the PS stage's best merge (hybrid), else the base."""
    assert cfg.search.dfs is not None
    if cfg.search.dfs.space.model_a is not None:
        return resolve_model(cfg, cfg.search.dfs.space.model_a)
    if "ps" in cfg.search.stages:
        return str(cfg.run_dir / "ps_best")
    if cfg.models.base is None:
        raise EvomergeError("search.dfs.space.model_a: required when there is no base model and no ps stage")
    return cfg.models.base


def build_dfs_space(cfg: RunConfig) -> DataFlowSpace:
    assert cfg.search.dfs is not None
    d = cfg.search.dfs.space
    a, b = dfs_model_a(cfg), resolve_model(cfg, d.model_b)
    opts = dict(allow_pickle=cfg.models.allow_pickle, trust_remote_code=cfg.models.trust_remote_code)
    not_merged_yet = a == str(cfg.run_dir / "ps_best") and not Path(a).exists()  # the PS merge has the base's shape
    layers_a = Checkpoint.open(cfg.models.base or cfg.models.sources[0].path if not_merged_yet else a, **opts).num_layers
    cb = Checkpoint.open(b, **opts)
    return DataFlowSpace(model_a=a, model_b=b, layers_a=layers_a, layers_b=cb.num_layers, repeats=d.repeats,
                         scales=d.scales, max_path_length=d.max_path_length, scale_bounds=tuple(d.scale_bounds))


def build_ps_space(cfg: RunConfig) -> ParameterSpace:
    """The PS genome for this config (the number of layers is read from the base checkpoint's config)."""
    m, sp = cfg.models, cfg.search.space
    ref = Checkpoint.open(m.base or m.sources[0].path, allow_pickle=m.allow_pickle, trust_remote_code=m.trust_remote_code)
    if sp.layers_per_group is not None and ref.num_layers % sp.layers_per_group:
        raise EvomergeError(f"search.space.layers_per_group: must divide num_hidden_layers={ref.num_layers}, got {sp.layers_per_group}")
    return ParameterSpace(
        method=sp.method, base=m.base, sources=[s.path for s in m.sources], num_layers=ref.num_layers,
        aliases=m.aliases(), layers_per_group=sp.layers_per_group, modules=sp.modules,
        embed_head_groups=sp.embed_head_groups, weight_bounds=tuple(sp.weight_bounds),
        density_bounds=tuple(sp.density_bounds), weight_x0=sp.x0.get("weight", 0.5),
        density_x0=sp.x0.get("density", 0.5), params=dict(sp.params), seed=cfg.seed, dtype=sp.dtype,
    )


# ---- the study ------------------------------------------------------------------------------


def study_name(cfg: RunConfig, stage: str) -> str:
    """The first stage's study is named after the run; later stages get a suffix (`NAME-dfs`)."""
    return cfg.name if stage == cfg.search.stages[0] else f"{cfg.name}-{stage}"


def open_study(cfg: RunConfig, space, sampler: Optional[optuna.samplers.BaseSampler] = None, stage: str = "ps") -> optuna.Study:
    """Create or reopen a stage's study; refuse one whose genome differs from this config's."""
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    name = study_name(cfg, stage)
    for attempt in range(3):  # two processes creating one new storage's schema at once: the loser retries
        try:
            study = optuna.create_study(study_name=name, storage=cfg.storage_url, direction="maximize",
                                        sampler=sampler, load_if_exists=True)
            break
        except Exception as e:  # storage errors carry the URL; never print its password
            if attempt < 2 and "IntegrityError" in type(e).__name__ + str(e):
                time.sleep(0.5)
                continue
            raise EvomergeError(f"storage {redact_url(cfg.storage_url)}: cannot open ({storage_cause(e, cfg.storage_url)})") from None
    stored = study.user_attrs.get("space_names")
    if stored is None:
        study.set_user_attr("space_names", space.names)
        study.set_user_attr("config", dump_config(cfg))
        study.set_user_attr("stage", stage)
    elif stored != space.names:
        raise EvomergeError(f"study '{name}' in {redact_url(cfg.storage_url)} was made with another search space "
                            f"({len(stored)} parameters, this config has {space.dim}); give the run a new name")
    return study


def distributions(space: ParameterSpace) -> dict[str, FloatDistribution]:
    return {n: FloatDistribution(lo, hi) for n, (lo, hi) in zip(space.names, space.bounds)}


def counted(t: FrozenTrial) -> bool:
    """Trials that used the budget: finished ones, except those an older evomerge marked `interrupted` (it re-ran
    them as new trials; trials a dead process leaves RUNNING now continue in place, see `resume_trial`)."""
    return t.state in (TrialState.COMPLETE, TrialState.FAIL) and not t.user_attrs.get("interrupted")


def resume_trial(study: optuna.Study, left: FrozenTrial, dists: dict[str, FloatDistribution]) -> optuna.Trial:
    """Take over a trial a dead process left RUNNING, in place: same number, its stored parameters as stored, the
    ones its ask had not set yet sampled now (an enqueued trial's from its fixed params). Like `study.ask`, the
    `Trial` calls `sampler.before_trial`; with `make_sampler`'s per-trial reseeding the missing values are the ones
    the dead process would have drawn."""
    study._thread_local.cached_all_trials = None  # as study.ask does: the sampler reads the current record
    trial = optuna.Trial(study, left._trial_id)
    for name, d in dists.items():
        trial.suggest_float(name, d.low, d.high, step=d.step, log=d.log)
    return trial


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
            raise EvomergeError(f"{run_dir}: a search is already running on this study ({holder}); "
                                "wait for it, or set execution.shared_study: true to add workers to it") from None
        self._fh.seek(0)
        self._fh.truncate()
        self._fh.write(f"pid {os.getpid()} on {socket.gethostname()}")
        self._fh.flush()

    def release(self) -> None:
        fcntl.flock(self._fh, fcntl.LOCK_UN)
        self._fh.close()


# ---- the loop ---------------------------------------------------------------------------------


@dataclass
class SearchResult:
    study: optuna.Study
    space: ParameterSpace
    stopped_because: str


class Progress:
    """One live line: trials done / budget, best fitness, trials per minute, ETA."""

    def __init__(self, total: int, done: int, enabled: bool):
        from tqdm import tqdm

        self.bar = tqdm(total=total, initial=done, disable=not enabled, unit="trial", dynamic_ncols=True,
                        bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}]{postfix}")
        self.t0, self.start_done = time.monotonic(), done

    def update(self, best: float | None) -> None:
        self.bar.update(1)
        per_min = (self.bar.n - self.start_done) / max((time.monotonic() - self.t0) / 60, 1e-9)
        self.bar.set_postfix_str(f"best {best:.4f}, {per_min:.1f}/min" if best is not None else f"{per_min:.1f}/min")

    def close(self) -> None:
        self.bar.close()


def run_search(cfg: RunConfig, *, progress: bool = True, executor_factory: Callable[..., Executor] = make_executor) -> SearchResult:
    """Run (or continue) every stage of the search until its budget is spent; the studies hold the record."""
    check_ray_job_storage(cfg)  # inside `ray job submit`: no SQLite study in Ray's temporary working directory
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    lock = None if cfg.execution.shared_study else RunLock(cfg.run_dir)  # before writing anything
    try:
        if has_secret(cfg.storage):
            log.warning("storage: the password in the storage URL is not written to %s nor to the study; to resume "
                        "from the run directory give it as PGPASSWORD or in ~/.pgpass, or write the URL with "
                        "${ENV_VAR} in its place", cfg.run_dir / "config.yaml")
        (cfg.run_dir / "config.yaml").write_text(dump_config(cfg))
        result = None
        for stage in cfg.search.stages:
            if stage == "dfs" and "ps" in cfg.search.stages and cfg.search.dfs.space.model_a is None:
                export_ps_best(cfg)
            result = run_stage(cfg, stage, progress=progress, executor_factory=executor_factory)
        assert result is not None
        return result
    finally:
        if lock is not None:
            lock.release()


def run_stage(cfg: RunConfig, stage: str, *, progress: bool, executor_factory: Callable[..., Executor]) -> SearchResult:
    space = build_space(cfg, stage)
    _, opt, budget = cfg.search.stage(stage)
    sampler = make_sampler(opt.sampler, names=space.names, x0=space.x0, bounds=space.bounds,
                           sigma0=opt.sigma0, seed=cfg.seed, popsize=opt.popsize)
    study = open_study(cfg, space, sampler, stage)
    with storage_errors(cfg):
        if not study.trials:
            study.enqueue_trial(dict(zip(space.names, space.x0)), user_attrs={"x0": True})
        trials = study.get_trials(deepcopy=False)
        # trials a dead process left RUNNING continue in place (with a shared study they may be another process's)
        left = [] if cfg.execution.shared_study else [t for t in trials if t.state == TrialState.RUNNING]
        if left:
            log.warning("continuing trials a previous process left running: %s", [t.number for t in left])
        if sum(counted(t) for t in trials) >= budget.max_trials and not left:
            return SearchResult(study, space, "budget: max_trials reached (already)")
        executor = executor_factory(cfg, space.decode(space.x0))
        try:
            return SearchResult(study, space, _loop(budget, study, space, sampler, executor, progress, left))
        finally:
            executor.close()


@contextmanager
def storage_errors(cfg: RunConfig) -> Iterator[None]:
    """The storage failing mid-run (deleted, corrupted, full, unreachable): one line naming it and the real cause
    (Optuna reports every failed commit as "invalid data ... e.g. exceeding max length"). Trials in flight stay
    RUNNING in the storage and continue in place on the next `evolve resume`."""
    try:
        yield
    except (optuna.exceptions.StorageInternalError, sqlalchemy.exc.SQLAlchemyError, sqlite3.Error) as e:
        url = cfg.storage_url
        gone = url.startswith("sqlite:///") and not Path(url[len("sqlite:///"):]).exists()
        raise EvomergeError(f"storage {redact_url(url)} failed during the search: {storage_cause(e, url)}"
                            f"{' (the database file was deleted or moved)' if gone else ''}; the search stopped, and "
                            f"once the storage works again `evolve resume {shlex.quote(str(cfg.run_dir))}` continues") from None


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
        fix = ('pip install "evomerge[postgres]"' if e.name.split(".")[0] in ("psycopg", "psycopg2")
               else "install the driver this URL names")
        return f"the database driver module '{e.name}' is not installed; {fix}"
    kind = type(e).__name__ if type(e).__module__ == "builtins" else f"{type(e).__module__}.{type(e).__name__}"
    text = " ".join(redact_text(str(e), url).split())
    return f"{kind}: {text[:300]}" if text else kind


def export_ps_best(cfg: RunConfig) -> Path:
    """Write the PS stage's best merge to RUN_DIR/ps_best (model A of a hybrid's DFS stage), once per best trial."""
    from merge_core.merge import RECIPE_FILE, run_merge

    study = optuna.load_study(study_name=study_name(cfg, "ps"), storage=cfg.storage_url)
    recipe = trial_recipe(best_trial(study))
    out = cfg.run_dir / "ps_best"
    marker = out / RECIPE_FILE
    if not (marker.is_file() and load_recipe(marker.read_text()) == recipe):  # replaced only once the new one is complete
        run_merge(recipe, out, device=cfg.execution.device, allow_pickle=cfg.models.allow_pickle,
                  trust_remote_code=cfg.models.trust_remote_code, overwrite=True)
    return out


def _loop(budget, study: optuna.Study, space, sampler, executor: Executor, show: bool,
          left: list[FrozenTrial] = ()) -> str:
    dists = distributions(space)
    cap = min(executor.slots, getattr(sampler, "max_parallel", executor.slots))
    trials = study.get_trials(deepcopy=False)
    cache = {t.user_attrs["recipe_hash"]: t for t in trials if t.state == TrialState.COMPLETE and "recipe_hash" in t.user_attrs}
    done = sum(counted(t) for t in trials)
    best, since_best, failures = _replay_progress(trials)
    deadline = time.monotonic() + 60 * budget.max_minutes if budget.max_minutes else math.inf
    inflight: dict[int, optuna.Trial] = {}
    resumable = sorted(left, key=lambda t: t.number)  # asked before the stop: finished whatever the budget says now
    bar = Progress(budget.max_trials, done, show)
    reason = "budget: max_trials reached"
    try:
        while True:
            stop = _stop_reason(budget, done, since_best, failures, deadline)
            while len(inflight) < cap and (resumable or (stop is None and done + len(inflight) < budget.max_trials
                                                         and _can_ask(sampler, study))):
                trial = resume_trial(study, resumable.pop(0), dists) if resumable else study.ask(dists)
                recipe = space.decode([trial.params[n] for n in space.names])
                h = recipe.hash()
                trial.set_user_attr("recipe", recipe.to_yaml())
                trial.set_user_attr("recipe_hash", h)
                if h in cache:  # an identical candidate is never evaluated twice
                    _tell_cached(study, trial, cache[h])
                    done += 1
                    bar.update(best)
                    continue
                executor.submit(trial.number, recipe)
                inflight[trial.number] = trial
                _fault(study, trial.number)
            if not inflight:
                reason = stop or reason
                break
            number, outcome = executor.wait()
            trial = inflight.pop(number)
            _tell(study, trial, outcome)
            done += 1
            if outcome.ok:
                cache[trial.user_attrs["recipe_hash"]] = study._storage.get_trial(trial._trial_id)
            else:
                log.warning("trial %d failed: %s", number, outcome.error)
            best, since_best, failures = _progress(best, since_best, failures,
                                                   sampler_value(outcome.fitness) if outcome.ok else None)
            bar.update(best)
    finally:  # Ctrl-C (KeyboardInterrupt) goes up: told trials are recorded, in-flight ones stay RUNNING for resume
        bar.close()
    if failures >= budget.max_consecutive_failures:
        raise EvomergeError(f"stopped after {failures} consecutive failed trials; last: {_last_fail_reason(study)}")
    return reason


def _progress(best: float | None, since_best: int, failures: int, value: float | None) -> tuple[float | None, int, int]:
    """(best, trials since it improved, consecutive failures) after one evaluated trial (value None: it failed)."""
    if value is None:
        return best, since_best, failures + 1
    if best is None or value > best:
        return value, 0, 0
    return best, since_best + 1, 0


def _replay_progress(trials: list[FrozenTrial]) -> tuple[float | None, int, int]:
    """The loop's (best, since_best, failures) rebuilt from the record, so patience and the failure limit count
    across a resume exactly as in one uninterrupted process (cached duplicates count for neither)."""
    state: tuple[float | None, int, int] = (None, 0, 0)
    for t in sorted(trials, key=lambda t: t.number):
        if counted(t) and "cached_from" not in t.user_attrs:
            state = _progress(*state, t.value if t.state == TrialState.COMPLETE else None)
    return state


def _fault(study: optuna.Study, number: int) -> None:
    """Fault injection for the crash tests: EVOMERGE_FAULT=sigkill-after-submit:STUDY:N kills this process with
    SIGKILL right after trial N of study STUDY went to a worker, leaving it RUNNING as a crash would. Unset: no-op."""
    if os.environ.get("EVOMERGE_FAULT") == f"sigkill-after-submit:{study.study_name}:{number}":
        os.kill(os.getpid(), signal.SIGKILL)


def _can_ask(sampler, study: optuna.Study) -> bool:
    """Generational samplers (pycma) hand out a generation at a time: ask only when a candidate is free."""
    available = getattr(sampler, "available", None)
    return available is None or available(study) > 0


def _stop_reason(b, done: int, since_best: int, failures: int, deadline: float) -> Optional[str]:
    if done >= b.max_trials:
        return "budget: max_trials reached"
    if failures >= b.max_consecutive_failures:
        return "too many consecutive failures"
    if time.monotonic() >= deadline:
        return "budget: max_minutes reached"
    if b.patience is not None and since_best >= b.patience:
        return f"patience: {since_best} trials without improvement"
    return None


FITNESS_DIGITS = 10


def sampler_value(fitness: float) -> float:
    """The value told to the study (what samplers and `best_trial` see): the fitness rounded to FITNESS_DIGITS
    significant digits, so noise in the last bits of a float64 sum (summation order, library versions) never reaches
    the sampler, while any difference an evaluation can resolve (1 example in 10^9) still does. The exact fitness is
    kept in the trial's `fitness` user attr."""
    return float(f"{fitness:.{FITNESS_DIGITS}g}") if math.isfinite(fitness) else fitness


def _tell(study: optuna.Study, trial: optuna.Trial, outcome: Outcome) -> None:
    for key in ("metrics", "merge_seconds", "eval_seconds", "worker"):
        trial.set_user_attr(key, getattr(outcome, key))
    if outcome.ok:
        trial.set_user_attr("fitness", outcome.fitness)
        study.tell(trial, sampler_value(outcome.fitness))
    else:
        trial.set_user_attr("fail_reason", outcome.error)
        study.tell(trial, state=TrialState.FAIL)


def _tell_cached(study: optuna.Study, trial: optuna.Trial, source: FrozenTrial) -> None:
    for key in ("metrics", "fitness"):
        trial.set_user_attr(key, source.user_attrs.get(key))
    trial.set_user_attr("cached_from", source.number)
    study.tell(trial, source.value)


def _last_fail_reason(study: optuna.Study) -> str:
    fails = [t for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)) if not t.user_attrs.get("interrupted")]
    return fails[-1].user_attrs.get("fail_reason", "unknown") if fails else "unknown"


def evaluated_trials(study: optuna.Study) -> list[FrozenTrial]:
    return [t for t in study.get_trials(deepcopy=False) if counted(t)]


def best_trial(study: optuna.Study, number: Optional[int] = None) -> FrozenTrial:
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        raise EvomergeError(f"study '{study.study_name}' has no complete trial yet")
    if number is None:
        return max(complete, key=lambda t: (t.value, -t.number))
    for t in complete:
        if t.number == number:
            return t
    raise EvomergeError(f"--trial {number}: no complete trial with that number (complete: {len(complete)})")


def trial_recipe(t: FrozenTrial):
    """The trial's recipe: a MergeRecipe (ps) or a DataFlowRecipe (dfs)."""
    return load_recipe(t.user_attrs["recipe"], where=f"trial {t.number} recipe")
