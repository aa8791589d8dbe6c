"""optuna-dashboard reads a finished study as evomerge writes it: the real dashboard (its WSGI app, in process) serves
the objective names, one sortable column per metric, each trial's recipe, and trials a race stopped early as Pruned
with the estimates it reported."""

from __future__ import annotations

import json
from typing import Any
from wsgiref.util import setup_testing_defaults

import optuna
import optuna_dashboard

from evolve.config import load_config
from evolve.loop import run_search
from evolve.worker import Outcome
from tests.evolve.fake_run import config_dict, write_config

METRICS = ("words/acc", "words/gold_prob")


class StandInExecutor:
    """Scores a recipe by its content hash; every third candidate is stopped early, as a race would stop it."""

    slots = 1

    def __init__(self, cfg: Any, template: Any) -> None:
        self.objectives = cfg.evaluation.objectives
        self.pending: list[tuple[int, Any]] = []

    def submit(self, key: int, recipe: Any, *args: Any, **kwargs: Any) -> None:
        self.pending.append((key, recipe))

    def wait(self) -> tuple[int, Outcome]:
        key, recipe = self.pending.pop(0)
        h = int(recipe.hash()[:6], 16) / 16**6
        metrics = {"words/acc": h, "words/gold_prob": 1 - h}
        if self.objectives:
            return key, Outcome(worker="fake", metrics=metrics, values=[metrics[o.metric] for o in self.objectives])
        if key % 3 == 2:
            return key, Outcome(worker="fake", metrics=metrics, fitness=h, steps=[(5, h)], stopped="race: behind")
        return key, Outcome(worker="fake", metrics=metrics, fitness=h)

    def close(self) -> None:
        pass


def finished_study(tmp_path, trio, task: dict[str, Any] | None = None, **evaluation: Any) -> optuna.Study:
    """Six trials of a random search over `trio` (task settings and evaluation fields as given)."""
    data = config_dict(trio, tmp_path / "run")
    data["search"]["budget"]["max_trials"] = 6
    data["evaluation"]["tasks"][0] |= task or {}
    data["evaluation"] |= evaluation
    cfg = load_config(write_config(tmp_path / "config.yaml", data))
    return run_search(cfg, progress=False, executor_factory=StandInExecutor).study


def get(app, path: str, query: str = "") -> Any:
    """GET `path` from a WSGI app; the decoded JSON body."""
    environ: dict[str, Any] = {"PATH_INFO": path, "QUERY_STRING": query}
    setup_testing_defaults(environ)
    status: list[str] = []
    body = b"".join(app(environ, lambda s, headers, exc_info=None: status.append(s)))
    assert status[0].startswith("200"), (status, body[:500])
    return json.loads(body)


def study_detail(study: optuna.Study) -> dict[str, Any]:
    app = optuna_dashboard.wsgi(study._storage)
    [listed] = get(app, "/api/studies")["study_summaries"]
    assert listed["study_name"] == study.study_name
    return get(app, f"/api/studies/{listed['study_id']}", "after=0")


def test_dashboard_shows_fitness_metric_columns_recipes_and_pruned_trials(tmp_path, tiny_llama_trio):
    study = finished_study(tmp_path, tiny_llama_trio)
    detail = study_detail(study)
    assert detail["objective_names"] == ["fitness"]  # not "Objective 0"
    columns = {a["key"]: a["sortable"] for a in detail["union_user_attrs"]}
    assert all(columns[m] for m in METRICS)  # one sortable column per metric
    assert columns["metrics"] is False  # the nested dict, kept for evomerge's readers, is not
    trials = detail["trials"]
    assert len(trials) == 6
    for t in trials:
        attrs = {a["key"]: a["value"] for a in t["user_attrs"]}
        assert "merge_method: ties" in attrs["recipe"]  # the whole recipe, as stored
        assert float(attrs["words/acc"]) == json.loads(attrs["metrics"])["words/acc"]
    pruned = [t for t in trials if t["state"] == "Pruned"]
    assert [t["number"] for t in pruned] == [2, 5]
    assert all(
        t["intermediate_values"] and {"key": "stopped", "value": "race: behind"} in t["user_attrs"] for t in pruned
    )
    assert {t["state"] for t in trials} == {"Complete", "Pruned"}


def test_dashboard_names_each_objective(tmp_path, tiny_llama_trio):
    objectives = [{"metric": "words/acc"}, {"metric": "words/gold_prob", "direction": "min"}]
    study = finished_study(tmp_path, tiny_llama_trio, fitness=None, objectives=objectives)
    detail = study_detail(study)
    assert detail["objective_names"] == list(METRICS) and detail["directions"] == ["maximize", "minimize"]
    assert len(detail["best_trials"]) >= 1  # the Pareto front
    app = optuna_dashboard.wsgi(study._storage)
    [listed] = get(app, "/api/studies")["study_summaries"]
    plot = get(app, f"/api/studies/{listed['study_id']}/plot/pareto_front")
    assert plot["data"]  # plotly is in the dev extra: the dashboard draws the front (without it: HTTP 500)


def test_dashboard_shows_re_scored_trials(tmp_path, world):
    """Re-scores (real ones, on 4 items) are study user attrs named after their trial (a finished trial's own attrs
    are read-only): the dashboard lists them, the re-scored fitness first."""
    task = {"task_dir": world["task"], "max_new_tokens": 2, "extract": "first_word", "batch_size": 8}
    study = finished_study(tmp_path, (world["base"], world["a"], world["b"]), task, rescore={"top_k": 2, "limit": 4})
    stored = {k: v for k, v in study.user_attrs.items() if k.startswith("rescore:")}
    assert len(stored) == 2
    shown = {a["key"]: a["value"] for a in study_detail(study)["user_attrs"]}
    for key, record in stored.items():
        assert shown[key].startswith(f'{{"fitness": {json.dumps(record["fitness"])}, ')
