"""Multi-objective search (`evaluation.objectives`): config rules, the front and its balanced member, hypervolume,
and a search told several values, in process (a fake executor scores two objectives that trade off)."""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.study import StudyDirection
from optuna.trial import TrialState, create_trial

from evolve.config import RunConfig, parse_config
from evolve.loop import LoopState, run_search
from evolve.pareto import REFERENCE_ATTR, balanced, derived_reference, hypervolume, hypervolume_history, pareto_front
from evolve.spaces import build_ps_space
from evolve.study import best_trial
from evolve.worker import Outcome
from merge_core.errors import EvomergeError
from tests.evolve.harness import zoo_config_data

MAX, MIN = StudyDirection.MAXIMIZE, StudyDirection.MINIMIZE
OBJECTIVES = [{"metric": "ja_sub/acc", "direction": "max"}, {"metric": "ja_sub/gold_prob", "direction": "max"}]


@pytest.fixture
def fast_dir():
    base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    path = Path(tempfile.mkdtemp(prefix="evomerge-pareto-", dir=base))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def mo_data(out: Path, sampler: str = "nsga2", trials: int = 12, **evaluation) -> dict:
    data = zoo_config_data("pareto", out, sampler, trials)
    data["evaluation"].pop("fitness")
    data["evaluation"]["objectives"] = copy.deepcopy(OBJECTIVES)
    data["evaluation"].update(evaluation)
    return data


def trial(number: int, values: list[float], **attrs) -> optuna.trial.FrozenTrial:
    t = create_trial(values=values, user_attrs=attrs)
    t.number = number
    return t


# ---- config ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d["evaluation"].update(fitness=[{"metric": "ja_sub/acc"}]), "evaluation.fitness: give either"),
        (lambda d: d["evaluation"].pop("objectives"), "evaluation.fitness: give either `fitness`"),
        (lambda d: d["evaluation"]["objectives"].pop(), "evaluation.objectives: List should have at least 2"),
        (lambda d: d["search"]["optimizer"].update(sampler="cmaes"), "search.optimizer.sampler: 'cmaes' optimizes one"),
        (lambda d: d["search"]["optimizer"].update(sampler="pycma"), "use nsga2, tpe, gp, random"),
        (lambda d: d["evaluation"].update(racing={}), "evaluation.racing: ranks candidates by one fitness"),
        (lambda d: d["evaluation"].update(rescore={}), "evaluation.rescore: ranks candidates by one fitness"),
        (lambda d: d["evaluation"].update(reference_point=[0.0]), "evaluation.reference_point: 1 values for 2"),
        (lambda d: d["evaluation"]["objectives"][1].update(metric="ja_sub/acc"), "objectives[1].metric: 'ja_sub/acc'"),
        (lambda d: d["evaluation"]["objectives"][1].update(metric="nope/acc"), "objectives[1].metric: 'nope/acc' mu"),
        (lambda d: d["evaluation"]["objectives"][1].update(direction="up"), "evaluation.objectives.1.direction"),
    ],
)
def test_objectives_config_errors_are_one_line(change, message, tmp_path):
    data = mo_data(tmp_path)
    change(data)
    with pytest.raises(EvomergeError) as e:
        parse_config(data)
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("sampler", ["nsga2", "tpe", "gp", "random"])
def test_multi_objective_samplers_are_accepted(sampler, tmp_path):
    cfg = parse_config(mo_data(tmp_path, sampler))
    assert cfg.evaluation.multi_objective and cfg.evaluation.fitness is None


def test_a_metric_no_task_reports_is_refused_before_the_search(tmp_path):
    from evolve.checks import validate_run

    data = mo_data(tmp_path)
    data["evaluation"]["objectives"][1]["metric"] = "ja_sub/bleu"
    with pytest.raises(EvomergeError, match=r"evaluation.objectives\[1\].metric: 'ja_sub/bleu': generation task"):
        validate_run(parse_config(data), offline=True)


def test_single_objective_reference_point_is_refused(tmp_path):
    data = zoo_config_data("single", tmp_path, "cmaes", 4)
    data["evaluation"]["reference_point"] = [0.0]
    with pytest.raises(EvomergeError, match="evaluation.reference_point: a hypervolume reference is for `objectives`"):
        parse_config(data)


