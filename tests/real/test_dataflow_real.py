"""Data-flow models on SmolLM2-135M (30 layers, GQA, tied head): the identity path is the model itself, and a
path through two different real checkpoints exports to a plain LlamaForCausalLM that computes the same logits and
the same batched greedy generations (left padding, the KV cache carried over 32 new tokens)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from merge_core.dataflow import DataFlowModel, export_dataflow
from merge_core.recipe import LayerPath
from tests.merge_core.test_recipe import identity_path
from tests.real.chat import CHAT, chat_batch, greedy
from zoo.real import RealModels

A, B = 0, 1
# A0-13, B12-17, A15 twice, A16, A17-19 skipped, A20-29 (33 hops); scales on a few hops.
HOPS = [(A, i) for i in range(14)] + [(B, i) for i in range(12, 18)] + [(A, 15), (A, 15), (A, 16)]
HOPS += [(A, i) for i in range(20, 30)]
SCALES = [1.0] * len(HOPS)
SCALES[14], SCALES[20], SCALES[21], SCALES[23] = 1.1, 0.9, 1.2, 1.05  # entering B, back to A, the repeat, the skip
PATH = LayerPath(tuple(HOPS), tuple(SCALES))
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def expert(real_models: RealModels):
    return AutoModelForCausalLM.from_pretrained(real_models.expert_a, dtype=torch.float32).eval()


def test_identity_path_reproduces_smollm2(real_base, expert) -> None:
    model = real_base.model
    dataflow = DataFlowModel(model, expert, identity_path(30)).eval()
    batch = chat_batch(real_base.tokenizer, [q for q, _ in CHAT])
    with torch.inference_mode():
        torch.testing.assert_close(dataflow(**batch).logits, model(**batch).logits, rtol=0, atol=0)
    assert greedy(dataflow, batch, 8) == greedy(model, batch, 8)


def test_mixed_path_exports_to_a_plain_llama_with_equal_logits_and_generations(
    real_base, expert, real_models: RealModels, tmp_path
) -> None:
    assert HOPS.count((A, 15)) == 2 and (A, 18) not in HOPS and {m for m, _ in HOPS} == {A, B}  # repeat, skip, mix
    out = export_dataflow(PATH, real_models.base, real_models.expert_a, tmp_path / "export")
    exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(exported).__name__ == "LlamaForCausalLM" and exported.config.num_hidden_layers == len(PATH) == 33
    assert exported.lm_head.weight is exported.model.embed_tokens.weight  # s_1 = 1: the tie is kept
    dataflow = DataFlowModel(real_base.model, expert, PATH).eval()
    batch = chat_batch(real_base.tokenizer, [q for q, _ in CHAT] + ["Name a color."])
    with torch.inference_mode():
        torch.testing.assert_close(dataflow(**batch).logits, exported(**batch).logits, rtol=0, atol=3e-4)
    tokens = greedy(dataflow, batch, NEW_TOKENS, exact=True)
    assert tokens == greedy(exported, batch, NEW_TOKENS, exact=True)
    assert all(len(row) == NEW_TOKENS for row in tokens) and len({tuple(row) for row in tokens}) == len(tokens)
