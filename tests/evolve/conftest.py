"""Fixtures for the search tests: the `world`, a tiny base, two fine-tunes and a word task, built once a session."""

from __future__ import annotations

import pytest

from evals.data import write_jsonl
from zoo.synthetic import DEFAULT_WORDS, make_tiny_trio


@pytest.fixture(scope="session")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A tiny base + two fine-tunes and a generation task whose answers are vocabulary words."""
    root = tmp_path_factory.mktemp("world")
    base, a, b = make_tiny_trio(root / "models", "llama", seed=0, noise=0.05)
    words = [w for w in DEFAULT_WORDS if w.isalpha()][:40]
    for split, n in (("dev", 40), ("test", 30)):
        rows = [
            {
                "id": f"{split}-{i}",
                "prompt": " ".join(words[(i + k) % len(words)] for k in range(5)),
                "answer": words[(i * 7) % len(words)],
            }
            for i in range(n)
        ]
        write_jsonl(root / "task" / f"{split}.jsonl", rows)
    return {"base": str(base), "a": str(a), "b": str(b), "task": str(root / "task")}
