"""The export as the Hugging Face Hub reads it: a model card `huggingface_hub.ModelCard` parses, naming the merged
models (never by a local path), one evomerge recipe beside mergekit.yaml, and the base's generation config."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import optuna
import pytest
import yaml
from huggingface_hub import ModelCard

from evolve.config import load_config
from evolve.export import MERGEKIT_FILE, card_name, export_trial
from evolve.loop import run_search
from evolve.worker import Outcome
from merge_core.merge import RECIPE_FILE, run_merge
from merge_core.recipe import MergeRecipe
from tests.evolve.fake_run import HashScoreExecutor, config_dict, write_config

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def exported(tmp_path_factory, world):
    """A finished run over copies of the world's models (source `ja` records a hub id in its config.json),
    exported with held-out scores on 8 test items."""
    tmp_path = tmp_path_factory.mktemp("export")
    models = {}
    for key in ("base", "a", "b"):
        models[key] = tmp_path / "models" / Path(world[key]).name
        shutil.copytree(world[key], models[key])
    config = json.loads((models["a"] / "config.json").read_text())
    (models["a"] / "config.json").write_text(json.dumps({**config, "_name_or_path": "someorg/ja-expert-7b"}))
    data = config_dict((models["base"], models["a"], models["b"]), tmp_path / "run")
    data["evaluation"]["tasks"][0] |= {"task_dir": world["task"], "max_new_tokens": 2, "extract": "first_word"}
    data["evaluation"] |= {"heldout_split": "test", "heldout_limit": 8}
    cfg = load_config(write_config(tmp_path / "config.yaml", data))
    run_search(cfg, progress=False, executor_factory=HashScoreExecutor)
    study = optuna.load_study(study_name="t", storage=cfg.storage_url)
    out = tmp_path / "export"
    export_trial(cfg, study, out, device="cpu")
    return out, models


def test_card_parses_and_names_the_merged_models(exported):
    out, models = exported
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "transformers"
    assert card.data.base_model_relation == "merge"
    assert card.data.base_model == [models["base"].name, "someorg/ja-expert-7b", models["b"].name]
    assert set(card.data.tags) == {"merge", "evomerge", "mergekit"}  # mergekit.yaml is written: the tag says so
    assert str(out.parent) not in card.content  # no local path anywhere in the card
    text = card.text
    for section in ("## Recipe", "## How it was found", "## Held-out results"):
        assert section in text
    assert "sampler `random`, seed 1, 4 trials" in text and "fitness = 1 * words/acc" in text
    held = text.split("## Held-out results")[1]
    assert "| words/acc | " in held and "source ja" in held and "source math" in held and "base" in held
    assert "`test` split (words 8 items)" in held and "McNemar exact p=" in held
    scores = json.loads((out / "evomerge_scores.json").read_text())
    lo, hi = scores["heldout_intervals"]["words/acc"]
    assert lo <= scores["heldout_metrics"]["words/acc"] <= hi
    assert {c["other"] for c in scores["heldout_comparisons"]} == {"source ja", "source math"}


def test_one_evomerge_recipe_beside_mergekit_yaml(exported):
    out, models = exported
    recipes = sorted(p.name for p in out.iterdir() if p.suffix in (".yaml", ".yml"))
    assert recipes == sorted([MERGEKIT_FILE, RECIPE_FILE])
    mergekit = yaml.safe_load((out / MERGEKIT_FILE).read_text())
    assert "seed" not in mergekit and mergekit["base_model"] == str(models["base"].resolve())


def test_generation_config_is_the_bases_not_evaluation_settings(exported):
    out, models = exported
    exported_config = json.loads((out / "generation_config.json").read_text())
    assert exported_config == json.loads((models["base"] / "generation_config.json").read_text())
    for model in ("base", "expert_ja", "expert_math"):  # the zoo ships no generation length: it is the run config's
        assert "max_new_tokens" not in json.loads((ROOT / "data/zoo" / model / "generation_config.json").read_text())


def test_generation_config_follows_the_tokenizer_source(tmp_path, world):
    a = tmp_path / "a"
    shutil.copytree(world["a"], a)
    config = json.loads((a / "generation_config.json").read_text())
    (a / "generation_config.json").write_text(json.dumps({**config, "eos_token_id": 1, "temperature": 0.3}))
    recipe = MergeRecipe.from_dict(
        {
            "merge_method": "linear",
            "models": [{"model": world["base"], "parameters": {"weight": 1.0}}, {"model": str(a), "parameters": {}}],
            "parameters": {"weight": 0.5},
            "tokenizer_source": str(a),
        }
    )
    run_merge(recipe, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "generation_config.json").read_text())["eos_token_id"] == 1


def test_card_names(tmp_path):
    assert card_name("mistralai/Mistral-7B-v0.1") == "mistralai/Mistral-7B-v0.1"  # a hub id as it is
    local = tmp_path / "My-Merge"
    local.mkdir()
    (local / "config.json").write_text(json.dumps({"_name_or_path": "/home/me/checkpoints/step-100"}))
    assert card_name(str(local)) == "My-Merge"  # a local path recorded in the config is not a name


class TwoObjectiveExecutor(HashScoreExecutor):
    """Two objectives from the stand-in score: words/acc up, words/gold_prob its complement."""

    def wait(self):
        key, out = super().wait()
        acc = out.metrics["words/acc"]
        metrics = {"words/acc": acc, "words/gold_prob": 1 - acc}
        return key, Outcome(worker="fake", metrics=metrics, values=[acc, 1 - acc])


def test_a_front_member_exports_with_its_objectives_on_the_card(tmp_path, tiny_llama_trio):
    data = config_dict(tiny_llama_trio, tmp_path / "run")
    data["evaluation"] |= {"fitness": None, "objectives": [{"metric": "words/acc"}, {"metric": "words/gold_prob"}]}
    cfg = load_config(write_config(tmp_path / "config.yaml", data))
    study = run_search(cfg, progress=False, executor_factory=TwoObjectiveExecutor).study
    member = study.best_trials[-1]
    export_trial(cfg, study, tmp_path / "export", trial_number=member.number, device="cpu", heldout=False)
    card = ModelCard.load(tmp_path / "export" / "README.md")
    assert card.data.base_model == ["base", "ft_a", "ft_b"]  # local directories without a recorded hub id
    assert "objectives words/acc (max), words/gold_prob (max)" in card.text
    assert f"this trial ({member.number}): words/acc {member.values[0]:.4f}" in card.text
    assert json.loads((tmp_path / "export" / "evomerge_scores.json").read_text())["values"] == member.values


@pytest.mark.parametrize("method", ["ties", "dare_ties"])
def test_hub_ids_name_the_models_in_the_card_both_recipes_and_mergekit_yaml(tmp_path, world, method):
    """`models.base_hub_id` and a source's `hub_id`: the export names those models by them (card, recipe.evomerge.yaml,
    mergekit.yaml), so it reproduces on another machine; a source without one keeps its path."""
    data = config_dict((Path(world["base"]), Path(world["a"]), Path(world["b"])), tmp_path / "run")
    data["models"]["base_hub_id"] = "someorg/base-1b"
    data["models"]["sources"][0]["hub_id"] = "someorg/ja-expert-1b"
    data["search"]["space"]["method"] = method
    data["evaluation"]["tasks"][0]["task_dir"] = world["task"]
    cfg = load_config(write_config(tmp_path / "config.yaml", data))
    study = run_search(cfg, progress=False, executor_factory=HashScoreExecutor).study
    out = export_trial(cfg, study, tmp_path / "export", device="cpu", heldout=False)

    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == ["someorg/base-1b", "someorg/ja-expert-1b", Path(world["b"]).name]
    recipe = MergeRecipe.load(out / RECIPE_FILE)
    assert recipe.base_model == "someorg/base-1b"
    assert set(recipe.models) == {"someorg/base-1b", "someorg/ja-expert-1b", world["b"]}
    mergekit = yaml.safe_load((out / MERGEKIT_FILE).read_text())
    assert mergekit["base_model"] == "someorg/base-1b"
    named = [m["model"] for s in mergekit.get("slices", []) for m in s["sources"]] or [
        m["model"] for m in mergekit["models"]
    ]
    assert set(named) <= {"someorg/base-1b", "someorg/ja-expert-1b", str(Path(world["b"]).resolve())}
    assert "someorg/ja-expert-1b" in named
    for f in (RECIPE_FILE, MERGEKIT_FILE, "README.md"):
        text = (out / f).read_text()
        assert world["a"] not in text and str(Path(world["base"]).resolve()) not in text, f
    assert ("not these exact weights" in card.text) == (method == "dare_ties")  # masks follow the model names


def test_a_hub_id_must_be_owner_slash_name(tmp_path):
    from evolve.config import parse_config
    from merge_core.errors import EvomergeError

    for bad in ("base", "a/b/c", "/abs/path", "org/" + "n" * 100):
        data = config_dict((Path("b"), Path("a"), Path("m")), tmp_path / "run")
        data["models"]["sources"][1]["hub_id"] = bad
        with pytest.raises(EvomergeError, match="models.sources.1.hub_id: .* is not a Hugging Face Hub id"):
            parse_config(data)
    data = config_dict((Path("b"), Path("a"), Path("m")), tmp_path / "run")
    data["models"] |= {"base": None, "base_hub_id": "org/base"}
    with pytest.raises(EvomergeError, match="models.base_hub_id: names the base, and there is no `base`"):
        parse_config(data)
