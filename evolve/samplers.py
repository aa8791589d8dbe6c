"""Optuna samplers for the search loop: pycma's CMA-ES behind Optuna's ask/tell, and the factory the config names.

``sigma0`` means one thing for every CMA-ES sampler: the initial standard deviation of each parameter as a fraction
of its bounds' width (Optuna's ``CmaEsSampler`` searches the box normalized to [0, 1]; pycma gets ``sigma0`` with
``CMA_stds`` = the widths), so ``sigma0: 1/6`` puts the initial spread at a sixth of every parameter's range.

Resume means the same search. The loop continues a trial a dead process left RUNNING in place (same number; the
parameters its ask had not stored yet are sampled then). `make_sampler` returns Optuna's samplers with
`_ReseedPerTrial` mixed in, which reseeds every random stream they hold from (seed, trial number, parameter) before
each draw, so a trial's proposal depends only on the seed, its number and the study's record, not on the process.

`PycmaSampler` keeps all of its state in the study, as plain JSON (never a pickle: a study database can come from
someone else, and unpickling runs code), so a sampler built in a new process on the same storage continues exactly
where the last one stopped:

- Generations. `es.ask()` produces a whole generation once; its candidates are stored in the study system attr
  ``pycma:state`` (``{generation, candidates}``). Each new trial takes the next unused candidate and records it in
  its own system attrs ``pycma:generation`` and ``pycma:index`` (a candidate "slot").
- Tell. The generation is told lazily: when a trial needs a candidate and every slot is handed out and finished,
  the sampler calls ``es.tell(candidates, losses)`` and ``es.ask()`` for the next generation, stores what it told
  in ``pycma:history:<generation>`` (``{candidates, losses}``) and then the new state. Loss is ``value`` when
  minimizing and ``-value`` when maximizing.
- Replay. The ES lives in memory. A sampler in a new process rebuilds it from the study: a new ES from (x0,
  sigma0, seed, popsize, bounds), then ``ask`` + ``tell(stored candidates, stored losses)`` per stored generation,
  once per process. pycma is deterministic given its ``randn``, so every replayed ``ask`` equals the stored
  candidates; if one differs (by more than 1e-12) the study was made with another pycma or numpy, and the sampler
  refuses it (EvomergeError) rather than continue another search.
- Failures. A slot whose trials all FAILed or were PRUNED (or whose value is not finite) is told the worst finite
  loss of its generation (the worst of the whole study if the generation has none), so CMA ranks it last.
- Re-runs. A trial enqueued with exactly the params of a failed slot of the current generation (what evomerge
  before in-place resume did for trials a dead process left RUNNING) takes that slot over, so its value is what
  CMA is told; since the tell waits until a candidate is needed, the re-run's value reaches CMA even when the
  failure closed the generation (as long as it is enqueued before the next ask; later, it is only an extra
  evaluation).
- Other enqueued trials (the evaluated ``x0``) keep their fixed params and take no candidate.
- Randomness. pycma's ``randn`` option gets a private generator seeded with ``seed``, replayed with the ES
  (pycma's own ``seed`` option would seed numpy's global RNG).
- Concurrency. pycma cannot take a tell for a partial generation, so once every candidate of a generation is
  handed out, the next ask must wait until all of them are finished; asking anyway raises ``RuntimeError`` (and
  leaves the refused trial RUNNING, without params). ``max_parallel`` (= popsize) bounds how many trials can be
  in flight, but capping at it is not enough: ``available(study)`` says how many asks can be made now without
  that error. Asks must come from one thread and one process at a time.
"""

from __future__ import annotations

import copy
import hashlib
import math
import warnings
from collections.abc import Sequence
from typing import Any, get_args

import cma
import numpy as np
import optuna
from optuna.distributions import BaseDistribution, FloatDistribution
from optuna.study import Study, StudyDirection
from optuna.trial import FrozenTrial, TrialState

from evolve import optuna_api
from evolve.config import SamplerName
from merge_core.errors import EvomergeError
from search_spaces.base import SearchSpace

