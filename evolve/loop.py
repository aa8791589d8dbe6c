"""The search: ask the study for a vector, decode it to a recipe, have a worker score it, tell the study. Resumable."""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import optuna
from optuna.distributions import FloatDistribution
from optuna.trial import FrozenTrial, TrialState
from tqdm import tqdm

from evolve.config import Budget, Evaluation, Protocol, Racing, RunConfig, dump_config
from evolve.executors import Executor, check_ray_job_storage, make_executor
from evolve.faults import fault_point
from evolve.items import decode_items, encode_items, fully_scored, item_fitness, items_scored, tokens_generated
from evolve.pareto import HYPERVOLUME_ATTR, hypervolume, reference_point, signs
from evolve.protocol import TrialItems
from evolve.racing import Race
from evolve.samplers import PycmaSampler, make_sampler
from evolve.study import (
    RESCORE_KEY,
    RunLock,
    best_first,
    best_trial,
    counted,
    load_study,
    open_study,
    rescored,
    resume_trial,
    set_user_attrs,
    storage_errors,
    take_over_stale,
    trial_recipe,
)
from evolve.urls import has_secret
from evolve.worker import Outcome
from merge_core.checkpoint import Checkpoint
from merge_core.errors import EvomergeError
from merge_core.merge import RECIPE_FILE, run_merge
from merge_core.recipe import load_recipe
from search_spaces.base import SearchSpace
from search_spaces.dfs import DataFlowSpace
from search_spaces.ps import ParameterSpace

log = logging.getLogger(__name__)
# Optuna warns on every ask of a study whose storage has a heartbeat; ours keeps it (`Heartbeats`), as optimize does
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")


def build_space(cfg: RunConfig, stage: str = "ps") -> SearchSpace:
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
    path_a = cfg.models.base or cfg.models.sources[0].path if not_merged_yet else a
    layers_a = Checkpoint.open(path_a, **opts).num_layers
    cb = Checkpoint.open(b, **opts)
    return DataFlowSpace(
        model_a=a,
        model_b=b,
        layers_a=layers_a,
        layers_b=cb.num_layers,
        repeats=d.repeats,
        scales=d.scales,
        max_path_length=d.max_path_length,
        scale_bounds=tuple(d.scale_bounds),
    )


def build_ps_space(cfg: RunConfig) -> ParameterSpace:
    """The PS genome for this config (the number of layers is read from the base checkpoint's config)."""
    m, sp = cfg.models, cfg.search.space
    ref = Checkpoint.open(
        m.base or m.sources[0].path, allow_pickle=m.allow_pickle, trust_remote_code=m.trust_remote_code
    )
    return ParameterSpace(
        method=sp.method,
        base=m.base,
        sources=[s.path for s in m.sources],
        num_layers=ref.num_layers,
        aliases=m.aliases(),
        layers_per_group=sp.layers_per_group,
        modules=sp.modules,
        embed_head_groups=sp.embed_head_groups,
        weight_bounds=tuple(sp.weight_bounds),
        density_bounds=tuple(sp.density_bounds),
        weight_x0=sp.x0.get("weight", 0.5),
        density_x0=sp.x0.get("density", 0.5),
        params=dict(sp.params),
        seed=cfg.seed,
        dtype=sp.dtype,
    )


def distributions(space: SearchSpace) -> dict[str, FloatDistribution]:
    return {n: FloatDistribution(lo, hi) for n, (lo, hi) in zip(space.names, space.bounds)}


# ---- the loop ---------------------------------------------------------------------------------


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
    cfg: RunConfig, *, progress: bool = True, executor_factory: Callable[..., Executor] = make_executor
) -> SearchResult:
    """Run (or continue) every stage of the search until its budget is spent; the studies hold the record."""
    check_ray_job_storage(cfg)  # inside `ray job submit`: no SQLite study in Ray's temporary working directory
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    lock = None if cfg.execution.shared_study else RunLock(cfg.run_dir)  # before writing anything
    try:
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
            result = run_stage(cfg, stage, progress=progress, executor_factory=executor_factory)
        assert result is not None
        return result
    finally:
        if lock is not None:
            lock.release()


