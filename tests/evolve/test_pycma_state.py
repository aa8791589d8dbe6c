"""PycmaSampler's state in the study is plain JSON, replayed in a new process; a pickle in a study is never loaded,
neither by pycma nor by the default `cmaes` (Optuna's CMA-ES, whose optimizer evomerge rebuilds by replay).
sigma0 is a fraction of each parameter's range for both CMA-ES samplers."""

from __future__ import annotations

import base64
import json
import pickle
import warnings
from pathlib import Path

import numpy as np
import optuna
import pytest
from optuna.distributions import FloatDistribution

from evolve.pycma_sampler import HISTORY_KEY, STATE_KEY, PycmaSampler
from evolve.samplers import ReseededCmaEsSampler
from merge_core.errors import EvomergeError

optuna.logging.set_verbosity(optuna.logging.WARNING)

NAMES, X0, BOUNDS, POP = ["a", "b"], [0.5, 0.5], [(0.0, 1.0), (0.0, 1.0)], 4
DISTS = {n: FloatDistribution(lo, hi) for n, (lo, hi) in zip(NAMES, BOUNDS)}


def new_sampler() -> PycmaSampler:
    return PycmaSampler(NAMES, X0, BOUNDS, sigma0=0.2, seed=3, popsize=POP)


def open_study(url: str) -> optuna.Study:
    return optuna.create_study(storage=url, study_name="s", sampler=new_sampler(), load_if_exists=True)


def run(study: optuna.Study, n: int) -> list[dict[str, float]]:
    asked = []
    for _ in range(n):
        trial = study.ask(DISTS)
        asked.append(dict(trial.params))
        study.tell(trial, (trial.params["a"] - 0.2) ** 2 + (trial.params["b"] - 0.7) ** 2)
    return asked


def system_attrs(study: optuna.Study) -> dict:
    return study._storage.get_study_system_attrs(study._study_id)


class Marker:
    """Unpickling this creates `path`: proof that a pickle was loaded."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_state_is_plain_json_and_a_new_process_replays_it_exactly(tmp_path):
    url = f"sqlite:///{tmp_path / 'a.db'}"
    whole = run(optuna.create_study(sampler=new_sampler()), 5 * POP)
    first = run(open_study(url), 2 * POP + 1)
    study = open_study(url)  # a new sampler object: replays the two stored generations
    second = run(study, 3 * POP - 1)
    assert first + second == whole
    attrs = system_attrs(study)
    assert set(attrs[STATE_KEY]) == {"generation", "candidates"} and attrs[STATE_KEY]["generation"] == 4
    assert sorted(k for k in attrs if k.startswith(HISTORY_KEY)) == [f"{HISTORY_KEY}:{g}" for g in range(4)]
    assert json.loads(json.dumps(attrs)) == attrs


def test_a_pickle_in_the_study_is_never_unpickled(tmp_path):
    url = f"sqlite:///{tmp_path / 'crafted.db'}"
    marker = tmp_path / "pwned"
    payload = base64.b64encode(pickle.dumps(Marker(marker))).decode()
    study = open_study(url)
    run(study, POP + 1)  # in generation 1 now
    storage = study._storage
    state = system_attrs(study)[STATE_KEY]
    storage.set_study_system_attr(study._study_id, STATE_KEY, {**state, "es": payload})  # the old, pickled layout
    storage.set_study_system_attr(study._study_id, f"{HISTORY_KEY}:0", payload)
    with pytest.raises(EvomergeError, match=f"{HISTORY_KEY}:0 is not the sampler's state"):
        run(open_study(url), POP)
    storage.set_study_system_attr(study._study_id, f"{HISTORY_KEY}:0", None)
    with pytest.raises(EvomergeError, match="is not the sampler's state"):
        run(open_study(url), POP)
    assert not marker.exists()


def test_a_study_with_the_old_pickled_state_is_refused_without_unpickling(tmp_path):
    marker = tmp_path / "pwned"
    study = open_study(f"sqlite:///{tmp_path / 'old.db'}")
    state = {
        "generation": 1,
        "candidates": [[0.5, 0.5]] * POP,
        "es": base64.b64encode(pickle.dumps(Marker(marker))).decode(),
    }  # what evomerge stored before
    study._storage.set_study_system_attr(study._study_id, STATE_KEY, state)
    run(study, POP)  # the stored candidates are handed out as they are
    with pytest.raises(EvomergeError, match=f"has no {HISTORY_KEY}:0 .*older evomerge, whose pickled state is never"):
        run(study, 1)
    assert not marker.exists()


def test_a_replay_that_asks_otherwise_is_refused(tmp_path):
    url = f"sqlite:///{tmp_path / 'b.db'}"
    study = open_study(url)
    run(study, 2 * POP + 1)
    key = f"{HISTORY_KEY}:1"
    told = system_attrs(study)[key]
    told["candidates"][0][0] += 1e-9  # what another numpy/pycma build would have asked
    study._storage.set_study_system_attr(study._study_id, key, told)
    with pytest.raises(EvomergeError, match="made with another pycma/numpy"):
        run(open_study(url), POP)


def first_generation_spread(sampler, bounds: tuple[float, float], n: int) -> float:
    study = optuna.create_study(sampler=sampler)
    dists = {"a": FloatDistribution(*bounds), "b": FloatDistribution(*bounds)}
    values = []
    for _ in range(n):
        trial = study.ask(dists)
        values.append([trial.params["a"], trial.params["b"]])
        study.tell(trial, 0.0)
    return float(np.std(np.asarray(values[1:]) - (bounds[0] + bounds[1]) / 2)) / (bounds[1] - bounds[0])


@pytest.mark.parametrize("bounds", [(0.0, 1.0), (0.0, 20.0)])
def test_sigma0_is_a_fraction_of_each_range_for_both_cma_samplers(bounds):
    mid = (bounds[0] + bounds[1]) / 2
    pycma = PycmaSampler(["a", "b"], [mid, mid], [bounds, bounds], sigma0=0.05, seed=0, popsize=40)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cmaes = optuna.samplers.CmaEsSampler(x0={"a": mid, "b": mid}, sigma0=0.05, seed=0, popsize=40)
    spreads = [first_generation_spread(s, bounds, 41) for s in (pycma, cmaes)]
    assert all(0.03 < s < 0.08 for s in spreads), spreads  # 0.05 of the width, whatever the width


def test_pycma_candidates_scale_with_the_box():
    def generation(width: float) -> np.ndarray:
        s = PycmaSampler(["a", "b"], [width / 2] * 2, [(0.0, width)] * 2, sigma0=0.1, seed=4, popsize=6)
        return np.asarray(s._new_es().ask())

    assert np.allclose(generation(10.0), 10 * generation(1.0), rtol=1e-9, atol=0)


# ---- Optuna's CmaEsSampler (the default `cmaes`): rebuilt by replay, never unpickled ------------------------------


class PicklingCmaEs(ReseededCmaEsSampler):
    """The same sampler with Optuna's own restore (unpickle the stored optimizer): the reference trajectory."""

    _restore_optimizer = optuna.samplers.CmaEsSampler._restore_optimizer


