"""Data-flow search through the loop: DFS end to end with a plain-transformers export; hybrid PS->DFS resume after SIGKILL."""
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import optuna
import pytest
from optuna.trial import TrialState
from transformers import AutoModelForCausalLM

from evolve.config import load_config
from evolve.loop import counted, run_search, study_name
from tests.evolve.test_search import ROOT, evolve_cli, world, write_config  # noqa: F401  (fixture)

DFS = {"space": {"model_a": "ja", "model_b": "math", "repeats": 2, "scales": "model_pair", "max_path_length": 8},
       "optimizer": {"sampler": "cmaes", "sigma0": 0.5}, "budget": {"max_trials": 6}}


def test_dfs_search_exports_a_plain_checkpoint_that_reproduces_its_score(tmp_path, world):  # noqa: F811
    cfg_path = write_config(tmp_path, world, **{"search.stages": ["dfs"], "search.dfs": DFS})
    cfg = load_config(cfg_path)
    study = run_search(cfg, progress=False).study
    assert study.study_name == "t" and sum(counted(t) for t in study.get_trials()) == 6
    first = study.get_trials()[0]
    assert "layer_path" in first.user_attrs["recipe"]  # x0 = model A's own layers
    # pick a trial whose path mixes A and B, so the export has to fold scales into copies
    mixed = [t for t in study.get_trials() if t.state == TrialState.COMPLETE and "model: B" in t.user_attrs["recipe"]]
    trial = (mixed or [study.best_trial])[0]
    out = tmp_path / "dfs_export"
    exp = evolve_cli("export", str(tmp_path / "run"), "--out", str(out), "--trial", str(trial.number), "--device", "cpu", "--no-heldout")
    assert exp.returncode == 0, exp.stderr[-2000:]
    model = AutoModelForCausalLM.from_pretrained(out)  # plain transformers, no custom code
    hops = trial.user_attrs["recipe"].count("layer:")
    assert model.config.num_hidden_layers == hops
    ev = evolve_cli("eval", str(out), "--config", str(cfg_path), "--split", "dev", "--limit", "20", "--json")
    assert ev.returncode == 0, ev.stderr[-2000:]
    scored = json.loads(ev.stdout)
    for key, v in trial.user_attrs["metrics"].items():
        assert scored[key] == pytest.approx(v, abs=1e-4), key


def test_hybrid_resumes_in_the_dfs_stage_after_sigkill(tmp_path, world):  # noqa: F811
    dfs = {**DFS, "space": {**DFS["space"], "model_a": None}, "budget": {"max_trials": 12}}
    task = {"name": "words", "type": "generation", "task_dir": world["task"], "split": "dev", "limit": 40,
            "batch_size": 1, "max_new_tokens": 4, "extract": "first_word"}
    cfg_path = write_config(tmp_path, world, **{"search.stages": ["ps", "dfs"], "search.dfs": dfs,
                                                "search.budget.max_trials": 4, "evaluation.tasks": [task]})
    cfg = load_config(cfg_path)
    db = tmp_path / "run" / "study.db"
    proc = subprocess.Popen([sys.executable, "-m", "evolve.cli", "run", str(cfg_path), "--no-progress", "--no-final-table"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
        try:
            with sqlite3.connect(db) as con:
                rows = con.execute("select s.study_name, t.state from trials t join studies s on t.study_id = s.study_id "
                                   "where s.study_name = 't-dfs' order by t.number").fetchall()
        except sqlite3.OperationalError:
            continue
        states = [r[1] for r in rows]
        if states.count("COMPLETE") >= 2 and states and states[-1] == "RUNNING":
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            break
    assert proc.returncode == -signal.SIGKILL, "the run was not killed in the DFS stage"
    ps_before = [(t.number, t.value) for t in optuna.load_study(study_name="t", storage=cfg.storage_url).get_trials()]
    assert (tmp_path / "run" / "ps_best" / "config.json").is_file()  # model A = the PS result

    res = evolve_cli("resume", str(tmp_path / "run"), "--no-progress", "--no-final-table")
    assert res.returncode == 0, res.stderr[-2000:]
    ps_after = [(t.number, t.value) for t in optuna.load_study(study_name="t", storage=cfg.storage_url).get_trials()]
    assert ps_after == ps_before  # the finished PS stage is not re-run
    dfs_trials = optuna.load_study(study_name=study_name(cfg, "dfs"), storage=cfg.storage_url).get_trials()
    assert sum(counted(t) for t in dfs_trials) == 12
    assert any("rerun_of" in t.user_attrs for t in dfs_trials)


def test_report_draws_the_best_layer_path(tmp_path):
    from evolve.report import write_report
    from search_spaces.dfs import DataFlowRecipe

    study = optuna.create_study(direction="maximize")
    recipe = DataFlowRecipe("a", "b", ((0, 0), (1, 1), (0, 1)), (1.0, 0.8, 1.2))
    for v in (0.1, 0.3):
        t = study.ask({"I.r0.A00": optuna.distributions.FloatDistribution(-1, 1)})
        t.set_user_attr("recipe", recipe.to_yaml())
        t.set_user_attr("metrics", {"x/acc": v})
        study.tell(t, v)
    paths = write_report(study, tmp_path)
    assert (tmp_path / "best_path.png").stat().st_size > 1000 and tmp_path / "report.html" in paths
