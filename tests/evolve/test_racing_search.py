"""Racing and elite re-scoring in the real search (the committed zoo, the demo's task): stopped candidates recorded
as PRUNED with their partial estimate, items used and reason; the elites re-scored on another split and the pick
made from those scores; both shown by status; a SIGKILL in the middle of a race or of the re-scoring loses
nothing."""

from __future__ import annotations

from types import SimpleNamespace

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from evolve.config import load_config, parse_config
from evolve.items import fully_scored, items_scored
from evolve.loop import run_search
from evolve.rescore import elites
from evolve.study import best_trial, rescored
from tests.evolve.harness import QUIET, ROOT, evolve_cli, resume, zoo_config_data

TRIALS = 10
RACING = {"chunk": 40, "alpha": 0.05, "min_items": 40}
RESCORE = {"top_k": 3, "split": "train", "limit": 100}


def racing_config(tmp_path, name: str) -> str:
    data = zoo_config_data("race", tmp_path / name / "run", "cmaes", TRIALS, popsize=4)
    data["search"]["optimizer"]["sigma0"] = 0.8  # wide: some candidates are clearly worse than the incumbent
    data["evaluation"]["racing"] = RACING
    data["evaluation"]["rescore"] = RESCORE
    data["evaluation"]["heldout_split"] = None
    path = tmp_path / name / "config.yaml"
    path.parent.mkdir(parents=True)
    path.write_text(yaml.safe_dump(data))
    return str(path)


def study_of(cfg_path: str) -> optuna.Study:
    cfg = load_config(cfg_path)
    return optuna.load_study(study_name=cfg.name, storage=cfg.storage_url)


def record(cfg_path: str) -> list[tuple]:
    """Every trial (number, state, params, value, race estimates, per-item record) and the re-scores."""
    study = study_of(cfg_path)
    trials = [
        (t.number, t.state, t.params, t.value, t.intermediate_values, t.user_attrs.get("items"))
        for t in study.get_trials()
    ]
    return trials + [rescored(study)]


