"""The search loop through the real CLI: run, status, export, report; SIGKILL + resume = the uninterrupted run;
Ray faults.
"""

import json
import re
import signal
import sqlite3
import threading
import time
from types import SimpleNamespace

import optuna
import pytest
import torch
import yaml
from optuna.trial import TrialState
from transformers import AutoModelForCausalLM

from evolve.cli import main
from evolve.config import load_config
from evolve.items import decode_items, items_scored, tokens_generated
from evolve.loop import run_search
from evolve.study import RunLock, best_trial, counted
from tests.evolve.harness import evolve_cli, resume, run_killed, write_config


def study_of(cfg_path):
    cfg = load_config(cfg_path)
    return optuna.load_study(study_name=cfg.name, storage=cfg.storage_url)


TRIALS, KILL_AT = 8, 6  # CMA generations of 4 after x0: trial 5's ask tells the first; trial 6 is killed
SEARCH = {"search.budget.max_trials": TRIALS, "search.optimizer": {"sampler": "cmaes", "sigma0": 0.3, "popsize": 4}}


@pytest.fixture(scope="module")
def whole_run(tmp_path_factory, world):
    """One uninterrupted `evolve run` through the CLI (held-out table included), read by several tests."""
    tmp = tmp_path_factory.mktemp("whole")
    cfg_path = write_config(tmp, world, **SEARCH)
    return SimpleNamespace(dir=tmp, cfg_path=cfg_path, proc=evolve_cli("run", str(cfg_path), "--no-progress"))


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory, world):
    """The same run SIGKILLed (a deterministic point: right after trial KILL_AT went to the worker), then resumed."""
    tmp = tmp_path_factory.mktemp("killed")
    cfg_path = write_config(tmp, world, **SEARCH)
    killed = run_killed(cfg_path, "t", KILL_AT)
    before = study_of(cfg_path).get_trials()
    resumed = resume(tmp / "run")
    return SimpleNamespace(cfg_path=cfg_path, killed=killed, before=before, resumed=resumed)


def record(cfg_path):
    return [(t.number, t.state, t.params, t.value) for t in study_of(cfg_path).get_trials()]


def test_end_to_end_run_status_export_report(whole_run):
    tmp_path, cfg_path, proc = whole_run.dir, whole_run.cfg_path, whole_run.proc
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "held-out (test split)" in proc.stdout and "evolved PS (trial" in proc.stdout and "source ja" in proc.stdout
    evolved_row = next(line for line in proc.stdout.splitlines() if line.startswith("evolved PS (trial"))
    assert re.search(r"\d\.\d{4} \[\d\.\d{4}, \d\.\d{4}\]", evolved_row)  # every score with its interval
    assert re.search(r"vs source \w+ on words/acc: .* McNemar exact p=", proc.stdout)
    assert re.search(r"vs (linear|task|TIES|DARE).* on words/acc: .* McNemar exact p=", proc.stdout)
    study = study_of(cfg_path)
    trials = study.get_trials()
    assert sum(counted(t) for t in trials) == TRIALS  # exactly the budget
    first = trials[0]
    assert first.user_attrs.get("x0") and first.params["L00-01.ja.weight"] == 0.5
    for t in trials:
        if t.state == TrialState.COMPLETE:
            assert {"recipe", "recipe_hash", "metrics", "fitness", "worker", "items"} <= set(t.user_attrs)
            assert t.user_attrs["engine"] == "native"
    # per-item records: every item of the task, in one order shared by all trials, whose means are the metrics
    evaluated = [t for t in trials if t.state == TrialState.COMPLETE and "cached_from" not in t.user_attrs]
    for t in evaluated:
        scores = decode_items(t.user_attrs["items"])["words"]
        assert t.user_attrs["items"]["words"]["n"] == t.user_attrs["items"]["words"]["of"] == scores.n
        assert items_scored(t.user_attrs["items"]) == scores.n and tokens_generated(t.user_attrs["items"]) >= scores.n
        assert sum(scores.values["acc"]) / scores.n == pytest.approx(t.user_attrs["metrics"]["words/acc"])
        gold = sum(scores.values["gold_prob"]) / scores.n
        assert gold == pytest.approx(t.user_attrs["metrics"]["words/gold_prob"], rel=2e-3)  # float16 storage

    status = evolve_cli("status", str(tmp_path / "run"))
    assert status.returncode == 0 and "words/acc" in status.stdout and f"{TRIALS}/{TRIALS} trials" in status.stdout

    out = tmp_path / "export"
    exp = evolve_cli("export", str(tmp_path / "run"), "--out", str(out), "--device", "cpu")
    assert exp.returncode == 0, exp.stderr[-2000:]
    for f in (
        "recipe.evomerge.yaml",
        "mergekit.yaml",
        "README.md",
        "config.json",
        "tokenizer.json",
        "evomerge_scores.json",
    ):
        assert (out / f).is_file(), f
    assert "seed" not in yaml.safe_load((out / "mergekit.yaml").read_text())
    model = AutoModelForCausalLM.from_pretrained(out)  # plain transformers reads it: the base's class and shapes
    base = AutoModelForCausalLM.from_pretrained(load_config(cfg_path).models.base)
    assert type(model) is type(base) and model.config.num_hidden_layers == base.config.num_hidden_layers
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in base.state_dict().items()}
    assert not torch.equal(
        model.state_dict()["model.layers.0.mlp.down_proj.weight"],  # merged, not a copy
        base.state_dict()["model.layers.0.mlp.down_proj.weight"],
    )
    # the exported checkpoint scores on the search split exactly what the trial recorded
    best = best_trial(study)
    ev = evolve_cli("eval", str(out), "--config", str(cfg_path), "--split", "dev", "--limit", "20", "--json")
    assert ev.returncode == 0, ev.stderr[-2000:]
    scored = json.loads(ev.stdout)
    for key, v in best.user_attrs["metrics"].items():
        assert scored[key] == pytest.approx(v, abs=1e-6), key

    rep = evolve_cli("report", str(tmp_path / "run"))
    assert rep.returncode == 0, rep.stderr[-2000:]
    for f in ("fitness.png", "best_recipe.png", "report.html"):
        p = tmp_path / "run" / "report" / f
        assert p.is_file() and p.stat().st_size > 1000, f


