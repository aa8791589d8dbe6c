"""Native evaluators on a tiny random Llama: batching invariance, hand-computed metrics, teacher forcing."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from evals.data import ChoiceItem, GenerationItem, load_generation_items
from evals.extract import extract_first_word
from evals.lm import truncate_at_stop
from evals.native import ChoiceEvaluator, GenerationEvaluator, PerplexityEvaluator
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


def test_item_order_is_one_seeded_permutation_shared_by_every_evaluator(half_solved_task) -> None:
    a = GenerationEvaluator(half_solved_task, "test", seed=3)
    b = GenerationEvaluator(half_solved_task, "test", seed=3)
    n = len(a.items)
    assert a.order == b.order and sorted(a.order) == list(range(n))
    assert a.order != list(range(n)) and GenerationEvaluator(half_solved_task, "test", seed=4).order != a.order


def test_items_scored_in_chunks_are_the_items_scored_at_once(lm) -> None:
    """Per-item scores for positions [start, stop) of the order: chunks put together are the whole, in order, and
    their means are the metrics `evaluate` reports; tokens generated are counted."""
    model, tokenizer = lm
    prompts = random_prompts(20, seed=5)
    evaluator = GenerationEvaluator(items_from(prompts, ["j1"] * 20), batch_size=4, max_new_tokens=3, seed=7)
    whole = evaluator.score_items(model, tokenizer)
    assert whole.n == 20 and set(whole.values) == {"acc", "acc_value", "lang_ok", "gold_prob", "gold_logprob"}
    assert 20 <= whole.tokens <= 60
    first, rest = evaluator.score_items(model, tokenizer, 0, 8), evaluator.score_items(model, tokenizer, 8, None)
    joined = first.extend(rest)
    assert joined.values["acc"] == whole.values["acc"] and joined.tokens == whole.tokens
    assert joined.values["gold_logprob"] == pytest.approx(whole.values["gold_logprob"], abs=1e-5)
    # position j is item order[j]: its gold log-probability alone
    j = 3
    alone = GenerationEvaluator([evaluator.items[evaluator.order[j]]], max_new_tokens=3).gold_logprobs(model, tokenizer)
    assert whole.values["gold_logprob"][j] == pytest.approx(alone[0], abs=1e-5)
    metrics = evaluator.evaluate(model, tokenizer)
    for key, values in whole.values.items():
        assert metrics[key] == pytest.approx(sum(values) / 20, abs=1e-12)


def test_choice_and_perplexity_items(lm, tmp_path) -> None:
    model, tokenizer = lm
    items = [ChoiceItem(str(i), p, ["j1", "j2", "w3"], i % 3) for i, p in enumerate(random_prompts(9, seed=6))]
    choice = ChoiceEvaluator(items, batch_size=5)
    scores = choice.score_items(model, tokenizer)
    assert set(scores.values["acc"]) <= {0.0, 1.0} and choice.evaluate(model, tokenizer)["acc"] == pytest.approx(
        sum(scores.values["acc"]) / 9
    )
    text_file = tmp_path / "docs.txt"
    text_file.write_text("\n".join(random_prompts(6, seed=8)) + "\nj1\n")
    ppl = PerplexityEvaluator(text_file, batch_size=2)
    per_doc = ppl.score_items(model, tokenizer)
    assert per_doc.n == 7 and 0.0 in per_doc.weights  # a one-token document predicts nothing
    nll = sum(n * w for n, w in zip(per_doc.values["nll"], per_doc.weights)) / sum(per_doc.weights)
    assert ppl.evaluate(model, tokenizer)["nll"] == pytest.approx(nll, rel=1e-9)


@pytest.mark.parametrize("checkpoint_length", [1, 9])
def test_generation_length_is_the_evaluators_not_the_checkpoints(lm, checkpoint_length) -> None:
    """A `max_new_tokens` in the model's generation config (as the zoo once shipped) changes nothing: the run
    config's `max_new_tokens` is what the evaluator generates."""
    model, tokenizer = lm
    evaluator = GenerationEvaluator(items_from(random_prompts(6), ["x"] * 6), batch_size=6, max_new_tokens=3)
    plain, counts = evaluator.generate(model, tokenizer), []
    model.generation_config.max_new_tokens = checkpoint_length
    assert evaluator.generate(model, tokenizer, token_counts=counts) == plain
    assert max(counts) == 3
