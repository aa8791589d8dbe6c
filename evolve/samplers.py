"""Optuna samplers for the search loop, reseeded per trial, and the factory the config names.

``sigma0`` means one thing for every CMA-ES sampler: the initial standard deviation of each parameter as a fraction
of its bounds' width (Optuna's ``CmaEsSampler`` searches the box normalized to [0, 1]; pycma gets ``sigma0`` with
``CMA_stds`` = the widths), so ``sigma0: 1/6`` puts the initial spread at a sixth of every parameter's range.

Resume means the same search. The loop continues a trial a dead process left RUNNING in place (same number; the
parameters its ask had not stored yet are sampled then). `make_sampler` returns Optuna's samplers with
`_ReseedPerTrial` mixed in, which reseeds every random stream they hold from (seed, trial number, parameter) before
each draw, so a trial's proposal depends only on the seed, its number and the study's record, not on the process.

The pycma sampler is `evolve.pycma_sampler.PycmaSampler`.
"""

from __future__ import annotations

import copy
import hashlib
import warnings
from typing import Any, get_args

import numpy as np
import optuna
from optuna.distributions import BaseDistribution
from optuna.study import Study, StudyDirection
from optuna.trial import FrozenTrial, TrialState

from evolve import optuna_api
from evolve.config import SamplerName
from evolve.pycma_sampler import PycmaSampler
from merge_core.errors import EvomergeError
from search_spaces.base import SearchSpace

SAMPLERS: tuple[str, ...] = get_args(SamplerName)


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

    # overrides a private hook and reads private attrs: each listed in optuna_api.SAMPLER_INTERNALS (tested there)
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

    # overrides a private hook: listed in optuna_api.SAMPLER_INTERNALS (tested there)
    def _sample_relative_impl(
        self, study: Study, completed_trials: list[FrozenTrial], running_trials: list[FrozenTrial], *args: Any
    ) -> Any:
        if self._consider_pruned:
            pruned = optuna_api.trials_uncached(study, states=(TrialState.PRUNED,))
            completed_trials = completed_trials + [
                optuna_api.pruned_as_complete(t) for t in pruned if t.intermediate_values
            ]
        return super()._sample_relative_impl(study, completed_trials, running_trials, *args)


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
