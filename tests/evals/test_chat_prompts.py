"""evals.native.chat_prompts: prompts as one user turn of the tokenizer's chat template, never with two BOS."""

from __future__ import annotations

import pytest
from tokenizers.processors import TemplateProcessing

from evals.lm import chat_prompts
from merge_core.errors import EvomergeError
from zoo.synthetic import word_tokenizer

TEMPLATE = "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{% endfor %} kotae"


def test_one_user_turn_and_a_single_bos_when_the_tokenizer_adds_its_own() -> None:
    tokenizer = word_tokenizer(["a", "b", "[user]", "kotae"])
    tokenizer.chat_template = TEMPLATE
    assert chat_prompts(tokenizer, ["a b"]) == ["<s>[user] a b kotae"]  # the template's BOS kept: none added
    bos = tokenizer.bos_token_id
    tokenizer._tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    (text,) = chat_prompts(tokenizer, ["a b"])
    assert text == "[user] a b kotae"  # the tokenizer adds it: the template's copy is dropped
    assert tokenizer(text)["input_ids"].count(bos) == 1


def test_a_tokenizer_without_a_chat_template_is_a_one_line_error() -> None:
    with pytest.raises(EvomergeError, match="chat_template: true, but the model's tokenizer has no chat template"):
        chat_prompts(word_tokenizer(["a"]), ["a"])
