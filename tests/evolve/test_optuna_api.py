"""Every private Optuna name evomerge uses (`evolve/optuna_api.py`), exercised against real storages: an Optuna
release that renames or changes one of them fails here, by name (the drift check, `scripts/check-latest`, runs this
with the newest Optuna)."""

from __future__ import annotations

import inspect
import time
import warnings

import numpy as np
import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.storages import RDBStorage
from optuna.trial import TrialState

from evolve import optuna_api

DISTS = {"x": FloatDistribution(0.0, 1.0), "y": FloatDistribution(-1.0, 1.0)}


@pytest.fixture
def sqlite_url(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'study.db'}"


def test_system_attrs_and_stored_trials_through_the_storage(sqlite_url) -> None:
    study = optuna.create_study(study_name="s", storage=sqlite_url)
    trial = study.ask(DISTS)
    optuna_api.set_study_system_attr(study, "pycma:state", {"generation": 3})
    optuna_api.set_trial_system_attr(study, trial, "pycma:index", 2)
    again = optuna.load_study(study_name="s", storage=sqlite_url)
    assert optuna_api.study_system_attrs(again)["pycma:state"] == {"generation": 3}
    assert optuna_api.storage(study).get_study_id_from_name("s") == optuna_api.study_id(study)
    study.tell(trial, 0.5)
    stored = optuna_api.frozen_trial(study, trial)
    assert (stored.number, stored.value, stored.system_attrs["pycma:index"]) == (0, 0.5, 2)
    assert optuna_api.trial_id(stored) == optuna_api.trial_id(trial)
    assert [t.number for t in optuna_api.trials_uncached(again, states=(TrialState.COMPLETE,))] == [0]


def test_user_attrs_in_one_transaction_on_an_rdb_and_not_elsewhere(sqlite_url) -> None:
    study = optuna.create_study(study_name="s", storage=sqlite_url)
    trial = study.ask(DISTS)
    assert optuna_api.set_user_attrs_in_one_transaction(trial, {"a": 1, "b": [2, 3]})
    assert trial.user_attrs == {"a": 1, "b": [2, 3]}  # the Trial object's own copy
    assert optuna.load_study(study_name="s", storage=sqlite_url).trials[0].user_attrs == {"a": 1, "b": [2, 3]}
    memory = optuna.create_study()
    assert not optuna_api.set_user_attrs_in_one_transaction(memory.ask(DISTS), {"a": 1})


def test_a_running_trial_is_reopened_in_place(sqlite_url) -> None:
    study = optuna.create_study(study_name="s", storage=sqlite_url)
    left = study.ask({"x": DISTS["x"]})  # asked for x only, then "the process died"
    reopened = optuna_api.reopen_trial(optuna.load_study(study_name="s", storage=sqlite_url), study.trials[0])
    assert reopened.number == left.number
    y = reopened.suggest_float("y", -1.0, 1.0)
    assert -1.0 <= y <= 1.0 and set(optuna_api.frozen_trial(study, reopened).params) == {"x", "y"}


def test_heartbeats_and_stale_trials(sqlite_url) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        storage = RDBStorage(sqlite_url, heartbeat_interval=1, grace_period=1)
        study = optuna.create_study(study_name="s", storage=storage)
        assert not optuna_api.heartbeat_enabled(optuna.create_study())
        assert optuna_api.heartbeat_enabled(study) and optuna_api.heartbeat_interval(study) == 1
        trial = study.ask(DISTS)
    thread = optuna_api.record_heartbeat(study, trial)
    thread.join()  # the heartbeat stops: the trial goes stale after the grace period
    assert optuna_api.stale_trial_ids(study) == []
    time.sleep(2.5)
    assert optuna_api.stale_trial_ids(study) == [optuna_api.trial_id(trial)]


def test_hypervolume_of_two_points() -> None:
    loss = np.array([[1.0, 2.0], [2.0, 1.0]])
    assert optuna_api.compute_hypervolume(loss, np.array([3.0, 3.0])) == pytest.approx(3.0)


def test_a_trial_copy_with_another_state_and_value() -> None:
    study = optuna.create_study()
    trial = study.ask(DISTS)
    trial.report(0.25, step=4)
    study.tell(trial, state=TrialState.PRUNED)
    pruned = study.trials[0]
    copy = optuna_api.with_value(pruned, 0.25)
    assert (copy.state, copy.value, pruned.state) == (TrialState.COMPLETE, 0.25, TrialState.PRUNED)
    estimate = optuna_api.pruned_as_complete(pruned)
    assert (estimate.state, estimate.value, pruned.state) == (TrialState.COMPLETE, 0.25, TrialState.PRUNED)


def test_sampler_internals_exist_with_the_signatures_the_subclasses_use() -> None:
    trans = optuna_api.SearchSpaceTransform(DISTS, transform_step=True, transform_0_1=True)
    assert trans.bounds.shape == (2, 2) and np.allclose(trans.transform({"x": 0.5, "y": 0.0}), [0.5, 0.5])
    assert isinstance(optuna_api.LazyRandomState(0).rng, np.random.RandomState)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        instances = {cls: cls(seed=0) for cls in optuna_api.SAMPLER_INTERNALS}
    for cls, names in optuna_api.SAMPLER_INTERNALS.items():
        missing = [n for n in names if not hasattr(instances[cls], n)]
        assert not missing, f"{cls.__name__} no longer has {missing}: evolve.samplers relies on them"
    restore = inspect.signature(optuna.samplers.CmaEsSampler._restore_optimizer)
    assert list(restore.parameters) == ["self", "completed_trials"]
    init = inspect.signature(optuna.samplers.CmaEsSampler._init_optimizer)
    assert list(init.parameters)[:3] == ["self", "trans", "direction"]
    impl = inspect.signature(optuna.samplers.GPSampler._sample_relative_impl)
    assert list(impl.parameters)[:4] == ["self", "study", "completed_trials", "running_trials"]
