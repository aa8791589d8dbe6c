"""Fixtures for the evals tests: a tiny random Llama with a word tokenizer, and a JSONL task it half solves."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from evals.data import write_jsonl
from evals.lm import generate_greedy
from tests.evals.tiny import make_lm, random_prompts


@pytest.fixture()
def lm() -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    return make_lm()


@pytest.fixture()
def half_solved_task(tmp_path: Path, lm) -> Path:
    """30 test items: even ones have as gold the first word the random model generates (right); the others
    "w0 w0", which a first-word extraction never matches (wrong)."""
    model, tokenizer = lm
    prompts = random_prompts(30)
    responses = generate_greedy(model, tokenizer, prompts, batch_size=1, max_new_tokens=4, stop=["."])
    rows = []
    for i, (prompt, response) in enumerate(zip(prompts, responses)):
        words = response.split()
        answer = words[0] if i % 2 == 0 and words else "w0 w0"
        rows.append({"id": f"q{i}", "prompt": prompt, "answer": answer})
    task_dir = tmp_path / "tiny_task"
    write_jsonl(task_dir / "test.jsonl", rows)
    write_jsonl(task_dir / "dev.jsonl", rows[:10])
    return task_dir
