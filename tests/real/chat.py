"""Chat helpers for the real-model tests: batched greedy generation with the chat template and left padding."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

# Chat prompts whose greedy answers a working SmolLM2-135M-Instruct gets right (checked by substring).
CHAT = [
    ("What is the capital of France?", "Paris"),
    ("Tom has 3 apples and buys 5 more. How many apples does he have?", "8"),
]


def chat_batch(tokenizer: PreTrainedTokenizerBase, questions: list[str]) -> dict[str, torch.Tensor]:
    """Questions in the chat template, left-padded into one batch."""
    tokenizer.padding_side = "left"
    conversations = [[{"role": "user", "content": q}] for q in questions]
    return tokenizer.apply_chat_template(
        conversations, add_generation_prompt=True, padding=True, return_tensors="pt", return_dict=True
    )


def greedy(
    model: PreTrainedModel, batch: dict[str, torch.Tensor], new_tokens: int, *, exact: bool = False
) -> list[list[int]]:
    """Each row's greedy new tokens; with `exact`, exactly `new_tokens` (EOS cannot end a row early)."""
    with torch.inference_mode():
        out = model.generate(
            **batch,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens if exact else None,
            do_sample=False,
            pad_token_id=model.config.pad_token_id,
        )
    return out[:, batch["input_ids"].shape[1] :].tolist()


def chat_answers(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, questions: list[str], new_tokens: int = 32
) -> list[str]:
    rows = greedy(model, chat_batch(tokenizer, questions), new_tokens)
    return [tokenizer.decode(row, skip_special_tokens=True) for row in rows]


def assert_talks(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, chat: list[tuple[str, str]] = CHAT
) -> None:
    """The model answers `chat`'s questions correctly (greedy, chat template, batched with left padding)."""
    for (question, expected), answer in zip(chat, chat_answers(model, tokenizer, [q for q, _ in chat])):
        assert expected in answer, f"{question!r} -> {answer!r}"