# ---- front, balanced member, hypervolume ----------------------------------------------------------


def test_front_leaves_out_dominated_and_cached_trials():
    trials = [
        trial(0, [0.2, 0.9]),
        trial(1, [0.5, 0.5]),
        trial(2, [0.4, 0.4]),  # dominated by 1
        trial(3, [0.9, 0.1]),
        trial(4, [0.5, 0.5], cached_from=1),
    ]
    assert [t.number for t in pareto_front(trials, [MAX, MAX])] == [0, 1, 3]
    # minimizing the second objective turns the front around
    assert [t.number for t in pareto_front(trials, [MAX, MIN])] == [3]


def test_balanced_member_maximizes_the_worst_normalized_objective():
    front = [trial(0, [0.2, 0.9]), trial(1, [0.5, 0.6]), trial(2, [0.9, 0.1])]
    # normalized over the front: 0 -> (0, 1), 1 -> (3/7, 5/8), 2 -> (1, 0); the worst of each: 0, 3/7, 0
    assert balanced(front, [MAX, MAX]).number == 1
    # ties on the worst objective: the higher sum, then the lower number
    assert balanced([trial(5, [1.0, 0.0]), trial(2, [0.0, 1.0])], [MAX, MAX]).number == 2
    assert balanced([trial(7, [0.3, 0.3])], [MAX, MAX]).number == 7


def test_hypervolume_against_the_reference_point():
    assert hypervolume([[0.5, 0.5]], [MAX, MAX], [0.0, 0.0]) == pytest.approx(0.25)
    assert hypervolume([[0.5, 0.5], [1.0, 0.2]], [MAX, MAX], [0.0, 0.0]) == pytest.approx(0.25 + 0.5 * 0.2)
    # minimized objective: the reference is its worst value; a point worse than the reference adds nothing
    assert hypervolume([[0.5, 2.0], [0.9, 5.0]], [MAX, MIN], [0.0, 4.0]) == pytest.approx(1.0)
    assert hypervolume([], [MAX, MAX], [0.0, 0.0]) == 0.0
    points = [trial(0, [0.5, 0.5]), trial(1, [0.2, 0.2]), trial(2, [1.0, 0.2])]
    history = hypervolume_history(points, [MAX, MAX], [0, 0])
    assert [n for n, _ in history] == [0, 1, 2] and [h for _, h in history] == pytest.approx([0.25, 0.25, 0.35])


def test_derived_reference_is_the_worst_proportion_or_the_first_trials_value():
    assert derived_reference(["t/acc", "t/gold_prob"], [MAX, MAX], None) == [0.0, 0.0]
    assert derived_reference(["t/acc", "lm/x/exact_match,flex"], [MAX, MIN], None) == [0.0, 1.0]
    assert derived_reference(["t/acc", "t/ppl"], [MAX, MIN], None) is None  # needs x0's value
    assert derived_reference(["t/acc", "t/ppl"], [MAX, MIN], [0.3, 12.5]) == [0.0, 12.5]


def test_patience_counts_trials_that_do_not_move_the_front():
    from evolve.config import Budget

    state = LoopState(Budget(max_trials=10, patience=2), float("inf"))
    for value, since in [((0.2, 0.9), 0), ((0.1, 0.8), 1), ((0.9, 0.1), 0), ((0.9, 0.1), 1), ((0.5, 0.5), 0)]:
        state.record(value)
        assert state.since_best == since
    assert state.front == [(0.2, 0.9), (0.9, 0.1), (0.5, 0.5)]


# ---- a search told several values ----------------------------------------------------------------


class TradeOffExecutor:
    """Two objectives that pull apart: acc peaks where the first coordinate is high, gold_prob where it is low."""

    slots = 1
    evaluated: list[int] = []

    def __init__(self, cfg: RunConfig, template) -> None:
        self.space = build_ps_space(cfg)
        self.pending: list = []

    def submit(self, key, recipe, *args) -> None:
        self.pending.append((key, recipe))

    def wait(self):
        key, recipe = self.pending.pop(0)
        TradeOffExecutor.evaluated.append(key)
        x = self.space.encode(recipe)
        lo, hi = self.space.bounds[0]
        u = (x[0] - lo) / (hi - lo)
        rest = sum((v - 1.0) ** 2 for v in x[1:]) / 40
        metrics = {"ja_sub/acc": max(0.0, u - rest), "ja_sub/gold_prob": max(0.0, 1 - u * u - rest)}
        return key, Outcome(worker="fake", metrics=metrics, values=list(metrics.values()))

    def close(self) -> None:
        self.pending.clear()