def run_stage(cfg: RunConfig, stage: str, *, progress: bool, executor_factory: Callable[..., Executor]) -> SearchResult:
    space = build_space(cfg, stage)
    _, opt, budget = cfg.search.stage(stage)
    racing = cfg.evaluation.racing
    sampler = make_sampler(
        opt.sampler, space, sigma0=opt.sigma0, seed=cfg.seed, popsize=opt.popsize, racing=racing is not None
    )
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
            reason = "budget: max_trials reached (already)"
        else:
            executor = executor_factory(cfg, space.decode(space.x0))
            try:
                reason = _loop(
                    budget, study, space, sampler, executor, progress, left, cfg.evaluation, stage_items(cfg, stage)
                )
            finally:
                executor.close()
        protocol = cfg.search.protocol_of(stage)
        if cfg.evaluation.rescore is not None or (protocol is not None and protocol.validation):
            rescore_elites(cfg, study, stage)
        return SearchResult(study, space, reason)


def elites(study: optuna.Study, top_k: int) -> list[FrozenTrial]:
    """The `top_k` best complete trials by search fitness, one per distinct recipe (cached duplicates left out)."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return [t for t in best_first(complete) if "cached_from" not in t.user_attrs][:top_k]


def rescore_elites(cfg: RunConfig, study: optuna.Study, stage: str = "ps") -> dict[int, dict]:
    """Re-score the elites on `evaluation.rescore`'s items (its split and limit, default every item of the task's
    split), or under the stage's protocol on its validation items, and record each one as it finishes (study user
    attr ``rescore:<trial>``: fitness, metrics, per-item record); the run's pick is then the best re-scored trial
    (`evolve.study.best_trial`). Elites already recorded are not scored again, so a run killed while re-scoring
    continues where it stopped."""
    from transformers import AutoTokenizer

    from evolve.fitness import Fitness
    from evolve.protocol import use_validation
    from evolve.worker import build_evaluators, item_totals, make_backend, score_items

    rs, protocol = cfg.evaluation.rescore, stage_items(cfg, stage)
    top_k = rs.top_k if rs is not None else protocol[0].top_k
    done = rescored(study)
    todo = [t for t in elites(study, top_k) if t.number not in done]
    if not todo:
        return done
    if rs is not None:
        evaluators = build_evaluators(
            list(cfg.evaluation.tasks), seed=cfg.seed, split=rs.split, limit=rs.limit, heldout=True
        )
        where = {"split": rs.split, "limit": rs.limit}
    else:
        evaluators = build_evaluators(list(cfg.evaluation.tasks), seed=cfg.seed)
        use_validation(evaluators, protocol[0].validation, protocol[1])
        where = {"validation": protocol[0].validation}
    totals, fitness = item_totals(evaluators), Fitness(cfg.evaluation.fitness)
    log.info(
        "re-scoring %d elite trials on %s: %s",
        len(todo),
        "more items" if rs is not None else "the validation items",
        [t.number for t in todo],
    )
    backend = make_backend(cfg, trial_recipe(todo[0]))  # the sources resident once, as in a search worker
    tokenizer = AutoTokenizer.from_pretrained(backend.tokenizer_path, trust_remote_code=cfg.models.trust_remote_code)
    with storage_errors(cfg):
        for t in todo:  # one at a time, each recorded at once
            backend.apply(trial_recipe(t))
            metrics, scores = score_items(evaluators, backend.model, tokenizer)
            items = encode_items(scores, totals)
            done[t.number] = {
                "fitness": fitness.score(metrics),
                "metrics": metrics,
                "items": items,
                "items_scored": items_scored(items),
                "tokens": tokens_generated(items),
                **where,
            }
            study.set_user_attr(f"{RESCORE_KEY}{t.number}", done[t.number])
            fault_point(f"sigkill-after-rescore:{study.study_name}:{t.number}")
    return done


def export_ps_best(cfg: RunConfig) -> Path:
    """Write the PS stage's best merge to RUN_DIR/ps_best (model A of a hybrid's DFS stage), once per best trial."""
    from evolve.worker import use_threads

    use_threads(cfg)
    recipe = trial_recipe(best_trial(load_study(cfg, "ps")))
    out = cfg.run_dir / "ps_best"
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
    protocol: tuple[Protocol, str] | None = None,
) -> str:
    dists = distributions(space)
    racing = evaluation.racing if evaluation is not None else None
    cap = min(executor.slots, sampler.max_parallel) if isinstance(sampler, PycmaSampler) else executor.slots
    trials = study.get_trials(deepcopy=False)
    cache = {_cache_key(t): t for t in trials if t.state == TrialState.COMPLETE and "recipe_hash" in t.user_attrs}
    state = LoopState.replay(budget, trials, study.directions)
    sign = signs(study.directions) if len(study.directions) > 1 else None
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
                or (stop is None and state.done + len(inflight) < budget.max_trials and _can_ask(sampler, study))
            ):
                trial = resume_trial(study, resumable.pop(0), dists) if resumable else study.ask(dists)
                beats.start(trial)
                recipe = space.decode([trial.params[n] for n in space.names])
                items = TrialItems.for_trial(protocol[0], trial.number, protocol[1]) if protocol else None
                batch = {"batch": items.attr()} if items is not None and items.attr() is not None else {}
                set_user_attrs(trial, {"recipe": recipe.to_yaml(), "recipe_hash": recipe.hash(), **batch})
                h = _cache_key(trial)
                if h in cache:  # an identical candidate is never evaluated twice (on the same items)
                    _tell_cached(study, trial, cache[h])
                    beats.stop(trial)
                    state.record(None, cached=True)  # a duplicate: counts for the budget only
                    bar.update(state.best, state.items)
                    continue
                race = _race(study, racing, evaluation.fitness, trial.number) if racing is not None else None
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
            _tell(study, trial, outcome, evaluation)
            beats.stop(trial)
            if outcome.ok:
                cache[_cache_key(trial)] = study._storage.get_trial(trial._trial_id)
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
            f"stopped after {state.failures} consecutive failed trials; last: {_last_fail_reason(study)}"
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
        sign = signs(directions) if directions and len(directions) > 1 else None
        for t in sorted(trials, key=lambda t: t.number):
            if counted(t):
                state.record(
                    _stored_value(t, sign) if t.state in (TrialState.COMPLETE, TrialState.PRUNED) else None,
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


def stage_items(cfg: RunConfig, stage: str) -> tuple[Protocol, str] | None:
    """The stage's item protocol and its config path (for error messages), or None."""
    protocol = cfg.search.protocol_of(stage)
    return None if protocol is None else (protocol, "search.protocol" if stage == "ps" else "search.dfs.protocol")


