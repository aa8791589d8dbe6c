"""Every use of Optuna's private API, in one place.

evomerge goes through Optuna's public API (create/load/ask/tell, user attrs, `BaseSampler`) wherever it offers what
is needed. What it does not offer, and what evomerge needs, is here, each with the reason; no other module reads a
private Optuna name, except the two sampler subclasses in `evolve.samplers`, which override private hooks and read
the private attributes listed in `SAMPLER_INTERNALS`. `tests/evolve/test_optuna_api.py` exercises every function
here against a real study and checks each name of `SAMPLER_INTERNALS`, so an Optuna release that changes any of
them fails loudly (the drift check, `scripts/check-latest`, runs that test with the newest Optuna).

- Storage access (`study._storage`, `study._study_id`, `trial._trial_id`): pycma's state lives in study and trial
  *system* attrs (never shown as user data, nor by optuna-dashboard as such), which Optuna 5 exposes on no public
  object; a told trial's stored record is read straight from the storage (public: every trial of the study).
- One transaction for a trial's dozen user attrs on an RDB storage (`_rdb` internals): each public
  `set_user_attr` commits, a disk sync on SQLite.
- Heartbeats of a shared study (`_heartbeat`): evomerge's loop is ask/tell, not `study.optimize`, which is the only
  public user of the heartbeat thread; stale trials are taken over with an `interrupted` mark set *before* they are
  failed (public `fail_stale_trials` fails first, and a failed trial takes no attr), so no process counts one.
- Resuming a RUNNING trial in place: `optuna.Trial(study, id)` after dropping the study's thread-local trial cache,
  as `study.ask` does.
- The hypervolume (`optuna._hypervolume.compute_hypervolume`): no public function computes it.
- Sampler internals: `_SearchSpaceTransform` (CMA-ES's coordinate transform), `LazyRandomState` (the random
  streams reseeded per trial), a FrozenTrial's value set in a copy (a pruned trial given to GP as complete), and the
  uncached trial list GP reads.
"""

from __future__ import annotations

import copy
from collections.abc import Container
from typing import Any

import numpy as np
import optuna
from optuna._hypervolume import compute_hypervolume as _compute_hypervolume
from optuna._transform import _SearchSpaceTransform
from optuna.samplers._lazy_random_state import LazyRandomState
from optuna.storages import BaseStorage, RDBStorage
from optuna.storages._heartbeat import HeartbeatThread
from optuna.storages._heartbeat import is_heartbeat_enabled as _is_heartbeat_enabled
from optuna.trial import FrozenTrial, TrialState

SearchSpaceTransform = _SearchSpaceTransform
__all__ = [
    "SAMPLER_INTERNALS",
    "LazyRandomState",
    "SearchSpaceTransform",
    "compute_hypervolume",
    "frozen_trial",
    "heartbeat_enabled",
    "heartbeat_interval",
    "record_heartbeat",
    "reopen_trial",
    "set_study_system_attr",
    "set_trial_system_attr",
    "set_user_attrs_in_one_transaction",
    "stale_trial_ids",
    "storage",
    "study_id",
    "study_system_attrs",
    "trial_id",
    "trials_uncached",
    "with_value",
    "pruned_as_complete",
]

# Private names the sampler subclasses of `evolve.samplers` override or read: class -> names (checked by the test).
SAMPLER_INTERNALS: dict[type, tuple[str, ...]] = {
    optuna.samplers.CmaEsSampler: (
        "_restore_optimizer",  # overridden: the optimizer replayed from the plain record, never unpickled
        "_init_optimizer",
        "_cma_rng",
        "_with_margin",
        "_attr_key_generation",
    ),
    optuna.samplers.GPSampler: ("_sample_relative_impl",),  # overridden: pruned trials join its data under racing
}


def storage(study: optuna.Study) -> BaseStorage:
    return study._storage


def study_id(study: optuna.Study) -> int:
    return study._study_id


def trial_id(trial: optuna.Trial | FrozenTrial) -> int:
    return trial._trial_id


def frozen_trial(study: optuna.Study, trial: optuna.Trial | FrozenTrial) -> FrozenTrial:
    """The stored record of one trial (public: `study.get_trials()`, every trial of the study)."""
    return study._storage.get_trial(trial._trial_id)


def study_system_attrs(study: optuna.Study) -> dict[str, Any]:
    return study._storage.get_study_system_attrs(study._study_id)


def set_study_system_attr(study: optuna.Study, key: str, value: Any) -> None:
    study._storage.set_study_system_attr(study._study_id, key, value)


def set_trial_system_attr(study: optuna.Study, trial: optuna.Trial | FrozenTrial, key: str, value: Any) -> None:
    study._storage.set_trial_system_attr(trial._trial_id, key, value)


def trials_uncached(study: optuna.Study, states: Container[TrialState]) -> list[FrozenTrial]:
    """The study's trials in these states read from the storage, not the study's per-ask cache."""
    return study._get_trials(deepcopy=False, states=states, use_cache=False)


def reopen_trial(study: optuna.Study, trial: FrozenTrial) -> optuna.Trial:
    """A running `Trial` object for a stored RUNNING trial (as `study.ask` hands out), the study's trial cache
    dropped first so the sampler reads the current record."""
    study._thread_local.cached_all_trials = None
    return optuna.Trial(study, trial._trial_id)


def set_user_attrs_in_one_transaction(trial: optuna.Trial, attrs: dict[str, Any]) -> bool:
    """A running trial's user attrs in one transaction where its storage is an RDB (else False: nothing written).
    The `Trial` object's own copy is updated too, as `Trial.set_user_attr` does."""
    storage_ = trial.study._storage
    backend = getattr(storage_, "_backend", storage_)  # Optuna wraps an RDB in a cache
    if not isinstance(backend, RDBStorage):
        return False
    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session

    with _create_scoped_session(backend.scoped_session, True) as session:
        for key, value in attrs.items():
            backend._set_trial_attr_without_commit(session, models.TrialUserAttributeModel, trial._trial_id, key, value)
    trial._cached_frozen_trial.user_attrs.update(attrs)
    return True


def heartbeat_enabled(study: optuna.Study) -> bool:
    return _is_heartbeat_enabled(study._storage)


def heartbeat_interval(study: optuna.Study) -> int:
    return study._storage.get_heartbeat_interval()


def record_heartbeat(study: optuna.Study, trial: optuna.Trial) -> HeartbeatThread:
    """One heartbeat now, then a started thread that keeps beating until it is joined."""
    study._storage.record_heartbeat(trial._trial_id)
    thread = HeartbeatThread(trial._trial_id, study._storage)
    thread.start()
    return thread


def stale_trial_ids(study: optuna.Study) -> list[int]:
    """RUNNING trials whose heartbeat stopped for longer than the storage's grace period."""
    return study._storage._get_stale_trial_ids(study._study_id)


def compute_hypervolume(loss: np.ndarray, reference: np.ndarray) -> float:
    """The volume the loss points (minimized) dominate up to `reference`."""
    return float(_compute_hypervolume(loss, reference))


def pruned_as_complete(trial: FrozenTrial) -> FrozenTrial:
    """A PRUNED trial as a COMPLETE one whose value is its last reported value (under racing, the partial fitness
    estimate it was stopped at); a copy, the record is unchanged."""
    return with_value(trial, trial.intermediate_values[max(trial.intermediate_values)])


def with_value(trial: FrozenTrial, value: float, state: TrialState = TrialState.COMPLETE) -> FrozenTrial:
    """A copy of `trial` in `state` with this value (the record is unchanged)."""
    clone = copy.copy(trial)
    clone.state = state
    clone._values = [value]
    return clone