@pytest.fixture
def trade_off(monkeypatch):
    TradeOffExecutor.evaluated = []
    monkeypatch.setitem(run_search.__kwdefaults__, "executor_factory", TradeOffExecutor)
    return TradeOffExecutor


def test_a_search_tells_each_objective_and_records_the_hypervolume(fast_dir, trade_off):
    cfg = parse_config(mo_data(fast_dir / "run", "nsga2", trials=12))
    study = run_search(cfg, progress=False).study
    assert study.directions == [MAX, MAX] and study.metric_names == ["ja_sub/acc", "ja_sub/gold_prob"]
    trials = study.get_trials()
    assert len(trials) == 12 and all(t.state == TrialState.COMPLETE and len(t.values) == 2 for t in trials)
    assert study.user_attrs[REFERENCE_ATTR] == [0.0, 0.0]  # both proportions
    recorded = [t.user_attrs["hypervolume"] for t in trials if "cached_from" not in t.user_attrs]
    assert recorded == sorted(recorded) and recorded[-1] > 0
    history = dict(hypervolume_history(trials, study.directions, [0.0, 0.0]))
    fresh = [t for t in trials if "cached_from" not in t.user_attrs]
    assert [history[t.number] for t in fresh] == pytest.approx([t.user_attrs["hypervolume"] for t in fresh])
    front = pareto_front(trials, study.directions)
    assert len(front) >= 2 and best_trial(study).number == balanced(front, study.directions).number


def test_a_study_searched_with_other_objectives_is_refused(fast_dir, trade_off):
    run_search(parse_config(mo_data(fast_dir / "run", trials=2)), progress=False)
    data = mo_data(fast_dir / "run", trials=2)
    data["evaluation"]["objectives"][1]["direction"] = "min"
    with pytest.raises(EvomergeError, match="was made with other objectives .*give the run a new name"):
        run_search(parse_config(data), progress=False)


def test_a_configured_reference_point_is_stored_and_used(fast_dir, trade_off):
    cfg = parse_config(mo_data(fast_dir / "run", trials=3, reference_point=[0.1, 0.2]))
    study = run_search(cfg, progress=False).study
    assert study.user_attrs[REFERENCE_ATTR] == [0.1, 0.2]
    last = study.trials[-1]
    expected = hypervolume([t.values for t in study.trials], study.directions, [0.1, 0.2])
    assert last.user_attrs["hypervolume"] == pytest.approx(expected)


# ---- status, report, held-out scores of the front -------------------------------------------------


def test_status_lists_the_front_with_the_balanced_member_and_the_hypervolume(fast_dir, trade_off, capsys):
    from evolve.cli import main

    cfg = parse_config(mo_data(fast_dir / "run", "tpe", trials=14))
    study = run_search(cfg, progress=False).study
    capsys.readouterr()
    assert main(["status", str(fast_dir / "run")]) == 0
    out = capsys.readouterr().out
    front = pareto_front(study.trials, study.directions)
    pick = balanced(front, study.directions)
    assert "objectives: ja_sub/acc (maximize), ja_sub/gold_prob (maximize); hypervolume " in out
    assert "reference point (0, 0), derived" in out and f"Pareto front ({len(front)} trials; balanced:" in out
    table = out.split("Pareto front", 1)[1].splitlines()[3:]
    assert [int(line.split()[0]) for line in table] == [t.number for t in front]
    assert [line.split()[0] for line in table if " yes " in line] == [str(pick.number)]
    assert all("ja.weight" in line and "math.weight" in line for line in table)


