"""Short real-model end-to-ends in CI: `evolve run` of configs/smollm2_ps.yaml (2 candidates, 2 items, 32 tokens),
`evolve export` of its best, which loads with plain transformers, keeps the tie and scores what the study
recorded (`evolve eval` on the same items); and configs/smollm2_hybrid.yaml (PS then DFS) run and exported."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from evolve.cli import main
from zoo.real import RealModels

ROOT = Path(__file__).resolve().parents[2]


def short_config(name: str, real_models: RealModels, tmp_path: Path) -> Path:
    """configs/NAME.yaml cut down: 2 candidates per stage, 2 items, 32 new tokens, absolute paths, run in tmp_path."""
    config = yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text())
    config["name"], config["output_dir"] = f"{name}_e2e", str(tmp_path / "run")
    sources = [{"path": str(real_models.expert_a), "alias": "a"}, {"path": str(real_models.expert_b), "alias": "b"}]
    config["models"] = {"base": str(real_models.base), "sources": sources}
    config["search"]["budget"]["max_trials"] = 2
    if "dfs" in config["search"]:
        config["search"]["dfs"]["budget"]["max_trials"] = 2
    task = config["evaluation"]["tasks"][0]
    task |= {"task_dir": str(ROOT / task["task_dir"]), "limit": 2, "max_new_tokens": 32}
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump(config, sort_keys=False))
    return cfg


def test_run_export_eval_on_smollm2(real_models: RealModels, tmp_path, capsys) -> None:
    cfg = short_config("smollm2_ps", real_models, tmp_path)
    assert main(["run", str(cfg), "--no-progress", "--no-final-table"]) == 0
    storage = f"sqlite:///{tmp_path / 'run' / 'study.db'}"
    study = optuna.load_study(study_name=optuna.get_all_study_names(storage)[0], storage=storage)
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == 2 and done[0].params["L00-09.a.weight"] == 0.5  # x0 first
    best = max(done, key=lambda t: t.value)

    out = tmp_path / "export"
    assert main(["export", str(tmp_path / "run"), "--out", str(out), "--device", "cpu", "--no-heldout"]) == 0
    exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert exported.config.tie_word_embeddings and exported.lm_head.weight is exported.model.embed_tokens.weight
    del exported
    capsys.readouterr()
    args = ["eval", str(out), "--config", str(cfg), "--split", "dev", "--limit", "2", "--device", "cpu", "--json"]
    assert main(args) == 0
    scored = json.loads(capsys.readouterr().out)
    recorded = best.user_attrs["metrics"]
    assert scored["gsm/acc"] == recorded["gsm/acc"]
    assert scored["gsm/gold_prob"] == pytest.approx(recorded["gsm/gold_prob"], rel=2e-3)  # float16 in the study


def test_hybrid_ps_then_dfs_runs_and_exports_on_smollm2(real_models: RealModels, tmp_path) -> None:
    """configs/smollm2_hybrid.yaml cut down: PS, then DFS over (the PS best, expert_b); its best exports as a plain
    Llama with one layer per hop (x0, evaluated first, is A's own 30 layers)."""
    cfg = short_config("smollm2_hybrid", real_models, tmp_path)
    assert main(["run", str(cfg), "--no-progress", "--no-final-table"]) == 0
    storage = f"sqlite:///{tmp_path / 'run' / 'study.db'}"
    for name in optuna.get_all_study_names(storage):
        trials = optuna.load_study(study_name=name, storage=storage).trials
        assert sum(t.state == optuna.trial.TrialState.COMPLETE for t in trials) == 2, name
    assert len(optuna.get_all_study_names(storage)) == 2  # the PS stage's study and the DFS stage's
    out = tmp_path / "export"
    assert main(["export", str(tmp_path / "run"), "--out", str(out), "--device", "cpu", "--no-heldout"]) == 0
    exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert type(exported).__name__ == "LlamaForCausalLM" and 2 <= exported.config.num_hidden_layers <= 40


@pytest.mark.slow  # two processes each loading SmolLM2: 424 s with the 2-core CPU shared by four jobs
def test_a_killed_real_model_search_resumes_with_nothing_lost(real_models: RealModels, tmp_path) -> None:
    """configs/smollm2_ps.yaml cut down to 4 candidates, SIGKILLed right after trial 2 went to the worker: the resumed
    run keeps trials 0-1 as they were, completes trial 2 in place with the parameters it was asked with, and ends
    with the budget's 4 complete trials."""
    from tests.evolve.harness import resume, run_killed

    cfg = short_config("smollm2_ps", real_models, tmp_path)
    config = yaml.safe_load(cfg.read_text())
    config["search"]["budget"]["max_trials"] = 4
    cfg.write_text(yaml.safe_dump(config, sort_keys=False))
    killed = run_killed(cfg, "smollm2_ps_e2e", 2)
    assert killed.returncode == -9, killed.stderr[-2000:]
    storage = f"sqlite:///{tmp_path / 'run' / 'study.db'}"
    before = optuna.load_study(study_name="smollm2_ps_e2e", storage=storage).trials
    assert [t.state for t in before] == [optuna.trial.TrialState.COMPLETE] * 2 + [optuna.trial.TrialState.RUNNING]
    resumed = resume(tmp_path / "run")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    after = optuna.load_study(study_name="smollm2_ps_e2e", storage=storage).trials
    assert [t.state for t in after] == [optuna.trial.TrialState.COMPLETE] * 4
    assert [(t.params, t.value, t.user_attrs["items"]) for t in after[:2]] == [
        (t.params, t.value, t.user_attrs["items"]) for t in before[:2]
    ]
    assert after[2].params == before[2].params and after[2].number == 2
