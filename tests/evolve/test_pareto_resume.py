"""A multi-objective search killed anywhere (while asking, while evaluating, between the hypervolume record and the
tell) and resumed ends with the uninterrupted run's trials, values, hypervolumes, reference point and front.

In process, as tests/evolve/test_resume.py: a "kill" is a BaseException raised at the chosen point, which leaves the
study as SIGKILL would; each resume is a new `run_search` (new sampler, study object and connection). One real
SIGKILL of `evolve run` through the CLI closes the file."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from evolve import trials
from evolve.config import parse_config
from evolve.loop import run_search
from evolve.pareto import REFERENCE_ATTR, balanced, pareto_front
from tests.evolve.harness import resume
from tests.evolve.harness import run_killed as cli_run_killed
from tests.evolve.test_pareto import TradeOffExecutor, mo_data
from tests.evolve.test_resume import Killed, killing_asks

TRIALS = 12


@pytest.fixture
def fast_dir():
    base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    path = Path(tempfile.mkdtemp(prefix="evomerge-pareto-resume-", dir=base))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def record(cfg) -> tuple[list[tuple], dict, int]:
    study = optuna.load_study(study_name=cfg.name, storage=cfg.storage_url)
    trials = study.get_trials()
    rows = [(t.number, t.state, t.params, t.values, t.user_attrs.get("hypervolume")) for t in trials]
    front = pareto_front(trials, study.directions)
    return rows, study.user_attrs[REFERENCE_ATTR], balanced(front, study.directions).number


@pytest.fixture(autouse=True)
def trade_off(monkeypatch):
    TradeOffExecutor.evaluated = []
    monkeypatch.setitem(run_search.__kwdefaults__, "executor_factory", TradeOffExecutor)


class KillingExecutor(TradeOffExecutor):
    kill_at: dict[int, BaseException] = {}

    def wait(self):
        key = self.pending[0][0]
        if key in KillingExecutor.kill_at:
            self.pending.pop(0)
            raise KillingExecutor.kill_at.pop(key)
        return super().wait()


@pytest.mark.parametrize("sampler", ["nsga2", "tpe", "gp", "random"])
def test_killed_while_asking_evaluating_and_telling_resumes_into_the_uninterrupted_run(sampler, fast_dir, monkeypatch):
    whole = parse_config(mo_data(fast_dir / "whole", sampler, TRIALS))
    run_search(whole, progress=False)
    expected = record(whole)
    assert all(state == TrialState.COMPLETE for _, state, *_ in expected[0])

    cfg = parse_config(mo_data(fast_dir / "killed", sampler, TRIALS))
    monkeypatch.setitem(run_search.__kwdefaults__, "executor_factory", KillingExecutor)
    KillingExecutor.kill_at = {7: Killed("killed while evaluating trial 7")}
    killing_asks(monkeypatch, {0: 1, 5: 2, 10: 3})
    told = trials.record_hypervolume

    def die_before_tell(study, trial, values, configured):  # the hypervolume stored, the tell not yet made
        told(study, trial, values, configured)
        if trial.number == 3 and not getattr(die_before_tell, "done", False):
            die_before_tell.done = True
            raise Killed("killed between the hypervolume record and the tell of trial 3")

    monkeypatch.setattr(trials, "record_hypervolume", die_before_tell)
    for number in (0, 3, 5, 7, 10):
        with pytest.raises(Killed):
            run_search(cfg, progress=False)
        study = optuna.load_study(study_name=cfg.name, storage=cfg.storage_url)
        assert [t.number for t in study.trials if t.state == TrialState.RUNNING] == [number]
    run_search(cfg, progress=False)
    assert record(cfg) == expected


@pytest.mark.slow  # two CLI processes on the zoo, ~35 s; the kill points above cover the same record in process
def test_sigkill_of_the_cli_run_then_resume_loses_nothing(fast_dir):
    """A real process, SIGKILLed right after trial 4 went to the worker, then `evolve resume` (real worker)."""
    data = mo_data(fast_dir / "run", "nsga2", 6)
    data["evaluation"]["tasks"][0]["limit"] = 20
    path = fast_dir / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    killed = cli_run_killed(path, "pareto", 4)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    cfg = parse_config(data)
    before = optuna.load_study(study_name=cfg.name, storage=cfg.storage_url).get_trials()
    assert [t.state for t in before] == [TrialState.COMPLETE] * 4 + [TrialState.RUNNING]
    resumed = resume(fast_dir / "run")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    after = optuna.load_study(study_name=cfg.name, storage=cfg.storage_url).get_trials()
    assert [(t.number, t.values, t.user_attrs["hypervolume"]) for t in after[:4]] == [
        (t.number, t.values, t.user_attrs["hypervolume"]) for t in before[:4]
    ]
    assert len(after) == 6 and all(t.state == TrialState.COMPLETE and len(t.values) == 2 for t in after)
    assert after[4].params == before[4].params  # continued in place
    assert "Pareto front:" in resumed.stdout
