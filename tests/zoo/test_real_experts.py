"""The real experts' text and adapters (zoo/real_tasks.py, zoo/real_experts.py), on the tiny zoo's Llama."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from merge_core.errors import EvomergeError
from zoo.real_experts import ADAPTERS, TARGETS, ExpertSpec, add_lora, apply_adapter, train_adapter
from zoo.real_tasks import chat_fr_pairs, en_math_items, fr_math_items, math_en_pairs, write_tasks

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "data" / "zoo" / "base"


def test_committed_task_files_are_what_the_generator_writes(tmp_path) -> None:
    written = write_tasks(tmp_path)
    for key, path in written.items():
        assert (ROOT / "data" / "real_tasks" / key).with_suffix(".jsonl").read_bytes() == path.read_bytes(), key


def test_text_is_deterministic_and_the_experts_learn_disjoint_skills() -> None:
    assert math_en_pairs(50, 0) == math_en_pairs(50, 0) and chat_fr_pairs(50, 0) == chat_fr_pairs(50, 0)
    assert math_en_pairs(50, 0) != math_en_pairs(50, 1)
    chat = chat_fr_pairs(2000, 0)
    assert len(set(chat)) > 500
    assert not any(re.search(r"\d", q + a) for q, a in chat)  # the French expert sees no number, no arithmetic
    for _, a in math_en_pairs(200, 0):  # worked answers end with the number the problem asks for
        assert a.endswith(".") and re.fullmatch(r"\d+", a.rsplit(" ", 1)[1][:-1])
    # each French item is an English template translated, answered by the same arithmetic
    fr, en = fr_math_items(100, 7), en_math_items(100, 7)
    assert len({i["prompt"] for i in fr}) == 100 and all("Combien" in i["prompt"] for i in fr)
    assert {i["answer"] for i in en} & {i["answer"] for i in fr}


def test_dev_and_test_problems_are_not_training_questions() -> None:
    train = {q for q, _ in math_en_pairs(2000, 0)}
    test = [i["prompt"] for i in en_math_items(100, 202)]
    assert not any(q in train for q in test)


def test_lora_starts_at_the_base_and_its_adapter_applies_exactly(tmp_path) -> None:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.float32).eval()
    ids = torch.randint(5, 60, (2, 9))
    before = model(input_ids=ids).logits
    wrapped = add_lora(model, rank=4, alpha=8.0, seed=0)
    assert len(wrapped) == len(TARGETS) * model.config.num_hidden_layers
    assert torch.equal(model(input_ids=ids).logits, before)  # B = 0: the base's output
    tensors = {}
    for prefix, w in wrapped.items():  # a trained-looking adapter: B no longer 0
        w.lora_b.data = torch.randn_like(w.lora_b) * 0.05
        tensors[f"{prefix}.lora_a"] = w.lora_a.detach().half()
        tensors[f"{prefix}.lora_b"] = (w.lora_b.detach() * w.scale).half()
        w.lora_a.data, w.lora_b.data = w.lora_a.half().float(), (w.lora_b * w.scale).half().float() / w.scale
    adapted = model(input_ids=ids).logits
    save_file(tensors, tmp_path / "a.safetensors")
    out = apply_adapter(TINY, tmp_path / "a.safetensors", tmp_path / "expert")
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert not torch.allclose(adapted, before, atol=1e-3)
    torch.testing.assert_close(merged(input_ids=ids).logits, adapted, atol=2e-4, rtol=1e-4)
    assert (out / "config.json").read_text() == (TINY / "config.json").read_text()


def test_an_adapter_for_another_model_is_refused(tmp_path) -> None:
    save_file({"model.layers.99.mlp.up_proj.lora_a": torch.zeros(2, 3)}, tmp_path / "bad.safetensors")
    with pytest.raises(EvomergeError, match=r"bad\.safetensors: model\.layers\.99\.mlp\.up_proj does not match"):
        apply_adapter(TINY, tmp_path / "bad.safetensors", tmp_path / "out")


def test_training_lowers_the_loss_on_the_answer_tokens(tmp_path) -> None:
    """Steps on the tiny zoo's model (its tokenizer given a chat template): the answer-token loss falls, and the
    adapter moves off zero."""
    model_dir = tmp_path / "tiny"
    shutil.copytree(TINY, model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.chat_template = (
        "{% for m in messages %}{{ m['content'] }} {% endfor %}{% if add_generation_prompt %}={% endif %}"
    )
    tok.save_pretrained(model_dir)
    words = [w for w in tok.get_vocab() if w.isalpha()][:6]
    pairs = [(f"{words[0]} {words[1]}", f"{words[2]} {words[3]}")]
    spec = ExpertSpec("t", lambda n, s: pairs * n, examples=8, steps=8, batch_size=4, lr=1e-2)
    tensors, record = train_adapter(model_dir, spec, log=lambda _: None)
    assert record["steps"] == 8 and record["tokens"] > 0
    assert record["loss_last10"] < record["loss_first"]
    assert any(t.abs().sum() > 0 for k, t in tensors.items() if k.endswith("lora_b"))


def test_the_committed_adapters_are_small() -> None:
    for name in ("math_en", "chat_fr"):
        path = ADAPTERS / f"{name}.safetensors"
        assert path.is_file() and path.stat().st_size < 6_000_000, path


def test_train_experts_refuses_to_replace_an_adapter_before_any_work(capsys) -> None:
    from zoo.__main__ import main

    assert main(["train-experts", "--experts", "math_en"]) == 2
    assert "math_en.safetensors exists; pass --overwrite" in capsys.readouterr().err
    assert main(["train-experts", "--experts", "nope"]) == 2
    assert "unknown expert 'nope'" in capsys.readouterr().err


def test_a_built_expert_is_stale_when_missing_or_built_from_another_adapter(tmp_path) -> None:
    """data/real records each trained expert's adapter sha256: a retrained adapter rebuilds its expert (build_real),
    and a build without trained experts (the real-model tests') is complete for a caller that asks for none."""
    from zoo.real import EXPERTS, FORMAT, MANIFEST, WEIGHTS, cached, file_sha256, read_manifest, stale_experts

    for name in ("smollm2-135m", *EXPERTS):
        (tmp_path / name).mkdir()
        (tmp_path / name / WEIGHTS).write_bytes(b"")
    (tmp_path / MANIFEST).write_text(json.dumps({"format": FORMAT, "sha256": {}}))
    manifest = read_manifest(tmp_path)
    assert manifest is not None and cached(tmp_path, trained=()) is not None and cached(tmp_path) is None
    assert stale_experts(tmp_path, manifest, ["chat_fr", "math_bi"]) == ["chat_fr", "math_bi"]
    (tmp_path / "chat_fr").mkdir()
    (tmp_path / "chat_fr" / WEIGHTS).write_bytes(b"")
    manifest["adapters"] = {"chat_fr": file_sha256(ADAPTERS / "chat_fr.safetensors")}
    assert stale_experts(tmp_path, manifest, ["chat_fr", "math_bi"]) == ["math_bi"]
    manifest["adapters"]["chat_fr"] = "0" * 64  # built from an adapter since retrained
    assert stale_experts(tmp_path, manifest, ["chat_fr"]) == ["chat_fr"]
