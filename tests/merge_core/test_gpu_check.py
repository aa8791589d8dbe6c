"""bench/gpu_check.py in its reduced mode (tiny Mistral shapes, CPU), so the GPU check cannot rot between GPU runs."""

import importlib.util
from pathlib import Path

import pytest

from merge_core.checkpoint import Checkpoint

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_reduced_gpu_check_builds_mistrals_plans_merges_and_generates(gpu_check, tmp_path):
    argv = ["--reduced", "--device", "cpu", "--work", str(tmp_path), "--batch", "2", "--prompt-tokens", "12"]
    text = gpu_check.main([*argv, "--new-tokens", "4", "--eval-batches", "1", "--candidates", "1"])
    base = Checkpoint.open(str(tmp_path / "reduced" / "base"))
    assert base.model_type == "mistral" and base.num_layers == 2
    rows = [line for line in text.splitlines() if line.startswith("| ties") or line.startswith("| dare_ties")]
    assert len(rows) == 2 and "task vectors + cache" in rows[0]
    assert all("| compiled (" in row for row in rows), rows  # merge_core.fused wrote the candidates
    assert "ties: `memory plan on cpu:" in text and "evaluator reserve" in text
    assert " generated tokens/s " in text


def test_full_check_refuses_without_a_gpu(gpu_check, tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        gpu_check.main(["--work", str(tmp_path)])
    assert not (tmp_path / "7b").exists()  # refused before building 43 GB of checkpoints
