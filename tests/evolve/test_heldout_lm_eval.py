"""The end-of-run held-out table with an lm-eval task (as configs/jp_math.yaml scores MGSM-JA): its metrics are
columns, with bootstrap intervals from lm-eval's per-sample results, and the paired test against the best source
and untuned merge runs on them as on a native accuracy."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from evals.lm_eval_backend import per_sample_scores
from evolve.baselines import heldout_comparisons, heldout_table
from evolve.config import parse_config
from evolve.loop import run_search
from tests.evolve.harness import mean_interval

ROOT = Path(__file__).resolve().parents[2]
LM = "lm/zoo_ja_sub/exact_match,first_word"


def test_per_sample_scores_keep_mean_metrics_in_doc_order():
    from lm_eval.api.metrics import mean

    task = SimpleNamespace(aggregation=lambda: {"exact_match": mean, "bleu": lambda x: 0.0})
    rows = [
        {"doc_id": 2, "filter": "first_word", "metrics": ["exact_match", "bleu"], "exact_match": 1.0, "bleu": 3.0},
        {"doc_id": 0, "filter": "first_word", "metrics": ["exact_match", "bleu"], "exact_match": 0.0, "bleu": 1.0},
        {"doc_id": 0, "filter": "none", "metrics": ["exact_match"], "exact_match": 1},
        {"doc_id": 2, "filter": "none", "metrics": ["exact_match"], "exact_match": 1},
    ]
    scores = per_sample_scores({"t": rows, "other": rows}, {"t": task})
    assert list(scores) == ["t"]
    assert scores["t"].values == {"exact_match,first_word": [0.0, 1.0], "exact_match,none": [1.0, 1.0]}


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ROOT)  # the zoo's lm-eval YAMLs name their data relative to the repo root, like the configs
        yield _table(tmp_path_factory)


def _table(tmp_path_factory) -> list[dict]:
    cfg = yaml.safe_load((ROOT / "configs" / "tiny_jp_math.yaml").read_text())
    cfg["evaluation"]["tasks"][0]["limit"] = 20
    cfg["evaluation"]["heldout_limit"] = 60
    cfg["evaluation"]["heldout_tasks"] = [
        {
            "name": "lm",
            "type": "lm_eval",
            "tasks": ["zoo_ja_sub"],
            "include_path": "data/zoo/tasks/lm_eval",
            "limit": 60,
            "batch_size": 60,
        }
    ]
    cfg["search"]["budget"]["max_trials"] = 2
    cfg["output_dir"] = str(tmp_path_factory.mktemp("heldout_lm") / "run")
    config = parse_config(cfg)
    run_search(config, progress=False)
    return heldout_table(config)


def test_lm_eval_columns_carry_intervals_and_agree_with_the_native_task(table):
    assert {r["_kind"] for r in table} == {"base", "source", "untuned", "evolved"}
    for row in table:
        assert LM in row and "ja_sub/acc" in row
        # the same 60 test items (lm-eval's limit draws the native items): within one item of the native score
        assert row[LM] == pytest.approx(row["ja_sub/acc"], abs=1 / 60 + 1e-9)
        values = row["_items"]["lm/zoo_ja_sub"].values["exact_match,first_word"]
        assert len(values) == 60 and sum(values) / 60 == pytest.approx(row[LM])
        lo, hi = row["_ci"][LM]  # a bootstrap over these items (its own draws: within a couple of items of another)
        assert lo <= row[LM] <= hi
        assert (lo, hi) == pytest.approx(mean_interval(values), abs=2 / 60 + 1e-9)


def test_lm_eval_columns_get_the_paired_test(table):
    lines = [c for _, c in heldout_comparisons(table) if c.metric == LM]
    assert len(lines) == 2  # against the best source and the best untuned merge
    evolved = next(r for r in table if r["_kind"] == "evolved")
    for c in lines:
        assert c.evolved == evolved[LM]
