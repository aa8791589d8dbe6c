"""Nothing a user owns is destroyed: merge/export output directories, the run lock, run names, where the study is."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import optuna
import pytest
import yaml

import merge_core.merge as merge_module
from evolve.cli import main
from evolve.config import load_config, parse_config
from evolve.export import export_trial
from evolve.loop import export_ps_best, run_search
from evolve.study import RunLock, best_trial
from merge_core.errors import EvomergeError
from merge_core.merge import RECIPE_FILE, run_merge
from merge_core.recipe import MergeRecipe
from tests.evolve.fake_run import HashScoreExecutor, config_dict, write_config


def digest(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def recipe_file(tmp_path: Path, trio, **extra) -> Path:
    base, a, b = trio
    recipe = {
        "merge_method": "ties",
        "base_model": str(base),
        "models": [
            {"model": str(a), "parameters": {"weight": 0.5, "density": 0.5}},
            {"model": str(b), "parameters": {"weight": 0.5, "density": 0.5}},
        ],
        **extra,
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def merge_cli(*args: str) -> int:
    return main(["merge", *map(str, args), "--device", "cpu"])


# ---- evolve merge --out -------------------------------------------------------------------------


def test_merge_refuses_a_non_empty_out_unless_overwrite(tmp_path, tiny_llama_trio, capsys):
    recipe = recipe_file(tmp_path, tiny_llama_trio)
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_text("mine")
    (out / "notes.txt").write_text("mine too")
    assert merge_cli(recipe, "--out", out) == 2
    err = capsys.readouterr().err
    assert "is not empty; pass --overwrite" in err and err.count("\n") == 1
    assert (out / "model.safetensors").read_text() == "mine"
    assert merge_cli(recipe, "--out", out, "--overwrite") == 0
    assert {"config.json", "model.safetensors", RECIPE_FILE, "tokenizer.json"} <= set(os.listdir(out))
    assert not (out / "notes.txt").exists() and (out / "model.safetensors").stat().st_size > 1000
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left
    (tmp_path / "empty").mkdir()
    assert merge_cli(recipe, "--out", tmp_path / "empty") == 0  # an empty directory is fine


@pytest.mark.parametrize("where", ["is", "inside", "holds"])
def test_merge_never_writes_over_or_into_an_input_model(tmp_path, tiny_trio_factory, capsys, where):
    trio = tiny_trio_factory("llama", seed=5)
    source = trio[1]
    before = digest(source.parent)
    out = {"is": source, "inside": source / "merged", "holds": source.parent}[where]
    assert merge_cli(recipe_file(tmp_path, trio), "--out", out, "--overwrite") == 2
    err = capsys.readouterr().err
    assert f"the input model {source}" in err or "holds the input model" in err, err
    assert digest(source.parent) == before


def test_a_failed_merge_leaves_the_old_output_and_nothing_else(tmp_path, tiny_llama_trio, monkeypatch):
    recipe = MergeRecipe.load(recipe_file(tmp_path, tiny_llama_trio))
    out = tmp_path / "out"
    run_merge(recipe, out)
    before = digest(out)

    def broken(*args, **kwargs):
        raise OSError("disk full (simulated) after the weights were written")

    monkeypatch.setattr(merge_module, "copy_model_files", broken)
    with pytest.raises(OSError, match="simulated"):
        run_merge(recipe.replace(seed=7), out, overwrite=True)
    with pytest.raises(OSError, match="simulated"):
        run_merge(recipe, tmp_path / "new")
    assert digest(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "recipe.yaml"]


def test_a_missing_tokenizer_source_fails_before_anything_is_written(tmp_path, tiny_llama_trio):
    recipe = MergeRecipe.load(recipe_file(tmp_path, tiny_llama_trio, tokenizer_source=str(tmp_path / "nowhere")))
    with pytest.raises(EvomergeError):
        run_merge(recipe, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml"]


# ---- a finished run (real study, stand-in scores) -------------------------------------------------


@pytest.fixture()
def finished(tmp_path, tiny_llama_trio):
    cfg_path = write_config(tmp_path / "config.yaml", config_dict(tiny_llama_trio, tmp_path / "run"))
    cfg = load_config(cfg_path)
    run_search(cfg, progress=False, executor_factory=HashScoreExecutor)
    return cfg_path, cfg


def test_export_is_all_or_nothing_and_mergekit_paths_are_absolute(finished, tmp_path, monkeypatch, capsys):
    cfg_path, cfg = finished
    study = optuna.load_study(study_name="t", storage=cfg.storage_url)
    out = tmp_path / "export"
    export_trial(cfg, study, out, device="cpu", heldout=False)
    mk = yaml.safe_load((out / "mergekit.yaml").read_text())
    models = [mk["base_model"], *(m["model"] for m in mk["models"])]
    assert all(Path(m).is_absolute() and Path(m).is_dir() for m in models), models
    assert RECIPE_FILE in os.listdir(out) and "evomerge_recipe.yaml" not in os.listdir(out)  # one evomerge recipe
    assert MergeRecipe.load(out / RECIPE_FILE) == MergeRecipe.from_yaml(best_trial(study).user_attrs["recipe"])

    before = digest(out)
    assert main(["export", str(cfg.run_dir), "--out", str(out), "--no-heldout", "--device", "cpu"]) == 2
    assert "is not empty; pass --overwrite" in capsys.readouterr().err
    for target in (cfg.run_dir, cfg.run_dir.parent, cfg.models.sources[0].path):
        assert main(["export", str(cfg.run_dir), "--out", str(target), "--overwrite", "--no-heldout"]) == 2
        assert "another directory" in capsys.readouterr().err
    monkeypatch.setattr("evolve.export.model_card", lambda *a: 1 / 0)  # fails after weights and recipes
    with pytest.raises(ZeroDivisionError):
        export_trial(cfg, study, out, device="cpu", heldout=False, overwrite=True)
    assert digest(out) == before and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_ps_best_is_re_merged_over_itself(finished):
    _, cfg = finished
    out = export_ps_best(cfg)
    marker = out / RECIPE_FILE
    marker.write_text(marker.read_text().replace("seed: 1", "seed: 99"))  # as if the best trial had changed
    assert export_ps_best(cfg) == out and "seed: 1" in marker.read_text()


def test_a_copied_run_dir_reads_its_own_study_from_any_cwd(finished, tmp_path, monkeypatch, capsys):
    _, cfg = finished
    copy = tmp_path / "elsewhere" / "copied"
    shutil.copytree(cfg.run_dir, copy)
    optuna.load_study(study_name="t", storage=cfg.storage_url).enqueue_trial({})  # the original moves on
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert main(["status", "copied"]) == 0
    out = capsys.readouterr().out
    assert f"sqlite:///{copy / 'study.db'}" in out and "4/4 trials; complete 4" in out, out
    moved = load_config(copy / "config.yaml")
    assert moved.run_dir == Path(str(cfg.run_dir))  # a config *file* keeps its output_dir semantics


def test_default_storage_is_absolute_and_inside_the_run_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = parse_config(config_dict(("b", "x", "y"), Path("rel/run")))
    assert cfg.run_dir == Path("rel/run") and cfg.storage_url == f"sqlite:///{tmp_path / 'rel/run/study.db'}"
    from evolve.cli import with_overrides

    seeded = with_overrides(cfg, seed=5)
    assert seeded.run_dir == Path("rel/t-seed5") and seeded.storage_url.endswith("/rel/t-seed5/study.db")
    plain = parse_config({**config_dict(("b", "x", "y"), Path("unused")), "output_dir": None})
    assert with_overrides(plain, name="other").run_dir == Path("runs/other")


# ---- resume, the lock, names ---------------------------------------------------------------------


def test_resume_refuses_when_the_study_is_gone_unless_restart(finished, monkeypatch, capsys):
    _, cfg = finished
    (cfg.run_dir / "study.db").unlink()
    assert main(["resume", str(cfg.run_dir)]) == 2
    err = capsys.readouterr().err
    assert "study.db does not exist; pass --restart" in err and err.count("\n") == 1
    assert not (cfg.run_dir / "study.db").exists()
    optuna.create_study(study_name="another", storage=cfg.storage_url)  # a database without this run's study
    assert main(["resume", str(cfg.run_dir)]) == 2
    assert "study 't' is not in sqlite:///" in capsys.readouterr().err
    started = []
    monkeypatch.setattr("evolve.cli._search", lambda c, args: started.append(c.storage_url) or 0)
    assert main(["resume", str(cfg.run_dir), "--restart"]) == 0 and started == [cfg.storage_url]


def test_a_busy_run_dir_is_refused_before_its_config_is_touched(finished, tiny_llama_trio, tmp_path):
    _, cfg = finished
    saved = (cfg.run_dir / "config.yaml").read_text()
    other = parse_config({**config_dict(tiny_llama_trio, cfg.run_dir), "seed": 2})
    lock = RunLock(cfg.run_dir)
    try:
        with pytest.raises(EvomergeError, match="already running"):
            run_search(other, progress=False, executor_factory=HashScoreExecutor)
    finally:
        lock.release()
    assert (cfg.run_dir / "config.yaml").read_text() == saved


@pytest.mark.parametrize("name", [".", "..", "a/b", "../x"])
def test_a_run_name_is_one_path_component(name, tmp_path):
    with pytest.raises(EvomergeError, match="^config: name: "):
        parse_config({**config_dict(("b", "x", "y"), tmp_path), "name": name})