def _cache_key(trial: optuna.Trial | FrozenTrial) -> str:
    """Identical candidates share a score only when scored on the same items: the recipe hash, and under a
    protocol with batches, the batch."""
    batch = trial.user_attrs.get("batch")
    return trial.user_attrs["recipe_hash"] + (f"@batch{batch['index']}" if batch else "")


class Heartbeats:
    """A shared study's heartbeat of each trial this process runs (Optuna's heartbeat thread, as `study.optimize`
    keeps one), and, at most once per interval, the take-over of trials whose process died (`take_over_stale`).
    Nothing for a study without heartbeat (one process owns it; `resume` continues its trials in place)."""

    def __init__(self, study: optuna.Study):
        from optuna.storages._heartbeat import is_heartbeat_enabled

        self.study = study
        self.enabled = is_heartbeat_enabled(study._storage)
        self.threads: dict[int, object] = {}
        self.next_check = 0.0

    def check(self) -> None:
        if self.enabled and time.monotonic() >= self.next_check:
            take_over_stale(self.study)
            self.next_check = time.monotonic() + self.study._storage.get_heartbeat_interval()

    def start(self, trial: optuna.Trial) -> None:
        if self.enabled:
            from optuna.storages._heartbeat import HeartbeatThread

            # the first beat before anything else: a trial without one is never found stale (a process killed
            # before its thread's first beat would leave it RUNNING for good)
            self.study._storage.record_heartbeat(trial._trial_id)
            thread = HeartbeatThread(trial._trial_id, self.study._storage)
            thread.start()
            self.threads[trial.number] = thread

    def stop(self, trial: optuna.Trial) -> None:
        thread = self.threads.pop(trial.number, None)
        if thread is not None:
            thread.join()

    def close(self) -> None:
        for thread in self.threads.values():
            thread.join()
        self.threads.clear()


def _can_ask(sampler: optuna.samplers.BaseSampler, study: optuna.Study) -> bool:
    """pycma hands out a generation at a time: ask only when one of its candidates is free."""
    return not isinstance(sampler, PycmaSampler) or sampler.available(study) > 0


FITNESS_DIGITS = 10


def sampler_value(fitness: float) -> float:
    """The value told to the study (what samplers and `best_trial` see): the fitness rounded to FITNESS_DIGITS
    significant digits, so noise in the last bits of a float64 sum (summation order, library versions) never reaches
    the sampler, while any difference an evaluation can resolve (1 example in 10^9) still does. The exact fitness is
    kept in the trial's `fitness` user attr."""
    return float(f"{fitness:.{FITNESS_DIGITS}g}") if math.isfinite(fitness) else fitness


