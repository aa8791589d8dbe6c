"""Dataset-backed tasks in the run config: schema errors in one line, `evolve check` reading the data offline, and
the held-out rule (a dataset search task is not rescored; held-out data from a dataset is a heldout_tasks entry)."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml

from evolve.baselines import heldout_evaluators
from evolve.cli import main
from evolve.config import load_config, parse_config
from merge_core.errors import EvomergeError
from tests.evals.test_dataset_source import FIELDS, HUB_ID, fake_hub_cache, offline_cache, save_jp_math_dataset

__all__ = ["offline_cache"]  # the fixture, imported for these tests

ROOT = Path(__file__).resolve().parents[2]


def tiny_config(tmp_path: Path, dataset: dict, heldout: list | None = None) -> dict:
    """configs/tiny_jp_math.yaml (zoo models, absolute paths) with its task reading `dataset`."""
    cfg = yaml.safe_load((ROOT / "configs" / "tiny_jp_math.yaml").read_text())
    cfg["models"]["base"] = str(ROOT / cfg["models"]["base"])
    cfg["models"]["sources"] = [{**s, "path": str(ROOT / s["path"])} for s in cfg["models"]["sources"]]
    task = cfg["evaluation"]["tasks"][0]
    del task["task_dir"], task["split"]
    task["dataset"] = copy.deepcopy(dataset)
    cfg["evaluation"]["heldout_tasks"] = copy.deepcopy(heldout or [])
    cfg["output_dir"] = str(tmp_path / "run")
    return cfg


def write(tmp_path: Path, cfg: dict) -> str:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True))
    return str(path)


@pytest.mark.parametrize(
    ("dataset", "message"),
    [
        ({"path": "x", "fields": {"question": "prompt"}}, "dataset.fields.question: not a field here"),
        ({"path": "x", "fields": {"prompt": 1}}, "dataset.fields.prompt: Input should be a valid string"),
        ({"path": "x", "slice": "0-5"}, "dataset.slice: expected 'start:stop'"),
        ({"path": "x", "splt": "test"}, "dataset.splt: not a field here"),
        ({"path": ""}, "dataset.path: String should have at least 1 character"),
    ],
)
def test_bad_dataset_fields_give_one_line(tmp_path, dataset, message):
    with pytest.raises(EvomergeError) as err:
        parse_config(tiny_config(tmp_path, dataset), where="c.yaml")
    assert f"c.yaml: evaluation.tasks.0.{message}" in str(err.value) and "\n" not in str(err.value)


def test_task_dir_or_dataset_exactly_one(tmp_path):
    cfg = tiny_config(tmp_path, {"path": "x", "split": "test"})
    both = copy.deepcopy(cfg)
    both["evaluation"]["tasks"][0]["task_dir"] = "data/zoo/tasks/ja_sub"
    neither = copy.deepcopy(cfg)
    del neither["evaluation"]["tasks"][0]["dataset"]
    split = copy.deepcopy(cfg)
    split["evaluation"]["tasks"][0]["split"] = "dev"
    for data, message in (
        (both, "evaluation.tasks.0.dataset: give task_dir"),
        (neither, "evaluation.tasks.0.task_dir: required"),
        (split, "evaluation.tasks.0.split: a dataset task takes its split from dataset.split"),
    ):
        with pytest.raises(EvomergeError, match=message):
            parse_config(data)


def test_check_reads_a_save_to_disk_dataset(tmp_path, capsys):
    folder = save_jp_math_dataset(tmp_path / "gsm8k_ja")
    heldout = [{**tiny_config(tmp_path, {})["evaluation"]["tasks"][0], "name": "ja_heldout"}]
    heldout[0]["dataset"] = {"path": str(folder), "fields": FIELDS, "slice": "30:"}
    cfg = tiny_config(tmp_path, {"path": str(folder), "fields": FIELDS, "slice": ":30"}, heldout)
    path = write(tmp_path, cfg)
    for args in ([], ["--offline"]):
        assert main(["check", path, *args]) == 0
        out = capsys.readouterr().out
        assert "config OK" in out and "note:" not in out
    # the held-out table: the dataset search task is left out, the held-out dataset task keeps its own rows
    (name, evaluator), *rest = heldout_evaluators(load_config(path))
    assert not rest and name == "ja_heldout" and [i.id for i in evaluator.items] == [str(i) for i in range(30, 40)]
    cfg["evaluation"]["tasks"][0]["dataset"]["fields"]["answer"] = "answer"
    assert main(["check", write(tmp_path, cfg), "--offline"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "evaluation.tasks[0].dataset.fields.answer: column 'answer' is not in" in err


def test_check_notes_an_uncached_hub_dataset_and_reads_a_cached_one(tmp_path, capsys, offline_cache):
    cfg = tiny_config(tmp_path, {"path": HUB_ID, "split": "test", "fields": FIELDS})
    path = write(tmp_path, cfg)
    assert main(["check", path]) == 0  # not in the (empty) cache: a note, never a download
    out = capsys.readouterr().out
    assert f"note: evaluation.tasks[0].dataset: {HUB_ID} split test: not cached; not checked" in out
    fake_hub_cache(offline_cache, HUB_ID)
    assert main(["check", path]) == 0
    assert "note:" not in capsys.readouterr().out
    cfg["evaluation"]["tasks"][0]["dataset"]["split"] = "validation"
    assert main(["check", write(tmp_path, cfg)]) == 2
    assert "evaluation.tasks[0].dataset: dataset SakanaAI/gsm8k-ja-test_250-1319: Unknown split" in (
        capsys.readouterr().err
    )


def test_check_states_the_cost_of_jp_math_from_the_cached_dataset(tmp_path, capsys, offline_cache):
    """`evolve check` on the shipped configs: items x generated tokens per candidate and per stage (from the cached
    data; 'not known' without it), the DFS protocol's batch, and, on a machine without CUDA, that it is a GPU job."""
    import torch

    gpu_job = "this config is a GPU job" if not torch.cuda.is_available() else None
    assert main(["check", str(ROOT / "configs" / "jp_math_hybrid.yaml"), "--offline"]) == 0
    out = capsys.readouterr().out
    assert "cost: ps: per candidate items not known here (data not cached): ja_math: ? items x at most 1024" in out
    assert "cost: dfs: per candidate 200 items, at most 204,800 generated tokens; 12800 trials" in out
    assert "(a batch of 200 items per task, new every 128 trials; then the top 10 re-scored" in out
    assert gpu_job is None or gpu_job in out
    fake_hub_cache(offline_cache, HUB_ID, n=300)
    assert main(["check", str(ROOT / "configs" / "jp_math.yaml"), "--offline"]) == 0
    out = capsys.readouterr().out
    assert "note:" not in out
    assert (
        "cost: ps: per candidate 300 items, at most 307,200 generated tokens; 1000 trials: 300,000 items, at most "
        "3.07e+08 tokens"
    ) in out


