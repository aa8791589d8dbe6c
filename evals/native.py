"""Native fast-path evaluators: batched greedy generation + extraction, log-likelihood choice, perplexity.

Each scores any stretch of its run-wide item order (`evals.base.ItemEvaluator`); the model calls they share
(batching, generation, log-likelihoods) are in `evals.lm`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

import evals.spec as spec
from evals.base import ItemEvaluator, ItemScores, item_order
from evals.data import GenerationItem, load_choice_items, load_dataset_items, load_generation_items, subsample
from evals.extract import Extractor, answers_match, make_extractor
from evals.language import LanguageCheck, make_language_check
from evals.lm import (
    chat_prompts,
    check_template,
    continuation_logprobs,
    format_prompt,
    generate_greedy,
    pad_token_id,
    sum_logprobs,
    with_delimiter,
)
from merge_core.errors import EvomergeError

# ---------------------------------------------------------------- evaluators


def _items_name(task_dir: Any, dataset: Mapping[str, Any] | None, default: str) -> str:
    if dataset is not None:
        return Path(str(dataset["path"]).rstrip("/")).name
    return Path(task_dir).name if isinstance(task_dir, (str, Path)) else default


def _load_items(kind: str, task_dir: Any, split: str, dataset: Mapping[str, Any] | None) -> list:
    """The items of a task: a JSONL split of `task_dir`, a dataset source (its own split; `split` unused), or
    items given as a list."""
    if dataset is not None:
        if task_dir is not None:
            raise EvomergeError(f"{kind} task: give task_dir or dataset, not both")
        return list(load_dataset_items(kind, dataset))
    if task_dir is None:
        raise EvomergeError(f"{kind} task: needs task_dir (JSONL splits) or dataset (a datasets source)")
    if isinstance(task_dir, (str, Path)):
        return list((load_generation_items if kind == "generation" else load_choice_items)(task_dir, split))
    return list(task_dir)


def _source_label(task_dir: Any, split: str, dataset: Mapping[str, Any] | None) -> str:
    if dataset is not None:
        return f"dataset {dataset['path']!r} split {dataset.get('split')!r} slice {dataset.get('slice')!r}"
    return f"{task_dir!r} split {split!r}"


class TaskItemsEvaluator(ItemEvaluator):
    """An evaluator of items read from JSONL splits (`task_dir`, `split`) or a `datasets` source (`dataset`),
    subsampled to `limit` by `seed` (or its first `limit` with `limit_mode="first"`), in the run's item order; each
    prompt formatted by `prompt_template`, an answer joined to it with `delimiter`."""

    kind: str  # the task type: which item reader applies
    # a generation engine (evals.vllm_engine.VllmEngine) holding the live model's weights, set by the scorer for
    # `execution.engine: vllm`: generation and log-likelihoods run on it instead of the live model
    engine: Any = None

    def __init__(
        self,
        task_dir: Any = None,
        split: str = "dev",
        *,
        dataset: Mapping[str, Any] | None = None,
        name: str | None = None,
        limit: int | None = None,
        limit_mode: str = spec.LIMIT_MODE,
        seed: int = 0,
        batch_size: int | str = spec.BATCH_SIZE,
        prompt_template: str | None = None,
        delimiter: str = " ",
    ) -> None:
        self.items = subsample(_load_items(self.kind, task_dir, split, dataset), limit, seed, limit_mode)
        if not self.items:
            raise EvomergeError(f"{self.kind} task {_source_label(task_dir, split, dataset)} has no items")
        self.order = item_order(len(self.items), seed)
        self.name = name or _items_name(task_dir, dataset, self.kind)
        self.batch_size = batch_size
        self.prompt_template = check_template(prompt_template)
        self.delimiter = delimiter

    def longest_sequence(self, tokenizer: PreTrainedTokenizerBase) -> int:
        """The longest sequence (prompt and what is generated or scored after it) of these items, in tokens: what
        an engine must hold, and what an automatic batch is sized for."""
        raise NotImplementedError

    def batch(self) -> int:
        """The batch size (`batch_size: auto` is decided by the scorer from the worker's memory plan)."""
        if self.batch_size == spec.AUTO_BATCH:
            raise EvomergeError(
                f"task {self.name}: batch_size auto is decided by the scorer from the memory plan; "
                "give a number to score with the evaluator alone"
            )
        return int(self.batch_size)


class GenerationEvaluator(TaskItemsEvaluator):
    """Greedy generation + answer extraction + exact match (optionally counting only answers in the right language).

    Metrics: ``acc`` (value right AND language check passed), ``acc_value`` (value right, language ignored),
    ``lang_ok`` (share passing the language check; 1.0 without one), and with ``gold_prob``:
    ``gold_prob`` = mean over items of p(gold continuation | prompt) under teacher forcing, the product of
    the token probabilities of ``delimiter + answer`` (no delimiter when the prompt ends in whitespace;
    no EOS or stop token included), and ``gold_logprob`` = the mean of its log. With ``chat_template``, the
    model reads each (templated) prompt as one user turn of its tokenizer's chat template.
    """

    kind = spec.GENERATION

    def __init__(
        self,
        task_dir: str | Path | Sequence[GenerationItem] | None = None,
        split: str = "dev",
        *,
        max_new_tokens: int = spec.MAX_NEW_TOKENS,
        stop: Sequence[str] = (),
        extract: str | Mapping[str, Any] | Extractor = spec.EXTRACT,
        language_check: Mapping[str, Any] | LanguageCheck | None = None,
        gold_prob: bool = spec.GOLD_PROB,
        extract_gold: bool = False,
        chat_template: bool = False,
        **source: Any,
    ) -> None:
        super().__init__(task_dir, split, **source)
        self.max_new_tokens = max_new_tokens
        self.stop = list(stop)
        self.extract = make_extractor(extract)
        self.language_check = make_language_check(language_check)
        self.gold_prob = gold_prob
        self.extract_gold = extract_gold
        self.chat_template = chat_template

    @classmethod
    def metric_names(cls, gold_prob: bool = spec.GOLD_PROB, **_: Any) -> tuple[str, ...]:
        """The keys `evaluate` returns for these constructor fields (checked before a search starts)."""
        return ("acc", "acc_value", "lang_ok") + (("gold_prob", "gold_logprob") if gold_prob else ())

    def prompts(self, indices: Sequence[int] | None = None) -> list[str]:
        """The formatted prompts of the items at `indices` (default: all, in item order)."""
        items = self.items if indices is None else [self.items[i] for i in indices]
        return [format_prompt(self.prompt_template, item.prompt) for item in items]

    def model_prompts(self, tokenizer: PreTrainedTokenizerBase, indices: Sequence[int] | None = None) -> list[str]:
        """The text the model reads: `prompts`, each as a user turn of the chat template when `chat_template`."""
        prompts = self.prompts(indices)
        return chat_prompts(tokenizer, prompts) if self.chat_template else prompts

    def generate(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        indices: Sequence[int] | None = None,
        token_counts: list[int] | None = None,
    ) -> list[str]:
        """The stop-truncated greedy responses to the items at `indices` (default: all, in item order)."""
        if self.engine is not None:
            return self.engine.generate(
                model,
                tokenizer,
                self.model_prompts(tokenizer, indices),
                max_new_tokens=self.max_new_tokens,
                stop=self.stop,
                token_counts=token_counts,
            )
        return generate_greedy(
            model,
            tokenizer,
            self.model_prompts(tokenizer, indices),
            batch_size=self.batch(),
            max_new_tokens=self.max_new_tokens,
            stop=self.stop,
            token_counts=token_counts,
        )

    def gold(self, item: GenerationItem) -> str:
        """The gold answer compared against (passed through the extractor when `extract_gold`)."""
        if not self.extract_gold:
            return item.answer
        extracted = self.extract(item.answer)
        if extracted is None:
            raise EvomergeError(f"extract_gold: the extractor finds no answer in gold {item.answer!r} (item {item.id})")
        return extracted

    def score(self, responses: Sequence[str], indices: Sequence[int] | None = None) -> dict[str, list[float]]:
        """Per item: acc, acc_value and lang_ok (1.0 or 0.0) of `responses` to the items at `indices`."""
        items = self.items if indices is None else [self.items[i] for i in indices]
        value_ok = [answers_match(self.extract(r), self.gold(item)) for r, item in zip(responses, items)]
        lang_ok = [self.language_check(r.strip()) if self.language_check else True for r in responses]
        return {
            "acc": [float(value and lang) for value, lang in zip(value_ok, lang_ok)],
            "acc_value": [float(v) for v in value_ok],
            "lang_ok": [float(v) for v in lang_ok],
        }

    def gold_logprobs(
        self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, indices: Sequence[int] | None = None
    ) -> list[float]:
        """log p(gold continuation | prompt) per item (the items at `indices`, default all)."""
        items = self.items if indices is None else [self.items[i] for i in indices]
        prompts = self.model_prompts(tokenizer, indices)
        pairs = [(p, with_delimiter(p, item.answer, self.delimiter)) for p, item in zip(prompts, items)]
        if self.engine is not None:
            return self.engine.continuation_logprobs(tokenizer, pairs)
        return continuation_logprobs(model, tokenizer, pairs, batch_size=self.batch())

    def longest_sequence(self, tokenizer: PreTrainedTokenizerBase) -> int:
        """The longest prompt plus `max_new_tokens`, or plus its gold answer when `gold_prob` scores a longer one."""
        longest = 0
        for prompt, item in zip(self.model_prompts(tokenizer), self.items):
            tokens = len(tokenizer(prompt)["input_ids"]) + self.max_new_tokens
            if self.gold_prob:
                tokens = max(
                    tokens, len(tokenizer(prompt + with_delimiter(prompt, item.answer, self.delimiter))["input_ids"])
                )
            longest = max(longest, tokens)
        return longest

    def score_items(
        self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, start: int = 0, stop: int | None = None
    ) -> ItemScores:
        """Per-item scores of the items at positions [start, stop) of `order` (see `ItemScores`)."""
        indices = sorted(self.order[start:stop])  # scored in item order: the full set batches exactly as before
        counts: list[int] = []
        values = self.score(self.generate(model, tokenizer, indices, counts), indices)
        if self.gold_prob:
            logprobs = self.gold_logprobs(model, tokenizer, indices)
            values["gold_prob"] = [math.exp(lp) for lp in logprobs]
            values["gold_logprob"] = logprobs
        return _in_order(self.order, start, indices, values, tokens=sum(counts))

    def aggregate(self, scores: ItemScores) -> dict[str, float]:
        """The metrics of scored items: the mean of each per-item value (summed in item order)."""
        return _means(self.order, scores)


class ChoiceEvaluator(TaskItemsEvaluator):
    """Log-likelihood multiple choice: ``acc`` (argmax of log p(delimiter + choice | prompt)) and
    ``acc_norm`` (argmax of that log-likelihood divided by the choice's length in characters, as lm-eval)."""

    kind = spec.CHOICE
    metrics = ("acc", "acc_norm")

    def score_items(
        self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, start: int = 0, stop: int | None = None
    ) -> ItemScores:
        """Per-item acc and acc_norm (1.0 or 0.0) of the items at positions [start, stop) of `order`."""
        indices = sorted(self.order[start:stop])
        items = [self.items[i] for i in indices]
        pairs = []
        for item in items:
            prompt = format_prompt(self.prompt_template, item.prompt)
            pairs += [(prompt, with_delimiter(prompt, choice, self.delimiter)) for choice in item.choices]
        if self.engine is not None:
            logprobs = iter(self.engine.continuation_logprobs(tokenizer, pairs))
        else:
            logprobs = iter(continuation_logprobs(model, tokenizer, pairs, batch_size=self.batch()))
        values: dict[str, list[float]] = {"acc": [], "acc_norm": []}
        for item in items:
            scores = [next(logprobs) for _ in item.choices]
            normed = [s / max(len(c), 1) for s, c in zip(scores, item.choices)]
            values["acc"].append(float(max(range(len(scores)), key=scores.__getitem__) == item.label))
            values["acc_norm"].append(float(max(range(len(normed)), key=normed.__getitem__) == item.label))
        return _in_order(self.order, start, indices, values)

    def longest_sequence(self, tokenizer: PreTrainedTokenizerBase) -> int:
        """The longest prompt with its delimiter and longest choice."""
        longest = 0
        for item in self.items:
            prompt = format_prompt(self.prompt_template, item.prompt)
            for choice in item.choices:
                longest = max(
                    longest, len(tokenizer(prompt + with_delimiter(prompt, choice, self.delimiter))["input_ids"])
                )
        return longest + 1

    def aggregate(self, scores: ItemScores) -> dict[str, float]:
        """acc and acc_norm of scored items (means in item order)."""
        return _means(self.order, scores)


class PerplexityEvaluator(ItemEvaluator):
    """Token perplexity over a text file, one document per non-empty line (each truncated to `max_length`
    tokens): ``ppl`` = exp(``nll``), ``nll`` = mean negative log-likelihood per predicted token. Lower is better."""

    metrics = ("ppl", "nll")

    def __init__(
        self,
        text_file: str | Path,
        *,
        name: str | None = None,
        limit: int | None = None,
        limit_mode: str = spec.LIMIT_MODE,
        seed: int = 0,
        batch_size: int = spec.BATCH_SIZE,
        max_length: int = spec.PERPLEXITY_MAX_LENGTH,
    ) -> None:
        path = Path(text_file)
        if not path.is_file():
            raise EvomergeError(f"perplexity text_file not found: {path}")
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        self.documents = subsample(lines, limit, seed, limit_mode)
        if not self.documents:
            raise EvomergeError(f"perplexity text_file {path} has no non-empty lines")
        self.order = item_order(len(self.documents), seed)
        self.name = name or path.stem
        self.batch_size = batch_size
        self.max_length = max_length

    def score_items(
        self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, start: int = 0, stop: int | None = None
    ) -> ItemScores:
        """Per document at positions [start, stop) of `order`: its mean ``nll`` per predicted token, weighted by that
        token count (0 for a document shorter than two tokens, which predicts nothing)."""
        indices = sorted(self.order[start:stop])
        sequences = [(tokenizer(self.documents[i])["input_ids"][: self.max_length], 1) for i in indices]
        scored = [j for j, (ids, _) in enumerate(sequences) if len(ids) >= 2]
        totals = sum_logprobs(
            model, [sequences[j] for j in scored], pad_id=pad_token_id(tokenizer), batch_size=self.batch_size
        )
        nll, weights = [0.0] * len(indices), [0.0] * len(indices)
        for j, total in zip(scored, totals):
            weights[j] = float(len(sequences[j][0]) - 1)
            nll[j] = -total / weights[j]
        scores = _in_order(self.order, start, indices, {"nll": nll, "weight": weights})
        scores.weights = scores.values.pop("weight")
        return scores

    def aggregate(self, scores: ItemScores) -> dict[str, float]:
        """``nll`` = the token-weighted mean of the documents' nll, ``ppl`` = exp(nll)."""
        assert scores.weights is not None
        if not sum(scores.weights):
            raise EvomergeError(f"perplexity {self.name}: every document is shorter than two tokens")
        total = sum(n * w for n, w in zip(scores.values["nll"], scores.weights))
        nll = total / sum(scores.weights)
        return {"ppl": math.exp(nll), "nll": nll}


def _in_order(
    order: Sequence[int], start: int, indices: Sequence[int], values: dict[str, list[float]], tokens: int = 0
) -> ItemScores:
    """`values` of the items at `indices` rearranged into order positions start, start+1, ..."""
    at = {index: j for j, index in enumerate(indices)}
    rows = [at[index] for index in order[start : start + len(indices)]]
    return ItemScores(start, {k: [float(v[r]) for r in rows] for k, v in values.items()}, tokens=tokens)


def _means(order: Sequence[int], scores: ItemScores) -> dict[str, float]:
    """The mean of each per-item value, summed in item order (as one pass over the items would)."""
    rows = sorted(range(scores.n), key=lambda j: order[scores.start + j])
    return {k: sum(v[j] for j in rows) / scores.n for k, v in scores.values.items()}