def test_sigkill_mid_trial_then_resume_ends_as_the_uninterrupted_run(whole_run, killed_run):
    """Same seed, same machine: the killed-and-resumed run has the uninterrupted run's trials, values and best."""
    assert killed_run.killed.returncode == -signal.SIGKILL, killed_run.killed.stderr[-2000:]
    before = killed_run.before
    assert [t.state for t in before] == [TrialState.COMPLETE] * KILL_AT + [TrialState.RUNNING]
    left = before[KILL_AT]
    assert set(left.params) == set(before[0].params) and "recipe_hash" in left.user_attrs  # asked, handed out

    assert killed_run.resumed.returncode == 0, killed_run.resumed.stderr[-2000:]
    assert f"continuing trials a previous process left running: [{KILL_AT}]" in killed_run.resumed.stderr
    after = study_of(killed_run.cfg_path).get_trials()
    assert [(t.number, t.value) for t in after[:KILL_AT]] == [(t.number, t.value) for t in before[:KILL_AT]]
    assert after[KILL_AT].state == TrialState.COMPLETE and after[KILL_AT].params == left.params  # continued in place
    assert record(killed_run.cfg_path) == record(whole_run.cfg_path)  # the same search: params, values, order
    assert study_of(killed_run.cfg_path).best_trial.number == study_of(whole_run.cfg_path).best_trial.number
    assert not any({"interrupted", "rerun_of"} & set(t.user_attrs) for t in after)
    assert len({t.user_attrs["recipe_hash"] for t in after}) == TRIALS  # nothing evaluated twice


def test_a_second_concurrent_run_is_refused(tmp_path, world, capsys):
    cfg_path = write_config(tmp_path, world)
    (tmp_path / "run").mkdir()
    lock = RunLock(tmp_path / "run")
    try:
        assert main(["run", str(cfg_path), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert "a search is already running on this study" in err and "shared_study" in err
    finally:
        lock.release()


def test_ray_executor_survives_a_killed_actor_and_records_every_trial(tmp_path, world):
    ray = pytest.importorskip("ray")
    cfg = load_config(
        write_config(
            tmp_path,
            world,
            **{
                "search.budget.max_trials": 10,
                "execution": {"backend": "ray", "workers": 2, "device": "cpu", "cpus_per_worker": 0.5},
            },
        )
    )
    killed = []

    def kill_one_actor():
        deadline = time.time() + 300
        db = tmp_path / "run" / "study.db"
        while time.time() < deadline and not killed:
            time.sleep(0.5)
            try:  # raw reads: never race the run's own schema creation
                with sqlite3.connect(db) as con:
                    complete = con.execute("select count(*) from trials where state = 'COMPLETE'").fetchone()[0]
            except sqlite3.OperationalError:
                continue
            if complete >= 2:
                try:
                    actor = ray.get_actor(f"evomerge-{cfg.name}-w0-1")
                except ValueError:
                    continue
                ray.kill(actor)
                killed.append(True)

    thread = threading.Thread(target=kill_one_actor, daemon=True)
    thread.start()
    try:
        study = run_search(cfg, progress=False).study
    finally:
        thread.join(timeout=5)
        ray.shutdown()
    assert killed, "the actor was never killed"
    trials = study.get_trials()
    assert sum(counted(t) for t in trials) == 10
    assert all(t.state == TrialState.COMPLETE for t in trials), [t.user_attrs.get("fail_reason") for t in trials]
    assert {t.user_attrs["worker"] for t in trials} == {"ray-0", "ray-1"}
    local = run_search(
        load_config(write_config(tmp_path / "local", world, **{"search.budget.max_trials": 10})), progress=False
    ).study
    assert study.best_value >= local.best_value - 0.25


def test_pycma_sampler_runs_the_loop_to_budget(tmp_path, world):
    cfg = load_config(
        write_config(
            tmp_path,
            world,
            **{"search.optimizer": {"sampler": "pycma", "sigma0": 0.3, "popsize": 4}, "search.budget.max_trials": 7},
        )
    )
    study = run_search(cfg, progress=False).study
    trials = study.get_trials()
    assert sum(counted(t) for t in trials) == 7
    assert "pycma:state" in study._storage.get_study_system_attrs(study._study_id)
