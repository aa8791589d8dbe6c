"""Tests for merge_core.dataflow: the in-memory path model, its export and cached generation."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from merge_core.checkpoint import Checkpoint
from merge_core.dataflow import CACHE_NAME, DataFlowModel, check_compatible_configs, export_dataflow
from merge_core.errors import EvomergeError
from merge_core.recipe import LayerPath
from tests.merge_core.test_recipe import identity_path
from zoo.synthetic import make_tiny_checkpoint

torch.set_num_threads(1)

SIZES = dict(hidden_size=32, intermediate_size=64, num_heads=4, num_kv_heads=2)
# Small sliding windows so Mistral's and Qwen2's window masks and window caches matter at these lengths;
# Qwen2 slides from layer 1 on, so a path mixes full and sliding hops. Llama ties its head to exercise untying.
FAMILY_CONFIG = {
    "llama": dict(tie_word_embeddings=True),
    "mistral": dict(sliding_window=4),
    "qwen2": dict(use_sliding_window=True, sliding_window=4, max_window_layers=1),
}
# A has 3 layers, B 2: interleaves A and B, repeats A1, scales the embeddings (0.7) and later hops.
PATH = LayerPath(((0, 0), (1, 1), (0, 1), (0, 1), (1, 0), (0, 2)), (0.7, 1.3, 1.0, 0.9, 1.1, 1.2))
PROMPTS = [[5, 9, 14, 22, 7, 31, 12, 40, 18], [11, 4], [33, 8, 19, 27, 6]]
PAD = 0
# Every generation test decodes this many tokens per row (EOS suppressed until then), so a cache that is lost or
# misread after the first step shows up as different tokens, not hidden behind an early EOS.
NEW_TOKENS = 16


@dataclass
class Pair:
    family: str
    dir_a: Path
    dir_b: Path
    model_a: PreTrainedModel
    model_b: PreTrainedModel
    exported: PreTrainedModel


@pytest.fixture(scope="module", params=sorted(FAMILY_CONFIG))
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Pair:
    """Two different random tiny models of one family (A: 3 layers, B: 2), loaded, and PATH exported from them."""
    family = request.param
    root = tmp_path_factory.mktemp(f"dataflow_{family}")
    extra = FAMILY_CONFIG[family]
    dir_a = make_tiny_checkpoint(root / "a", family, seed=1, num_layers=3, **SIZES, **extra)
    dir_b = make_tiny_checkpoint(root / "b", family, seed=2, num_layers=2, **SIZES, **extra)
    out = export_dataflow(PATH, dir_a, dir_b, root / "out")
    load = lambda p: AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).eval()  # noqa: E731
    return Pair(family, dir_a, dir_b, load(dir_a), load(dir_b), load(out))


def _left_padded(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def _greedy(model: PreTrainedModel, ids: torch.Tensor, mask: torch.Tensor, **kwargs) -> list[list[int]]:
    """The NEW_TOKENS greedy new tokens of each row (EOS cannot end a row early)."""
    with torch.inference_mode():
        out = model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
            pad_token_id=PAD,
            **kwargs,
        )
    rows = out[:, ids.shape[1] :].tolist()
    assert [len(row) for row in rows] == [NEW_TOKENS] * len(rows)
    return rows


def test_in_memory_logits_match_exported_checkpoint(pair: Pair) -> None:
    dataflow = DataFlowModel(pair.model_a, pair.model_b, PATH).eval()
    ids, mask = _left_padded(PROMPTS)
    with torch.inference_mode():
        expected = pair.exported(ids, attention_mask=mask).logits
        got = dataflow(ids, attention_mask=mask).logits
    assert pair.exported.config.num_hidden_layers == len(PATH)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_export_layout(pair: Pair) -> None:
    ckpt = Checkpoint.open(str(pair.exported.name_or_path))
    src_a, src_b = Checkpoint.open(str(pair.dir_a)), Checkpoint.open(str(pair.dir_b))
    # Hop 0 (A0) carries hop 1's scale (1.3) in its down_proj; hop 1 (B1) its attention unchanged.
    down, q_proj = "mlp.down_proj.weight", "self_attn.q_proj.weight"
    torch.testing.assert_close(ckpt.tensor(f"model.layers.0.{down}"), src_a.tensor(f"model.layers.0.{down}") * 1.3)
    assert torch.equal(ckpt.tensor(f"model.layers.1.{q_proj}"), src_b.tensor(f"model.layers.1.{q_proj}"))
    assert torch.equal(ckpt.tensor(f"model.layers.5.{down}"), src_a.tensor(f"model.layers.2.{down}"))  # last: unscaled
    torch.testing.assert_close(
        ckpt.tensor("model.embed_tokens.weight"), src_a.tensor("model.embed_tokens.weight") * 0.7
    )
    if pair.family == "llama":  # A ties its head: the export unties it and keeps the head unscaled
        assert not pair.exported.config.tie_word_embeddings
        assert torch.equal(ckpt.tensor("lm_head.weight"), src_a.tensor("model.embed_tokens.weight"))
    if pair.family == "qwen2":  # each hop keeps its source layer's attention type
        full, sliding = "full_attention", "sliding_attention"
        assert pair.exported.config.layer_types == [full, sliding, sliding, sliding, full, sliding]
    assert (Path(pair.exported.name_or_path) / "tokenizer.json").is_file()


def test_identity_path_reproduces_model_a(pair: Pair) -> None:
    dataflow = DataFlowModel(pair.model_a, pair.model_b, PATH).eval()
    dataflow.set_path(identity_path(pair.model_a.config.num_hidden_layers))
    ids, mask = _left_padded(PROMPTS)
    with torch.inference_mode():
        torch.testing.assert_close(
            dataflow(ids, attention_mask=mask).logits, pair.model_a(ids, attention_mask=mask).logits, rtol=0, atol=1e-6
        )
    assert _greedy(dataflow, ids, mask) == _greedy(pair.model_a, ids, mask)


def test_batched_cached_generation_matches_export_and_unpadded(pair: Pair) -> None:
    dataflow = DataFlowModel(pair.model_a, pair.model_b, PATH).eval()
    ids, mask = _left_padded(PROMPTS)
    batched = _greedy(dataflow, ids, mask)
    assert batched == _greedy(pair.exported, ids, mask)
    for prompt, row in zip(PROMPTS, batched):
        alone = torch.tensor([prompt])
        assert _greedy(dataflow, alone, torch.ones_like(alone), use_cache=False) == [row]
    assert len({tuple(row) for row in batched}) > 1  # rows differ: each followed its own prompt through the cache
    with torch.inference_mode():
        cache = getattr(dataflow(ids, attention_mask=mask, use_cache=True), CACHE_NAME)
    assert len(cache.layers) == len(PATH)  # one slot per hop: hops 2 and 3 both run A1 but keep their own keys
    assert not torch.equal(cache.layers[2].keys, cache.layers[3].keys)


def test_generate_hands_the_cache_to_every_step(pair: Pair) -> None:
    """generate's own keyword names reach forward: after the prompt, each step sees one new token and the cache of
    everything before it (a cache passed under a name forward does not read would show length 0 at every step)."""
    dataflow = DataFlowModel(pair.model_a, pair.model_b, PATH).eval()
    ids, mask = _left_padded(PROMPTS)
    steps: list[tuple[int, int]] = []

    def record(module, args, kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        steps.append((kwargs["input_ids"].shape[1], 0 if cache is None else cache.get_seq_length()))

    handle = dataflow.register_forward_pre_hook(record, with_kwargs=True)
    try:
        _greedy(dataflow, ids, mask)
    finally:
        handle.remove()
    width = ids.shape[1]
    assert steps == [(width, 0)] + [(1, width + i) for i in range(NEW_TOKENS - 1)]


def test_forward_takes_the_cache_under_either_name_and_refuses_unknown_arguments(pair: Pair) -> None:
    dataflow = DataFlowModel(pair.model_a, pair.model_b, PATH).eval()
    ids, mask = _left_padded(PROMPTS)
    full = torch.cat([ids, torch.tensor([[3], [4], [5]])], dim=1)
    full_mask = torch.cat([mask, torch.ones(3, 1, dtype=mask.dtype)], dim=1)
    with torch.inference_mode():
        expected = dataflow(full, attention_mask=full_mask).logits[:, -1]
        for name in ("cache", "past_key_values"):  # prompt, then one step with the cache under each name
            first = dataflow(ids, attention_mask=mask, use_cache=True)
            cache = getattr(first, CACHE_NAME)
            step = dataflow(full[:, -1:], attention_mask=full_mask, use_cache=True, **{name: cache})
            torch.testing.assert_close(step.logits[:, -1], expected, rtol=0, atol=1e-5)
            assert cache.get_seq_length() == full.shape[1]
        with pytest.raises(TypeError, match="both cache and past_key_values"):
            dataflow(full[:, -1:], cache=cache, past_key_values=cache)
        with pytest.raises(TypeError, match="cache_params"):  # a future rename fails here, not silently in a search
            dataflow(ids, attention_mask=mask, cache_params=cache)
        with pytest.raises(TypeError, match="output_attentions=True is not supported"):
            dataflow(ids, output_attentions=True)
        logits, returned = dataflow(ids, attention_mask=mask, use_cache=True, return_dict=False)
    torch.testing.assert_close(logits, first.logits, rtol=0, atol=0)
    assert returned.get_seq_length() == ids.shape[1]


def test_holds_references_not_copies(pair: Pair) -> None:
    before = pair.model_a.model.layers[0].mlp.down_proj.weight.clone()
    before_ptr = pair.model_a.model.layers[0].mlp.down_proj.weight.data_ptr()
    dataflow = DataFlowModel(pair.model_a, pair.model_b, PATH).eval()
    with torch.inference_mode():
        dataflow(torch.tensor([PROMPTS[0]]))
    held = dict(dataflow.named_parameters())
    assert held["model_a.model.layers.0.mlp.down_proj.weight"].data_ptr() == before_ptr
    assert held["model_b.model.layers.1.self_attn.q_proj.weight"].data_ptr() == (
        pair.model_b.model.layers[1].self_attn.q_proj.weight.data_ptr()
    )
    assert torch.equal(pair.model_a.model.layers[0].mlp.down_proj.weight, before)  # scales never folded in place
    source_ptrs = {p.data_ptr() for m in (pair.model_a, pair.model_b) for p in m.parameters()}
    assert {p.data_ptr() for p in dataflow.parameters()} == source_ptrs
    assert dataflow.device == pair.model_a.device
    with pytest.raises(EvomergeError, match="export_dataflow"):
        dataflow.save_pretrained("unused")


def test_set_path_checks_ranges(pair: Pair) -> None:
    dataflow = DataFlowModel(pair.model_a, pair.model_b, PATH)
    with pytest.raises(EvomergeError, match=r"hop 1 \(B2\) is out of range; model B has 2 layers"):
        dataflow.set_path(LayerPath(((0, 0), (1, 2)), (1.0, 1.0)))
    assert dataflow.path == PATH and dataflow.config.num_hidden_layers == len(PATH)
    with pytest.raises(EvomergeError, match="uses model B .* but no model B was given"):
        DataFlowModel(pair.model_a, None, PATH)
    with pytest.raises(EvomergeError, match=r"hop 0 \(A3\) is out of range; model A has 3 layers"):
        export_dataflow(LayerPath(((0, 3),), (1.0,)), pair.dir_a, pair.dir_b, pair.dir_a.parent / "bad")


def test_export_dtype(pair: Pair, tmp_path: Path) -> None:
    out = export_dataflow(PATH, pair.dir_a, pair.dir_b, tmp_path / "bf16", dtype=torch.bfloat16)
    assert Checkpoint.open(str(out)).dtype("model.layers.0.mlp.down_proj.weight") == torch.bfloat16
    assert AutoModelForCausalLM.from_pretrained(out).dtype == torch.bfloat16


def test_incompatible_configs() -> None:
    from transformers import LlamaConfig, MistralConfig

    with pytest.raises(EvomergeError, match=r"'hidden_size' differs between A \(64\) and B \(32\)"):
        check_compatible_configs(LlamaConfig(hidden_size=64), LlamaConfig(hidden_size=32))
    with pytest.raises(EvomergeError, match="'model_type' differs"):
        check_compatible_configs(LlamaConfig(), MistralConfig())
