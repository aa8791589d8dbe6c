"""Locally built tokenizers and random checkpoints, for tests, benchmarks and the tiny zoo (nothing is downloaded)."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from merge_core.checkpoint import TOKENIZER_FILES
from merge_core.errors import EvomergeError

SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>")


def word_tokenizer(words: Sequence[str]) -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer over `words` (special tokens first), usable by transformers and lm-eval."""
    vocab: dict[str, int] = {}
    for w in (*SPECIAL_TOKENS, *words):
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins word tokens with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        clean_up_tokenization_spaces=False,
    )


DEFAULT_WORDS = (
    *(str(d) for d in range(10)),
    *"+ - * = ? . , : ( )".split(),
    *"the a an is are was of to and in on for with what how many much answer question".split(),
    *"cat dog bird fish apple banana red blue green big small one two three four five".split(),
    *"plus minus times equals total left each has have gives takes more less".split(),
    *"猫 犬 りんご 答え は です 個 円 合計 いくつ".split(),
)

# Sizes for unit tests: a whole trio builds and loads in well under a second.
# Mistral-7B-v0.1's shape (config.json field names): the 7B scenarios of the memory plan's tests and bench/gpu_check.py
MISTRAL_7B: dict[str, int] = dict(
    hidden_size=4096,
    num_hidden_layers=32,
    intermediate_size=14336,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=32000,
)
TEST_SIZES: dict[str, int] = dict(hidden_size=32, num_layers=4, intermediate_size=64, num_heads=4, num_kv_heads=2)

_FAMILIES: dict[str, tuple[type[PretrainedConfig], type[PreTrainedModel]]] = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
}


def make_tiny_checkpoint(
    out_dir: str | Path,
    family: str = "llama",
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    words: Sequence[str] | None = None,
    max_shard_size: str | None = None,
    from_checkpoint: str | Path | None = None,
    noise: float = 0.02,
    **model_options: Any,
) -> Path:
    """Save a seeded random decoder (or, with `from_checkpoint`, that model plus seeded noise) with tokenizer.

    `model_options` go to `tiny_model` (sizes, `tie_word_embeddings`, config overrides). With `from_checkpoint` the
    architecture, vocabulary and tokenizer come from that checkpoint (a "fine-tune" sharing its shapes) and only
    `seed`, `dtype`, `noise` and `max_shard_size` apply.
    """
    out = Path(out_dir)
    shard_kwargs = {"max_shard_size": max_shard_size} if max_shard_size is not None else {}
    if from_checkpoint is not None:
        return _save_finetune(Path(from_checkpoint), out, seed=seed, dtype=dtype, noise=noise, **shard_kwargs)
    tokenizer = word_tokenizer(words if words is not None else DEFAULT_WORDS)
    model = tiny_model(tokenizer, family, seed=seed, dtype=dtype, **model_options)
    model.save_pretrained(out, **shard_kwargs)
    tokenizer.save_pretrained(out)
    return out


def tiny_model(
    tokenizer: PreTrainedTokenizerFast,
    family: str = "llama",
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    hidden_size: int = 64,
    num_layers: int = 4,
    intermediate_size: int = 128,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    tie_word_embeddings: bool = False,
    **config_overrides: Any,
) -> PreTrainedModel:
    """A seeded random decoder over `tokenizer`'s vocabulary, in eval mode with a greedy generation config
    (`config_overrides` go to the model config, e.g. `initializer_range`; the global torch RNG is left as it was)."""
    config = _tiny_config(
        family,
        tokenizer,
        hidden_size=hidden_size,
        num_layers=num_layers,
        intermediate_size=intermediate_size,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        tie_word_embeddings=tie_word_embeddings,
        **config_overrides,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _FAMILIES[family][1]._from_config(config, dtype=dtype)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    return model.eval()


def make_tiny_trio(
    out_dir: str | Path, family: str = "llama", *, seed: int = 0, noise: float = 0.02, **kwargs: Any
) -> tuple[Path, Path, Path]:
    """A base checkpoint and two noisy fine-tunes of it under `out_dir` (`base`, `ft_a`, `ft_b`)."""
    out = Path(out_dir)
    base = make_tiny_checkpoint(out / "base", family, seed=seed, **kwargs)
    finetune_kwargs = {k: v for k, v in kwargs.items() if k in ("dtype", "max_shard_size")}
    ft_a = make_tiny_checkpoint(out / "ft_a", seed=seed + 1, from_checkpoint=base, noise=noise, **finetune_kwargs)
    ft_b = make_tiny_checkpoint(out / "ft_b", seed=seed + 2, from_checkpoint=base, noise=noise, **finetune_kwargs)
    return base, ft_a, ft_b


def _tiny_config(
    family: str,
    tokenizer: PreTrainedTokenizerFast,
    *,
    hidden_size: int,
    num_layers: int,
    intermediate_size: int,
    num_heads: int,
    num_kv_heads: int,
    tie_word_embeddings: bool,
    **overrides: Any,
) -> PretrainedConfig:
    """The model config for `family`, sized as asked, with the tokenizer's vocabulary and special ids."""
    if family not in _FAMILIES:
        raise EvomergeError(f"unknown tiny model family '{family}'; use one of {sorted(_FAMILIES)}")
    if hidden_size % num_heads or num_heads % num_kv_heads:
        raise EvomergeError(
            f"tiny {family}: hidden_size {hidden_size} must divide by num_heads {num_heads}, "
            f"and num_heads by num_kv_heads {num_kv_heads}"
        )
    fields: dict[str, Any] = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=512,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config_cls, model_cls = _FAMILIES[family]
    config = config_cls(**{**fields, **overrides})
    config.architectures = [model_cls.__name__]
    return config


def _save_finetune(base: Path, out: Path, *, seed: int, dtype: torch.dtype, noise: float, **save_kwargs: Any) -> Path:
    """Save `base` plus seeded noise to `out`, with `base`'s tokenizer files copied unchanged."""
    _noisy_copy(base, seed=seed, dtype=dtype, noise=noise).save_pretrained(out, **save_kwargs)
    for name in TOKENIZER_FILES:
        if (base / name).is_file():
            shutil.copyfile(base / name, out / name)
    return out


def _noisy_copy(base: Path, *, seed: int, dtype: torch.dtype, noise: float) -> PreTrainedModel:
    """Load `base` in `dtype` and add `noise` * N(0, 1) to every parameter, one tensor at a time."""
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            delta = torch.randn(param.shape, generator=generator, dtype=torch.float32) * noise
            param.copy_((param.float() + delta).to(param.dtype))
    return model
