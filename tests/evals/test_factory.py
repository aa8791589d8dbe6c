"""build_evaluator: a task's fields (validated by evolve.config: tests/evolve/test_config.py) to its evaluator."""

from __future__ import annotations

from pathlib import Path

import pytest

from evals import ChoiceEvaluator, GenerationEvaluator, PerplexityEvaluator, build_evaluator
from evals.data import write_jsonl
from evolve.scoring import score_items
from merge_core.errors import EvomergeError


def test_builds_each_native_type(half_solved_task: Path, tmp_path: Path) -> None:
    generation = build_evaluator(
        {
            "type": "generation",
            "task_dir": str(half_solved_task),
            "split": "test",
            "limit": 5,
            "stop": ["."],
            "extract": "first_word",
            "language_check": {"type": "pattern", "pattern": r"^j\d+$"},
            "name": "target",
        }
    )
    assert isinstance(generation, GenerationEvaluator) and generation.name == "target" and len(generation.items) == 5
    write_jsonl(tmp_path / "mc" / "dev.jsonl", [{"id": "a", "prompt": "p", "choices": ["x", "y"], "label": 1}])
    assert isinstance(build_evaluator({"type": "choice", "task_dir": tmp_path / "mc"}), ChoiceEvaluator)
    (tmp_path / "t.txt").write_text("w1 w2 w3\n")
    assert isinstance(build_evaluator({"type": "perplexity", "text_file": tmp_path / "t.txt"}), PerplexityEvaluator)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"type": "bleu"}, r"evaluator.type: 'bleu' is not one of"),
        ({"task_dir": "x"}, r"evaluator.type: None"),
        ({"type": "generation", "task_dir": "/nonexistent", "split": "dev"}, r"task data not found"),
    ],
)
def test_errors_name_the_field(spec: dict, message: str) -> None:
    with pytest.raises(EvomergeError, match=message):
        build_evaluator(spec)


def test_score_metrics_prefixes_each_metric_with_its_task_name(half_solved_task: Path, lm) -> None:
    model, tokenizer = lm
    a = GenerationEvaluator(half_solved_task, "dev", name="a", max_new_tokens=2, gold_prob=False)
    b = GenerationEvaluator(half_solved_task, "dev", name="b", max_new_tokens=2, gold_prob=False)
    assert sorted(score_items([("a", a), ("b", b)], model, tokenizer)[0]) == [
        "a/acc",
        "a/acc_value",
        "a/lang_ok",
        "b/acc",
        "b/acc_value",
        "b/lang_ok",
    ]
