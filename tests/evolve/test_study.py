"""The one definition of the best trial (highest value, the lowest number among equal values), as the search's
summary, status, report and export use it."""

from __future__ import annotations

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from evolve.report import write_report
from evolve.study import best_first, best_trial
from merge_core.errors import EvomergeError

DISTS = {"x": FloatDistribution(0.0, 1.0)}


def tied_study() -> optuna.Study:
    """Trials 0..4: values 0.5, 0.9, 0.9 (a tie with trial 1), 0.1, and a failed trial; trial 5 still running."""
    study = optuna.create_study(study_name="ties", direction="maximize")
    study.set_user_attr("space_names", ["x"])
    for i, value in enumerate([0.5, 0.9, 0.9, 0.1]):
        study.add_trial(
            create_trial(
                value=value,
                params={"x": value},
                distributions=DISTS,
                user_attrs={"recipe": f"merge_method: linear  # trial {i}\n"},
            )
        )
    study.add_trial(create_trial(state=TrialState.FAIL, params={"x": 0.2}, distributions=DISTS))
    study.add_trial(create_trial(state=TrialState.RUNNING, params={"x": 0.3}, distributions=DISTS))
    return study


def test_best_is_the_highest_value_and_the_lowest_number_among_ties():
    study = tied_study()
    assert [t.number for t in best_first(study.get_trials())] == [1, 2, 0, 3]
    assert best_trial(study).number == 1
    assert best_trial(study, 3).number == 3  # a chosen complete trial
    with pytest.raises(EvomergeError, match="--trial 4: no complete trial"):
        best_trial(study, 4)  # failed
    with pytest.raises(EvomergeError, match="has no complete trial yet"):
        best_trial(optuna.create_study(study_name="empty"))


def test_the_report_shows_the_same_best_trial(tmp_path):
    page = write_report(tied_study(), tmp_path)[-1].read_text(encoding="utf-8")
    assert "<tr><th>best trial</th><td>1</td></tr>" in page and "# trial 1\n" in page


def test_candidates_per_hour_counts_busy_time_only() -> None:
    """Spans [0, 10] and [5, 20] minutes overlap (20 busy minutes), then a day's gap, then [0, 10] minutes: 3 trials
    in 30 busy minutes = 6 per hour."""
    from datetime import datetime, timedelta
    from types import SimpleNamespace

    from evolve.study import candidates_per_hour

    t0 = datetime(2026, 1, 1)
    minute, day = timedelta(minutes=1), timedelta(days=1)
    spans = [(t0, t0 + 10 * minute), (t0 + 5 * minute, t0 + 20 * minute), (t0 + day, t0 + day + 10 * minute)]
    trials = [SimpleNamespace(datetime_start=a, datetime_complete=b) for a, b in spans]
    assert candidates_per_hour(trials) == 6.0
    assert candidates_per_hour([SimpleNamespace(datetime_start=t0, datetime_complete=None)]) is None
