"""Shared test fixtures: tiny checkpoints built locally (nothing is downloaded), once per test session."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before huggingface_hub is imported: hub look-ups fail fast
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from zoo.synthetic import TEST_SIZES, make_tiny_checkpoint, make_tiny_trio

torch.set_num_threads(1)

Trio = tuple[Path, Path, Path]  # (base, ft_a, ft_b): a base and two noisy fine-tunes sharing its shapes
TWO_LAYERS = {**TEST_SIZES, "num_layers": 2}


@pytest.fixture(scope="session")
def tiny_trio_factory(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Trio]:
    """`make(family="llama", **make_tiny_checkpoint_kwargs) -> Trio`, built once per distinct argument set."""
    cache: dict[str, Trio] = {}

    def make(family: str = "llama", **kwargs: Any) -> Trio:
        kwargs = {**TWO_LAYERS, **kwargs}
        key = f"{family}-{sorted(kwargs.items())}"
        if key not in cache:
            cache[key] = make_tiny_trio(tmp_path_factory.mktemp(f"{family}_trio"), family, **kwargs)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def tiny_llama_trio(tiny_trio_factory: Callable[..., Trio]) -> Trio:
    """Llama, float32, hidden 32, 4 layers; fine-tunes are base + 0.02 * N(0, 1) noise."""
    return tiny_trio_factory("llama", **TEST_SIZES)


@pytest.fixture(scope="session")
def tiny_mistral_trio(tiny_trio_factory: Callable[..., Trio]) -> Trio:
    return tiny_trio_factory("mistral")


@pytest.fixture(scope="session")
def tiny_qwen2_trio(tiny_trio_factory: Callable[..., Trio]) -> Trio:
    """Qwen2 has q/k/v biases, unlike Llama and Mistral."""
    return tiny_trio_factory("qwen2")


@pytest.fixture(scope="session")
def tiny_bf16_trio(tiny_trio_factory: Callable[..., Trio]) -> Trio:
    return tiny_trio_factory("llama", dtype=torch.bfloat16)


@pytest.fixture(scope="session")
def tiny_sharded_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same weights as `tiny_llama_trio`'s base (same seed and sizes), saved as several safetensors shards."""
    return make_tiny_checkpoint(
        tmp_path_factory.mktemp("sharded_llama") / "base", "llama", seed=0, max_shard_size="40KB", **TEST_SIZES
    )
