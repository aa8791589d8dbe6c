"""Tiny test material for the evals tests: a random Llama with a word tokenizer, prompts, JSONL splits."""
from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from merge_core.synthetic import word_tokenizer

WORDS = [f"w{i}" for i in range(40)] + [".", "kotae"] + [f"j{i}" for i in range(19)]


def make_lm(seed: int = 0) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """A 2-layer random Llama; a large init range keeps greedy argmaxes far from ties."""
    tokenizer = word_tokenizer(WORDS)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        initializer_range=0.5,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return LlamaForCausalLM(config).eval(), tokenizer


def random_prompts(n: int, seed: int = 0) -> list[str]:
    """`n` prompts of 2-12 random words of various lengths, ending with the answer cue "kotae"."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS[:40]) for _ in range(rng.randint(2, 12))) + " kotae" for _ in range(n)]


def write_split(task_dir: Path, split: str, rows: list[dict]) -> None:
    """Write `rows` as `<task_dir>/<split>.jsonl`."""
    task_dir.mkdir(parents=True, exist_ok=True)
    with open(task_dir / f"{split}.jsonl", "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
