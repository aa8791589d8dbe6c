"""The real experts (zoo/real_experts.py): base + their committed LoRA adapters, each with its own skill.

`math_en` (design 1) solves English arithmetic problems; `math_bi` (design 2) solves them asked in French too, but
answers in English; `chat_fr` answers French questions in French and gets the arithmetic wrong: the target (French
problems, French answers) needs a math expert and `chat_fr`. Scored with the search's own
evaluator (configs/smollm2_fr_math.yaml) on the first 12 problems of the dev splits. Each expert is built from its
adapter into a temporary folder and removed after use: one 0.5 GB checkpoint on disk at a time."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open

from evolve.baselines import score_checkpoint
from evolve.config import load_config
from zoo.real import WEIGHTS, RealModels
from zoo.real_experts import ADAPTERS, RECORD, apply_adapter

ROOT = Path(__file__).resolve().parents[2]
ITEMS = 12
MATH_EN_MIN = 0.5  # measured on these 12 items: base 0.17, math_en 0.75
FR_LANG_MIN = 0.9  # measured: chat_fr 1.0, math_bi 0.0 (it answers in English)
MATH_BI_MIN = 0.5  # measured: math_bi 0.67, chat_fr 0.08


def config(real_models: RealModels, task: str):
    """configs/smollm2_fr_math.yaml over the built experts, scoring `task`: fr_math (the target) or en_math (the
    same problems in English, no language check: the math skill alone)."""
    cfg = load_config(ROOT / "configs" / "smollm2_fr_math.yaml")
    math, fr = cfg.models.sources
    models = cfg.models.model_copy(
        update={
            "base": str(real_models.base),
            "sources": [
                math.model_copy(update={"path": str(real_models.math_bi)}),
                fr.model_copy(update={"path": str(real_models.chat_fr)}),
            ],
        }
    )
    fr_math = cfg.evaluation.tasks[0]
    update = {"task_dir": str(ROOT / "data" / "real_tasks" / task)}
    if task == "en_math":
        update |= {"name": "en_math", "language_check": None}
    evaluation = cfg.evaluation.model_copy(update={"tasks": [fr_math.model_copy(update=update)]})
    return cfg.model_copy(update={"models": models, "evaluation": evaluation})


@contextmanager
def expert(real_models: RealModels, name: str, tmp: Path) -> Iterator[Path]:
    """The expert `name` (base + its committed adapter) as a checkpoint folder under `tmp`, removed afterwards."""
    path = apply_adapter(real_models.base, ADAPTERS / f"{name}.safetensors", tmp / name)
    try:
        yield path
    finally:
        shutil.rmtree(path)


def test_experts_are_the_base_plus_their_adapters(real_models: RealModels, tmp_path: Path) -> None:
    record = json.loads((ADAPTERS / RECORD).read_text())
    for name in ("math_en", "chat_fr", "math_bi"):
        assert record[name]["loss_last10"] < record[name]["loss_first"]
        with (
            expert(real_models, name, tmp_path) as path,
            safe_open(real_models.base / WEIGHTS, "pt") as base,
            safe_open(path / WEIGHTS, "pt") as expert_file,
            safe_open(ADAPTERS / f"{name}.safetensors", "pt") as adapter,
        ):
            assert torch.equal(
                base.get_tensor("model.embed_tokens.weight"), expert_file.get_tensor("model.embed_tokens.weight")
            )
            prefix = "model.layers.12.mlp.down_proj"
            delta = expert_file.get_tensor(f"{prefix}.weight") - base.get_tensor(f"{prefix}.weight")
            lora = adapter.get_tensor(f"{prefix}.lora_b").float() @ adapter.get_tensor(f"{prefix}.lora_a").float()
            torch.testing.assert_close(delta, lora, atol=1e-6, rtol=0)
            assert delta.abs().max() > 1e-4  # training moved it


def test_each_expert_has_its_skill_and_lacks_the_other(real_models: RealModels, tmp_path: Path) -> None:
    en, fr = config(real_models, "en_math"), config(real_models, "fr_math")

    def score(cfg, name: str) -> dict[str, float]:
        if name == "base":
            return score_checkpoint(cfg, str(real_models.base), split="dev", limit=ITEMS, device="cpu")[0]
        with expert(real_models, name, tmp_path) as path:
            return score_checkpoint(cfg, str(path), split="dev", limit=ITEMS, device="cpu")[0]

    base_en, math_en = score(en, "base"), score(en, "math_en")
    bi_fr, fr_fr = score(fr, "math_bi"), score(fr, "chat_fr")
    print(json.dumps({"base en": base_en, "math_en en": math_en, "math_bi fr": bi_fr, "chat_fr fr": fr_fr}, indent=1))
    assert math_en["en_math/acc"] >= MATH_EN_MIN > base_en["en_math/acc"]  # math_en learned arithmetic
    assert bi_fr["fr_math/acc_value"] >= MATH_BI_MIN > fr_fr["fr_math/acc_value"]  # math_bi reads French problems
    assert fr_fr["fr_math/lang_ok"] >= FR_LANG_MIN > bi_fr["fr_math/lang_ok"]  # ... but only chat_fr answers in French
