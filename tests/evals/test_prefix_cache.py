"""The shared prompt prefix (a chat template's system turn, a preamble) is computed once per call and its KV cache
copied into every batch: the responses and token counts equal those of computing every prompt whole."""

from __future__ import annotations

import pytest

import evals.lm as lm_calls
from evals.lm import generate_greedy, shared_prefix_length
from tests.evals.tiny import random_prompts

PREAMBLE = "w1 w2 w3 w4 w5 w6 w7 w8 w9 w10 . "


def test_shared_prefix_length() -> None:
    assert shared_prefix_length([[1] * 9 + [2], [1] * 9 + [3, 4]]) == 9
    assert shared_prefix_length([[1] * 9, [1] * 12]) == 8  # every prompt keeps a token of its own
    assert shared_prefix_length([[1] * 7 + [2], [1] * 7 + [3]]) == 0  # below MIN_SHARED_PREFIX
    assert shared_prefix_length([[1] * 20]) == 0  # one prompt: nothing to share
    assert shared_prefix_length([[5] + [1] * 20, [6] + [1] * 20]) == 0


def whole_and_prefixed(model, tokenizer, prompts, monkeypatch, **options) -> tuple[tuple, tuple]:
    out = []
    for minimum in (10**9, lm_calls.MIN_SHARED_PREFIX):  # first: every prompt computed whole
        monkeypatch.setattr(lm_calls, "MIN_SHARED_PREFIX", minimum)
        counts: list[int] = []
        out.append((generate_greedy(model, tokenizer, prompts, token_counts=counts, **options), counts))
    return out[0], out[1]


@pytest.mark.parametrize("batch_size", [1, 4, 32])
def test_prefix_cache_generates_what_whole_prompts_generate(lm, monkeypatch, batch_size) -> None:
    model, tokenizer = lm
    prompts = [PREAMBLE + p for p in random_prompts(20)]
    assert shared_prefix_length([tokenizer(p)["input_ids"] for p in prompts]) >= lm_calls.MIN_SHARED_PREFIX
    whole, prefixed = whole_and_prefixed(
        model, tokenizer, prompts, monkeypatch, batch_size=batch_size, max_new_tokens=6, stop=["."]
    )
    assert prefixed == whole
    assert len(set(whole[0])) > 5  # the prompts' own tokens matter: not one response for all


def test_prefix_cache_on_a_data_flow_model(lm, monkeypatch) -> None:
    """A data-flow model (one KV-cache slot per hop, a repeated layer) takes the prefix cache too."""
    from merge_core.dataflow import DataFlowModel
    from merge_core.recipe import LayerPath

    model, tokenizer = lm
    path = LayerPath(((0, 0), (0, 1), (0, 1), (0, 1)), (1.0, 1.0, 0.5, 1.0))
    dataflow = DataFlowModel(model, model, path)
    prompts = [PREAMBLE + p for p in random_prompts(12, seed=3)]
    whole, prefixed = whole_and_prefixed(
        dataflow, tokenizer, prompts, monkeypatch, batch_size=5, max_new_tokens=5, stop=["."]
    )
    assert prefixed == whole
