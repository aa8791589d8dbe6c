"""What a zoo model can do: greedy first-token scores per task (in this world one token is the whole answer).

Besides accuracy, two scores separate the target's two halves: `value` (the right number in either numeral, E
digits or J words: did it compute?) and `j_form` (any J numeral: did it answer in J?). The math expert scores high
`value` and zero `j_form` on `ja_sub`; the J expert the reverse; the target needs both at once.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from zoo.world import MAX_NUMBER, TASKS, e_numeral, j_numeral


def read_rows(tasks_dir: Path, task: str, split: str, n: int | None = None) -> list[dict]:
    """The first `n` rows (all when None) of tasks_dir/<task>/<split>.jsonl."""
    lines = (Path(tasks_dir) / task / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines[:n]]


@torch.no_grad()
def skill_scores(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, rows: Sequence[dict]) -> dict[str, float]:
    """acc, gold_prob, value and j_form of the greedy first token after each prompt (prompts of one task share a
    length in this world; rows are batched by length all the same)."""
    numbers = range(MAX_NUMBER + 1)
    value_of = {tokenizer.convert_tokens_to_ids(e_numeral(n)): n for n in numbers}
    j_ids = {tokenizer.convert_tokens_to_ids(j_numeral(n)): n for n in numbers}
    value_of.update(j_ids)
    by_length: dict[int, list[tuple[list[int], int]]] = {}
    for row in rows:
        ids = tokenizer.convert_tokens_to_ids(row["prompt"].split())
        by_length.setdefault(len(ids), []).append((ids, tokenizer.convert_tokens_to_ids(row["answer"])))
    acc = prob = value = j_form = 0.0
    for batch in by_length.values():
        ids = torch.tensor([ids for ids, _ in batch])
        gold = torch.tensor([g for _, g in batch])
        logits = model(input_ids=ids).logits[:, -1].float()
        pred = logits.argmax(-1).tolist()
        prob += logits.softmax(-1).gather(1, gold[:, None]).sum().item()
        for p, g in zip(pred, gold.tolist()):
            acc += p == g
            value += p in value_of and value_of[p] == value_of.get(g)
            j_form += p in j_ids
    n = max(1, len(rows))
    return {"acc": acc / n, "gold_prob": prob / n, "value": value / n, "j_form": j_form / n}


def skill_profile(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    tasks_dir: Path,
    split: str = "test",
    n: int | None = None,
    tasks: Sequence[str] = tuple(TASKS),
) -> dict[str, dict[str, float]]:
    """skill_scores on each task's first `n` rows of `split`."""
    model.eval()
    return {t: skill_scores(model, tokenizer, read_rows(tasks_dir, t, split, n)) for t in tasks}
