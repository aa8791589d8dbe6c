"""Tiny test material for the evals tests: a random Llama with a word tokenizer, and prompts."""

from __future__ import annotations

import random

from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from zoo.synthetic import tiny_model, word_tokenizer

WORDS = [f"w{i}" for i in range(40)] + [".", "kotae"] + [f"j{i}" for i in range(19)]


def make_lm(seed: int = 0) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """A 2-layer random Llama; a large init range keeps greedy argmaxes far from ties."""
    tokenizer = word_tokenizer(WORDS)
    model = tiny_model(
        tokenizer,
        seed=seed,
        hidden_size=32,
        num_layers=2,
        intermediate_size=64,
        max_position_embeddings=128,
        initializer_range=0.5,
    )
    return model, tokenizer


def random_prompts(n: int, seed: int = 0) -> list[str]:
    """`n` prompts of 2-12 random words of various lengths, ending with the answer cue "kotae"."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS[:40]) for _ in range(rng.randint(2, 12))) + " kotae" for _ in range(n)]
