"""Data-flow search through the loop: a hybrid PS->DFS run SIGKILLed in its DFS stage and resumed in place, whose
DFS trial exports as a plain-transformers checkpoint that reproduces its score; a DFS-only stage's naming."""

import json
import signal
from types import SimpleNamespace

import optuna
import pytest
from optuna.trial import TrialState
from transformers import AutoModelForCausalLM

from evolve.config import load_config
from evolve.loop import run_search
from evolve.spaces import build_dfs_space
from evolve.study import counted, study_name
from tests.evolve.harness import evolve_cli, resume, run_killed, write_config

DFS = {
    "space": {"model_a": "ja", "model_b": "math", "repeats": 2, "scales": "model_pair", "max_path_length": 8},
    "optimizer": {"sampler": "cmaes", "sigma0": 0.5, "popsize": 4},
    "budget": {"max_trials": 8},
}
KILL_AT = 6  # in the DFS stage: after x0 and CMA's first generation of 4, whose tell trial 5's ask made


@pytest.fixture(scope="module")
def hybrid(tmp_path_factory, world):
    """One hybrid run through the CLI, SIGKILLed right after DFS trial KILL_AT went to the worker, then resumed."""
    tmp = tmp_path_factory.mktemp("hybrid")
    dfs = {**DFS, "space": {**DFS["space"], "model_a": None}}
    cfg_path = write_config(
        tmp, world, **{"search.stages": ["ps", "dfs"], "search.dfs": dfs, "search.budget.max_trials": 4}
    )
    cfg = load_config(cfg_path)
    killed = run_killed(cfg_path, "t-dfs", KILL_AT)
    ps_before = [(t.number, t.value) for t in optuna.load_study(study_name="t", storage=cfg.storage_url).get_trials()]
    dfs_before = optuna.load_study(study_name=study_name(cfg, "dfs"), storage=cfg.storage_url).get_trials()
    ps_best_was_written = (tmp / "run" / "ps_best" / "config.json").is_file()
    resumed = resume(tmp / "run")
    return SimpleNamespace(
        dir=tmp,
        cfg_path=cfg_path,
        cfg=cfg,
        killed=killed,
        resumed=resumed,
        ps_before=ps_before,
        dfs_before=dfs_before,
        ps_best_was_written=ps_best_was_written,
    )


def test_hybrid_resumes_in_the_dfs_stage_after_sigkill(hybrid):
    assert hybrid.killed.returncode == -signal.SIGKILL, hybrid.killed.stderr[-2000:]
    assert hybrid.ps_best_was_written  # model A = the PS result, merged before the DFS stage
    before = hybrid.dfs_before
    assert [t.state for t in before] == [TrialState.COMPLETE] * KILL_AT + [TrialState.RUNNING]
    assert hybrid.resumed.returncode == 0, hybrid.resumed.stderr[-2000:]
    cfg = hybrid.cfg
    ps_after = [(t.number, t.value) for t in optuna.load_study(study_name="t", storage=cfg.storage_url).get_trials()]
    assert ps_after == hybrid.ps_before and len(ps_after) == 4  # the finished PS stage is not re-run
    after = optuna.load_study(study_name=study_name(cfg, "dfs"), storage=cfg.storage_url).get_trials()
    assert len(after) == 8 and sum(counted(t) for t in after) == 8
    assert all(t.state == TrialState.COMPLETE for t in after)
    assert [(t.number, t.params, t.value) for t in after[:KILL_AT]] == [
        (t.number, t.params, t.value) for t in before[:KILL_AT]
    ]
    assert after[KILL_AT].params == before[KILL_AT].params  # the killed trial continued in place, same number
    assert after[KILL_AT].user_attrs["recipe_hash"] == before[KILL_AT].user_attrs["recipe_hash"]
    assert not any({"interrupted", "rerun_of"} & set(t.user_attrs) for t in after)


def test_dfs_trial_exports_a_plain_checkpoint_that_reproduces_its_score(hybrid):
    assert hybrid.resumed.returncode == 0, hybrid.resumed.stderr[-2000:]
    study = optuna.load_study(study_name=study_name(hybrid.cfg, "dfs"), storage=hybrid.cfg.storage_url)
    first = study.get_trials()[0]
    assert "layer_path" in first.user_attrs["recipe"]  # x0 = model A's own layers
    # a trial whose path mixes A and B, so the export has to fold scales into copies
    mixed = [t for t in study.get_trials() if t.state == TrialState.COMPLETE and "model: B" in t.user_attrs["recipe"]]
    assert mixed, "no DFS trial used model B"
    trial = mixed[0]
    out = hybrid.dir / "dfs_export"
    exp = evolve_cli(
        "export",
        str(hybrid.dir / "run"),
        "--out",
        str(out),
        "--trial",
        str(trial.number),
        "--device",
        "cpu",
        "--no-heldout",
    )
    assert exp.returncode == 0, exp.stderr[-2000:]
    model = AutoModelForCausalLM.from_pretrained(out)  # plain transformers, no custom code
    hops = trial.user_attrs["recipe"].count("layer:")
    assert model.config.num_hidden_layers == hops
    ev = evolve_cli("eval", str(out), "--config", str(hybrid.cfg_path), "--split", "dev", "--limit", "20", "--json")
    assert ev.returncode == 0, ev.stderr[-2000:]
    scored = json.loads(ev.stdout)
    for key, v in trial.user_attrs["metrics"].items():
        assert scored[key] == pytest.approx(v, abs=1e-4), key


def test_a_dfs_only_search_is_named_after_the_run_and_reads_model_a_by_alias(tmp_path, world):
    cfg = load_config(
        write_config(tmp_path, world, **{"search.stages": ["dfs"], "search.dfs": {**DFS, "budget": {"max_trials": 2}}})
    )
    assert study_name(cfg, "dfs") == "t" and build_dfs_space(cfg).model_a == world["a"]
    study = run_search(cfg, progress=False).study
    assert study.study_name == "t" and [t.state for t in study.get_trials()] == [TrialState.COMPLETE] * 2
    assert "layer_path" in study.get_trials()[0].user_attrs["recipe"]


def test_report_draws_the_best_layer_path(tmp_path):
    from evolve.report import write_report
    from merge_core.recipe import DataFlowRecipe, LayerPath

    study = optuna.create_study(direction="maximize")
    recipe = DataFlowRecipe("a", "b", LayerPath(((0, 0), (1, 1), (0, 1)), (1.0, 0.8, 1.2)))
    for v in (0.1, 0.3):
        t = study.ask({"I.r0.A00": optuna.distributions.FloatDistribution(-1, 1)})
        t.set_user_attr("recipe", recipe.to_yaml())
        t.set_user_attr("metrics", {"x/acc": v})
        study.tell(t, v)
    paths = write_report(study, tmp_path)
    assert (tmp_path / "best_path.png").stat().st_size > 1000 and tmp_path / "report.html" in paths
