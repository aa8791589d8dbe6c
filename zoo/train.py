"""Training for the tiny zoo: a 1.1M-parameter Llama and a plain AdamW loop over sampled documents."""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass

import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from zoo.synthetic import tiny_model
from zoo.world import Doc, Mixture

log = logging.getLogger(__name__)

MAX_POSITIONS = 64  # the longest document (three facts and a question) is 26 words plus the terminator


@dataclass(frozen=True)
class TrainSchedule:
    """AdamW (betas 0.9/0.98, no weight decay), linear warmup, cosine decay to `final_lr_frac`, clip 1.0."""

    steps: int
    lr: float
    batch_size: int = 32
    warmup_frac: float = 0.05
    final_lr_frac: float = 0.05

    def lr_at(self, step: int) -> float:
        warmup = max(1, int(self.warmup_frac * self.steps))
        if step < warmup:
            return self.lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, self.steps - warmup)
        cosine = 0.5 * (1 + math.cos(math.pi * progress))
        return self.lr * (self.final_lr_frac + (1 - self.final_lr_frac) * cosine)


def new_model(tokenizer: PreTrainedTokenizerFast, seed: int) -> LlamaForCausalLM:
    """A freshly initialized Llama (hidden 128, 4 layers, 4 heads, intermediate 512, untied embeddings)."""
    return tiny_model(
        tokenizer,
        seed=seed,
        hidden_size=128,
        intermediate_size=512,
        num_layers=4,
        num_heads=4,
        num_kv_heads=4,
        max_position_embeddings=MAX_POSITIONS,
    )


def encode_batch(docs: list[Doc], tokenizer: PreTrainedTokenizerFast) -> dict[str, torch.Tensor]:
    """Right-padded ids of `docs` each followed by the terminator; labels ignore the padding."""
    rows = [tokenizer.convert_tokens_to_ids(doc) + [tokenizer.eos_token_id] for doc in docs]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def train(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    mixture: Mixture,
    schedule: TrainSchedule,
    rng: random.Random,
) -> float:
    """Train `model` in place on documents sampled from `mixture` by `rng`; returns the mean loss of the last 10%."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=schedule.lr, betas=(0.9, 0.98), weight_decay=0.0)
    tail: list[float] = []
    for step in range(schedule.steps):
        for group in optimizer.param_groups:
            group["lr"] = schedule.lr_at(step)
        batch = encode_batch([mixture.sample(rng) for _ in range(schedule.batch_size)], tokenizer)
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step >= int(0.9 * schedule.steps):
            tail.append(loss.item())
        if (step + 1) % 250 == 0:
            log.info("step %d/%d loss %.4f", step + 1, schedule.steps, loss.item())
    model.eval()
    return sum(tail) / max(1, len(tail))
