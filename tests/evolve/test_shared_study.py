"""A shared study (`execution.shared_study`, several `evolve run` processes on one study): each process keeps a
heartbeat of its running trials, and a trial whose process was SIGKILLed is failed (not counted) and its parameters
re-run by the next process, so the study ends with its full budget of finished trials and nothing left RUNNING."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import optuna
from optuna.trial import TrialState

from evolve.config import load_config
from evolve.study import counted, load_study
from tests.evolve.harness import QUIET, ROOT, evolve_cli, run_killed, write_config

SHARED = {"execution.shared_study": True, "execution.heartbeat_s": 1, "search.budget.max_trials": 6}


def test_a_killed_process_trial_is_re_run_by_the_next_one(tmp_path, world):
    cfg_path = write_config(tmp_path, world, **SHARED)
    killed = run_killed(cfg_path, "t", 3)
    assert killed.returncode == -9, killed.stderr[-2000:]
    cfg = load_config(cfg_path)
    before = {t.number: t for t in load_study(cfg).get_trials(deepcopy=False)}
    assert before[3].state == TrialState.RUNNING
    storage = optuna.storages.RDBStorage(cfg.storage_url)
    assert storage.get_trial(before[3]._trial_id).state == TrialState.RUNNING
    time.sleep(5)  # past the grace period (3 heartbeats; SQLite keeps whole seconds) since its last heartbeat
    second = evolve_cli("run", str(cfg_path), *QUIET)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "trial 3: its process stopped (no heartbeat); re-running its parameters" in second.stderr
    trials = load_study(cfg).get_trials(deepcopy=False)
    assert not [t.number for t in trials if t.state == TrialState.RUNNING]
    assert trials[3].state == TrialState.FAIL and trials[3].user_attrs["interrupted"] is True
    retry = [t for t in trials if t.user_attrs.get("retry_of") == 3]
    assert len(retry) == 1 and retry[0].state == TrialState.COMPLETE and retry[0].params == before[3].params
    assert sum(counted(t) for t in trials) == 6
    # the finished trials of the killed process are kept as they were
    assert [(t.number, t.value) for t in trials[:3]] == [(n, before[n].value) for n in range(3)]


def test_a_trial_has_its_first_heartbeat_before_it_goes_to_a_worker(tmp_path):
    """The first beat is written at once, not by the thread later: a process killed in between would otherwise leave
    a trial no one ever finds stale."""
    from evolve.study import Heartbeats

    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 's.db'}", heartbeat_interval=60)
    study = optuna.create_study(storage=storage)
    trial = study.ask()
    beats = Heartbeats(study)
    started = []
    real = optuna.storages._heartbeat.HeartbeatThread.start
    optuna.storages._heartbeat.HeartbeatThread.start = lambda self: started.append(self)  # no thread beats
    try:
        beats.start(trial)
    finally:
        optuna.storages._heartbeat.HeartbeatThread.start = real
    assert started and storage.get_heartbeat_interval() == 60
    with storage.scoped_session() as session:
        from optuna.storages._rdb import models

        assert models.TrialHeartbeatModel.where_trial_id(trial._trial_id, session) is not None
    beats.threads.clear()


def test_two_processes_share_the_studys_budget(tmp_path, world):
    """Two `evolve run` processes at once on one shared study: together they finish exactly max_trials trials (each
    counts the study's trials, the other's running ones included, before it asks), not max_trials each."""
    budget = 40
    cfg_path = write_config(tmp_path, world, **{**SHARED, "search.budget.max_trials": budget})
    command = [sys.executable, "-m", "evolve.cli", "run", str(cfg_path), *QUIET]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    runs = [subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)]
    runs.append(subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [r.communicate(timeout=600) for r in runs]
    for r, (out, err) in zip(runs, outputs):
        assert r.returncode == 0, err[-2000:]
        assert "stopped: budget: max_trials reached" in out, out
    trials = load_study(load_config(cfg_path)).get_trials(deepcopy=False)
    assert sum(counted(t) for t in trials) == budget
    assert not [t.number for t in trials if t.state == TrialState.RUNNING]
    # the two processes did run at once: some trials were running at the same time (one slot per process)
    spans = sorted((t.datetime_start, t.datetime_complete) for t in trials if t.datetime_complete)
    assert any(later[0] < earlier[1] for earlier, later in zip(spans, spans[1:])), "the processes never overlapped"
    status = evolve_cli("status", str(cfg_path))
    assert status.returncode == 0 and f": {budget}/{budget} trials;" in status.stdout, status.stdout
