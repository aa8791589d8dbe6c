"""Report: parameter-name parsing, files written from a synthetic sqlite study, HTML content, empty-study error."""

from __future__ import annotations

import base64
import re
import struct
import time
from pathlib import Path

import numpy as np
import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from evolve import report
from evolve.report import recipe_grid, write_report
from evolve.study import best_trial
from merge_core.errors import EvomergeError
from search_spaces.ps import parse_param_name

optuna.logging.set_verbosity(optuna.logging.WARNING)

SOURCES = ("ja", "math")
GROUPS = ("embed", "L00", "L01", "L02", "L03", "head")
NAMES = [f"{g}.{s}.{p}" for g in GROUPS for s in SOURCES for p in ("weight", "density")]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path.name} is not a PNG"
    return struct.unpack(">II", data[16:24])  # IHDR width, height


def make_study(storage: str | None, n_trials: int = 15, fail_at: int | None = 5) -> optuna.Study:
    """The search loop's layout: study attrs, one trial per genome with its user attrs; trial `fail_at` failed.

    Trials are added whole (`create_trial`), which leaves the storage as ask/tell does in one commit per trial.
    """
    study = optuna.create_study(study_name="ps-test", storage=storage, direction="maximize")
    study.set_user_attr("space_names", NAMES)
    study.set_user_attr("config", "run:\n  name: ps-test\n")
    study.set_user_attr("stage", "ps")
    dists = {n: FloatDistribution(0.0, 1.0) for n in NAMES}
    rng = np.random.default_rng(0)
    trials = []
    for i in range(n_trials):
        params = {n: float(v) for n, v in zip(NAMES, rng.uniform(size=len(NAMES)))}
        if i == fail_at:
            trials.append(
                create_trial(
                    state=TrialState.FAIL,
                    params=params,
                    distributions=dists,
                    user_attrs={"fail_reason": "merge failed: out of memory"},
                )
            )
            continue
        fitness = float(np.mean([v for k, v in params.items() if k.endswith("ja.weight")]))
        attrs = {
            "recipe": f"merge_method: dare_ties  # trial {i}\n",
            "recipe_hash": f"h{i}",
            "metrics": {"ja_acc": fitness, "math_acc": 1 - fitness},
            "fitness": fitness,
            "merge_seconds": 1.5,
            "eval_seconds": 3.25,
            "worker": "w0",
            **({"cached_from": 3} if i == 7 else {}),
        }
        trials.append(create_trial(value=fitness, params=params, distributions=dists, user_attrs=attrs))
    study.add_trials(trials)
    return study


@pytest.fixture(scope="module")
def sqlite_study(tmp_path_factory: pytest.TempPathFactory) -> optuna.Study:
    return make_study(f"sqlite:///{tmp_path_factory.mktemp('study') / 'study.db'}")


@pytest.mark.parametrize(
    "name, parts",
    [
        ("embed.ja.weight", ("embed", None, "ja", "weight")),
        ("L00.ja.weight", ("L00", None, "ja", "weight")),
        ("L08-15.mlp.math.density", ("L08-15", "mlp", "math", "density")),
        ("L00-03.attn.ja.weight", ("L00-03", "attn", "ja", "weight")),
        ("all.math.weight", ("all", None, "math", "weight")),
        ("head.math.weight", ("head", None, "math", "weight")),
        ("L00.t", ("L00", None, None, "t")),
        ("L00.other.t", ("L00", "other", None, "t")),
        ("L00.qwen2.5-7b.weight", ("L00", None, "qwen2.5-7b", "weight")),
    ],
)
def test_parse_param_name(name, parts):
    assert parse_param_name(name) == parts


@pytest.mark.parametrize("name", ["weight", "L00..weight", ""])
def test_parse_param_name_rejects_malformed(name):
    with pytest.raises(EvomergeError, match="GROUP"):
        parse_param_name(name)


def test_recipe_grid_orders_columns_by_layer_then_module():
    params = {
        "head.ja.weight": 0.9,
        "L04-07.mlp.ja.weight": 0.4,
        "L00-03.mlp.ja.weight": 0.2,
        "L00-03.attn.ja.weight": 0.1,
        "embed.ja.weight": 0.0,
        "L00-03.t": 0.5,
    }
    grid, rows, cols = recipe_grid(params, list(params))
    assert cols == ["embed", "L00-03", "L00-03\nattn", "L00-03\nmlp", "L04-07\nmlp", "head"]
    assert rows == ["ja · weight", "t"]
    np.testing.assert_array_equal(grid[0], [0.0, np.nan, 0.1, 0.2, 0.4, 0.9])
    assert grid[1, 1] == 0.5 and np.isnan(grid[1]).sum() == 5


