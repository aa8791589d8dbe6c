"""Model calls the native evaluators share: prompts (template, chat template), length-sorted padded batches, greedy
generation with stop strings, and teacher-forced log-likelihoods of continuations.

Every call runs the live model in eval mode under `torch.inference_mode` on the model's device and batches items
by length (results do not depend on the batch size). Prompts are tokenized with the tokenizer's default special
tokens (as lm-eval's HFLM does), so both backends see the same ids.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from merge_core.dataflow import CACHE_NAME
from merge_core.errors import EvomergeError

PROMPT_FIELD = "{prompt}"


def format_prompt(template: str | None, prompt: str) -> str:
    """`template` with ``{prompt}`` replaced by the item's prompt (plain replacement, no other braces)."""
    return prompt if template is None else template.replace(PROMPT_FIELD, prompt)


def check_template(template: str | None) -> str | None:
    """Reject a prompt_template without the ``{prompt}`` placeholder."""
    if template is not None and PROMPT_FIELD not in template:
        raise EvomergeError(f"prompt_template must contain {PROMPT_FIELD}, got {template!r}")
    return template


def require_chat_template(tokenizer: PreTrainedTokenizerBase, model: str | None = None) -> None:
    """`chat_template: true` needs a tokenizer with a chat template (checked before a search and by every call)."""
    if not getattr(tokenizer, "chat_template", None):
        which = f" (model '{model}')" if model else ""
        raise EvomergeError(
            f"chat_template: true, but the model's tokenizer has no chat template{which}; set it to false"
        )


def chat_prompts(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str]) -> list[str]:
    """Each prompt as one user turn in the tokenizer's chat template, opening the assistant's turn (a BOS the
    template writes is dropped when the tokenizer adds its own, so a prompt never starts with two)."""
    require_chat_template(tokenizer)
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


MIN_SHARED_PREFIX = 8  # tokens every prompt starts with, below which no prefix is computed apart


def shared_prefix_length(encoded: Sequence[Sequence[int]]) -> int:
    """How many leading token ids every prompt shares (a chat template's system turn, a few-shot preamble), leaving
    each prompt at least one token of its own; 0 when fewer than MIN_SHARED_PREFIX, or fewer than two prompts."""
    if len(encoded) < 2:
        return 0
    first, n = encoded[0], min(len(e) for e in encoded) - 1
    length = next((i for i in range(n) if any(e[i] != first[i] for e in encoded)), max(n, 0))
    return length if length >= MIN_SHARED_PREFIX else 0


def prefix_cache(model: PreTrainedModel, prefix: Sequence[int]) -> Any:
    """The KV cache of `prefix` (one row), computed once and copied into every batch (`batch_cache`)."""
    out = model(input_ids=torch.tensor([list(prefix)], device=model.device), use_cache=True)
    return getattr(out, CACHE_NAME)


