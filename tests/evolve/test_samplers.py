"""PycmaSampler driven through Optuna's ask/tell on sqlite: progress, exact resume, seeding, x0; the factory."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

from evolve.pycma_sampler import GENERATION_KEY, INDEX_KEY, PycmaSampler
from evolve.samplers import make_sampler
from merge_core.errors import EvomergeError

optuna.logging.set_verbosity(optuna.logging.WARNING)

NAMES = ["a", "b", "c"]
X0 = [0.5, 0.5, 0.5]
BOUNDS = [(0.0, 1.0)] * 3
TARGET = [0.2, 0.7, 0.4]
DISTRIBUTIONS = {n: FloatDistribution(low, high) for n, (low, high) in zip(NAMES, BOUNDS)}
POPSIZE = 6


def quadratic(params: dict[str, float]) -> float:
    return sum((params[n] - t) ** 2 for n, t in zip(NAMES, TARGET))


def sampler(seed: int = 0, popsize: int | None = POPSIZE) -> PycmaSampler:
    return PycmaSampler(NAMES, X0, BOUNDS, sigma0=0.2, seed=seed, popsize=popsize)


def storage(tmp_path: Path, name: str) -> optuna.storages.RDBStorage:
    """sqlite in tmp_path without fsync: the same SQL and JSON round trips, fast on a busy disk."""
    path = tmp_path / f"{name}.db"

    def connect() -> sqlite3.Connection:
        connection = sqlite3.connect(path, check_same_thread=False)
        connection.execute("PRAGMA synchronous=OFF")
        return connection

    return optuna.storages.RDBStorage(f"sqlite:///{path}", engine_kwargs={"creator": connect})


def system_attrs(study: optuna.Study, trial: optuna.Trial) -> dict:
    return study._storage.get_trial(trial._trial_id).system_attrs


def new_study(
    tmp_path: Path | None, name: str = "", direction: str = "minimize", seed: int = 1, enqueue_x0: bool = True
) -> optuna.Study:
    """On sqlite in tmp_path, or in memory when tmp_path is None."""
    study = optuna.create_study(
        storage=tmp_path and storage(tmp_path, name), study_name="s", direction=direction, sampler=sampler(seed)
    )
    if enqueue_x0:
        study.enqueue_trial(dict(zip(NAMES, X0)))
    return study


def reopen(tmp_path: Path, name: str) -> optuna.Study:
    """What a new process does: a new sampler object on the stored study."""
    return optuna.load_study(storage=storage(tmp_path, name), study_name="s", sampler=sampler(seed=1))


def run(study: optuna.Study, n: int, sign: float = 1.0) -> list[dict[str, float]]:
    """Sequential ask/tell as the loop does it; returns the params asked, in order."""
    asked = []
    for _ in range(n):
        trial = study.ask(DISTRIBUTIONS)
        asked.append(dict(trial.params))
        study.tell(trial, sign * quadratic(trial.params))
    return asked


def generation_means(study: optuna.Study, sign: float) -> list[float]:
    by_generation: dict[int, list[float]] = {}
    for t in study.get_trials(states=(TrialState.COMPLETE,)):
        if GENERATION_KEY in t.system_attrs:
            by_generation.setdefault(t.system_attrs[GENERATION_KEY], []).append(sign * t.value)
    assert all(len(v) == POPSIZE for v in by_generation.values())
    return [float(np.mean(by_generation[g])) for g in sorted(by_generation)]


def test_pycma_improves_over_generations_in_either_direction(tmp_path: Path) -> None:
    minimized = new_study(tmp_path, "min")
    maximized = new_study(tmp_path, "max", direction="maximize")
    asked = run(minimized, 1 + 8 * POPSIZE)
    assert run(maximized, 1 + 8 * POPSIZE, sign=-1.0) == asked  # maximizing -f is minimizing f
    losses = generation_means(minimized, 1.0)  # mean quadratic per generation
    assert generation_means(maximized, -1.0) == losses and len(losses) == 8
    assert losses[-1] < losses[0] / 5
    best = minimized.best_params
    assert maximized.best_params == best and max(abs(best[n] - t) for n, t in zip(NAMES, TARGET)) < 0.1


def test_pycma_resumes_exactly_between_generations(tmp_path: Path) -> None:
    total, cut = 1 + 5 * POPSIZE, 1 + 2 * POPSIZE + POPSIZE // 2  # x0, then 2.5 of 5 generations
    uninterrupted = run(new_study(None), total)
    first = run(new_study(tmp_path, "cut"), cut)
    second = run(reopen(tmp_path, "cut"), total - cut)
    assert first + second == uninterrupted  # exact float equality
    assert len({tuple(p.values()) for p in uninterrupted}) == total


@pytest.mark.parametrize("index", [3, POPSIZE - 1])  # mid-generation; the last slot, whose failure closes it
def test_pycma_resume_reruns_a_trial_left_running(tmp_path: Path, index: int) -> None:
    total = 1 + 3 * POPSIZE
    uninterrupted = run(new_study(None), total)

    study = new_study(tmp_path, "cut")
    before = run(study, 1 + POPSIZE + index)  # x0, generation 0, then `index` trials of generation 1
    left_running = study.ask(DISTRIBUTIONS)  # the process dies while this one is evaluated
    slot = system_attrs(study, left_running)
    assert (slot[GENERATION_KEY], slot[INDEX_KEY]) == (1, index)

    resumed = reopen(tmp_path, "cut")  # the loop's resume: FAIL what was left RUNNING, re-enqueue its params
    for t in resumed.get_trials(states=(TrialState.RUNNING,)):
        resumed.tell(t.number, state=TrialState.FAIL)
        resumed.enqueue_trial(t.params)
    after = run(resumed, total - len(before))

    assert after[0] == left_running.params
    assert before + after == uninterrupted  # generation 2 equals the uninterrupted run's
    rerun = resumed.get_trials()[len(before) + 1]
    assert (rerun.state, rerun.system_attrs[GENERATION_KEY], rerun.system_attrs[INDEX_KEY]) == (
        TrialState.COMPLETE,
        1,
        index,
    )


def test_pycma_tells_failures_the_worst_loss_of_their_generation() -> None:
    study = new_study(None, direction="maximize", enqueue_x0=False)
    trials = [study.ask(DISTRIBUTIONS) for _ in range(POPSIZE)]
    for i, trial in enumerate(trials):
        study.tell(trial, state=TrialState.FAIL) if i == 2 else study.tell(trial, -quadratic(trial.params))
    next_generation = run(study, POPSIZE, sign=-1.0)

    es = sampler(seed=1)._new_es()  # the same ES by hand: same seed, the failure told the worst loss
    candidates = es.ask()
    assert [list(t.params.values()) for t in trials] == [c.tolist() for c in candidates]
    losses = [quadratic(dict(zip(NAMES, c))) for c in candidates]
    losses[2] = max(losses[:2] + losses[3:])
    es.tell(candidates, losses)
    assert [list(p.values()) for p in next_generation] == [c.tolist() for c in es.ask()]


def test_pycma_generation_barrier() -> None:
    study = new_study(None, enqueue_x0=False)
    pycma = study.sampler
    assert pycma.max_parallel == POPSIZE and sampler(popsize=None).max_parallel == 4 + int(3 * np.log(3))
    assert pycma.available(study) == POPSIZE
    trials = [study.ask(DISTRIBUTIONS) for _ in range(POPSIZE)]
    assert pycma.available(study) == 0
    with pytest.raises(RuntimeError, match="all 6 candidates of generation 0 are handed out and 6 are not"):
        study.ask(DISTRIBUTIONS)
    study.tell(study.get_trials()[-1].number, state=TrialState.FAIL)  # the refused ask's trial
    for trial in trials[:-1]:
        study.tell(trial, quadratic(trial.params))
    assert pycma.available(study) == 0  # one candidate still running
    study.tell(trials[-1], quadratic(trials[-1].params))
    assert pycma.available(study) == POPSIZE
    assert system_attrs(study, study.ask(DISTRIBUTIONS))[GENERATION_KEY] == 1


def test_pycma_seeded_and_leaves_numpy_global_rng_alone(tmp_path: Path) -> None:
    global_state = np.random.get_state()[1].copy()
    same_a = run(new_study(tmp_path, "a", seed=7), 2 * POPSIZE + 1)
    same_b = run(new_study(None, seed=7), 2 * POPSIZE + 1)
    other = run(new_study(None, seed=8), 2 * POPSIZE + 1)
    assert same_a == same_b
    assert same_a[0] == other[0] == dict(zip(NAMES, X0))  # the enqueued x0
    assert all(p != q for p, q in zip(same_a[1:], other[1:]))
    assert np.array_equal(np.random.get_state()[1], global_state)


def test_pycma_enqueued_x0_runs_first_and_takes_no_candidate(tmp_path: Path) -> None:
    with_x0 = new_study(tmp_path, "x0")
    first = with_x0.ask(DISTRIBUTIONS)
    assert first.params == dict(zip(NAMES, X0)) and GENERATION_KEY not in system_attrs(with_x0, first)
    with_x0.tell(first, quadratic(first.params))
    with_x0_rest = run(with_x0, POPSIZE + 1)
    without_x0 = run(new_study(None, enqueue_x0=False), POPSIZE + 1)
    assert with_x0_rest == without_x0
    slots = [(t.system_attrs[GENERATION_KEY], t.system_attrs[INDEX_KEY]) for t in with_x0.get_trials()[1:]]
    assert slots == [(0, i) for i in range(POPSIZE)] + [(1, 0)]


def test_pycma_rejects_another_popsize_and_a_foreign_parameter() -> None:
    study = new_study(None)
    run(study, 2)
    study.sampler = PycmaSampler(NAMES, X0, BOUNDS, sigma0=0.2, seed=1, popsize=POPSIZE + 1)
    with pytest.raises(EvomergeError, match="started with 3 parameters and popsize 6, this sampler has 3 and 7"):
        study.ask(DISTRIBUTIONS)
    study.sampler = sampler(seed=1)
    with pytest.raises(EvomergeError, match="parameter 'z' with .* is outside the sampler's fixed search space"):
        study.ask({"z": FloatDistribution(0.0, 1.0)})


def test_make_sampler_kinds_and_bad_name() -> None:
    kwargs = dict(space=SimpleNamespace(names=NAMES, x0=X0, bounds=BOUNDS), sigma0=0.2, seed=3, popsize=POPSIZE)
    cmaes = make_sampler("cmaes", **kwargs)
    assert isinstance(cmaes, optuna.samplers.CmaEsSampler)
    assert (cmaes._x0, cmaes._sigma0, cmaes._popsize) == (dict(zip(NAMES, X0)), 0.2, POPSIZE)
    pycma = make_sampler("pycma", **kwargs)
    assert isinstance(pycma, PycmaSampler) and pycma.max_parallel == POPSIZE
    assert isinstance(make_sampler("tpe", **kwargs), optuna.samplers.TPESampler)
    assert isinstance(make_sampler("random", **kwargs), optuna.samplers.RandomSampler)
    nsga2 = make_sampler("nsga2", **kwargs)
    assert isinstance(nsga2, optuna.samplers.NSGAIISampler) and nsga2._population_size == POPSIZE
    assert isinstance(make_sampler("gp", **kwargs), optuna.samplers.GPSampler)
    assert not cmaes._consider_pruned_trials and make_sampler("cmaes", racing=True, **kwargs)._consider_pruned_trials
    with pytest.raises(EvomergeError) as err:
        make_sampler("x", **kwargs)
    assert str(err.value) == "search.optimizer.sampler: 'x' is not one of cmaes, pycma, tpe, random, nsga2, gp"


@pytest.mark.parametrize(
    "kind, streams",
    [
        ("cmaes", ["._cma_rng", "._independent_sampler._rng"]),
        ("tpe", ["._random_sampler._rng", "._rng"]),
        ("random", ["._rng"]),
        ("nsga2", ["._random_sampler._rng", "._rng"]),
    ],
)
def test_optuna_samplers_propose_from_the_seed_trial_number_and_record_alone(kind: str, streams: list[str]) -> None:
    """Trial n's proposal must not depend on what the sampler object drew before (a resumed process starts fresh):
    a sampler that first served another study proposes, on a copy of the record, exactly the original trial n."""
    from evolve.samplers import _random_states

    kwargs = dict(space=SimpleNamespace(names=NAMES, x0=X0, bounds=BOUNDS), sigma0=0.2, seed=3, popsize=4)
    assert [path for path, _ in _random_states(make_sampler(kind, **kwargs))] == streams  # every stream it draws from
    original = optuna.create_study(sampler=make_sampler(kind, **kwargs))
    original.enqueue_trial(dict(zip(NAMES, X0)))
    asked = run(original, 14)
    assert len({tuple(p.values()) for p in asked}) >= 12
    for n in (1, 5, 11, 13):  # random start-up, CMA's second generation, TPE's model-based trials
        used = make_sampler(kind, **kwargs)
        run(optuna.create_study(sampler=used), 3)  # advances every stream of `used`
        copy = optuna.create_study(sampler=used)
        copy.add_trials(original.get_trials()[:n])
        assert copy.ask(DISTRIBUTIONS).params == asked[n]


def test_pycma_trial_left_running_mid_ask_gets_its_candidate_back_in_place(tmp_path: Path) -> None:
    from evolve.study import resume_trial

    total = 1 + 3 * POPSIZE
    uninterrupted = run(new_study(None), total)
    study = new_study(tmp_path, "cut")
    before = run(study, 1 + POPSIZE + 2)  # x0, generation 0, two of generation 1
    dying = study.ask()  # the process dies after its first parameter was stored
    dying.suggest_float("a", 0.0, 1.0)
    resumed = reopen(tmp_path, "cut")  # a new process: a new sampler on the stored study
    left = resumed.get_trials(states=(TrialState.RUNNING,))
    assert [t.number for t in left] == [len(before)] and list(left[0].params) == ["a"]
    trial = resume_trial(resumed, left[0], DISTRIBUTIONS)
    assert trial.number == len(before) and trial.params == uninterrupted[len(before)]
    assert (system_attrs(resumed, trial)[GENERATION_KEY], system_attrs(resumed, trial)[INDEX_KEY]) == (1, 2)
    resumed.tell(trial, quadratic(trial.params))
    assert before + [trial.params] + run(resumed, total - len(before) - 1) == uninterrupted


def test_gp_under_racing_learns_from_stopped_trials_with_their_partial_estimate(monkeypatch) -> None:
    """Optuna's GPSampler fits COMPLETE trials only; under racing (`consider_pruned_trials`) a PRUNED trial joins
    its data as COMPLETE with its last reported value, and the study's record is left as it was."""
    from evolve.samplers import ReseededGPSampler

    seen: list[list[tuple[str, float]]] = []

    def record(self, study, completed, running, search_space):
        seen.append([(t.state.name, t.value) for t in completed])
        return {}

    monkeypatch.setattr(optuna.samplers.GPSampler, "_sample_relative_impl", record)
    dists = {"x": FloatDistribution(0.0, 1.0)}
    for racing, expected in ((False, 10), (True, 13)):
        seen.clear()
        study = optuna.create_study(
            direction="maximize", sampler=ReseededGPSampler(seed=0, n_startup_trials=10, consider_pruned_trials=racing)
        )
        for i in range(13):
            trial = study.ask(dists)
            if i % 4 == 3:  # three raced candidates stopped after two looks
                trial.report(0.1, step=40)
                trial.report(0.05 * i, step=80)
                study.tell(trial, state=TrialState.PRUNED)
            else:
                study.tell(trial, float(i))
        study.ask(dists)
        assert len(seen[-1]) == expected
        assert all(state == "COMPLETE" for state, _ in seen[-1])
        if racing:
            told = [v for _, v in seen[-1]]
            assert all(any(v == pytest.approx(0.05 * i) for v in told) for i in (3, 7, 11))  # the last estimates
        assert sum(t.state == TrialState.PRUNED for t in study.trials) == 3
