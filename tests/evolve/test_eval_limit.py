"""`evolve eval --limit N`: a seeded random sample of N items by default; `--limit-mode first` scores the first N in
file order, as `lm_eval --limit N` does."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from evals.data import read_jsonl, subsample_indices, write_jsonl
from evolve.baselines import heldout_evaluators
from evolve.cli import main
from evolve.config import load_config

ROOT = Path(__file__).resolve().parents[2]
ZOO = ROOT / "data" / "zoo"
N = 12


def _config(tmp_path: Path, task_dir: Path, name: str) -> Path:
    cfg = {
        "name": name,
        "models": {"base": str(ZOO / "base"), "sources": [str(ZOO / "expert_ja"), str(ZOO / "expert_math")]},
        "evaluation": {
            "tasks": [
                {
                    "name": "ja_sub",
                    "task_dir": str(task_dir),
                    "max_new_tokens": 2,
                    "stop": ["</s>"],
                    "extract": "first_word",
                    "gold_prob": False,
                }
            ],
            "fitness": [{"metric": "ja_sub/acc"}],
            "heldout_split": "dev",
        },
        "execution": {"device": "cpu", "threads": 1},
        "output_dir": str(tmp_path / name),
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _eval(capsys, config: Path, *flags: str) -> dict[str, float]:
    assert main(["eval", str(ZOO / "base"), "--config", str(config), "--split", "dev", "--json", *flags]) == 0
    return json.loads(capsys.readouterr().out)


def test_limit_first_scores_exactly_the_first_items_in_file_order(tmp_path, capsys):
    rows = read_jsonl(ZOO / "tasks" / "ja_sub" / "dev.jsonl")
    first_only = tmp_path / "first"
    write_jsonl(first_only / "dev.jsonl", rows[:N])
    config = _config(tmp_path, ZOO / "tasks" / "ja_sub", "all")
    # the items each mode picks: the first N in file order, or a seeded sample that is not them
    ((_, first),) = heldout_evaluators(load_config(config), limit=N, limit_mode="first")
    ((_, sample),) = heldout_evaluators(load_config(config), limit=N)
    assert [i.id for i in first.items] == [str(r["id"]) for r in rows[:N]]
    assert [i.id for i in sample.items] != [i.id for i in first.items]
    # scored through the CLI: --limit-mode first gives what a task holding only those items gives
    assert _eval(capsys, config, "--limit", str(N), "--limit-mode", "first") == _eval(
        capsys, _config(tmp_path, first_only, "first_only")
    )


def test_subsample_modes():
    assert subsample_indices(10, 3, 0, "first") == [0, 1, 2]
    assert subsample_indices(10, 3, 0) == subsample_indices(10, 3, 0, "sample") != [0, 1, 2]
    assert subsample_indices(2, 3, 0, "first") == [0, 1]


def test_limit_must_be_positive(capsys):
    config = str(ROOT / "configs" / "tiny_jp_math.yaml")
    assert main(["eval", str(ZOO / "base"), "--config", config, "--limit", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --limit: 0 is not a positive number") and "\n" not in err
