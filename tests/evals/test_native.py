"""Native evaluators on a tiny random Llama: batching invariance, hand-computed metrics, teacher forcing."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from evals.data import ChoiceItem, GenerationItem, load_generation_items
from evals.extract import extract_first_word
from evals.native import ChoiceEvaluator, GenerationEvaluator, PerplexityEvaluator, truncate_at_stop
from tests.evals.tiny import random_prompts


def items_from(prompts: list[str], answers: list[str]) -> list[GenerationItem]:
    return [GenerationItem(str(i), p, a) for i, (p, a) in enumerate(zip(prompts, answers))]


def test_batched_generation_equals_unbatched(lm) -> None:
    model, tokenizer = lm
    items = items_from(random_prompts(24, seed=1), ["j1"] * 24)
    kwargs = dict(max_new_tokens=6, stop=["."], extract="first_word", gold_prob=False)
    one = GenerationEvaluator(items, batch_size=1, **kwargs).generate(model, tokenizer)
    eight = GenerationEvaluator(items, batch_size=8, **kwargs).generate(model, tokenizer)
    assert one == eight
    assert len({len(p.split()) for p in random_prompts(24, seed=1)}) > 5  # prompt lengths vary: padding matters
    assert all("." not in r for r in one)
    assert len(set(one)) > 5  # the random model does not answer every prompt alike


def test_acc_matches_hand_scoring(lm) -> None:
    model, tokenizer = lm
    prompts = random_prompts(20, seed=2)
    probe = GenerationEvaluator(items_from(prompts, ["x"] * 20), max_new_tokens=4, stop=["."], extract="first_word")
    responses = probe.generate(model, tokenizer)
    firsts = [extract_first_word(r) or "none" for r in responses]
    # right for even items, wrong otherwise; the language check only passes J numerals
    answers = [f if i % 2 == 0 else "w0 w0" for i, f in enumerate(firsts)]
    evaluator = GenerationEvaluator(
        items_from(prompts, answers),
        batch_size=4,
        max_new_tokens=4,
        stop=["."],
        extract="first_word",
        language_check={"type": "pattern", "pattern": r"^j\d+$"},
        gold_prob=False,
    )
    metrics = evaluator.evaluate(model, tokenizer)
    value_ok = [extract_first_word(r) == a for r, a in zip(responses, answers)]
    lang_ok = [(extract_first_word(r) or "").startswith("j") for r in responses]
    assert metrics["acc_value"] == pytest.approx(sum(value_ok) / 20)
    assert metrics["lang_ok"] == pytest.approx(sum(lang_ok) / 20)
    assert metrics["acc"] == pytest.approx(sum(value and lang for value, lang in zip(value_ok, lang_ok)) / 20)
    assert 0 < metrics["acc"] < metrics["acc_value"] <= 0.5


def test_gold_prob_matches_teacher_forcing(lm) -> None:
    model, tokenizer = lm
    prompts = random_prompts(6, seed=3)
    answers = ["j3", "w5", "j0", "w39", "kotae", "j18"]
    evaluator = GenerationEvaluator(items_from(prompts, answers), batch_size=4, max_new_tokens=2)
    logprobs = evaluator.gold_logprobs(model, tokenizer)
    for prompt, answer, logprob in zip(prompts, answers, logprobs):
        ids = tokenizer(prompt + " " + answer, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            probs = torch.softmax(model(ids).logits[0, -2], dim=-1)  # one-token answers
        assert logprob == pytest.approx(math.log(probs[ids[0, -1]].item()), abs=1e-4)
    metrics = evaluator.evaluate(model, tokenizer)
    assert metrics["gold_prob"] == pytest.approx(sum(math.exp(lp) for lp in logprobs) / 6, rel=1e-5)
    assert metrics["gold_logprob"] == pytest.approx(sum(logprobs) / 6, rel=1e-5)


def test_weights_changed_in_place_are_seen(lm) -> None:
    model, tokenizer = lm
    evaluator = GenerationEvaluator(items_from(random_prompts(8), ["j1"] * 8), max_new_tokens=3)
    before = evaluator.evaluate(model, tokenizer)["gold_logprob"]
    with torch.no_grad():
        model.lm_head.weight.mul_(0.5)
    assert evaluator.evaluate(model, tokenizer)["gold_logprob"] != pytest.approx(before)


def test_choice_acc_by_hand(lm) -> None:
    model, tokenizer = lm
    prompts = random_prompts(8, seed=4)
    choices = ("j1", "w2 w3", "kotae")
    probe = GenerationEvaluator(items_from(prompts, ["x"] * 8), batch_size=8)
    per_choice = []
    for choice in choices:
        probe.items = items_from(prompts, [choice] * 8)
        per_choice.append(probe.gold_logprobs(model, tokenizer))
    best = [max(range(3), key=lambda c: per_choice[c][i]) for i in range(8)]
    best_norm = [max(range(3), key=lambda c: per_choice[c][i] / len(choices[c])) for i in range(8)]
    items = [ChoiceItem(str(i), p, choices, label=i % 3) for i, p in enumerate(prompts)]
    metrics = ChoiceEvaluator(items, batch_size=5).evaluate(model, tokenizer)
    assert metrics["acc"] == pytest.approx(sum(b == i % 3 for i, b in enumerate(best)) / 8)
    assert metrics["acc_norm"] == pytest.approx(sum(b == i % 3 for i, b in enumerate(best_norm)) / 8)


def test_perplexity_matches_model_loss(lm, tmp_path: Path) -> None:
    model, tokenizer = lm
    lines = random_prompts(3, seed=5)
    text_file = tmp_path / "wiki.txt"
    text_file.write_text("\n".join(lines) + "\n\n", encoding="utf-8")
    metrics = PerplexityEvaluator(text_file, batch_size=2).evaluate(model, tokenizer)
    total_nll = count = 0.0
    for line in lines:
        ids = tokenizer(line, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            loss = model(ids, labels=ids).loss.item()
        total_nll += loss * (ids.shape[1] - 1)
        count += ids.shape[1] - 1
    assert metrics["nll"] == pytest.approx(total_nll / count, rel=1e-4)
    assert metrics["ppl"] == pytest.approx(math.exp(total_nll / count), rel=1e-4)


def test_task_dir_subsample_and_template(half_solved_task: Path, lm) -> None:
    model, tokenizer = lm
    evaluator = GenerationEvaluator(
        half_solved_task, "test", limit=7, seed=1, prompt_template="{prompt}", extract="first_word", stop=["."]
    )
    all_items = load_generation_items(half_solved_task, "test")
    assert len(evaluator.items) == 7 and set(evaluator.items) <= set(all_items)
    assert evaluator.name == "tiny_task"
    assert GenerationEvaluator(half_solved_task, "test", limit=7, seed=1).items == evaluator.items


def test_truncate_at_stop() -> None:
    assert truncate_at_stop("a b . c \n d", [".", "\n"]) == "a b "
    assert truncate_at_stop("a b", []) == "a b"


def test_special_token_stop_ends_rows_by_id(lm) -> None:
    model, tokenizer = lm
    prompts = random_prompts(6, seed=8)
    plain = GenerationEvaluator(items_from(prompts, ["x"] * 6), max_new_tokens=5).generate(model, tokenizer)
    kotae_id = tokenizer.convert_tokens_to_ids("kotae")
    tokenizer.add_special_tokens({"additional_special_tokens": ["kotae"]})  # now a special stop token
    assert tokenizer.convert_tokens_to_ids("kotae") == kotae_id
    stopped = GenerationEvaluator(items_from(prompts, ["x"] * 6), max_new_tokens=5, stop=["kotae"]).generate(
        model, tokenizer
    )
    assert sum("kotae" in r.split() for r in plain) == 3
    expected = [" ".join(r.split()[: r.split().index("kotae")]) if "kotae" in r.split() else r for r in plain]
    assert [s.strip() for s in stopped] == [e.strip() for e in expected]
