"""Evaluators on real text: SmolLM2-135M-Instruct answers GSM8K-style word problems (data/real_tasks/gsm_mini, dev:
8 items) through its chat template, greedy, batched with left padding, up to 64 new tokens, cut at stop strings,
scored by the last number (thousands separators allowed); the native evaluator and lm-eval's HF backend (HFLM with
apply_chat_template) must agree within one item."""

from __future__ import annotations

from pathlib import Path

import pytest
from lm_eval.evaluator import evaluate

from evals.extract import answers_match, extract_last_number
from evals.lm_eval_backend import LmEvalEvaluator, write_jsonl_task_group
from evals.native import GenerationEvaluator

TASK = Path(__file__).resolve().parents[2] / "data" / "real_tasks" / "gsm_mini"
OPTIONS = dict(stop=["<|im_end|>", "\n\n"], prompt_template="{prompt} Give the final answer as a number.")
NEW_TOKENS = 64


def correct(evaluator: GenerationEvaluator, responses: list[str]) -> list[float]:
    """Per item: 1.0 when the response's last number is the gold answer (the evaluator's own extract and match)."""
    return [float(answers_match(evaluator.extract(r), item.answer)) for r, item in zip(responses, evaluator.items)]


@pytest.fixture(scope="module")
def native(real_base):
    evaluator = GenerationEvaluator(
        TASK, "dev", batch_size=8, max_new_tokens=NEW_TOKENS, chat_template=True, gold_prob=False, **OPTIONS
    )
    return evaluator, evaluator.generate(real_base.model, real_base.tokenizer)


@pytest.fixture(scope="module")
def lm_eval_samples(real_base, tmp_path_factory):
    include = tmp_path_factory.mktemp("lm_eval_tasks")
    write_jsonl_task_group(
        "real", {"gsm_mini": TASK}, include, split="dev", extract="last_number", max_new_tokens=NEW_TOKENS, **OPTIONS
    )
    backend = LmEvalEvaluator(["gsm_mini"], include_path=include, batch_size=8)
    lm = backend.lm(real_base.model, real_base.tokenizer)
    options = dict(cache_requests=False, bootstrap_iters=0, log_samples=True)
    out = evaluate(lm, backend.task_dict, apply_chat_template=True, **options)
    return sorted(out["samples"]["gsm_mini"], key=lambda s: s["doc_id"])


def test_chat_prompts_batched_generation_and_stops(native, real_base) -> None:
    evaluator, responses = native
    prompts = evaluator.model_prompts(real_base.tokenizer)
    assert prompts[0].startswith("<|im_start|>system\n") and prompts[0].endswith("<|im_start|>assistant\n")
    assert "Give the final answer as a number.<|im_end|>" in prompts[0]
    assert all(response.strip() for response in responses)
    assert not any("\n\n" in r or "<|im_end|>" in r for r in responses)  # cut at the stop strings
    lengths = [len(real_base.tokenizer(r)["input_ids"]) for r in responses]
    assert all(0 < n <= NEW_TOKENS for n in lengths) and max(lengths) > 16  # real chain-of-thought lengths
    assert 1 <= sum(correct(evaluator, responses)) < len(responses)  # some, not all: room to move both ways


def test_native_and_lm_eval_agree_within_one_item(native, lm_eval_samples) -> None:
    evaluator, responses = native
    native_acc = correct(evaluator, responses)
    lm_eval_acc = [float(s["exact_match"]) for s in lm_eval_samples]
    assert len(lm_eval_acc) == len(native_acc) == 8
    assert sum(a != b for a, b in zip(native_acc, lm_eval_acc)) <= 1
    same_text = sum(r == s["resps"][0][0] for r, s in zip(responses, lm_eval_samples))
    assert same_text >= len(responses) - 1
    for response, sample in zip(responses, lm_eval_samples):  # both read the same last number off real text
        if response == sample["resps"][0][0]:
            assert (extract_last_number(response) or "[invalid]") == sample["filtered_resps"][0].replace(",", "")


def test_the_shared_chat_prefix_is_computed_once_with_the_same_responses(native, real_base, monkeypatch) -> None:
    """The chat template's system turn is every prompt's prefix: computed once (evals.lm.generate_greedy), the
    responses equal the ones of computing each prompt whole (real weights, real chain-of-thought lengths)."""
    import evals.lm as lm_calls

    evaluator, responses = native
    prompts = evaluator.model_prompts(real_base.tokenizer)[:4]
    assert lm_calls.shared_prefix_length([real_base.tokenizer(p)["input_ids"] for p in prompts]) > 20
    monkeypatch.setattr(lm_calls, "MIN_SHARED_PREFIX", 10**9)
    whole = lm_calls.generate_greedy(
        real_base.model, real_base.tokenizer, prompts, batch_size=8, max_new_tokens=NEW_TOKENS, stop=OPTIONS["stop"]
    )
    assert whole == responses[:4]