def batch_cache(cache: Any, rows: int) -> Any:
    """A copy of a one-row prefix cache for `rows` rows (generation appends to it)."""
    copied = copy.deepcopy(cache)
    copied.batch_repeat_interleave(rows)
    return copied


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
    """Greedy continuations of `prompts`, cut at the first stop string.

    Batches are sorted by length; the prompts' shared leading tokens (`shared_prefix_length`: a chat template's
    system turn, a preamble) are computed once per call and their KV cache copied into each batch, whose rows hold
    the prefix, then left padding, then each prompt's own tokens (the attention mask skips the padding and the
    positions continue the prefix's). Each batch is decoded by `greedy_rows`: a row leaves the batch as soon as it
    ends (EOS or a stop string), so the others go on without it, up to `max_new_tokens`. When `token_counts` is
    given, it receives the number of tokens generated for each prompt (up to its end).
    """
    encoded = [tokenizer(p)["input_ids"] for p in prompts]
    pad_id = pad_token_id(tokenizer)
    stop_ids, stop_texts = split_stops(tokenizer, stop)
    eos_ids = eos_token_ids(model, tokenizer)
    end_ids = eos_ids + [i for i in stop_ids if i not in eos_ids]
    ended = RowEnd(tokenizer, end_ids, stop_texts)
    responses = [""] * len(prompts)
    counts = [0] * len(prompts)
    shared = shared_prefix_length(encoded)
    model.eval()
    with torch.inference_mode():
        cache = prefix_cache(model, encoded[0][:shared]) if shared else None
        for batch in length_batches([len(e) for e in encoded], batch_size):
            ids, mask = pad_batch([encoded[i][shared:] for i in batch], pad_id, side="left")
            rows_cache = None
            if cache is not None:  # the prefix, then the left-padded rest of each prompt
                prefix = torch.tensor([encoded[batch[0]][:shared]] * len(batch), dtype=ids.dtype)
                ids, mask = torch.cat([prefix, ids], dim=1), torch.cat([torch.ones_like(prefix), mask], dim=1)
                rows_cache = batch_cache(cache, len(batch))
            rows = greedy_rows(model, ids.to(model.device), mask.to(model.device), rows_cache, max_new_tokens, ended)
            for i, row in zip(batch, rows):
                responses[i] = decode_until(tokenizer, row, end_ids, stop_texts)
                counts[i] = generated_length(row, end_ids, pad_id)
    if token_counts is not None:
        token_counts[:] = counts
    return responses


class RowEnd:
    """Whether a row's generated tokens end it: its last token is an end id (EOS, a special stop token), or its
    tail decodes to text holding a stop string (only the last few tokens are decoded)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, end_ids: Sequence[int], stop: Sequence[str]) -> None:
        self.tokenizer, self.end_ids, self.stop = tokenizer, set(end_ids), [s for s in stop if s]
        self.lookback = 2 + max((len(tokenizer.encode(s, add_special_tokens=False)) for s in self.stop), default=0)

    def __call__(self, row: Sequence[int]) -> bool:
        if row[-1] in self.end_ids:
            return True
        if not self.stop:
            return False
        tail = self.tokenizer.decode(row[-self.lookback :], skip_special_tokens=True)
        return any(s in tail for s in self.stop)


def greedy_rows(
    model: PreTrainedModel,
    ids: torch.Tensor,
    mask: torch.Tensor,
    cache: Any,
    max_new_tokens: int,
    ended: Callable[[Sequence[int]], bool],
) -> list[list[int]]:
    """Greedy decoding of one left-padded batch (the first `cache.get_seq_length()` columns already in `cache`):
    each row's new tokens, up to and including the one that ends it. Positions count the attended tokens, as
    transformers' generate does; a row that has ended leaves the batch (its rows of the cache are dropped), so a
    long answer no longer keeps finished rows computing."""
    rows: list[list[int]] = [[] for _ in range(ids.shape[0])]
    active = list(range(ids.shape[0]))
    positions = mask.long().cumsum(-1) - 1
    positions.masked_fill_(mask == 0, 1)
    past = cache.get_seq_length() if cache is not None else 0
    inputs, step_positions = ids[:, past:], positions[:, past:]
    for step in range(max_new_tokens):
        out = model(
            input_ids=inputs,
            attention_mask=mask,
            position_ids=step_positions,
            use_cache=True,
            logits_to_keep=1,
            **{CACHE_NAME: cache},
        )
        cache = getattr(out, CACHE_NAME)
        tokens = out.logits[:, -1, :].argmax(dim=-1)
        keep = []
        for j, (r, token) in enumerate(zip(active, tokens.tolist())):
            rows[r].append(token)
            if not ended(rows[r]):
                keep.append(j)
        if not keep or step == max_new_tokens - 1:
            break
        if len(keep) < len(active):
            index = torch.tensor(keep, device=ids.device)
            cache.batch_select_indices(index)
            mask, tokens, step_positions = mask[index], tokens[index], step_positions[index]
            active = [active[j] for j in keep]
        mask = torch.cat([mask, mask.new_ones((len(active), 1))], dim=1)
        inputs, step_positions = tokens[:, None], step_positions[:, -1:] + 1
    return rows


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
