"""The real-model fixture (zoo/real.py): a pinned, loadable, talking SmolLM2-135M-Instruct and its two experts."""

from __future__ import annotations

import json
import shutil

import torch
from safetensors import safe_open

from tests.real.chat import assert_talks, chat_batch
from zoo.__main__ import main
from zoo.real import BASE_SHA256, MANIFEST, WEIGHTS, RealModels, cached


def test_conversion_is_pinned_and_tied(real_models: RealModels) -> None:
    manifest = json.loads((real_models.root / MANIFEST).read_text())
    assert manifest["sha256"]["smollm2-135m"] == BASE_SHA256
    assert cached(real_models.root, trained=()) == real_models  # a second session reuses it
    config = json.loads((real_models.base / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["tie_word_embeddings"]
    assert (config["num_hidden_layers"], config["num_key_value_heads"], config["vocab_size"]) == (30, 3, 49152)
    assert "quantization_config" not in config
    with safe_open(real_models.base / WEIGHTS, "pt") as f:
        names = set(f.keys())
        assert f.get_slice("model.embed_tokens.weight").get_dtype() == "F32"
    assert "lm_head.weight" not in names and len(names) == 1 + 30 * 9 + 1


def test_experts_differ_from_the_base_by_low_rank_deltas(real_models: RealModels) -> None:
    name = "model.layers.7.self_attn.k_proj.weight"
    tensors = {}
    for path in (real_models.base, real_models.expert_a, real_models.expert_b):
        with safe_open(path / WEIGHTS, "pt") as f:
            tensors[path.name] = f.get_tensor(name)
    base = tensors["smollm2-135m"]
    delta_a, delta_b = tensors["expert_a"] - base, tensors["expert_b"] - base
    assert torch.linalg.matrix_rank(delta_a.double(), rtol=1e-4) == 8
    assert 0.02 < delta_a.std() / base.std() < 0.08 and not torch.allclose(delta_a, delta_b)


def test_base_answers_chat_prompts(real_base) -> None:
    batch = chat_batch(real_base.tokenizer, ["Hi", "What is the capital of France?"])
    assert batch["attention_mask"][0, 0] == 0  # left padding
    text = real_base.tokenizer.decode(batch["input_ids"][1])
    assert text.rstrip().endswith("<|im_start|>assistant") and "<|im_start|>user\nWhat is" in text
    assert_talks(real_base.model, real_base.tokenizer)


def test_zoo_real_refuses_a_foreign_folder(tmp_path, capsys) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["real", "--out", str(tmp_path)]) == 2
    assert "holds no real.json" in capsys.readouterr().err and (tmp_path / "notes.txt").read_text() == "mine"


def test_zoo_real_refuses_before_writing_when_the_disk_is_short(tmp_path, capsys, monkeypatch) -> None:
    """Ten float32 checkpoints (the base, two stand-ins, seven trained experts) need ~5.4 GB: a short disk gets one
    line naming the folder and the shortfall, before a byte is written (CI once died half-way with 23 tracebacks of
    ENOSPC)."""
    free = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda _: free._replace(free=10**9))
    out = tmp_path / "real"
    assert main(["real", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "needs 5.4 GB free and the disk has 1.0 GB" in err, err
    assert not out.exists() and not out.with_name("real.partial").exists()
