"""A stage's item protocol (search.protocol / search.dfs.protocol): validation items kept out of the search and
deciding the pick, batches of search items changing every few trials (the paper's DFS protocol), and a killed run
resuming to the uninterrupted record."""

from __future__ import annotations

import pytest
import yaml
from optuna.trial import TrialState

from evolve.config import load_config, parse_config
from evolve.items import decode_items
from evolve.loop import run_search
from evolve.protocol import TrialItems, pool_order, validation_order
from evolve.study import best_trial, load_study, rescored
from merge_core.errors import EvomergeError
from tests.evolve.harness import QUIET, evolve_cli, run_killed, write_config

PROTOCOL = {"validation": 10, "batch": 8, "every": 3, "top_k": 3}


def test_batches_walk_the_pool_and_never_touch_validation():
    order = [5, 11, 0, 9, 3, 7, 1, 10, 2, 8, 4, 6]  # a run's item order over 12 items
    assert pool_order(order, 12, 4, "t", "w") == [5, 0, 3, 7, 1, 2, 4, 6]
    assert validation_order(order, 12, 4, "t", "w") == [11, 9, 10, 8]
    seen = []
    for index in range(4):  # batches of 3 over a pool of 8: 0-2, 3-5, 6-7 + 0, 1-3
        trial_order, upto = TrialItems(4, 3, index).order(order, 12, "t")
        assert upto == 3 and sorted(trial_order) == [0, 1, 2, 3, 4, 5, 6, 7]
        seen.append(trial_order[:upto])
    assert seen == [[5, 0, 3], [7, 1, 2], [4, 6, 5], [0, 3, 7]]
    assert TrialItems(4).order(order, 12, "t") == ([5, 0, 3, 7, 1, 2, 4, 6], None)  # validation only: all the pool
    with pytest.raises(EvomergeError, match=r"w.validation: 12 items kept for the pick, but task 't' has 12"):
        validation_order(order, 12, 12, "t", "w")
    with pytest.raises(EvomergeError, match=r"search.dfs.protocol.batch: 9 items per trial, but task 't' has 8"):
        TrialItems(4, 9, 0, "search.dfs.protocol").order(order, 12, "t")


def test_protocol_config_rules(tmp_path, world):
    base = yaml.safe_load(write_config(tmp_path, world).read_text())

    def error(**changes) -> str:
        data = yaml.safe_load(yaml.safe_dump(base))
        for dotted, value in changes.items():
            node = data
            *keys, last = dotted.split(".")
            for k in keys:
                node = node.setdefault(k, {})
            node[last] = value
        with pytest.raises(EvomergeError) as err:
            parse_config(data, where="c.yaml")
        assert "\n" not in str(err.value)
        return str(err.value)

    assert "search.protocol: give validation" in error(**{"search.protocol": {"every": 3}})
    assert "search.protocol.every: trials sharing one batch; it needs `batch`" in error(
        **{"search.protocol": {"validation": 5, "every": 3}}
    )
    assert "search.protocol.top_k: trials re-scored on the validation items" in error(
        **{"search.protocol": {"batch": 5, "top_k": 3}}
    )
    assert "search.protocol.batch: racing compares" in error(
        **{"search.protocol": {"batch": 5}, "evaluation.racing": {"chunk": 5}}
    )
    assert "search.protocol.validation: the pick is re-scored" in error(
        **{"search.protocol": {"validation": 5}, "evaluation.rescore": {"top_k": 2}}
    )


@pytest.fixture(scope="module")
def protocol_run(tmp_path_factory, world):
    tmp = tmp_path_factory.mktemp("protocol")
    cfg_path = write_config(tmp, world, **{"search.protocol": PROTOCOL, "search.budget.max_trials": 8})
    run_search(load_config(cfg_path), progress=False)
    return cfg_path


def record(cfg_path) -> list[tuple]:
    study = load_study(load_config(cfg_path))
    trials = [
        (t.number, t.state, t.params, t.value, t.user_attrs.get("batch"), t.user_attrs.get("items"))
        for t in study.get_trials(deepcopy=False)
    ]
    return [trials, rescored(study)]


def test_trials_score_their_batch_and_the_pick_is_the_best_on_validation(protocol_run):
    cfg = load_config(protocol_run)
    study = load_study(cfg)
    trials = study.get_trials(deepcopy=False)
    assert len(trials) == 8 and all(t.state == TrialState.COMPLETE for t in trials)
    for t in trials:
        assert t.user_attrs["batch"] == {"index": t.number // 3, "size": 8}
        words = t.user_attrs["items"]["words"]
        assert (words["n"], words["of"]) == (8, 10)  # 8 scored of the 20 items less 10 kept for validation
        # its fitness is over its batch: acc + 0.1 * gold_logprob of its 8 items
        s = decode_items(t.user_attrs["items"])["words"]
        acc, lp = (sum(s.values[m]) / 8 for m in ("acc", "gold_logprob"))
        assert t.user_attrs["fitness"] == pytest.approx(acc + 0.1 * lp, abs=1e-3)  # stored as float16
    scores = rescored(study)
    assert len(scores) == 3 and all(r["validation"] == 10 and r["items_scored"] == 10 for r in scores.values())
    pick = best_trial(study)
    assert scores[pick.number]["fitness"] == max(r["fitness"] for r in scores.values())
    status = evolve_cli("status", str(cfg.run_dir))
    assert status.returncode == 0, status.stderr
    assert f"pick: trial {pick.number}, re-scored fitness {scores[pick.number]['fitness']:.4f} on 10 items" in (
        status.stdout
    )


def test_a_killed_protocol_run_resumes_to_the_same_record(tmp_path, protocol_run, world):
    """Killed right after trial 4 (batch 1) went to the worker, the resumed run re-runs it on the same batch and
    ends with the uninterrupted run's trials, batches, per-item records and validation scores."""
    cfg_path = write_config(tmp_path, world, **{"search.protocol": PROTOCOL, "search.budget.max_trials": 8})
    killed = run_killed(cfg_path, "t", 4)
    assert killed.returncode == -9, killed.stderr[-2000:]
    resumed = evolve_cli("resume", str(load_config(cfg_path).run_dir), *QUIET)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert record(cfg_path) == record(protocol_run)


def test_the_dfs_stage_runs_the_papers_protocol(tmp_path, world):
    """A DFS stage with validation items, batches per CMA-ES generation (every = popsize) and the pick re-scored."""
    dfs = {
        "space": {"model_a": "ja", "model_b": "math", "repeats": 2, "scales": "model_pair", "max_path_length": 8},
        "optimizer": {"sampler": "cmaes", "sigma0": 0.5, "popsize": 4},
        "budget": {"max_trials": 8},
        "protocol": {"validation": 8, "batch": 6, "every": 4, "top_k": 2},
    }
    cfg = load_config(write_config(tmp_path, world, **{"search.stages": ["dfs"], "search.dfs": dfs}))
    study = run_search(cfg, progress=False).study
    trials = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    assert len(trials) == 8
    assert {t.number: t.user_attrs["batch"]["index"] for t in trials} == {n: n // 4 for n in range(8)}
    assert all((t.user_attrs["items"]["words"]["n"], t.user_attrs["items"]["words"]["of"]) == (6, 12) for t in trials)
    scores = rescored(study)
    assert len(scores) == 2 and all(r["items_scored"] == 8 for r in scores.values())
    assert best_trial(study).number in scores
