"""JSONL loading and deterministic subsampling."""

from __future__ import annotations

from pathlib import Path

import pytest

from evals.data import load_choice_items, load_generation_items, subsample, subsample_indices, write_jsonl
from merge_core.errors import EvomergeError


def test_subsample_is_deterministic_and_ordered() -> None:
    items = list(range(100))
    first = subsample(items, 10, seed=3)
    assert first == subsample(items, 10, seed=3)
    assert first == sorted(first) and len(set(first)) == 10
    assert first != subsample(items, 10, seed=4)
    assert subsample(items, None, seed=3) == items
    assert subsample(items, 500, seed=3) == items
    assert subsample_indices(100, 10, 3) == first


def test_subsample_rejects_zero() -> None:
    with pytest.raises(EvomergeError, match="limit"):
        subsample([1, 2], 0, seed=0)


def test_load_items(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "dev.jsonl", [{"id": "a", "prompt": "1 + 1 =", "answer": "2"}, {"prompt": "x", "answer": 3}])
    items = load_generation_items(tmp_path, "dev")
    assert [(i.id, i.prompt, i.answer) for i in items] == [("a", "1 + 1 =", "2"), ("1", "x", "3")]
    write_jsonl(tmp_path / "test.jsonl", [{"id": "c", "prompt": "sky is", "choices": ["blue", "green"], "label": 0}])
    (choice,) = load_choice_items(tmp_path, "test")
    assert choice.choices == ("blue", "green") and choice.label == 0


def test_load_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(EvomergeError, match="train.jsonl"):
        load_generation_items(tmp_path, "train")
    write_jsonl(tmp_path / "dev.jsonl", [{"id": "a", "prompt": "p"}])
    with pytest.raises(EvomergeError, match=r"missing field\(s\) \['answer'\]"):
        load_generation_items(tmp_path, "dev")
    write_jsonl(tmp_path / "test.jsonl", [{"id": "c", "prompt": "p", "choices": ["a"], "label": 2}])
    with pytest.raises(EvomergeError, match="label 2 out of range"):
        load_choice_items(tmp_path, "test")


def test_a_null_item_field_is_refused_not_read_as_none(tmp_path: Path) -> None:
    """A JSONL null (as a dataset's null cell, `dataset_rows`) would be the text 'None', scored as an answer."""
    write_jsonl(tmp_path / "dev.jsonl", [{"prompt": "a", "answer": "b"}, {"prompt": "c", "answer": None}])
    with pytest.raises(EvomergeError, match=r"item 1: field\(s\) \['answer'\] are null"):
        load_generation_items(tmp_path, "dev")
    write_jsonl(tmp_path / "dev.jsonl", [{"prompt": "q", "choices": ["x", "y"], "label": None}])
    with pytest.raises(EvomergeError, match=r"item 0: field\(s\) \['label'\] are null"):
        load_choice_items(tmp_path, "dev")