STATE_KEY = "pycma:state"
HISTORY_KEY = "pycma:history"  # + ":<generation>": {candidates, losses} told to that generation
REPLAY_TOLERANCE = 1e-12
GENERATION_KEY = "pycma:generation"
INDEX_KEY = "pycma:index"

SAMPLERS: tuple[str, ...] = get_args(SamplerName)


class _SeededRandn:
    """pycma's ``randn`` option from a private seeded generator; a replayed ES draws the same stream.

    pycma's own ``seed`` option seeds numpy's global RNG, which we never touch.
    """

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def __call__(self, *shape: int) -> np.ndarray:
        return self.rng.standard_normal(shape)


class PycmaSampler(optuna.samplers.BaseSampler):
    """CMA-ES from the ``cma`` package over a fixed box of FloatDistributions, resumable from the study alone."""

    def __init__(
        self,
        names: list[str],
        x0: list[float],
        bounds: list[tuple[float, float]],
        sigma0: float,
        seed: int,
        popsize: int | None = None,
    ) -> None:
        if not names or len(x0) != len(names) or len(bounds) != len(names):
            raise EvomergeError(
                f"pycma: names, x0 and bounds must have the same non-zero length, "
                f"got {len(names)}, {len(x0)}, {len(bounds)}"
            )
        for name, x, (low, high) in zip(names, x0, bounds):
            if not low < high or not low <= x <= high:
                raise EvomergeError(f"pycma: {name}: x0 {x} must lie in bounds [{low}, {high}] with low < high")
        if not sigma0 > 0:
            raise EvomergeError(f"pycma: sigma0 must be > 0, got {sigma0}")
        if popsize is not None and popsize < 2:
            raise EvomergeError(f"pycma: popsize must be >= 2, got {popsize}")
        self._names = list(names)
        self._x0 = [float(x) for x in x0]
        self._bounds = [(float(low), float(high)) for low, high in bounds]
        self._sigma0 = float(sigma0)
        self._seed = seed
        self._popsize = popsize
        self._space = {n: FloatDistribution(low, high) for n, (low, high) in zip(self._names, self._bounds)}
        self.max_parallel: int = self._new_es().popsize  # pycma's default popsize when None: 4 + floor(3 ln d)
        self._es: cma.CMAEvolutionStrategy | None = None  # asked the generation `_es_at`, not yet told
        self._es_at: tuple[int, int, list[list[float]]] | None = None  # (study id, generation, its candidates)

    def _new_es(self) -> cma.CMAEvolutionStrategy:
        lows, highs = zip(*self._bounds)
        options = {
            "bounds": [list(lows), list(highs)],
            "randn": _SeededRandn(self._seed),
            "seed": math.nan,
            "CMA_stds": [high - low for low, high in self._bounds],  # sigma0 in units of each range's width
            "verbose": -9,
            "verb_disp": 0,
            "verb_log": 0,
        }
        if self._popsize is not None:
            options["popsize"] = self._popsize
        return cma.CMAEvolutionStrategy(self._x0, self._sigma0, options)

    # Optuna's sampler interface

    def infer_relative_search_space(self, study: Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return dict(self._space)

    def sample_relative(
        self, study: Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        if not search_space or trial.system_attrs.get("fixed_params"):
            return {}  # an enqueued trial: its params are given, it takes no candidate
        self._raise_error_if_multi_objective(study)
        state = self._load_state(study)
        if trial.system_attrs.get(GENERATION_KEY) == state["generation"]:  # already holds a slot
            return self._params(state["candidates"][trial.system_attrs[INDEX_KEY]])
        slots = _slots(study, state["generation"])
        free = [i for i in range(len(state["candidates"])) if i not in slots]
        if not free:
            state = self._next_generation(study, state, slots)
            free = [0]
        optuna_api.set_trial_system_attr(study, trial, GENERATION_KEY, state["generation"])
        optuna_api.set_trial_system_attr(study, trial, INDEX_KEY, free[0])
        return self._params(state["candidates"][free[0]])

    def sample_independent(
        self, study: Study, trial: FrozenTrial, param_name: str, param_distribution: BaseDistribution
    ) -> Any:
        if param_name not in self._space or not trial.system_attrs.get("fixed_params"):
            raise EvomergeError(
                f"pycma: parameter {param_name!r} with {param_distribution} is outside the "
                f"sampler's fixed search space {sorted(self._space)} and bounds"
            )
        return self._x0[self._names.index(param_name)]  # an enqueued trial that fixes only some params

    def before_trial(self, study: Study, trial: FrozenTrial) -> None:
        """An enqueued re-run of a failed candidate of the current generation takes over its slot."""
        fixed = trial.system_attrs.get("fixed_params")
        state = _stored_state(study) if fixed and GENERATION_KEY not in trial.system_attrs else None
        if state is None:
            return
        for index, owners in _slots(study, state["generation"]).items():
            if _failed(owners) and fixed == owners[-1].params:
                optuna_api.set_trial_system_attr(study, trial, GENERATION_KEY, state["generation"])
                optuna_api.set_trial_system_attr(study, trial, INDEX_KEY, index)
                return

    def available(self, study: Study) -> int:
        """How many ``study.ask`` calls can be made now without the in-flight ``RuntimeError``."""
        waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
        state = _stored_state(study)
        if state is None:
            return len(waiting) + self.max_parallel
        slots = _slots(study, state["generation"])
        free = len(state["candidates"]) - len(slots)
        if free:
            return len(waiting) + free
        rerun = [t.system_attrs.get("fixed_params") for t in waiting]
        done = all(
            _loss(study, owners) is not None and not (_failed(owners) and owners[-1].params in rerun)
            for owners in slots.values()
        )
        return len(waiting) + (len(state["candidates"]) if done else 0)

    # State

    def _load_state(self, study: Study) -> dict[str, Any]:
        state = _stored_state(study)
        if state is None:
            es = self._new_es()
            state = _save_state(study, 0, es.ask())
            self._es, self._es_at = es, (optuna_api.study_id(study), 0, state["candidates"])
        _check_generation(state, STATE_KEY)
        started = (len(state["candidates"][0]), len(state["candidates"]))
        if started != (len(self._names), self.max_parallel):
            raise EvomergeError(
                f"pycma: the study was started with {started[0]} parameters and popsize "
                f"{started[1]}, this sampler has {len(self._names)} and {self.max_parallel}; "
                f"use a new study name"
            )
        return state

    def _next_generation(
        self, study: Study, state: dict[str, Any], slots: dict[int, list[FrozenTrial]]
    ) -> dict[str, Any]:
        generation, candidates = state["generation"], state["candidates"]
        losses = [_loss(study, slots[i]) for i in range(len(candidates))]
        running = sum(loss is None for loss in losses)
        if running:
            raise RuntimeError(
                f"PycmaSampler: all {len(candidates)} candidates of generation {generation} are "
                f"handed out and {running} are not finished; ask at most "
                f"sampler.available(study) trials (sampler.max_parallel={self.max_parallel} "
                f"per generation)"
            )
        finite = [loss for loss in losses if math.isfinite(loss)] or _study_losses(study)
        if not finite:
            raise EvomergeError(
                f"pycma: every trial so far failed (generation {generation}); check the evaluation before searching"
            )
        losses = [loss if math.isfinite(loss) else max(finite) for loss in losses]
        es = self._es_asked(study, state)
        optuna_api.set_study_system_attr(
            study, f"{HISTORY_KEY}:{generation}", {"candidates": candidates, "losses": losses}
        )
        es.tell([np.asarray(c, dtype=float) for c in candidates], losses)
        state = _save_state(study, generation + 1, es.ask())
        self._es_at = (optuna_api.study_id(study), generation + 1, state["candidates"])
        return state

    def _es_asked(self, study: Study, state: dict[str, Any]) -> cma.CMAEvolutionStrategy:
        """The ES that asked ``state``'s generation: the one in memory, else rebuilt by replaying the study's history
        (a new ES, then ask + tell(stored candidates, stored losses) per generation), once per process."""
        generation = state["generation"]
        if self._es is not None and self._es_at == (optuna_api.study_id(study), generation, state["candidates"]):
            return self._es
        attrs = optuna_api.study_system_attrs(study)
        es = self._new_es()
        for g in range(generation):
            key = f"{HISTORY_KEY}:{g}"
            if key not in attrs:
                raise EvomergeError(
                    f"pycma: study '{study.study_name}' has no {key} to rebuild its CMA-ES from (made "
                    f"by an older evomerge, whose pickled state is never loaded); use a new study name"
                )
            told = attrs[key]
            _check_generation(told, key, with_losses=True)
            _check_replay(es.ask(), told["candidates"], key)
            es.tell([np.asarray(c, dtype=float) for c in told["candidates"]], [float(v) for v in told["losses"]])
        _check_replay(es.ask(), state["candidates"], f"{STATE_KEY} (generation {generation})")
        self._es, self._es_at = es, (optuna_api.study_id(study), generation, state["candidates"])
        return es

    def _params(self, candidate: Sequence[float]) -> dict[str, float]:
        return {n: min(max(float(x), low), high) for n, x, (low, high) in zip(self._names, candidate, self._bounds)}


def _stored_state(study: Study) -> dict[str, Any] | None:
    return optuna_api.study_system_attrs(study).get(STATE_KEY)


def _save_state(study: Study, generation: int, candidates: list[np.ndarray]) -> dict[str, Any]:
    state = {"generation": generation, "candidates": [[float(x) for x in c] for c in candidates]}
    optuna_api.set_study_system_attr(study, STATE_KEY, state)
    return state


def _check_generation(stored: Any, key: str, with_losses: bool = False) -> None:
    """A stored generation is plain JSON of the right shape, or a one-line error (the database is not trusted)."""
    ok = isinstance(stored, dict) and isinstance(stored.get("candidates"), list) and stored["candidates"]
    ok = ok and all(
        isinstance(c, list) and c and all(isinstance(x, (int, float)) for x in c) for c in stored["candidates"]
    )
    ok = ok and len({len(c) for c in stored["candidates"]}) == 1
    if not with_losses:
        ok = ok and isinstance(stored.get("generation"), int) and stored["generation"] >= 0
    else:
        losses = stored.get("losses") if ok else None
        ok = (
            isinstance(losses, list)
            and len(losses) == len(stored["candidates"])
            and all(isinstance(v, (int, float)) and math.isfinite(v) for v in losses)
        )
    if not ok:
        raise EvomergeError(
            f"pycma: the study's {key} is not the sampler's state (generation, candidates"
            f"{', losses' if with_losses else ''}); use a new study name"
        )


def _check_replay(asked: list[np.ndarray], stored: list[list[float]], key: str) -> None:
    """Replaying must ask exactly what was stored: otherwise this is not the search the study recorded."""
    if len(asked) != len(stored) or np.asarray(asked).shape != np.asarray(stored).shape:
        raise EvomergeError(
            f"pycma: replaying {key} asked {len(asked)} candidates, the study stored {len(stored)}; "
            f"use a new study name"
        )
    diff = float(np.max(np.abs(np.asarray(asked, dtype=float) - np.asarray(stored, dtype=float))))
    if not diff <= REPLAY_TOLERANCE:
        raise EvomergeError(
            f"pycma: replaying the study's CMA-ES differs from its {key} by {diff:.3g}: the study was "
            f"made with another pycma/numpy version (or CPU); resume it there, or use a new study name"
        )


def _slots(study: Study, generation: int) -> dict[int, list[FrozenTrial]]:
    """Candidate index -> the trials that took it (several after a re-run), in trial order."""
    slots: dict[int, list[FrozenTrial]] = {}
    for t in study.get_trials(deepcopy=False):
        if t.system_attrs.get(GENERATION_KEY) == generation:
            slots.setdefault(t.system_attrs[INDEX_KEY], []).append(t)
    return slots


def _failed(owners: list[FrozenTrial]) -> bool:
    return all(t.state in (TrialState.FAIL, TrialState.PRUNED) for t in owners)


def _loss(study: Study, owners: list[FrozenTrial]) -> float | None:
    """The slot's loss: from its completed trial (or a raced trial stopped early: its partial estimate), ``nan`` if
    all its trials failed, None while one runs."""
    sign = -1.0 if study.direction == StudyDirection.MAXIMIZE else 1.0
    for t in owners:
        if t.state == TrialState.COMPLETE or (t.state == TrialState.PRUNED and t.value is not None):
            return sign * t.value if math.isfinite(t.value) else math.nan
    return math.nan if _failed(owners) else None


def _study_losses(study: Study) -> list[float]:
    sign = -1.0 if study.direction == StudyDirection.MAXIMIZE else 1.0
    return [
        sign * t.value
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if math.isfinite(t.value)
    ]


class _ReseedPerTrial:
    """Mixed into Optuna's samplers by `make_sampler`: a trial's proposal depends only on (seed, trial number, the
    study's record), never on how many draws this sampler object made before.

    Optuna's samplers draw from NumPy ``RandomState`` streams (``LazyRandomState``: ``CmaEsSampler._cma_rng`` and
    its independent ``RandomSampler``, ``TPESampler._rng`` and its ``RandomSampler``, ``RandomSampler._rng``,
    ``NSGAIISampler._rng`` shared with its child-generation strategy) that advance with every draw, so a sampler
    built by a new process (``evolve resume``) would start them over and propose other trials than the
    uninterrupted run. Before every ``sample_relative`` and every ``sample_independent`` call this mixin reseeds each
    of those streams from a hash of (seed, trial number, ``"relative"`` or the parameter's name, the stream's
    attribute path). Keying by parameter too means a trial whose ask a dead process left half done is completed
    with exactly the values the uninterrupted process would have drawn for its missing parameters.
    """

    def __init__(self, *args: Any, seed: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, seed=seed, **kwargs)
        self._reseed_base = seed

    def _reseed(self, trial: FrozenTrial, key: str) -> None:
        if self._reseed_base is None:
            return
        for path, rng in _random_states(self):
            digest = hashlib.sha256(f"{self._reseed_base}:{trial.number}:{key}:{path}".encode()).digest()
            rng.seed(int.from_bytes(digest[:4], "little"))

    def sample_relative(
        self, study: Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        self._reseed(trial, "relative")
        return super().sample_relative(study, trial, search_space)

    def sample_independent(
        self, study: Study, trial: FrozenTrial, param_name: str, param_distribution: BaseDistribution
    ) -> Any:
        self._reseed(trial, f"param:{param_name}")
        return super().sample_independent(study, trial, param_name, param_distribution)


def _random_states(sampler: optuna.samplers.BaseSampler) -> list[tuple[str, np.random.RandomState]]:
    """Every NumPy RandomState a sampler draws from (its own and its delegate samplers'), with attribute paths."""
    found: dict[int, tuple[str, np.random.RandomState]] = {}

    def walk(obj: Any, path: str) -> None:
        for attr, value in sorted(vars(obj).items()):
            if isinstance(value, optuna_api.LazyRandomState):
                value = value.rng
            if isinstance(value, np.random.RandomState):
                found.setdefault(id(value), (f"{path}.{attr}", value))
            elif isinstance(value, optuna.samplers.BaseSampler):
                walk(value, f"{path}.{attr}")

    walk(sampler, "")
    return list(found.values())


def _raw_copy(optimizer: Any) -> Any:
    """An exact copy of a cmaes optimizer: its attributes deep-copied one by one (`copy.deepcopy` of the object goes
    through its pickle state, which rebuilds C from one triangle: not the same object when C is not exactly
    symmetric)."""
    clone = object.__new__(type(optimizer))
    clone.__dict__.update({k: copy.deepcopy(v) for k, v in optimizer.__dict__.items()})
    return clone


class ReseededCmaEsSampler(_ReseedPerTrial, optuna.samplers.CmaEsSampler):
    """Optuna's CMA-ES, reseeded per trial (see `_ReseedPerTrial`), whose optimizer is rebuilt from the study's plain
    record instead of unpickled from it.

    Optuna's ``CmaEsSampler`` stores its ``cmaes`` optimizer pickled in trial system attrs (``cma:optimizer:<i>``)
    and ``pickle.loads`` it on every ask: a crafted study database would run code. Here ``_restore_optimizer``
    never reads those attrs: it builds a fresh optimizer (as ``_init_optimizer`` does) and replays ``tell`` for
    every generation that has ``popsize`` completed trials (their params and values, in trial order: what Optuna
    told). The replayed optimizer is the one Optuna would have unpickled (its random state aside, which Optuna
    reseeds before every ask), so the search is unchanged; and since every full generation is told during the
    replay, the sampler never reaches the branch that pickles an optimizer into the study.
    """

    def sample_relative(
        self, study: Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        self._replay_from = (study, search_space)
        return super().sample_relative(study, trial, search_space)

    @property
    def _replayed(self) -> dict[tuple[int, int], tuple[list[tuple[int, ...]], Any, Any]]:
        """(study id, dimension) -> (trial numbers told per generation, the optimizer before and after the last
        tell): where the previous ask's replay ended."""
        if not hasattr(self, "_replay_cache"):
            self._replay_cache: dict = {}
        return self._replay_cache

    def _restore_optimizer(self, completed_trials: list[FrozenTrial], *args: Any, **kwargs: Any) -> Any:
        study, search_space = self._replay_from
        trans = optuna_api.SearchSpaceTransform(search_space, transform_step=not self._with_margin, transform_0_1=True)
        rng_state = self._cma_rng.rng.get_state()
        optimizer = self._init_optimizer(trans, study.direction)  # draws a seed from _cma_rng
        sign = 1.0 if study.direction == StudyDirection.MINIMIZE else -1.0
        by_generation: dict[int, list[FrozenTrial]] = {}  # as `_get_solution_trials`, for every generation at once
        for t in completed_trials:
            by_generation.setdefault(t.system_attrs.get(self._attr_key_generation, -1), []).append(t)
        told, used = None, []
        key = (optuna_api.study_id(study), len(trans.bounds))
        cached = self._replayed.get(key)
        if cached is not None and optimizer.dim == len(trans.bounds):
            # the generations told last time, unchanged (finished trials never change): continue from that optimizer
            pop = optimizer.population_size
            if all(tuple(t.number for t in by_generation.get(g, [])[:pop]) == nums for g, nums in enumerate(cached[0])):
                used, told, optimizer = list(cached[0]), _raw_copy(cached[1]), _raw_copy(cached[2])
        while True:
            solution_trials = by_generation.get(optimizer.generation, [])
            if optimizer.dim != len(trans.bounds) or len(solution_trials) < optimizer.population_size:
                break
            told = optimizer  # the object Optuna asks from right after its own tell
            batch = solution_trials[: optimizer.population_size]
            optimizer.tell([(trans.transform(t.params), sign * t.value) for t in batch])
            used.append(tuple(t.number for t in batch))
            optimizer = copy.deepcopy(optimizer)  # the round trip of Optuna's stored pickle (it re-symmetrizes C)
        if used:  # kept for the next ask: the replay tells each generation once per process, not once per ask
            self._replayed[key] = (used, _raw_copy(told), _raw_copy(optimizer))
        generations = {t.system_attrs.get(self._attr_key_generation, 0) for t in completed_trials}
        if optimizer.generation > 0 and optimizer.generation not in generations:
            optimizer = told  # the last tell is this trial's: Optuna would ask from the object it just told
        # Optuna draws that seed only while no completed trial holds a stored optimizer, i.e. until the trial that
        # made the first tell (the first of generation >= 1) has completed; keep its random stream exactly.
        told_before = max(generations, default=0) >= 1
        if told_before or optimizer.generation == 0:
            self._cma_rng.rng.set_state(rng_state)
        return optimizer if optimizer.generation > 0 else None  # None: Optuna initializes it, as before any tell


class ReseededTPESampler(_ReseedPerTrial, optuna.samplers.TPESampler):
    """Optuna's TPE, reseeded per trial and parameter (see `_ReseedPerTrial`)."""


class ReseededRandomSampler(_ReseedPerTrial, optuna.samplers.RandomSampler):
    """Optuna's random sampler, reseeded per trial and parameter (see `_ReseedPerTrial`)."""


class ReseededNSGAIISampler(_ReseedPerTrial, optuna.samplers.NSGAIISampler):
    """Optuna's NSGA-II, reseeded per trial and parameter (see `_ReseedPerTrial`)."""


class ReseededGPSampler(_ReseedPerTrial, optuna.samplers.GPSampler):
    """Optuna's Gaussian-process sampler (log EI), reseeded per trial (see `_ReseedPerTrial`). It warm-starts each
    kernel fit from the previous one held in memory, so a resumed search may ask slightly different trials than an
    uninterrupted one. Optuna's GPSampler fits COMPLETE trials only; with `consider_pruned_trials` (set under
    racing) a PRUNED trial joins its data with its last reported value, the race's partial estimate, as CMA-ES is
    told it: without them it learned from 12 of 150 raced trials."""

    def __init__(self, *args: Any, consider_pruned_trials: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._consider_pruned = consider_pruned_trials

    def _sample_relative_impl(
        self, study: Study, completed_trials: list[FrozenTrial], running_trials: list[FrozenTrial], *args: Any
    ) -> Any:
        if self._consider_pruned:
            pruned = optuna_api.trials_uncached(study, states=(TrialState.PRUNED,))
            completed_trials = completed_trials + [_as_complete(t) for t in pruned if t.intermediate_values]
        return super()._sample_relative_impl(study, completed_trials, running_trials, *args)


def _as_complete(trial: FrozenTrial) -> FrozenTrial:
    """A PRUNED trial as a COMPLETE one whose value is its last reported value (a copy; the record is unchanged)."""
    return optuna_api.with_value(trial, trial.intermediate_values[max(trial.intermediate_values)])


def make_sampler(
    name: str, space: SearchSpace, *, sigma0: float, seed: int, popsize: int | None = None, racing: bool = False
) -> optuna.samplers.BaseSampler:
    """The sampler the config's ``search.optimizer.sampler`` names. Optuna's samplers come reseeded per trial
    (`_ReseedPerTrial`) and PycmaSampler keeps its state in the study, so with the same seed a resumed search asks
    exactly the trials the uninterrupted one would have asked.

    With `racing`, a candidate stopped early is a PRUNED trial whose value is its partial fitness estimate (an
    unbiased estimate on a random subset of the items, below the incumbent). CMA-ES is told it as the trial's value
    (``consider_pruned_trials``; by default Optuna's CMA-ES drops pruned trials, so every stopped candidate would be
    lost to it and a generation would wait for survivors only); pycma uses it too; TPE ranks pruned trials below
    complete ones by itself; GP and random ignore them."""
    if name == "cmaes":
        with warnings.catch_warnings():  # x0 and sigma0 are deprecated since Optuna 4.9 (removal planned for 6.0)
            warnings.filterwarnings("ignore", message="`(x0|sigma0)` has been deprecated", category=FutureWarning)
            warnings.filterwarnings("ignore", message=".*consider_pruned_trials.*")  # experimental argument
            return ReseededCmaEsSampler(
                x0=dict(zip(space.names, space.x0)),
                sigma0=sigma0,
                seed=seed,
                popsize=popsize,
                consider_pruned_trials=racing,
            )
    if name == "gp":
        return ReseededGPSampler(seed=seed, warn_independent_sampling=False, consider_pruned_trials=racing)
    if name == "pycma":
        return PycmaSampler(space.names, space.x0, space.bounds, sigma0, seed, popsize)
    if name == "tpe":
        return ReseededTPESampler(seed=seed)
    if name == "random":
        return ReseededRandomSampler(seed=seed)
    if name == "nsga2":
        return ReseededNSGAIISampler(seed=seed, **({} if popsize is None else {"population_size": popsize}))
    raise EvomergeError(f"search.optimizer.sampler: {name!r} is not one of {', '.join(SAMPLERS)}")
