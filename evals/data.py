"""Task data: JSONL splits (`<dir>/{train,dev,test}.jsonl`) and deterministic subsampling.

Generation items are ``{"id", "prompt", "answer"}`` (the prompt ends where the model must answer);
multiple-choice items are ``{"id", "prompt", "choices": [...], "label": int}``.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from merge_core.errors import EvomergeError

T = TypeVar("T")


@dataclass(frozen=True)
class GenerationItem:
    """A prompt and its gold answer string."""

    id: str
    prompt: str
    answer: str


@dataclass(frozen=True)
class ChoiceItem:
    """A prompt, its candidate continuations and the index of the right one."""

    id: str
    prompt: str
    choices: tuple[str, ...]
    label: int


def split_path(task_dir: str | Path, split: str) -> Path:
    """`<task_dir>/<split>.jsonl`, checked to exist."""
    path = Path(task_dir) / f"{split}.jsonl"
    if not path.is_file():
        raise EvomergeError(f"task data not found: {path} (expected <task_dir>/{{train,dev,test}}.jsonl)")
    return path


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """All JSON objects of a JSONL file (blank lines skipped)."""
    rows = []
    with open(path, encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise EvomergeError(f"{path}:{line_no}: not valid JSON ({err.msg})") from err
    return rows


def write_jsonl(path: str | Path, rows: Sequence[dict[str, Any]]) -> Path:
    """Write `rows` as a UTF-8 JSONL file, one object a line (non-ASCII kept as is), creating its folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def _require(row: dict[str, Any], fields: Sequence[str], where: str) -> None:
    missing = [f for f in fields if f not in row]
    if missing:
        raise EvomergeError(f"{where}: missing field(s) {missing} (have {sorted(row)})")


def load_generation_items(task_dir: str | Path, split: str) -> list[GenerationItem]:
    """The generation items of one split."""
    path = split_path(task_dir, split)
    items = []
    for i, row in enumerate(read_jsonl(path)):
        _require(row, ("prompt", "answer"), f"{path} item {i}")
        items.append(GenerationItem(str(row.get("id", i)), str(row["prompt"]), str(row["answer"])))
    return items


def load_choice_items(task_dir: str | Path, split: str) -> list[ChoiceItem]:
    """The multiple-choice items of one split."""
    path = split_path(task_dir, split)
    items = []
    for i, row in enumerate(read_jsonl(path)):
        _require(row, ("prompt", "choices", "label"), f"{path} item {i}")
        choices = tuple(str(c) for c in row["choices"])
        label = int(row["label"])
        if not 0 <= label < len(choices):
            raise EvomergeError(f"{path} item {i}: label {label} out of range for {len(choices)} choices")
        items.append(ChoiceItem(str(row.get("id", i)), str(row["prompt"]), choices, label))
    return items


def subsample_indices(n: int, limit: int | None, seed: int) -> list[int]:
    """Sorted indices of `limit` items drawn without replacement by `random.Random(seed)`; all when limit is None
    or >= n."""
    if limit is None or limit >= n:
        return list(range(n))
    if limit < 1:
        raise EvomergeError(f"limit must be a positive number of items, got {limit}")
    return sorted(random.Random(seed).sample(range(n), limit))


def subsample(items: Sequence[T], limit: int | None, seed: int) -> list[T]:
    """The same `limit` items for the same (limit, seed) every time, in their original order."""
    return [items[i] for i in subsample_indices(len(items), limit, seed)]
