"""Racing: the stopping rule on constructed per-item scores, and the schedule of chunks."""

from __future__ import annotations

import numpy as np
import pytest

from evals.base import item_order
from evolve.racing import Race, paired_differences, schedule, stop_looks, stop_reason, upper_bound


def race(incumbent: list[float], test: str = "t", **kw) -> Race:
    args = dict(chunk=20, alpha=0.05, min_items=20) | kw
    return Race(incumbent={"t": incumbent}, incumbent_trial=0, test=test, **args)


def run_race(r: Race, candidate: list[float], order: list[int]) -> tuple[int, str | None]:
    """Items scored when the race stops (len(candidate) if it never does), the candidate's items taken in `order`."""
    cand = [candidate[i] for i in order]
    inc = {"t": [r.incumbent["t"][i] for i in order]}
    r = Race(inc, r.incumbent_trial, r.chunk, r.alpha, r.min_items, r.test)
    looks = schedule({"t": len(cand)}, r.chunk)
    for upto in looks:
        d = paired_differences({"t": cand[: upto["t"]]}, r.incumbent)
        why = stop_reason(r, d, len(cand), stop_looks(looks, r.min_items))
        if why:
            return upto["t"], why
    return len(cand), None


def accuracy(n: int, right: int, rng: np.random.Generator) -> list[float]:
    v = np.zeros(n)
    v[rng.choice(n, right, replace=False)] = 1.0
    return v.tolist()


def test_never_stops_a_candidate_better_on_the_full_set() -> None:
    """A candidate 3 points better on 200 items (acc 0.53 vs 0.50, plus a soft score) is never stopped by the t
    rule, whatever the seeded item order: 200 orders, every look. Optuna's WilcoxonPruner semantics (p < alpha at
    every look, uncorrected) stop it in some orders: why `t` is the default."""
    rng = np.random.default_rng(0)
    incumbent = accuracy(200, 100, rng)
    candidate = accuracy(200, 106, rng)
    gold_i, gold_c = rng.random(200) * 0.4, rng.random(200) * 0.4 + 0.02
    inc = [a + g for a, g in zip(incumbent, gold_i)]
    cand = [a + g for a, g in zip(candidate, gold_c)]
    assert np.mean(cand) > np.mean(inc)
    stopped = [run_race(race(inc, "t"), cand, item_order(200, seed))[1] for seed in range(200)]
    assert stopped == [None] * 200
    wilcoxon = [run_race(race(inc, "wilcoxon"), cand, item_order(200, seed))[1] for seed in range(200)]
    assert sum(w is not None for w in wilcoxon) > 0


def test_stops_a_clearly_worse_candidate_at_the_first_look_it_may() -> None:
    rng = np.random.default_rng(1)
    inc, cand = accuracy(200, 140, rng), accuracy(200, 40, rng)  # 0.70 vs 0.20
    for test in ("t", "wilcoxon"):
        used, why = run_race(race(inc, test, min_items=40), cand, item_order(200, 3))
        assert used == 40 and why.startswith("racing: after 40/200 items")


def test_an_equal_candidate_is_rarely_stopped() -> None:
    """The error rate the t rule promises: a candidate exactly as good on the full set is stopped in at most about
    alpha of item orders (Bonferroni over the looks makes it conservative)."""
    rng = np.random.default_rng(2)
    inc = accuracy(200, 120, rng)
    cand = list(inc)
    swap = rng.choice(200, 60, replace=False)  # 30 items flip each way: same total, 60 discordant items
    ones, zeros = [i for i in swap if inc[i] == 1][:30], [i for i in swap if inc[i] == 0][:30]
    n = min(len(ones), len(zeros))
    for i in ones[:n]:
        cand[i] = 0.0
    for i in zeros[:n]:
        cand[i] = 1.0
    assert sum(cand) == sum(inc)
    stops = sum(run_race(race(inc), cand, item_order(200, seed))[1] is not None for seed in range(400))
    assert stops <= 0.05 * 400


def test_upper_bound_by_hand() -> None:
    d = np.array([-1.0, 0.0, -1.0, 0.0])  # mean -0.5, sd 0.57735, n 4 of N 8
    from scipy.stats import t

    fpc = np.sqrt((8 - 4) / (8 - 1))
    assert upper_bound(d, 8, 0.95) == pytest.approx(-0.5 + t.ppf(0.95, 3) * 0.57735027 / 2 * fpc)
    assert upper_bound(d, 4, 0.95) == -0.5  # every item scored: the mean itself


def test_schedule_spreads_chunks_over_tasks_and_ends_with_every_item() -> None:
    assert schedule({"a": 100}, 40) == [{"a": 40}, {"a": 80}, {"a": 100}]
    assert schedule({"a": 150, "b": 50}, 100) == [{"a": 75, "b": 25}, {"a": 150, "b": 50}]
    assert schedule({"a": 30}, 40) == [{"a": 30}]
    looks = schedule({"a": 100}, 20)
    assert stop_looks(looks, 40) == 3  # 40, 60, 80 (20 is below min_items, 100 is the last)


def test_loop_state_counts_items_stops_at_max_items_and_counts_a_stopped_trial_as_no_improvement() -> None:
    from evolve.config import Budget
    from evolve.loop import LoopState

    state = LoopState(Budget(max_trials=100, max_items=500, patience=2), deadline=float("inf"))
    state.record(1.0, items=200)
    state.record(0.4, pruned=True, items=40)
    assert (state.done, state.items, state.best, state.since_best, state.failures) == (2, 240, 1.0, 1, 0)
    assert state.stop_reason() is None
    state.record(1.5, items=200)
    assert state.stop_reason() is None and state.since_best == 0
    state.record(0.2, pruned=True, items=80)
    assert state.stop_reason() == "budget: max_items reached (520 items scored)"