def metric_attrs(metrics: dict[str, float]) -> dict[str, float]:
    """Each metric also as a user attr of its own, named as the metric (`task/metric`; no other attr has a '/'), beside
    the `metrics` dict: a column optuna-dashboard shows, sorts and filters (it cannot look inside a dict)."""
    return dict(metrics)


def _tell(study: optuna.Study, trial: optuna.Trial, outcome: Outcome, evaluation: Evaluation | None = None) -> None:
    attrs = {key: getattr(outcome, key) for key in ("metrics", "merge_seconds", "eval_seconds", "worker")}
    attrs |= metric_attrs(outcome.metrics)
    if outcome.scores:  # items scored and tokens generated are in it (`items_scored`, `tokens_generated`)
        attrs["items"] = encode_items(outcome.scores, outcome.totals)
    if outcome.ok and outcome.values is None:
        attrs["fitness"] = outcome.fitness
    if outcome.ok and outcome.stopped:
        attrs["stopped"] = outcome.stopped
    if not outcome.ok:
        attrs["fail_reason"] = outcome.error
    set_user_attrs(trial, attrs)  # one transaction
    for n, value in outcome.steps:  # a race's estimate after each chunk (optuna-dashboard plots these)
        if math.isfinite(value):
            trial.report(sampler_value(value), step=n)
    if outcome.ok and outcome.stopped:
        study.tell(trial, state=TrialState.PRUNED)  # its value: the last estimate reported
    elif outcome.ok and outcome.values is not None:  # several objectives: each told as it is
        values = [sampler_value(v) for v in outcome.values]
        record_hypervolume(study, trial, values, evaluation.reference_point if evaluation else None)
        study.tell(trial, values)
    elif outcome.ok:
        study.tell(trial, sampler_value(outcome.fitness))
    else:
        study.tell(trial, state=TrialState.FAIL)


def told_value(outcome: Outcome, sign) -> float | tuple[float, ...]:
    """What the stop rules compare (`LoopState.record`): the fitness told, or the objectives (higher is better)."""
    if outcome.values is None:
        return sampler_value(outcome.fitness)
    return tuple(float(sampler_value(v) * s) for v, s in zip(outcome.values, sign))


def _stored_value(t: FrozenTrial, sign) -> float | tuple[float, ...]:
    """`told_value` of a trial in the record."""
    return t.value if sign is None else tuple(float(v * s) for v, s in zip(t.values, sign))


def record_hypervolume(study: optuna.Study, trial: optuna.Trial, values: list[float], configured) -> None:
    """The study's hypervolume once `trial` is told `values` (trial user attr `hypervolume`; `evolve.pareto`)."""
    ref = reference_point(study, configured, pending=values)
    if ref is None:
        return
    told = [t.values for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    trial.set_user_attr(HYPERVOLUME_ATTR, hypervolume([*told, values], study.directions, ref))


def incumbent(trials: list[FrozenTrial]) -> FrozenTrial | None:
    """The best complete trial whose every item was scored (what racing compares candidates with)."""
    return next((t for t in best_first(trials) if fully_scored(t.user_attrs.get("items"))), None)


def _race(study: optuna.Study, racing: Racing, terms: list, number: int) -> Race | None:
    """The race for the next candidate: against the incumbent's per-item fitness as stored (so a resumed search
    races exactly as an uninterrupted one); None (score every item) until a trial is fully scored."""
    best = incumbent(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    if best is None:
        return None
    items = best.user_attrs["items"]
    f = item_fitness(terms, decode_items(items), {t: int(r["of"]) for t, r in items.items()})
    return Race(
        incumbent={t: v.tolist() for t, v in f.items()},
        incumbent_trial=best.number,
        chunk=racing.chunk,
        alpha=racing.alpha,
        min_items=racing.min_items,
        test=racing.test,
        trial=number,
    )


def _tell_cached(study: optuna.Study, trial: optuna.Trial, source: FrozenTrial) -> None:
    attrs = {key: source.user_attrs.get(key) for key in ("metrics", "fitness")}
    attrs |= metric_attrs(source.user_attrs.get("metrics") or {})
    set_user_attrs(trial, {**attrs, "cached_from": source.number})
    study.tell(trial, source.values)  # one value, or one per objective


def _last_fail_reason(study: optuna.Study) -> str:
    fails = [
        t for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)) if not t.user_attrs.get("interrupted")
    ]
    return fails[-1].user_attrs.get("fail_reason", "unknown") if fails else "unknown"