def test_recipe_grid_keeps_names_outside_the_scheme():
    grid, rows, cols = recipe_grid({"scale": 0.3, "L00.ja.weight": 0.7}, ["scale", "L00.ja.weight"])
    assert rows == ["value", "ja · weight"] and cols == ["L00", "scale"]


def test_write_report(sqlite_study, tmp_path):
    study = sqlite_study
    paths = write_report(study, tmp_path / "report", title="PS search <test>")
    assert [p.name for p in paths] == ["fitness.png", "best_recipe.png", "importances.png", "report.html"]
    for p in paths:
        assert p.is_file() and p.stat().st_size > 0
    for p in paths[:-1]:
        width, height = png_size(p)
        assert 300 <= width <= 3000 and 200 <= height <= 2000, (p.name, width, height)

    page = paths[-1].read_text(encoding="utf-8")
    best = best_trial(study)
    assert "PS search &lt;test&gt;" in page
    assert f"{best.value:.6g}" in page and f"<td>{best.number}</td>" in page
    assert f"merge_method: dare_ties  # trial {best.number}" in page
    assert "best ja_acc" in page and "<td>1</td>" in page  # one failed trial
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == 3 and all(base64.b64decode(i)[:8] == PNG_MAGIC for i in images)
    assert not re.search(r'(src|href)="(?!data:)', page)  # self-contained


def test_importances_skipped_below_threshold(tmp_path):
    study = make_study(None, n_trials=6, fail_at=None)
    paths = write_report(study, tmp_path / "report")
    assert "importances.png" not in [p.name for p in paths]
    assert "Skipped: needs at least 10 complete trials, the study has 6" in paths[-1].read_text(encoding="utf-8")


def test_importances_skipped_when_too_slow(sqlite_study, tmp_path, monkeypatch):
    monkeypatch.setattr(report, "IMPORTANCE_TIMEOUT_S", 0.0)
    monkeypatch.setattr(optuna.importance, "get_param_importances", lambda study: time.sleep(0.5))
    paths = write_report(sqlite_study, tmp_path / "report")
    assert "importances.png" not in [p.name for p in paths]
    assert "took longer than 0 s" in paths[-1].read_text(encoding="utf-8")


def test_empty_study_is_an_error(tmp_path):
    study = make_study(None, n_trials=1, fail_at=0)
    with pytest.raises(EvomergeError, match="^study 'ps-test' has no complete trial yet: nothing to report$"):
        write_report(study, tmp_path / "report")


def test_importances_of_a_raced_study_count_the_trials_racing_stopped(tmp_path, monkeypatch):
    """Racing stops most trials early (the demo: 141 of 150): importances are fitted on the complete trials and the
    stopped ones at their partial estimate (the last value each reported), and the report says so."""
    study = optuna.create_study(study_name="raced", direction="maximize")
    study.set_user_attr("space_names", NAMES)
    dists = {n: FloatDistribution(0.0, 1.0) for n in NAMES}
    rng = np.random.default_rng(1)
    trials = []
    for i in range(24):
        params = {n: float(v) for n, v in zip(NAMES, rng.uniform(size=len(NAMES)))}
        estimate = float(np.mean([v for k, v in params.items() if k.endswith("ja.weight")]))
        if i % 8 == 0:  # 3 trials scored on every item
            trials.append(create_trial(value=estimate, params=params, distributions=dists))
        else:  # stopped after 40 items at this estimate
            trials.append(
                create_trial(
                    state=TrialState.PRUNED, params=params, distributions=dists, intermediate_values={40: estimate}
                )
            )
    study.add_trials(trials)
    paths = write_report(study, tmp_path / "report")
    assert "importances.png" in [p.name for p in paths]
    page = paths[-1].read_text(encoding="utf-8")
    assert "From 3 complete trials and 21 stopped early by racing, each at its partial estimate" in page
    fitted = []  # what the importance evaluator is given: every trial, each stopped one at its estimate
    monkeypatch.setattr(optuna.importance, "get_param_importances", lambda s: fitted.append(s) or {NAMES[0]: 1.0})
    report.compute_importances(study)
    (seen,) = fitted
    assert sorted((t.params[NAMES[0]], t.value) for t in seen.trials) == sorted(
        (t.params[NAMES[0]], t.value if t.value is not None else t.intermediate_values[40]) for t in trials
    )
    assert {t.state for t in seen.trials} == {TrialState.COMPLETE}
    assert sum(t.state == TrialState.PRUNED for t in study.trials) == 21  # the record is unchanged
    few = optuna.create_study(direction="maximize")
    few.add_trials(trials[:9])
    _, why = report.compute_importances(few)
    assert why.startswith("needs at least 10 complete trials (counting those stopped early by racing), the study has 2")
