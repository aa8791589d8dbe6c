"""The lm-eval backend against the native evaluator on the same tiny model and JSONL task."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import yaml

from evals.lm_eval_backend import LmEvalEvaluator, jsonl_task_config, leaf_tasks, write_task_yaml
from evals.native import GenerationEvaluator
from merge_core.errors import EvomergeError

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def write_jsonl_task_yaml(task_name: str, data_dir: Path, out_dir: Path, **options) -> Path:
    """`<out_dir>/<task_name>.yaml`: one of our JSONL tasks as a standalone lm-eval task file."""
    return write_task_yaml(out_dir / f"{task_name}.yaml", jsonl_task_config(task_name, data_dir, **options))


def test_yaml_is_absolute_and_templated(half_solved_task: Path, tmp_path: Path) -> None:
    path = write_jsonl_task_yaml(
        "tiny",
        half_solved_task,
        tmp_path / "yaml",
        stop=["."],
        extract="last_number",
        prompt_template="Q {x}: {prompt}",
    )
    config = yaml.safe_load(path.read_text())
    assert config["dataset_kwargs"]["data_files"]["test"] == str((half_solved_task / "test.jsonl").resolve())
    assert Path(config["dataset_kwargs"]["data_files"]["dev"]).is_absolute()
    assert config["doc_to_text"] == "{% raw %}Q {x}: {% endraw %}{{prompt}}"
    assert config["generation_kwargs"]["until"] == ["."]
    assert config["filter_list"][0]["name"] == "last_number"


def test_lm_eval_agrees_with_native(half_solved_task: Path, tmp_path: Path, lm) -> None:
    model, tokenizer = lm
    write_jsonl_task_yaml("tiny_gen", half_solved_task, tmp_path / "yaml", stop=["."], max_new_tokens=4)
    backend = LmEvalEvaluator(
        ["tiny_gen"], include_path=tmp_path / "yaml", metrics={"tiny_gen": ["exact_match", "first_word"]}, batch_size=8
    )
    native = GenerationEvaluator(half_solved_task, "test", extract="first_word", stop=["."], max_new_tokens=4)
    lm_acc = backend.evaluate(model, tokenizer)["tiny_gen"]
    native_acc = native.evaluate(model, tokenizer)["acc"]
    assert 0.3 <= native_acc <= 0.5  # even items right unless the model generated nothing
    assert abs(lm_acc - native_acc) <= 1 / 30 + 1e-9

    with torch.no_grad():  # a new candidate written in place: both backends must see it
        for param in model.parameters():
            param.mul_(0.7)
    lm_after = backend.evaluate(model, tokenizer)
    assert lm_after["tiny_gen"] == lm_after["tiny_gen/exact_match,first_word"]
    native_after = native.evaluate(model, tokenizer)["acc"]
    assert native_after != native_acc
    assert abs(lm_after["tiny_gen/exact_match,first_word"] - native_after) <= 1 / 30 + 1e-9


def test_lm_eval_limit_draws_the_native_items(half_solved_task: Path, tmp_path: Path, lm) -> None:
    write_jsonl_task_yaml("tiny_gen", half_solved_task, tmp_path / "yaml", stop=["."], max_new_tokens=4)
    backend = LmEvalEvaluator(["tiny_gen"], include_path=str(tmp_path / "yaml"), limit=8, seed=5)
    native = GenerationEvaluator(half_solved_task, "test", limit=8, seed=5)
    docs = leaf_tasks(backend.task_dict)["tiny_gen"].eval_docs
    assert [docs[i]["id"] for i in backend.samples["tiny_gen"]] == [item.id for item in native.items]


def test_lm_eval_errors(half_solved_task: Path, tmp_path: Path) -> None:
    write_jsonl_task_yaml("tiny_gen", half_solved_task, tmp_path / "yaml")
    with pytest.raises(EvomergeError, match="metrics name tasks that are not evaluated"):
        LmEvalEvaluator(["tiny_gen"], include_path=tmp_path / "yaml", metrics={"other": "acc,none"})
    with pytest.raises(EvomergeError, match="include_path does not exist"):
        LmEvalEvaluator(["tiny_gen"], include_path=tmp_path / "nowhere")


def test_the_tasks_length_wins_over_the_checkpoints(half_solved_task: Path, tmp_path: Path, lm) -> None:
    """A `max_new_tokens` in the model's generation config would override lm-eval's `max_length` in transformers
    (the zoo once shipped 4): the backend lifts it while it evaluates, and puts it back."""
    model, tokenizer = lm
    write_jsonl_task_yaml("tiny_gen", half_solved_task, tmp_path / "yaml", stop=["."], max_new_tokens=4)
    backend = LmEvalEvaluator(
        ["tiny_gen"], include_path=tmp_path / "yaml", metrics={"tiny_gen": ["exact_match", "first_word"]}, batch_size=8
    )

    def responses() -> list[str]:
        return [s["resps"][0][0] for s in backend._run(model, tokenizer, log_samples=True)[1]["samples"]["tiny_gen"]]

    plain = responses()
    assert max(len(tokenizer(r)["input_ids"]) for r in plain) > 1
    model.generation_config.max_new_tokens = 1
    assert responses() == plain and model.generation_config.max_new_tokens == 1
