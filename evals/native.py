"""Native fast-path evaluators: batched greedy generation + extraction, log-likelihood choice, perplexity.

All run the live model in eval mode under `torch.inference_mode` on the model's device and batch
items by length (results do not depend on the batch size). Prompts are tokenized with the
tokenizer's default special tokens (as lm-eval's HFLM does), so both backends see the same ids.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import (
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    StoppingCriteria,
    StoppingCriteriaList,
)

from evals import spec
from evals.base import ItemEvaluator, ItemScores, item_order
from evals.data import (
    ChoiceItem,
    GenerationItem,
    load_choice_items,
    load_dataset_items,
    load_generation_items,
    subsample,
)
from evals.extract import Extractor, answers_match, make_extractor
from evals.language import LanguageCheck, make_language_check
from merge_core.errors import EvomergeError

PROMPT_FIELD = "{prompt}"


# ---------------------------------------------------------------- shared helpers


def format_prompt(template: str | None, prompt: str) -> str:
    """`template` with ``{prompt}`` replaced by the item's prompt (plain replacement, no other braces)."""
    return prompt if template is None else template.replace(PROMPT_FIELD, prompt)


def check_template(template: str | None) -> str | None:
    """Reject a prompt_template without the ``{prompt}`` placeholder."""
    if template is not None and PROMPT_FIELD not in template:
        raise EvomergeError(f"prompt_template must contain {PROMPT_FIELD}, got {template!r}")
    return template


