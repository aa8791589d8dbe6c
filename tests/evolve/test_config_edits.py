"""Editing a run's config between a run and its resume (`evolve.config_edits`): budget, execution, storage and
held-out fields may change; a field that decides what a trial means is refused (nothing written), unless the search
is continued with --accept-config-change, which the study records."""

from __future__ import annotations

from pathlib import Path

import optuna
import yaml

from evolve.cli import main, resolve_run
from evolve.config import dump_config, parse_config
from evolve.config_edits import CHANGES_ATTR, changed_fields, editable
from evolve.loop import run_search
from tests.evolve.fake_run import HashScoreExecutor
from tests.evolve.test_hostile import Env


def _finished(tmp_path: Path, trials: int = 2) -> Path:
    data = Env(tmp_path).config(search__budget={"max_trials": trials})
    run_search(parse_config(data), progress=False, executor_factory=HashScoreExecutor)
    return tmp_path / "run"


def _edit(run_dir: Path, **changes) -> str:
    data = yaml.safe_load((run_dir / "config.yaml").read_text())
    for path, value in changes.items():
        node = data
        *keys, last = path.split("__")
        for k in keys:
            node = node[int(k)] if isinstance(node, list) else node[k]
        node[last] = value
    text = yaml.safe_dump(data, sort_keys=False)
    (run_dir / "config.yaml").write_text(text)
    return text


def _trials(run_dir: Path) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name="hostile", storage=f"sqlite:///{run_dir / 'study.db'}").trials


def test_budget_execution_and_heldout_edits_continue_the_study(tmp_path):
    run_dir = _finished(tmp_path)
    _edit(
        run_dir,
        search__budget__max_trials=4,
        execution__threads=1,
        evaluation__heldout_split="test",
        evaluation__tasks__0__batch_size=2,
    )
    result = run_search(resolve_run(str(run_dir)), progress=False, executor_factory=HashScoreExecutor)
    assert result.stopped_because == "budget: max_trials reached" and len(_trials(run_dir)) == 4
    assert CHANGES_ATTR not in result.study.user_attrs  # nothing that changes what a trial means
    assert yaml.safe_load(result.study.user_attrs["config"])["search"]["budget"]["max_trials"] == 4


def test_a_refused_resume_writes_nothing(tmp_path, capsys):
    run_dir = _finished(tmp_path)
    edited = _edit(run_dir, seed=7, search__space__weight_bounds=[0.0, 3.0])
    # every file as it was (the run lock, taken first so a busy run directory is refused first, holds the pid)
    files = lambda: sorted((p.name, p.stat().st_mtime_ns) for p in run_dir.iterdir() if p.name != ".lock")  # noqa: E731
    before = files()
    assert main(["resume", str(run_dir), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "seed, search.space.weight_bounds changed" in err, err
    assert (run_dir / "config.yaml").read_text() == edited
    assert files() == before and (run_dir / ".lock").is_file()
    assert len(_trials(run_dir)) == 2


def test_accepted_changes_are_recorded_and_then_are_the_studys_config(tmp_path):
    run_dir = _finished(tmp_path)
    _edit(run_dir, search__budget__max_trials=3, evaluation__tasks__0__limit=3)
    cfg = resolve_run(str(run_dir))
    result = run_search(cfg, progress=False, executor_factory=HashScoreExecutor, accept_config_change=True)
    assert len(_trials(run_dir)) == 3
    assert result.study.user_attrs[CHANGES_ATTR] == [{"trial": 2, "fields": ["evaluation.tasks[0].limit"]}]
    assert result.study.user_attrs["config"] == dump_config(cfg)
    _edit(run_dir, search__budget__max_trials=4)  # the accepted config is now the study's: no flag needed
    run_search(resolve_run(str(run_dir)), progress=False, executor_factory=HashScoreExecutor)
    assert len(_trials(run_dir)) == 4


def test_which_fields_are_editable():
    for path in (
        "search.budget.max_trials",
        "search.dfs.budget.patience",
        "execution.workers",
        "execution.threads",
        "storage",
        "output_dir",
        "models.sources[1].hub_id",
        "evaluation.tasks[0].batch_size",
        "evaluation.heldout_tasks[0].limit",
    ):
        assert editable(path), path
    for path in (
        "seed",
        "execution.dtype",
        "models.base",
        "models.sources[1].path",
        "search.space.weight_bounds",
        "search.optimizer.sampler",
        "search.protocol.batch",
        "evaluation.tasks[0].limit",
        "evaluation.tasks[0].limit_mode",
        "evaluation.fitness[0].weight",
        "evaluation.racing.chunk",
        "evaluation.reference_point",
    ):
        assert not editable(path), path


def test_a_config_stored_by_an_older_version_is_read_with_todays_defaults(tmp_path):
    cfg = parse_config(Env(tmp_path).config())
    stored = yaml.safe_load(dump_config(cfg))
    del stored["execution"]["heartbeat_s"], stored["search"]["budget"]["max_items"]  # fields added later
    stored["search"]["optimizer"].pop("sigma0")
    assert changed_fields(yaml.safe_dump(stored), cfg) == []
    stored["search"]["optimizer"]["sigma0"] = 0.5
    assert changed_fields(yaml.safe_dump(stored), cfg) == ["search.optimizer.sigma0"]