def test_run_header_states_cost_and_check_the_measured_rate(tmp_path, capsys):
    """The measured line comes from the run's own trials: none before it ran, seconds per candidate after."""
    from evolve.cost import cost_lines
    from evolve.loop import run_search

    cfg = yaml.safe_load((ROOT / "configs" / "tiny_jp_math.yaml").read_text())
    cfg["models"]["base"] = str(ROOT / cfg["models"]["base"])
    cfg["models"]["sources"] = [{**s, "path": str(ROOT / s["path"])} for s in cfg["models"]["sources"]]
    cfg["evaluation"]["tasks"][0].update(task_dir=str(ROOT / cfg["evaluation"]["tasks"][0]["task_dir"]), limit=10)
    cfg["search"]["budget"] = {"max_trials": 3}
    cfg["output_dir"] = str(tmp_path / "run")
    config = parse_config(cfg)
    lines = cost_lines(config)
    assert (
        lines[0]
        == "cost: ps: per candidate 10 items, at most 20 generated tokens; 3 trials: 30 items, at most 60 tokens "
        "(racing: a candidate that cannot beat the incumbent stops after 20+ items, in chunks of 20, so these are "
        "upper bounds)"
    )  # the demo races
    assert lines[1].startswith("cost: ps: not measured on this machine yet")
    run_search(config, progress=False)
    assert re.match(
        r"cost: ps: measured \d+\.\d\d s per candidate \(median of 3 trials of this run\); 3 of 3 done, about 0 s left",
        cost_lines(config)[1],
    )