def chat_prompts(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str]) -> list[str]:
    """Each prompt as one user turn in the tokenizer's chat template, opening the assistant's turn (a BOS the
    template writes is dropped when the tokenizer adds its own, so a prompt never starts with two)."""
    if not getattr(tokenizer, "chat_template", None):
        raise EvomergeError("chat_template: true, but the model's tokenizer has no chat template; set it to false")
    adds_bos = tokenizer.bos_token_id is not None and tokenizer.bos_token_id in tokenizer("")["input_ids"]
    texts = []
    for prompt in prompts:
        turn = [{"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(turn, tokenize=False, add_generation_prompt=True)
        texts.append(text[len(tokenizer.bos_token) :] if adds_bos and text.startswith(tokenizer.bos_token) else text)
    return texts


def pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The tokenizer's pad id, else its EOS id."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise EvomergeError("the tokenizer has neither a pad token nor an EOS token; set tokenizer.pad_token")
    return int(pad)


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) for `seqs`, padded on the "left" or "right"."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        cols = slice(width - len(seq), width) if side == "left" else slice(0, len(seq))
        ids[row, cols] = torch.tensor(seq, dtype=torch.long)
        mask[row, cols] = 1
    return ids, mask


def length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (longest first), to keep padding small."""
    if batch_size < 1:
        raise EvomergeError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def truncate_at_stop(text: str, stop: Sequence[str]) -> str:
    """`text` up to the earliest occurrence of any stop string."""
    cut = min((text.find(s) for s in stop if s and s in text), default=len(text))
    return text[:cut]


def eos_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """EOS ids of the model's generation config and of the tokenizer (either one ends a row)."""
    ids: list[int] = []
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for eos in (config_eos, tokenizer.eos_token_id):
        for token in eos if isinstance(eos, (list, tuple)) else [eos]:
            if token is not None and int(token) not in ids:
                ids.append(int(token))
    return ids


class StopOnStrings(StoppingCriteria):
    """Marks a row done once its generated tail contains a stop string (decodes only the last tokens)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: Sequence[str], prompt_width: int) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.prompt_width = prompt_width
        self.lookback = 2 + max(len(tokenizer.encode(s, add_special_tokens=False)) for s in self.stop)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        start = max(self.prompt_width, input_ids.shape[1] - self.lookback)
        tails = self.tokenizer.batch_decode(input_ids[:, start:], skip_special_tokens=True)
        done = [any(s in tail for s in self.stop) for tail in tails]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


# ---------------------------------------------------------------- generation and scoring


def split_stops(tokenizer: PreTrainedTokenizerBase, stop: Sequence[str]) -> tuple[list[int], list[str]]:
    """(token ids, strings): stop strings that are special tokens ("</s>", "<|im_end|>") end a row by id,
    like EOS, since decoding drops special tokens; the others are matched in the decoded text."""
    special = set(tokenizer.all_special_tokens)
    ids = [int(tokenizer.convert_tokens_to_ids(s)) for s in stop if s in special]
    return ids, [s for s in stop if s and s not in special]


def decode_until(
    tokenizer: PreTrainedTokenizerBase, ids: Sequence[int], end_ids: Sequence[int], stop: Sequence[str]
) -> str:
    """`ids` decoded up to the first end id (special tokens dropped), cut at the first stop string."""
    ends = [i for i, token in enumerate(ids) if token in end_ids]
    text = tokenizer.decode(ids[: ends[0]] if ends else ids, skip_special_tokens=True)
    return truncate_at_stop(text, stop)


def generate_greedy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    batch_size: int,
    max_new_tokens: int,
    stop: Sequence[str] = (),
    token_counts: list[int] | None = None,
) -> list[str]:
    """Greedy continuations of `prompts` (left-padded batches with attention masks), cut at the first stop string.

    A row ends at EOS or a stop string; a batch ends when every row has ended or after `max_new_tokens`. When
    `token_counts` is given, it receives the number of tokens generated for each prompt (up to its end).
    """
    encoded = [tokenizer(p)["input_ids"] for p in prompts]
    pad_id = pad_token_id(tokenizer)
    stop_ids, stop_texts = split_stops(tokenizer, stop)
    eos_ids = eos_token_ids(model, tokenizer)
    end_ids = eos_ids + [i for i in stop_ids if i not in eos_ids]
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, pad_token_id=pad_id, eos_token_id=end_ids
    )
    responses = [""] * len(prompts)
    counts = [0] * len(prompts)
    model.eval()
    with torch.inference_mode():
        for batch in length_batches([len(e) for e in encoded], batch_size):
            ids, mask = pad_batch([encoded[i] for i in batch], pad_id, side="left")
            criteria = [StopOnStrings(tokenizer, stop_texts, ids.shape[1])] if stop_texts else []
            out = model.generate(
                input_ids=ids.to(model.device),
                attention_mask=mask.to(model.device),
                generation_config=config,
                stopping_criteria=StoppingCriteriaList(criteria),
            )
            for i, row in zip(batch, out[:, ids.shape[1] :].tolist()):
                responses[i] = decode_until(tokenizer, row, end_ids, stop_texts)
                counts[i] = generated_length(row, end_ids, pad_id)
    if token_counts is not None:
        token_counts[:] = counts
    return responses


def generated_length(row: Sequence[int], end_ids: Sequence[int], pad_id: int) -> int:
    """Tokens generated in one row of a batch: up to and including its first end id, else up to the padding that
    fills a row finished early (by a stop string) while others went on."""
    for i, token in enumerate(row):
        if token in end_ids:
            return i + 1
    n = len(row)
    while n and row[n - 1] == pad_id:
        n -= 1
    return n


def continuation_token_ids(
    tokenizer: PreTrainedTokenizerBase, context: str, continuation: str
) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) split from the tokenization of context+continuation, as lm-eval does."""
    context_ids = tokenizer(context)["input_ids"]
    whole_ids = tokenizer(context + continuation)["input_ids"]
    if whole_ids[: len(context_ids)] != context_ids:  # the boundary merged: tokenize the parts apart
        whole_ids = context_ids + tokenizer(continuation, add_special_tokens=False)["input_ids"]
    continuation_ids = whole_ids[len(context_ids) :]
    if not continuation_ids:
        raise EvomergeError(f"continuation {continuation!r} tokenizes to nothing after context {context[-40:]!r}")
    return context_ids, continuation_ids


def sum_logprobs(
    model: PreTrainedModel, sequences: Sequence[tuple[Sequence[int], int]], *, pad_id: int, batch_size: int
) -> list[float]:
    """For each (token ids, start): the sum of log p(ids[t] | ids[:t]) over t >= start (teacher forcing)."""
    totals = [0.0] * len(sequences)
    model.eval()
    with torch.inference_mode():
        for batch in length_batches([len(ids) for ids, _ in sequences], batch_size):
            ids, mask = pad_batch([sequences[i][0] for i in batch], pad_id, side="right")
            logits = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)).logits
            for row, i in enumerate(batch):
                seq, start = sequences[i]
                positions = torch.arange(start - 1, len(seq) - 1, device=logits.device)
                logprobs = torch.log_softmax(logits[row, positions].float(), dim=-1)
                targets = torch.tensor(seq[start:], device=logits.device)
                totals[i] = float(logprobs.gather(1, targets[:, None]).sum())
    return totals


def continuation_logprobs(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, pairs: Sequence[tuple[str, str]], *, batch_size: int
) -> list[float]:
    """log p(continuation | context) for each (context, continuation) pair."""
    sequences = []
    for context, continuation in pairs:
        context_ids, continuation_ids = continuation_token_ids(tokenizer, context, continuation)
        sequences.append((context_ids + continuation_ids, len(context_ids)))
    return sum_logprobs(model, sequences, pad_id=pad_token_id(tokenizer), batch_size=batch_size)


def with_delimiter(context: str, continuation: str, delimiter: str) -> str:
    """`delimiter` + continuation, unless the context already ends in whitespace."""
    return continuation if not context or context[-1].isspace() else delimiter + continuation


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