@pytest.fixture(scope="module")
def raced(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("racing")
    cfg_path = racing_config(tmp, "whole")
    proc = evolve_cli("run", cfg_path, *QUIET)
    return SimpleNamespace(cfg_path=cfg_path, proc=proc, record=record(cfg_path), tmp=tmp)


def test_racing_stops_worse_candidates_and_records_them(raced) -> None:
    assert raced.proc.returncode == 0, raced.proc.stderr[-2000:]
    cfg = load_config(raced.cfg_path)
    study = optuna.load_study(study_name=cfg.name, storage=cfg.storage_url)
    trials = study.get_trials()
    assert len(trials) == TRIALS and all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    assert fully_scored(trials[0].user_attrs["items"])  # x0: no incumbent yet, every item
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    assert pruned, "no candidate was stopped"
    for t in pruned:
        used = items_scored(t.user_attrs["items"])
        assert 40 <= used < 200 and used % 40 == 0 and t.user_attrs["stopped"].startswith(f"racing: after {used}/200")
        assert max(t.intermediate_values) == used and t.value == t.intermediate_values[used]  # its partial estimate
        assert t.value == pytest.approx(t.user_attrs["fitness"])
    for t in trials:
        if t.state == TrialState.COMPLETE:
            assert fully_scored(t.user_attrs["items"])
    status = evolve_cli("status", str(tmp_path_run(raced)))
    assert status.returncode == 0, status.stderr
    assert f"pruned {len(pruned)}" in status.stdout and "stopped early by racing" in status.stdout
    spent = sum(items_scored(t.user_attrs["items"]) for t in trials)
    assert f"spent: {spent} items scored" in status.stdout and spent < 200 * TRIALS


def test_elites_are_rescored_on_more_items_and_the_pick_is_the_best_rescore(raced) -> None:
    study = study_of(raced.cfg_path)
    scores = rescored(study)
    assert sorted(scores) == sorted(t.number for t in elites(study, 3)) and len(scores) == 3
    for r in scores.values():
        assert r["items_scored"] == 100 and r["split"] == "train"
        assert r["fitness"] == pytest.approx(r["metrics"]["ja_sub/acc"] + r["metrics"]["ja_sub/gold_prob"])
    pick = best_trial(study)
    assert scores[pick.number]["fitness"] == max(r["fitness"] for r in scores.values())
    status = evolve_cli("status", tmp_path_run(raced))
    assert f"pick: trial {pick.number}, re-scored fitness {scores[pick.number]['fitness']:.4f} on 100 items" in (
        status.stdout
    )
    report = evolve_cli("report", tmp_path_run(raced))
    assert report.returncode == 0, report.stderr
    page = (load_config(raced.cfg_path).run_dir / "report" / "report.html").read_text()
    assert "Elites re-scored" in page and f"{pick.number} (pick)" in page and "items scored" in page


def tmp_path_run(raced) -> str:
    return str(load_config(raced.cfg_path).run_dir)


def test_sigkill_in_a_race_and_in_the_rescoring_loses_nothing(raced) -> None:
    """Killed after the first chunk of a raced trial (left RUNNING), the resumed run re-runs that trial from scratch;
    killed again right after the first elite's re-score was recorded, the next resume re-scores only the others; the
    run ends with the uninterrupted run's record, trial for trial, re-score for re-score."""
    victim = 1  # raced against x0
    cfg_path = racing_config(raced.tmp, "killed")
    killed = evolve_cli("run", cfg_path, *QUIET, env={"EVOMERGE_FAULT": f"sigkill-in-race:{victim}:0"})
    assert killed.returncode == -9, killed.stderr[-2000:]
    before = record(cfg_path)
    assert before[-2][0] == victim and before[-2][1] == TrialState.RUNNING and before[-2][5] is None
    run_dir = load_config(cfg_path).run_dir
    first_elite = elites(study_of(raced.cfg_path), 3)[0].number
    killed = resume(run_dir, env={"EVOMERGE_FAULT": f"sigkill-after-rescore:race:{first_elite}"})
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert list(rescored(study_of(cfg_path))) == [first_elite]
    resumed = resume(run_dir)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert record(cfg_path) == raced.record


def test_the_demo_config_races_its_candidates_and_picks_a_fully_scored_one(tmp_path) -> None:
    """configs/tiny_jp_math.yaml as shipped (racing in 20-item chunks, no re-scoring), its first 8 trials: the
    first candidates are scored on every item, most later ones are stopped early with their partial estimate, and
    the pick is a fully scored trial."""
    data = yaml.safe_load((ROOT / "configs" / "tiny_jp_math.yaml").read_text())
    assert data["evaluation"]["racing"] == {"chunk": 20, "min_items": 20, "alpha": 0.05, "test": "t"}
    assert "rescore" not in data["evaluation"]
    data["models"]["base"] = str(ROOT / data["models"]["base"])
    for s in data["models"]["sources"]:
        s["path"] = str(ROOT / s["path"])
    data["evaluation"]["tasks"][0]["task_dir"] = str(ROOT / data["evaluation"]["tasks"][0]["task_dir"])
    data["search"]["budget"]["max_trials"] = 8
    data["output_dir"] = str(tmp_path / "run")
    study = run_search(parse_config(data), progress=False).study
    trials = study.get_trials()
    assert len(trials) == 8 and all(fully_scored(t.user_attrs["items"]) for t in trials[:1])
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    assert len(pruned) >= 3, [(t.number, t.state.name) for t in trials]
    for t in pruned:
        used = items_scored(t.user_attrs["items"])
        assert 20 <= used < 200 and used % 20 == 0 and t.value == t.intermediate_values[used]
    for t in trials:
        if t.state == TrialState.COMPLETE:
            assert fully_scored(t.user_attrs["items"])
    pick = best_trial(study)
    assert pick.state == TrialState.COMPLETE and pick.value == max(
        t.value for t in trials if t.state == TrialState.COMPLETE
    )
    assert sum(items_scored(t.user_attrs["items"]) for t in trials) < 0.7 * 200 * 8
