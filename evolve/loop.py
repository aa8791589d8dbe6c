"""The search: ask the study for a vector, decode it to a recipe, have a worker score it, tell the study. Resumable.

`run_search` runs the stages in order (a hybrid's PS pick handed to the DFS stage as model A); `run_stage` opens a
stage's study and runs `_loop`, the ask/tell loop with asynchronous dispatch; `LoopState` holds the stop rules'
counters, rebuilt from the record on resume. What a trial records and is told: `evolve.trials`."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState
from tqdm import tqdm

from evolve.backends import use_threads
from evolve.config import Budget, Evaluation, ItemProtocol, RunConfig, dump_config
from evolve.config_edits import check_resume_config, record_config
from evolve.executors import Executor, check_ray_job_storage, make_executor
from evolve.faults import fault_point
from evolve.items import items_scored
from evolve.optuna_api import frozen_trial
from evolve.pareto import is_multi, signs
from evolve.protocol import TrialItems
from evolve.pycma_sampler import PycmaSampler
from evolve.rescore import rescore_elites
from evolve.samplers import make_sampler
from evolve.spaces import build_space, distributions, ps_best_dir
from evolve.study import (
    OVER_BUDGET,
    Heartbeats,
    RunLock,
    best_trial,
    budget_taken,
    counted,
    load_study,
    open_study,
    resume_trial,
    set_user_attrs,
    storage_errors,
    trial_recipe,
)
from evolve.trials import (
    cache_key,
    last_fail_reason,
    race_against_incumbent,
    stored_value,
    tell,
    tell_cached,
    told_value,
)
from evolve.urls import has_secret
from merge_core.errors import EvomergeError
from merge_core.merge import RECIPE_FILE, run_merge
from merge_core.recipe import load_recipe
from search_spaces.base import SearchSpace

log = logging.getLogger(__name__)


@dataclass
class SearchResult:
    study: optuna.Study
    space: SearchSpace
    stopped_because: str


class Progress:
    """One live line: trials done / budget, best fitness, trials per minute, ETA."""

    def __init__(self, total: int, done: int, enabled: bool):
        self.bar = tqdm(
            total=total,
            initial=done,
            disable=not enabled,
            unit="trial",
            dynamic_ncols=True,
            bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}]{postfix}",
        )
        self.t0, self.start_done = time.monotonic(), done

    def update(self, best: float | None, items: int = 0) -> None:
        self.bar.update(1)
        per_min = (self.bar.n - self.start_done) / max((time.monotonic() - self.t0) / 60, 1e-9)
        spent = f", {items} items" if items else ""
        self.bar.set_postfix_str(
            f"best {best:.4f}, {per_min:.1f}/min{spent}" if best is not None else f"{per_min:.1f}/min{spent}"
        )

    def close(self) -> None:
        self.bar.close()


def run_search(
    cfg: RunConfig,
    *,
    progress: bool = True,
    executor_factory: Callable[..., Executor] = make_executor,
    accept_config_change: bool = False,
) -> SearchResult:
    """Run (or continue) every stage of the search until its budget is spent; the studies hold the record. A study
    continues under the config it was run under, give or take the fields `config_edits.EDITABLE` lists, unless
    `accept_config_change`."""
    check_ray_job_storage(cfg)  # inside `ray job submit`: no SQLite study in Ray's temporary working directory
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    lock = None if cfg.execution.shared_study else RunLock(cfg.run_dir)  # before writing anything
    try:
        changes = check_resume_config(cfg, accept=accept_config_change)  # before config.yaml is written
        for name, fields in changes.items():
            log.warning("study '%s' continues under the new config; changed: %s", name, ", ".join(fields))
        if has_secret(cfg.storage):
            log.warning(
                "storage: the password in the storage URL is not written to %s nor to the study; to resume "
                "from the run directory give it as PGPASSWORD or in ~/.pgpass, or write the URL with "
                "${ENV_VAR} in its place",
                cfg.run_dir / "config.yaml",
            )
        (cfg.run_dir / "config.yaml").write_text(dump_config(cfg))
        result = None
        for stage in cfg.search.stages:
            if stage == "dfs" and "ps" in cfg.search.stages and cfg.search.dfs.space.model_a is None:
                export_ps_best(cfg)
            result = run_stage(cfg, stage, progress=progress, executor_factory=executor_factory, changes=changes)
        assert result is not None
        return result
    finally:
        if lock is not None:
            lock.release()


def run_stage(
    cfg: RunConfig,
    stage: str,
    *,
    progress: bool,
    executor_factory: Callable[..., Executor],
    changes: dict[str, list[str]] | None = None,
) -> SearchResult:
    space = build_space(cfg, stage)
    _, opt, budget = cfg.search.stage(stage)
    racing = cfg.evaluation.racing
    sampler = make_sampler(
        opt.sampler, space, sigma0=opt.sigma0, seed=cfg.seed, popsize=opt.popsize, racing=racing is not None
    )
    study = open_study(cfg, space, sampler, stage)
    with storage_errors(cfg):
        record_config(study, cfg, (changes or {}).get(study.study_name, []))
        if not study.trials:
            study.enqueue_trial(dict(zip(space.names, space.x0)), user_attrs={"x0": True})
        trials = study.get_trials(deepcopy=False)
        # trials a dead process left RUNNING continue in place (with a shared study they may be another process's)
        left = [] if cfg.execution.shared_study else [t for t in trials if t.state == TrialState.RUNNING]
        if left:
            log.warning("continuing trials a previous process left running: %s", [t.number for t in left])
        if sum(counted(t) for t in trials) >= budget.max_trials and not left:
            reason = "budget: max_trials reached (already)"
        else:
            executor = executor_factory(cfg, space.decode(space.x0))
            try:
                protocol = cfg.search.protocol_of(stage)
                where = cfg.search.protocol_path(stage)
                reason = _loop(
                    budget,
                    study,
                    space,
                    sampler,
                    executor,
                    progress,
                    left,
                    cfg.evaluation,
                    protocol,
                    where,
                    shared=cfg.execution.shared_study,
                )
            finally:
                executor.close()
        protocol = cfg.search.protocol_of(stage)
        if cfg.evaluation.rescore is not None or (protocol is not None and protocol.validation):
            rescore_elites(cfg, study, stage)
        return SearchResult(study, space, reason)


def export_ps_best(cfg: RunConfig) -> Path:
    """Write the PS stage's best merge to RUN_DIR/ps_best (model A of a hybrid's DFS stage), once per best trial."""
    use_threads(cfg)
    recipe = trial_recipe(best_trial(load_study(cfg, "ps")))
    out = ps_best_dir(cfg)
    marker = out / RECIPE_FILE
    # replaced only once the new one is complete
    if not (marker.is_file() and load_recipe(marker.read_text()) == recipe):
        run_merge(
            recipe,
            out,
            device=cfg.execution.device,
            allow_pickle=cfg.models.allow_pickle,
            trust_remote_code=cfg.models.trust_remote_code,
            overwrite=True,
        )
    return out


def _loop(
    budget: Budget,
    study: optuna.Study,
    space: SearchSpace,
    sampler,
    executor: Executor,
    show: bool,
    left: list[FrozenTrial] = (),
    evaluation: Evaluation | None = None,
    protocol: ItemProtocol | None = None,
    where: str = "",
    shared: bool = False,
) -> str:
    """Ask, dispatch, tell until a stop rule holds. The budget is the study's: with `shared` (several processes on
    one study), the trials every process finished or is running are counted before each ask, and a trial asked
    past the budget in a race with another process is failed as `over_budget` (not counted) instead of run."""
    dists = distributions(space)
    racing = evaluation.racing if evaluation is not None else None
    cap = min(executor.slots, sampler.max_parallel) if isinstance(sampler, PycmaSampler) else executor.slots
    trials = study.get_trials(deepcopy=False)
    cache = {cache_key(t): t for t in trials if t.state == TrialState.COMPLETE and "recipe_hash" in t.user_attrs}
    state = LoopState.replay(budget, trials, study.directions)
    sign = signs(study.directions) if is_multi(study.directions) else None
    inflight: dict[int, optuna.Trial] = {}
    beats = Heartbeats(study)
    resumable = sorted(left, key=lambda t: t.number)  # asked before the stop: finished whatever the budget says now
    bar = Progress(budget.max_trials, state.done, show)
    reason = "budget: max_trials reached"
    try:
        while True:
            beats.check()
            stop = state.stop_reason()
            while len(inflight) < cap and (
                resumable
                or (stop is None and _budget_left(study, state, inflight, shared) and _can_ask(sampler, study))
            ):
                trial = resume_trial(study, resumable.pop(0), dists) if resumable else study.ask(dists)
                if shared and _over_budget(study, trial, budget.max_trials):
                    break
                beats.start(trial)
                recipe = space.decode([trial.params[n] for n in space.names])
                items = TrialItems.for_trial(protocol, trial.number, where) if protocol else None
                batch = {"batch": items.attr()} if items is not None and items.attr() is not None else {}
                set_user_attrs(trial, {"recipe": recipe.to_yaml(), "recipe_hash": recipe.hash(), **batch})
                h = cache_key(trial)
                if h in cache:  # an identical candidate is never evaluated twice (on the same items)
                    tell_cached(study, trial, cache[h])
                    beats.stop(trial)
                    state.record(None, cached=True)  # a duplicate: counts for the budget only
                    bar.update(state.best, state.items)
                    continue
                race = race_against_incumbent(study, racing, evaluation.fitness, trial.number) if racing else None
                if race is None and items is None:
                    executor.submit(trial.number, recipe)
                else:
                    executor.submit(trial.number, recipe, race, items)
                inflight[trial.number] = trial
                fault_point(f"sigkill-after-submit:{study.study_name}:{trial.number}")
            if not inflight:
                reason = stop or reason
                break
            number, outcome = executor.wait()
            trial = inflight.pop(number)
            tell(study, trial, outcome, evaluation)
            beats.stop(trial)
            if outcome.ok:
                cache[cache_key(trial)] = frozen_trial(study, trial)
            else:
                log.warning("trial %d failed: %s", number, outcome.error)
            state.record(
                told_value(outcome, sign) if outcome.ok else None,
                pruned=outcome.stopped is not None,
                items=sum(s.n for s in outcome.scores.values()),
            )
            bar.update(state.best, state.items)
    finally:  # Ctrl-C (KeyboardInterrupt) goes up: told trials are recorded, in-flight ones stay RUNNING and
        bar.close()  # continue in place on resume (`resume_trial`), as after a crash
        beats.close()
    if state.failures >= budget.max_consecutive_failures:
        raise EvomergeError(
            f"stopped after {state.failures} consecutive failed trials; last: {last_fail_reason(study)}"
        )
    return reason


@dataclass
class LoopState:
    """What the stop rules count: trials that used the budget, the best value told, evaluated trials since it
    improved, consecutive failures. Rebuilt from the record (`replay`), so patience and the failure limit count
    across a resume exactly as in one uninterrupted process."""

    budget: Budget
    deadline: float
    done: int = 0
    best: float | None = None
    since_best: int = 0
    failures: int = 0
    items: int = 0
    front: list[tuple[float, ...]] = field(default_factory=list)  # several objectives, each as "higher is better"

    @classmethod
    def replay(cls, budget: Budget, trials: list[FrozenTrial], directions: list | None = None) -> LoopState:
        state = cls(budget, time.monotonic() + 60 * budget.max_minutes if budget.max_minutes else math.inf)
        sign = signs(directions) if directions and is_multi(directions) else None
        for t in sorted(trials, key=lambda t: t.number):
            if counted(t):
                state.record(
                    stored_value(t, sign) if t.state in (TrialState.COMPLETE, TrialState.PRUNED) else None,
                    cached="cached_from" in t.user_attrs,
                    pruned=t.state == TrialState.PRUNED,
                    items=items_scored(t.user_attrs.get("items")),
                )
        return state

    def record(
        self, value: float | tuple[float, ...] | None, cached: bool = False, pruned: bool = False, items: int = 0
    ) -> None:
        """One more trial used the budget (`items` of them scored), told `value` (None: it failed); a cached
        duplicate of an evaluated trial counts for neither patience nor the failure limit; a trial stopped early by
        racing (`pruned`) counts as one without improvement. With several objectives `value` is a tuple (each
        "higher is better") and a trial improves when no earlier one is as good on every objective (the front
        moved)."""
        self.done += 1
        self.items += items
        if cached:
            return
        if isinstance(value, tuple):
            if any(all(p >= v for p, v in zip(old, value)) for old in self.front):
                self.since_best, self.failures = self.since_best + 1, 0
            else:
                self.front = [o for o in self.front if not all(v >= p for p, v in zip(o, value))] + [value]
                self.since_best, self.failures = 0, 0
            return
        if pruned:
            self.since_best, self.failures = self.since_best + 1, 0
        elif value is None:
            self.failures += 1
        elif self.best is None or value > self.best:
            self.best, self.since_best, self.failures = value, 0, 0
        else:
            self.since_best, self.failures = self.since_best + 1, 0

    def stop_reason(self) -> str | None:
        b = self.budget
        if self.done >= b.max_trials:
            return "budget: max_trials reached"
        if b.max_items is not None and self.items >= b.max_items:
            return f"budget: max_items reached ({self.items} items scored)"
        if self.failures >= b.max_consecutive_failures:
            return "too many consecutive failures"
        if time.monotonic() >= self.deadline:
            return "budget: max_minutes reached"
        if b.patience is not None and self.since_best >= b.patience:
            return f"patience: {self.since_best} trials without improvement"
        return None


def _budget_left(study: optuna.Study, state: LoopState, inflight: dict, shared: bool) -> bool:
    """Room for one more trial: this process's count (the study's at start, then its own trials), or for a shared
    study the study's own count now, other processes' running trials included."""
    if shared:
        return budget_taken(study.get_trials(deepcopy=False)) < state.budget.max_trials
    return state.done + len(inflight) < state.budget.max_trials


def _over_budget(study: optuna.Study, trial: optuna.Trial, max_trials: int) -> bool:
    """A shared study: two processes may both see room for the last trial and ask at once. The storage numbers
    trials in order, so the one whose earlier trials already take the budget fails its trial as `over_budget`."""
    if budget_taken(study.get_trials(deepcopy=False), before=trial.number) < max_trials:
        return False
    trial.set_user_attr(OVER_BUDGET, True)
    study.tell(trial, state=TrialState.FAIL)
    return True


def _can_ask(sampler: optuna.samplers.BaseSampler, study: optuna.Study) -> bool:
    """pycma hands out a generation at a time: ask only when one of its candidates is free."""
    return not isinstance(sampler, PycmaSampler) or sampler.available(study) > 0