class GenerationEvaluator(ItemEvaluator):
    """Greedy generation + answer extraction + exact match (optionally counting only answers in the right language).

    Metrics: ``acc`` (value right AND language check passed), ``acc_value`` (value right, language ignored),
    ``lang_ok`` (share passing the language check; 1.0 without one), and with ``gold_prob``:
    ``gold_prob`` = mean over items of p(gold continuation | prompt) under teacher forcing, the product of
    the token probabilities of ``delimiter + answer`` (no delimiter when the prompt ends in whitespace;
    no EOS or stop token included), and ``gold_logprob`` = the mean of its log. With ``chat_template``, the
    model reads each (templated) prompt as one user turn of its tokenizer's chat template.
    """

    def __init__(
        self,
        task_dir: str | Path | Sequence[GenerationItem] | None = None,
        split: str = "dev",
        *,
        dataset: Mapping[str, Any] | None = None,
        name: str | None = None,
        limit: int | None = None,
        seed: int = 0,
        batch_size: int = spec.BATCH_SIZE,
        max_new_tokens: int = spec.MAX_NEW_TOKENS,
        stop: Sequence[str] = (),
        extract: str | Mapping[str, Any] | Extractor = spec.EXTRACT,
        language_check: Mapping[str, Any] | LanguageCheck | None = None,
        prompt_template: str | None = None,
        gold_prob: bool = spec.GOLD_PROB,
        extract_gold: bool = False,
        delimiter: str = " ",
        chat_template: bool = False,
    ) -> None:
        self.items = subsample(_load_items("generation", task_dir, split, dataset), limit, seed)
        if not self.items:
            raise EvomergeError(f"generation task {_source_label(task_dir, split, dataset)} has no items")
        self.order = item_order(len(self.items), seed)
        self.name = name or _items_name(task_dir, dataset, "generation")
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.stop = list(stop)
        self.extract = make_extractor(extract)
        self.language_check = make_language_check(language_check)
        self.prompt_template = check_template(prompt_template)
        self.gold_prob = gold_prob
        self.extract_gold = extract_gold
        self.delimiter = delimiter
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
        return generate_greedy(
            model,
            tokenizer,
            self.model_prompts(tokenizer, indices),
            batch_size=self.batch_size,
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
        return continuation_logprobs(model, tokenizer, pairs, batch_size=self.batch_size)

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


class ChoiceEvaluator(ItemEvaluator):
    """Log-likelihood multiple choice: ``acc`` (argmax of log p(delimiter + choice | prompt)) and
    ``acc_norm`` (argmax of that log-likelihood divided by the choice's length in characters, as lm-eval)."""

    def __init__(
        self,
        task_dir: str | Path | Sequence[ChoiceItem] | None = None,
        split: str = "dev",
        *,
        dataset: Mapping[str, Any] | None = None,
        name: str | None = None,
        limit: int | None = None,
        seed: int = 0,
        batch_size: int = spec.BATCH_SIZE,
        prompt_template: str | None = None,
        delimiter: str = " ",
    ) -> None:
        self.items = subsample(_load_items("choice", task_dir, split, dataset), limit, seed)
        if not self.items:
            raise EvomergeError(f"choice task {_source_label(task_dir, split, dataset)} has no items")
        self.order = item_order(len(self.items), seed)
        self.name = name or _items_name(task_dir, dataset, "choice")
        self.batch_size = batch_size
        self.prompt_template = check_template(prompt_template)
        self.delimiter = delimiter

    @classmethod
    def metric_names(cls, **_: Any) -> tuple[str, ...]:
        """The keys `evaluate` returns."""
        return ("acc", "acc_norm")

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
        logprobs = iter(continuation_logprobs(model, tokenizer, pairs, batch_size=self.batch_size))
        values: dict[str, list[float]] = {"acc": [], "acc_norm": []}
        for item in items:
            scores = [next(logprobs) for _ in item.choices]
            normed = [s / max(len(c), 1) for s, c in zip(scores, item.choices)]
            values["acc"].append(float(max(range(len(scores)), key=scores.__getitem__) == item.label))
            values["acc_norm"].append(float(max(range(len(normed)), key=normed.__getitem__) == item.label))
        return _in_order(self.order, start, indices, values)

    def aggregate(self, scores: ItemScores) -> dict[str, float]:
        """acc and acc_norm of scored items (means in item order)."""
        return _means(self.order, scores)


class PerplexityEvaluator(ItemEvaluator):
    """Token perplexity over a text file, one document per non-empty line (each truncated to `max_length`
    tokens): ``ppl`` = exp(``nll``), ``nll`` = mean negative log-likelihood per predicted token. Lower is better."""

    def __init__(
        self,
        text_file: str | Path,
        *,
        name: str | None = None,
        limit: int | None = None,
        seed: int = 0,
        batch_size: int = spec.BATCH_SIZE,
        max_length: int = spec.PERPLEXITY_MAX_LENGTH,
    ) -> None:
        path = Path(text_file)
        if not path.is_file():
            raise EvomergeError(f"perplexity text_file not found: {path}")
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        self.documents = subsample(lines, limit, seed)
        if not self.documents:
            raise EvomergeError(f"perplexity text_file {path} has no non-empty lines")
        self.order = item_order(len(self.documents), seed)
        self.name = name or path.stem
        self.batch_size = batch_size
        self.max_length = max_length

    @classmethod
    def metric_names(cls, **_: Any) -> tuple[str, ...]:
        """The keys `evaluate` returns."""
        return ("ppl", "nll")

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