def test_report_draws_the_front_and_the_hypervolume_and_lists_the_members(fast_dir, trade_off, capsys):
    from evolve.cli import main

    cfg = parse_config(mo_data(fast_dir / "run", "random", trials=10))
    study = run_search(cfg, progress=False).study
    assert main(["report", str(fast_dir / "run"), "--no-heldout"]) == 0
    report = fast_dir / "run" / "report"
    assert {p.name for p in report.iterdir()} >= {"pareto.png", "hypervolume.png", "best_recipe.png", "report.html"}
    page = (report / "report.html").read_text()
    front = pareto_front(study.trials, study.directions)
    assert "<h2>Pareto front</h2>" in page and "Held-out scores not computed" in page
    assert page.count("<tr><td>") == len(front) and "balanced member of the front" in page


def test_three_objectives_are_drawn_as_pairwise_panels(fast_dir):
    from evolve.report import plot_pareto

    trials = [trial(i, [i / 10, 1 - i / 10, (i % 3) / 3]) for i in range(8)]
    directions = [MAX, MAX, MIN]
    front = pareto_front(trials, directions)
    fig = plot_pareto(trials, front, balanced(front, directions), ["a", "b", "c"], directions)
    assert sum(ax.axison for ax in fig.axes) == 3  # (a, b), (a, c), (b, c)


def test_front_heldout_scores_each_member_once(fast_dir, trade_off, monkeypatch):
    from evolve import front as front_view
    from evolve.front import front_heldout

    cfg = parse_config(mo_data(fast_dir / "run", "nsga2", trials=6, heldout_limit=10))
    study = run_search(cfg, progress=False).study
    front = pareto_front(study.trials, study.directions)
    first = front_heldout(cfg, study)
    assert sorted(first) == [t.number for t in front]
    assert all(0 <= m["ja_sub/acc"] <= 1 for m in first.values())
    monkeypatch.setattr(front_view, "score_recipes", lambda *a, **k: pytest.fail("scored again"))
    assert front_heldout(cfg, optuna.load_study(study_name=cfg.name, storage=cfg.storage_url)) == first


def test_the_run_ends_with_the_front_and_its_heldout_table(fast_dir, trade_off, capsys):
    from evolve.cli import main

    data = mo_data(fast_dir / "run", "nsga2", trials=5, heldout_limit=10)
    path = fast_dir / "config.yaml"
    path.write_text(__import__("yaml").safe_dump(data))
    assert main(["run", str(path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    study = optuna.load_study(study_name="pareto", storage=f"sqlite:///{fast_dir / 'run' / 'study.db'}")
    front = pareto_front(study.trials, study.directions)
    pick = balanced(front, study.directions)
    assert f"Pareto front: {len(front)} trials; hypervolume " in out
    assert f"balanced member: trial {pick.number} (ja_sub/acc=" in out
    for t in front:
        assert f"evolved PS front trial {t.number}" + (" (balanced)" if t is pick else "") in out


def test_export_defaults_to_the_balanced_member_and_takes_any_member(fast_dir, trade_off, capsys):
    import json

    from evolve.cli import main

    cfg = parse_config(mo_data(fast_dir / "run", "nsga2", trials=6))
    study = run_search(cfg, progress=False).study
    front = pareto_front(study.trials, study.directions)
    pick = balanced(front, study.directions)
    other = next((t for t in front if t.number != pick.number), pick)
    for args, number in (([], pick.number), (["--trial", str(other.number)], other.number)):
        out = fast_dir / f"export-{number}"
        assert main(["export", str(fast_dir / "run"), "--out", str(out), "--no-heldout", *args]) == 0
        assert json.loads((out / "evomerge_scores.json").read_text())["trial"] == number


def test_a_gp_run_says_nothing_of_greenlet(fast_dir):
    """Optuna's GP sampler warns, when it first fits (after its 10 random start-up trials), that it runs without
    `greenlet`; the CLI keeps that from the user (the sequential path is the one evomerge ships and measured). A
    fresh process, which does import the module that warns."""
    import subprocess
    import sys

    path = fast_dir / "gp.yaml"
    path.write_text(yaml.safe_dump(mo_data(fast_dir / "gp", "gp", trials=12)))
    script = (
        "import sys; from evolve.cli import main; "
        f"rc = main(['run', {str(path)!r}, '--no-progress', '--no-final-table']); "
        "print('imported:', 'optuna._gp.batched_lbfgsb' in sys.modules); sys.exit(rc)"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Pareto front:" in done.stdout and "imported: True" in done.stdout
    assert "greenlet" not in done.stdout + done.stderr