def cmaes_run(sampler_cls: type, n: int, url: str | None = None) -> list[tuple[dict[str, float], float]]:
    names = ["a", "b", "c"]
    study = optuna.create_study(
        storage=url,
        study_name="s",
        load_if_exists=True,
        direction="maximize",
        sampler=sampler_cls(x0=dict.fromkeys(names, 0.5), sigma0=0.2, seed=3, popsize=4),
    )
    dists = {k: optuna.distributions.FloatDistribution(0.0, 1.0) for k in names}
    out = []
    for _ in range(n):
        trial = study.ask(dists)
        value = -sum((trial.params[k] - t) ** 2 for k, t in zip(names, (0.2, 0.7, 0.4)))
        study.tell(trial, value)
        out.append((trial.params, value))
    return out


def test_cmaes_replay_proposes_what_optunas_unpickled_optimizer_proposes():
    reference = cmaes_run(PicklingCmaEs, 6 * 4 + 2)
    assert cmaes_run(ReseededCmaEsSampler, 6 * 4 + 2) == reference  # five tells replayed, same proposals


def test_cmaes_never_unpickles_the_study_and_stores_no_pickle(tmp_path):
    url = f"sqlite:///{tmp_path / 'c.db'}"
    marker = tmp_path / "pwned"
    cmaes_run(ReseededCmaEsSampler, 4 * 4 + 1, url)
    study = optuna.load_study(study_name="s", storage=url)
    stored = [k for t in study.trials for k in t.system_attrs if k.startswith("cma:optimizer")]
    assert stored == []  # nothing pickled was written
    crafted = study.ask(
        {k: FloatDistribution(0.0, 1.0) for k in "abc"}
    )  # a completed trial carrying a pickled "optimizer": what a crafted study holds
    study._storage.set_trial_system_attr(crafted._trial_id, "cma:optimizer:0", pickle.dumps(Marker(marker)).hex())
    study.tell(crafted, 0.0)
    with pytest.raises(AttributeError):  # Optuna's own restore would load it: proof the payload is live
        cmaes_run(PicklingCmaEs, 1, url)
    assert marker.exists()
    marker.unlink()
    cmaes_run(ReseededCmaEsSampler, 4, url)
    assert not marker.exists()


def test_cmaes_replay_tells_each_generation_once_per_process(monkeypatch):
    """The replay continues from where the previous ask's ended: over 12 generations of 4, one tell per full
    generation (11 before the 49th ask; a replay from scratch on every ask made 264), and still
    Optuna's own trajectory."""
    import cmaes

    tells = []
    real_tell = cmaes.CMA.tell
    monkeypatch.setattr(cmaes.CMA, "tell", lambda self, solutions: tells.append(1) or real_tell(self, solutions))
    ours = cmaes_run(ReseededCmaEsSampler, 12 * 4 + 1)
    assert len(tells) == 11
    tells.clear()
    assert cmaes_run(PicklingCmaEs, 12 * 4 + 1) == ours
