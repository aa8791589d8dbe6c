"""pycma's CMA-ES behind Optuna's ask/tell, resumable from the study alone.

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

import math
from collections.abc import Sequence
from typing import Any

import cma
import numpy as np
import optuna
from optuna.distributions import BaseDistribution, FloatDistribution
from optuna.study import Study, StudyDirection
from optuna.trial import FrozenTrial, TrialState

from evolve import optuna_api
from merge_core.errors import EvomergeError

STATE_KEY = "pycma:state"
HISTORY_KEY = "pycma:history"  # + ":<generation>": {candidates, losses} told to that generation
REPLAY_TOLERANCE = 1e-12
GENERATION_KEY = "pycma:generation"
INDEX_KEY = "pycma:index"


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
