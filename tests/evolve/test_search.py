"""The search loop through the real CLI: run, status, export, report; SIGKILL + resume; reproducibility; Ray faults."""
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState
from transformers import AutoModelForCausalLM

from evolve.cli import main
from evolve.config import load_config
from evolve.loop import counted, run_search
from merge_core.synthetic import DEFAULT_WORDS, make_tiny_trio

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny base + two fine-tunes and a generation task whose answers are vocabulary words."""
    root = tmp_path_factory.mktemp("world")
    base, a, b = make_tiny_trio(root / "models", "llama", seed=0, noise=0.05)
    words = [w for w in DEFAULT_WORDS if w.isalpha()][:40]
    task = root / "task"
    task.mkdir()
    for split, n in (("dev", 40), ("test", 30)):
        with open(task / f"{split}.jsonl", "w") as f:
            for i in range(n):
                prompt = " ".join(words[(i + k) % len(words)] for k in range(5))
                f.write(json.dumps({"id": f"{split}-{i}", "prompt": prompt, "answer": words[(i * 7) % len(words)]}) + "\n")
    return {"base": str(base), "a": str(a), "b": str(b), "task": str(task)}


def write_config(tmp_path, world, **overrides):
    cfg = {
        "name": "t",
        "seed": 3,
        "models": {"base": world["base"], "sources": [{"path": world["a"], "alias": "ja"}, {"path": world["b"], "alias": "math"}]},
        "search": {"space": {"method": "dare_ties", "layers_per_group": 2, "weight_bounds": [0.0, 1.5]},
                   "optimizer": {"sampler": "cmaes", "sigma0": 0.3}, "budget": {"max_trials": 6}},
        "evaluation": {"tasks": [{"name": "words", "type": "generation", "task_dir": world["task"], "split": "dev",
                                  "limit": 20, "batch_size": 20, "max_new_tokens": 2, "extract": "first_word"}],
                       "fitness": [{"metric": "words/acc"}, {"metric": "words/gold_logprob", "weight": 0.1}]},
        "execution": {"backend": "local", "device": "cpu"},
        "output_dir": str(tmp_path / "run"),
    }
    for dotted, value in overrides.items():
        node = cfg
        *keys, last = dotted.split(".")
        for k in keys:
            node = node.setdefault(k, {})
        node[last] = value
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def study_of(cfg_path):
    cfg = load_config(cfg_path)
    return optuna.load_study(study_name=cfg.name, storage=cfg.storage_url)


def evolve_cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "evolve.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, **kw)


def test_end_to_end_run_status_export_report(tmp_path, world):
    cfg_path = write_config(tmp_path, world)
    proc = evolve_cli("run", str(cfg_path), "--no-progress")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "held-out (test split)" in proc.stdout and "evolved PS (trial" in proc.stdout and "source ja" in proc.stdout
    study = study_of(cfg_path)
    trials = study.get_trials()
    assert sum(counted(t) for t in trials) == 6  # exactly the budget
    first = trials[0]
    assert first.user_attrs.get("x0") and first.params["L00-01.ja.weight"] == 0.5
    for t in trials:
        if t.state == TrialState.COMPLETE:
            assert {"recipe", "recipe_hash", "metrics", "fitness", "worker"} <= set(t.user_attrs)

    status = evolve_cli("status", str(tmp_path / "run"))
    assert status.returncode == 0 and "words/acc" in status.stdout and "6/6 trials" in status.stdout

    out = tmp_path / "export"
    exp = evolve_cli("export", str(tmp_path / "run"), "--out", str(out), "--device", "cpu")
    assert exp.returncode == 0, exp.stderr[-2000:]
    for f in ("recipe.evomerge.yaml", "mergekit.yaml", "README.md", "config.json", "tokenizer.json", "evomerge_scores.json"):
        assert (out / f).is_file(), f
    assert "seed" not in yaml.safe_load((out / "mergekit.yaml").read_text())
    assert AutoModelForCausalLM.from_pretrained(out) is not None
    # the exported checkpoint scores on the search split exactly what the trial recorded
    best = study.best_trial
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


def test_resume_after_sigkill_keeps_completed_trials_and_reruns_the_running_one(tmp_path, world):
    cfg_path = write_config(tmp_path, world, **{"search.budget.max_trials": 14, "evaluation.tasks": [
        {"name": "words", "type": "generation", "task_dir": world["task"], "split": "dev", "limit": 40,
         "batch_size": 1, "max_new_tokens": 4, "extract": "first_word"}]})
    db = tmp_path / "run" / "study.db"
    proc = subprocess.Popen([sys.executable, "-m", "evolve.cli", "run", str(cfg_path), "--no-progress", "--no-final-table"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
        if not db.exists():
            continue
        try:
            with sqlite3.connect(db) as con:
                states = [s for (s,) in con.execute("select state from trials order by number")]
        except sqlite3.OperationalError:
            continue
        if states.count("COMPLETE") >= 4 and states[-1] == "RUNNING":
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            break
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    before = {t.number: t for t in study_of(cfg_path).get_trials()}
    running = [n for n, t in before.items() if t.state == TrialState.RUNNING]
    assert running, "no trial was RUNNING at the kill"

    res = evolve_cli("resume", str(tmp_path / "run"), "--no-progress", "--no-final-table")
    assert res.returncode == 0, res.stderr[-2000:]
    after = study_of(cfg_path).get_trials()
    by_number = {t.number: t for t in after}
    for n, t in before.items():  # completed trials are kept, untouched
        if t.state == TrialState.COMPLETE:
            assert by_number[n].state == TrialState.COMPLETE and by_number[n].value == t.value
    reruns = [t for t in after if t.user_attrs.get("rerun_of") in running]
    if len(before[running[0]].params) == len(reruns[0].params if reruns else {}) or reruns:
        assert reruns and reruns[0].state == TrialState.COMPLETE
        assert reruns[0].params == before[running[0]].params
    else:  # killed while its parameters were being asked: it never ran, nothing to re-run
        assert len(before[running[0]].params) < len(after[0].params)
    assert by_number[running[0]].user_attrs.get("interrupted") is True
    assert sum(counted(t) for t in after) == 14
    hashes = [t.user_attrs["recipe_hash"] for t in after if counted(t) and "cached_from" not in t.user_attrs]
    assert len(hashes) == len(set(hashes))  # nothing evaluated twice


def test_a_second_concurrent_run_is_refused(tmp_path, world, capsys):
    cfg_path = write_config(tmp_path, world)
    from evolve.loop import RunLock

    (tmp_path / "run").mkdir()
    lock = RunLock(tmp_path / "run")
    try:
        assert main(["run", str(cfg_path), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert "a search is already running on this study" in err and "shared_study" in err
    finally:
        lock.release()


def test_same_seed_same_trials_and_scores(tmp_path, world):
    results = []
    for i in range(2):
        cfg = load_config(write_config(tmp_path / str(i), world, **{"search.budget.max_trials": 5}))
        study = run_search(cfg, progress=False).study
        results.append([(t.params, t.value) for t in study.get_trials()])
    assert results[0] == results[1]


def test_ray_executor_survives_a_killed_actor_and_records_every_trial(tmp_path, world):
    ray = pytest.importorskip("ray")
    cfg = load_config(write_config(tmp_path, world, **{
        "search.budget.max_trials": 10, "execution": {"backend": "ray", "workers": 2, "device": "cpu", "cpus_per_worker": 0.5}}))
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
    local = run_search(load_config(write_config(tmp_path / "local", world, **{"search.budget.max_trials": 10})), progress=False).study
    assert study.best_value >= local.best_value - 0.25


def test_pycma_sampler_runs_the_loop_to_budget(tmp_path, world):
    cfg = load_config(write_config(tmp_path, world, **{"search.optimizer": {"sampler": "pycma", "sigma0": 0.3, "popsize": 4},
                                                       "search.budget.max_trials": 7}))
    study = run_search(cfg, progress=False).study
    trials = study.get_trials()
    assert sum(counted(t) for t in trials) == 7
    assert "pycma:state" in study._storage.get_study_system_attrs(study._study_id)
