"""Hostile and careless inputs: each gets exactly one `error: ...` line on stderr and exit code 2, from
`evolve check` and before `evolve run` starts any work (nothing written, no study opened).

Every case goes through the real CLI entry point (`evolve.cli.main`) in-process. The table is the record of what
was tried: `test_the_table_is_big_enough` asserts its size, and each case asserts a fragment of its message.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

import evolve.loop  # noqa: F401  (imported up front, so the timed commands measure their own work)
from evolve.cli import main

ROOT = Path(__file__).resolve().parents[2]
ZOO = ROOT / "data" / "zoo"
PASSWORD = "hunter2-secret"

BASE_CONFIG: dict[str, Any] = {
    "name": "hostile",
    "seed": 0,
    "models": {
        "base": str(ZOO / "base"),
        "sources": [
            {"path": str(ZOO / "expert_ja"), "alias": "ja"},
            {"path": str(ZOO / "expert_math"), "alias": "math"},
        ],
    },
    "search": {
        "space": {
            "method": "task_arithmetic",
            "layers_per_group": 2,
            "weight_bounds": [0.0, 2.0],
            "x0": {"weight": 1.0},
        },
        "optimizer": {"sampler": "random"},
        "budget": {"max_trials": 2},
    },
    "evaluation": {
        "tasks": [
            {
                "name": "ja_sub",
                "type": "generation",
                "task_dir": str(ZOO / "tasks" / "ja_sub"),
                "split": "dev",
                "limit": 4,
                "batch_size": 4,
                "max_new_tokens": 2,
                "stop": ["</s>"],
                "extract": "first_word",
            }
        ],
        "fitness": [{"metric": "ja_sub/acc"}],
        "heldout_split": None,
    },
    "execution": {"backend": "local", "device": "cpu"},
}

DFS = {
    "space": {"model_a": "ja", "model_b": "math", "repeats": 2, "scales": "model_pair"},
    "optimizer": {"sampler": "random"},
    "budget": {"max_trials": 2},
}


@dataclass
class Env:
    """A case's scratch directory: where its config, models and (never created) run directory live."""

    tmp: Path
    finished: Callable[[str], Path] | None = None  # a finished run of this config ("single" or "multi" objective)

    @property
    def run_dir(self) -> Path:
        return self.tmp / "run"

    def finished_run(self, kind: str = "single") -> Path:
        """A copy of a finished run (its study, config.yaml) as this case's run directory."""
        assert self.finished is not None
        shutil.copytree(self.finished(kind), self.run_dir)
        return self.run_dir

    def config(self, **changes: Any) -> dict[str, Any]:
        d = copy.deepcopy(BASE_CONFIG)
        d["output_dir"] = str(self.run_dir)
        for path, value in changes.items():
            node = d
            *keys, last = path.split("__")
            for k in keys:
                node = node.setdefault(k, {})
            node[last] = value
        return d

    def write(self, data: Any, name: str = "config.yaml") -> str:
        p = self.tmp / name
        p.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
        return str(p)

    def model_copy(self, name: str = "base") -> Path:
        dst = self.tmp / f"models/{name}"
        shutil.copytree(ZOO / name, dst)
        return dst


@dataclass
class Case:
    id: str
    make: Callable[[Env], list[str]]  # argv of `evolve ...`, given a scratch env
    expect: str  # a fragment of the one-line error
    run_too: bool = True  # the argv is `check CONFIG`: also try `run CONFIG`
    fast: float | None = None  # seconds the command must finish in


def config_case(id: str, expect: str, **changes: Any) -> Case:
    return Case(id, lambda env: ["check", env.write(env.config(**changes))], expect)


def _corrupt_weights(env: Env) -> list[str]:
    base = env.model_copy()
    (base / "model.safetensors").write_bytes(os.urandom(4096))
    return ["check", env.write(env.config(models__base=str(base)))]


def _truncated_weights(env: Env) -> list[str]:
    base = env.model_copy()
    data = (base / "model.safetensors").read_bytes()
    (base / "model.safetensors").write_bytes(data[: len(data) // 2])
    return ["check", env.write(env.config(models__base=str(base)))]


def _config_json_not_json(env: Env) -> list[str]:
    base = env.model_copy()
    (base / "config.json").write_text("{model_type: llama,,")
    return ["check", env.write(env.config(models__base=str(base)))]


def _hidden_size_differs(env: Env) -> list[str]:
    src = env.model_copy("expert_math")
    cfg = json.loads((src / "config.json").read_text())
    cfg["hidden_size"] = 256
    (src / "config.json").write_text(json.dumps(cfg))
    d = env.config()
    d["models"]["sources"][1]["path"] = str(src)
    return ["check", env.write(d)]


def _no_tokenizer(env: Env) -> list[str]:
    base = env.model_copy()
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (base / f).unlink()
    return ["check", env.write(env.config(models__base=str(base)))]


def _output_dir_is_a_file(env: Env) -> list[str]:
    (env.tmp / "afile").write_text("x")
    return ["check", env.write(env.config(output_dir=str(env.tmp / "afile" / "run")))]


def _binary_config(env: Env) -> list[str]:
    p = env.tmp / "config.yaml"
    p.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe" + os.urandom(64))
    return ["check", str(p)]


def _duplicate_keys(env: Env) -> list[str]:
    text = yaml.safe_dump(env.config(), sort_keys=False).replace("seed: 0\n", "seed: 0\nseed: 5\n", 1)
    return ["check", env.write(text)]


def _anchor_bomb(env: Env) -> list[str]:
    """'Billion laughs': 10**9 strings once expanded, hidden in a free-form field (fixed method params)."""
    chain = ['l0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    chain += [f"l{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]
    params = "    params: {" + ", ".join(chain) + "}\n"
    text = yaml.safe_dump(env.config(), sort_keys=False).replace("    x0:\n", params + "    x0:\n", 1)
    return ["check", env.write(text)]


def _base_again(env: Env) -> list[str]:
    d = env.config()
    d["models"]["sources"].append({"path": str(ZOO / "base"), "alias": "b"})
    return ["check", env.write(d)]


def _recipe(env: Env, density: Any) -> list[str]:
    recipe = {
        "merge_method": "ties",
        "base_model": str(ZOO / "base"),
        "models": [{"model": str(ZOO / "expert_ja"), "parameters": {"weight": 1.0, "density": density}}],
    }
    return ["merge", env.write(recipe, "recipe.yaml"), "--out", str(env.run_dir), "--device", "cpu"]


def _recipe_duplicate_keys(env: Env) -> list[str]:
    text = (
        f"merge_method: ties\nbase_model: {ZOO / 'base'}\nmerge_method: linear\n"
        f"models:\n  - model: {ZOO / 'expert_ja'}\n    parameters: {{weight: 1.0}}\n"
    )
    return ["merge", env.write(text, "recipe.yaml"), "--out", str(env.run_dir), "--device", "cpu"]


def _shard_size(size: str) -> Callable[[Env], list[str]]:
    def make(env: Env) -> list[str]:
        return [*_recipe(env, 0.5), f"--shard-size={size}"]

    return make


def _unreachable_postgres(verb: str) -> Callable[[Env], list[str]]:
    def make(env: Env) -> list[str]:
        cfg = env.write(env.config(storage=f"postgresql://evo:{PASSWORD}@127.0.0.1:9/evo"))
        return [verb, cfg] + (["--out", str(env.tmp / "export")] if verb == "export" else [])

    return make


def _dfs_other_architecture(env: Env) -> list[str]:
    """Model B with another MLP width: its layers cannot run inside A (the worker's rule, checked up front)."""
    from zoo.synthetic import make_tiny_checkpoint

    b = make_tiny_checkpoint(env.tmp / "models/b", hidden_size=128, intermediate_size=256, num_layers=2)
    return _dfs(model_b=str(b))(env)


def _dfs(**space: Any) -> Callable[[Env], list[str]]:
    def make(env: Env) -> list[str]:
        dfs = copy.deepcopy(DFS)
        dfs["space"].update(space)
        return ["check", env.write(env.config(search__stages=["dfs"], search__dfs=dfs))]

    return make


def _layers_beyond_tensors(env: Env) -> list[str]:
    src = env.model_copy("expert_ja")
    cfg = json.loads((src / "config.json").read_text())
    cfg["num_hidden_layers"] = 8  # the tensors hold 4
    (src / "config.json").write_text(json.dumps(cfg))
    d = env.config()
    d["models"]["sources"][0]["path"] = str(src)
    return ["check", env.write(d)]


def _index_names_missing_shard(env: Env) -> list[str]:
    base = env.model_copy()
    from safetensors import safe_open

    with safe_open(str(base / "model.safetensors"), "pt") as f:
        names = list(f.keys())
    (base / "model.safetensors").rename(base / "model-00001-of-00002.safetensors")
    weight_map = {n: f"model-0000{1 + (i % 2)}-of-00002.safetensors" for i, n in enumerate(names)}
    (base / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return ["check", env.write(env.config(models__base=str(base)))]


def _status_before_any_run(env: Env) -> list[str]:
    return ["status", env.write(env.config())]


def _recursive_alias(env: Env) -> list[str]:
    text = yaml.safe_dump(env.config(), sort_keys=False).replace(
        "    x0:\n", "    params: {loop: &me [1, *me]}\n    x0:\n", 1
    )
    return ["check", env.write(text)]


def _task(**fields: Any) -> list[dict[str, Any]]:
    return [{**BASE_CONFIG["evaluation"]["tasks"][0], **fields}]


def _seed_flag(seed: str) -> Callable[[Env], list[str]]:
    def make(env: Env) -> list[str]:
        return ["run", env.write(env.config()), "--seed", seed, "--no-progress"]

    return make


def _raw_at_in_password(verb: str) -> Callable[[Env], list[str]]:
    """A password with an unencoded '@': the driver would split it there and quote the rest in its error."""

    def make(env: Env) -> list[str]:
        return [verb, env.write(env.config(storage=f"postgresql://alice:p@ss:{PASSWORD}@127.0.0.1:9/evo"))]

    return make


def _pickled_base(env: Env) -> Path:
    """A copy of the base whose weights are a pickle that names a global outside torch's weights-only list."""
    import pathlib

    import torch
    from safetensors.torch import load_file

    base = env.model_copy()
    state: dict[str, Any] = dict(load_file(base / "model.safetensors"))
    state["note"] = pathlib.PurePosixPath("not a tensor")
    (base / "model.safetensors").unlink()
    torch.save(state, base / "pytorch_model.bin")
    return base


def _pickle_names_a_global(env: Env) -> list[str]:
    base = _pickled_base(env)
    return ["check", env.write(env.config(models__base=str(base), models__allow_pickle=True))]


def _merge_pickle_names_a_global(env: Env) -> list[str]:
    recipe = {
        "merge_method": "task_arithmetic",
        "base_model": str(_pickled_base(env)),
        "models": [{"model": str(ZOO / "expert_ja"), "parameters": {"weight": 1.0}}],
    }
    return ["merge", env.write(recipe, "recipe.yaml"), "--out", str(env.tmp / "out"), "--allow-pickle"]


def _objectives(reference: list[float]) -> dict[str, Any]:
    return {
        "evaluation__fitness": None,
        "evaluation__objectives": [{"metric": "ja_sub/acc"}, {"metric": "ja_sub/lang_ok"}],
        "evaluation__reference_point": reference,
        "search__optimizer": {"sampler": "random"},
    }


def _status_top(top: str) -> Callable[[Env], list[str]]:
    def make(env: Env) -> list[str]:
        return ["status", env.write(env.config()), "--top", top]

    return make


def _export_into_run_dir(sub: str, *flags: str) -> Callable[[Env], list[str]]:
    def make(env: Env) -> list[str]:
        out = env.run_dir / sub if sub else env.run_dir
        return ["export", env.write(env.config()), "--out", str(out), *flags]

    return make


def _dfs_protocol(**protocol: Any) -> Callable[[Env], list[str]]:
    def make(env: Env) -> list[str]:
        dfs = {**copy.deepcopy(DFS), "protocol": protocol}
        return ["check", env.write(env.config(search__stages=["dfs"], search__dfs=dfs))]

    return make


def _source_tokenizer(damage: str) -> Callable[[Env], list[str]]:
    """A source whose tokenizer is gone or unreadable: the search never uses it, the held-out table does."""

    def make(env: Env) -> list[str]:
        src = env.model_copy("expert_math")
        if damage == "missing":
            for f in ("tokenizer.json", "tokenizer_config.json"):
                (src / f).unlink()
        else:
            text = (src / "tokenizer.json").read_text()
            (src / "tokenizer.json").write_text(text[: len(text) // 2])
        d = env.config(evaluation__heldout_split="test")
        d["models"]["sources"][1]["path"] = str(src)
        return ["check", env.write(d)]

    return make


def _eval_source_without_tokenizer(env: Env) -> list[str]:
    src = env.model_copy("expert_math")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (src / f).unlink()
    return ["eval", str(src), "--config", env.write(env.config()), "--split", "dev", "--device", "cpu"]


def _saved_dataset(env: Env, damage: str) -> tuple[Path, str | None]:
    """The zoo's ja_sub dev items as a `DatasetDict.save_to_disk` folder (split `dev`), damaged as `damage` says;
    (folder, split)."""
    import datasets

    from evals.data import read_jsonl

    rows = read_jsonl(ZOO / "tasks" / "ja_sub" / "dev.jsonl")[:20]
    if damage == "null_prompt":
        rows[7]["prompt"] = None
    data = datasets.Dataset.from_list(rows)
    folder = env.tmp / "data" / "ja_sub"
    splits = {"dev": data, **({"empty": data.select([])} if damage == "empty_split" else {})}
    datasets.disable_progress_bars()  # the case's stderr is the command's alone
    try:
        datasets.DatasetDict(splits).save_to_disk(str(folder))
    finally:
        datasets.enable_progress_bars()
    arrow = next((folder / "dev").glob("*.arrow"))
    if damage == "arrow_corrupt":
        arrow.write_bytes(os.urandom(arrow.stat().st_size))
    elif damage == "arrow_missing":
        arrow.unlink()
    elif damage == "dict_json_truncated":
        text = (folder / "dataset_dict.json").read_text()
        (folder / "dataset_dict.json").write_text(text[: len(text) // 2])
    return folder, "empty" if damage == "empty_split" else "dev"


def _dataset_task(env: Env, damage: str, slice: str | None = None, name: str = "ja_sub") -> dict[str, Any]:
    folder, split = _saved_dataset(env, damage)
    task = {k: v for k, v in BASE_CONFIG["evaluation"]["tasks"][0].items() if k not in ("task_dir", "split")}
    source = {"path": str(folder), "split": split, **({"slice": slice} if slice else {})}
    return {**task, "name": name, "dataset": source}


def _dataset(damage: str, slice: str | None = None, group: str = "tasks") -> Callable[[Env], list[str]]:
    def make(env: Env) -> list[str]:
        if group == "tasks":
            d = env.config(evaluation__tasks=[_dataset_task(env, damage, slice)])
        else:
            held = _dataset_task(env, damage, slice, name="ja_held")
            d = env.config(evaluation__heldout_tasks=[held], evaluation__heldout_split="test")
        return ["check", env.write(d)]

    return make


def _edited_run(verb: str, kind: str = "single", **changes: Any) -> Callable[[Env], list[str]]:
    """A finished run whose config.yaml was edited (dotted keys, `a__b`), then `verb` on its run directory."""

    def make(env: Env) -> list[str]:
        run_dir = env.finished_run(kind)
        data = yaml.safe_load((run_dir / "config.yaml").read_text())
        for path, value in changes.items():
            node = data
            *keys, last = path.split("__")
            for k in keys:
                node = node[int(k)] if isinstance(node, list) else node[k]
            node[last] = value
        (run_dir / "config.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
        return [verb, str(run_dir), *(["--out", str(env.tmp / "out")] if verb == "export" else [])]

    return make


CASES: list[Case] = [
    config_case(
        "weight_bounds_inf",
        "search.space.weight_bounds",
        search__space={**BASE_CONFIG["search"]["space"], "weight_bounds": [float("-inf"), float("inf")]},
    ),
    config_case(
        "weight_bounds_nan",
        "search.space.weight_bounds",
        search__space={**BASE_CONFIG["search"]["space"], "weight_bounds": [float("nan"), 1.0]},
    ),
    config_case("seed_2_32", "seed", seed=2**32),
    config_case("seed_negative", "seed", seed=-1),
    Case("seed_flag_negative", _seed_flag("-3"), "seed", run_too=False),
    Case("safetensors_corrupt", _corrupt_weights, "model.safetensors"),
    Case("safetensors_truncated", _truncated_weights, "model.safetensors"),
    Case("config_json_not_json", _config_json_not_json, "config.json"),
    Case("config_json_hidden_size", _hidden_size_differs, "hidden_size"),
    Case("base_without_tokenizer", _no_tokenizer, "tokenizer"),
    config_case("name_300_chars", "name", name="n" * 300),
    Case("output_dir_is_a_file", _output_dir_is_a_file, "output_dir"),
    Case("binary_config", _binary_config, "UTF-8"),
    config_case(
        "stop_not_strings",
        "stop",
        evaluation__tasks=[{**BASE_CONFIG["evaluation"]["tasks"][0], "stop": [123, None, {"a": 1}]}],
    ),
    config_case(
        "stop_bare_string", "stop", evaluation__tasks=[{**BASE_CONFIG["evaluation"]["tasks"][0], "stop": "</s>"}]
    ),
    config_case("fitness_metric_not_produced", "ja_sub/bleu", evaluation__fitness=[{"metric": "ja_sub/bleu"}]),
    config_case(
        "space_params_density_word",
        "density",
        search__space={**BASE_CONFIG["search"]["space"], "params": {"density": "lots"}},
    ),
    config_case(
        "space_params_density_above_1",
        "density",
        search__space={**BASE_CONFIG["search"]["space"], "params": {"density": 1.5}},
    ),
    config_case(
        "space_params_density_negative",
        "density",
        search__space={**BASE_CONFIG["search"]["space"], "params": {"density": -0.5}},
    ),
    Case("recipe_density_word", lambda env: _recipe(env, "lots"), "density", run_too=False),
    Case("recipe_density_above_1", lambda env: _recipe(env, 1.5), "density", run_too=False),
    Case("recipe_density_negative", lambda env: _recipe(env, -0.5), "density", run_too=False),
    Case("shard_size_negative", _shard_size("-5GB"), "--shard-size", run_too=False),
    Case("shard_size_zero", _shard_size("0GB"), "--shard-size", run_too=False),
    Case("shard_size_word", _shard_size("abc"), "--shard-size", run_too=False),
    Case("duplicate_yaml_keys", _duplicate_keys, "duplicate key 'seed'"),
    Case("recipe_duplicate_keys", _recipe_duplicate_keys, "duplicate key 'merge_method'", run_too=False),
    Case("base_listed_as_source", _base_again, "models.sources"),
    Case("dfs_repeats_200000", _dfs(repeats=200000), "repeats", fast=5.0),
    Case("yaml_anchor_bomb", _anchor_bomb, "alias", fast=1.0),
    # found by probing, beyond the list
    Case("dfs_slots_over_limit", _dfs(repeats=600), "4800 slots", fast=5.0),
    Case("dfs_model_b_other_architecture", _dfs_other_architecture, "'intermediate_size' differs"),
    Case("config_json_layers_beyond_tensors", _layers_beyond_tensors, "num_hidden_layers 8"),
    Case("index_names_missing_shard", _index_names_missing_shard, "model-00002-of-00002.safetensors"),
    Case("recursive_alias", _recursive_alias, "recursive alias", fast=1.0),
    config_case(
        "source_listed_twice",
        "listed twice",
        models={
            **BASE_CONFIG["models"],
            "sources": [str(ZOO / "expert_ja"), {"path": str(ZOO / "expert_ja") + "/", "alias": "again"}],
        },
    ),
    config_case("sigma0_inf", "search.optimizer.sigma0", search__optimizer={"sigma0": float("inf")}),
    config_case(
        "fitness_weight_nan",
        "evaluation.fitness.0.weight",
        evaluation__fitness=[{"metric": "ja_sub/acc", "weight": float("nan")}],
    ),
    config_case("task_limit_zero", "limit", evaluation__tasks=_task(limit=0)),
    config_case("task_batch_size_string", "batch_size", evaluation__tasks=_task(batch_size="8")),
    config_case(
        "task_bad_regex",
        "not a valid regex",
        evaluation__tasks=_task(language_check={"type": "pattern", "pattern": "(["}),
    ),
    config_case("heldout_split_missing", "heldout_split 'nosuch'", evaluation__heldout_split="nosuch"),
    config_case(
        "lm_eval_metric_shape",
        "an lm_eval task reports",
        evaluation__tasks=[{"name": "lm", "type": "lm_eval", "tasks": ["zoo_ja_sub"]}],
        evaluation__fitness=[{"metric": "lm/acc"}],
    ),
    config_case(
        "lm_eval_tasks_string",
        "tasks",
        evaluation__tasks=[{"name": "lm", "type": "lm_eval", "tasks": "zoo_ja_sub"}],
        evaluation__fitness=[{"metric": "lm/zoo_ja_sub/exact_match,first_word"}],
    ),
    config_case("empty_source_path", "models.sources.0.path", models={**BASE_CONFIG["models"], "sources": [""]}),
    Case("status_before_any_run", _status_before_any_run, "does not exist", run_too=False),
    Case("postgres_unreachable_status", _unreachable_postgres("status"), "127.0.0.1", run_too=False, fast=15.0),
    Case("postgres_unreachable_report", _unreachable_postgres("report"), "127.0.0.1", run_too=False, fast=15.0),
    Case("postgres_unreachable_export", _unreachable_postgres("export"), "127.0.0.1", run_too=False, fast=15.0),
    # issue 25: secrets
    Case("storage_password_raw_at", _raw_at_in_password("check"), "percent-encode", fast=5.0),
    Case("storage_password_raw_at_status", _raw_at_in_password("status"), "percent-encode", run_too=False),
    # issue 25: pickles that name a blocked global (nothing runs; one line naming the file)
    Case("pickle_names_a_blocked_global", _pickle_names_a_global, "pytorch_model.bin"),
    Case("merge_pickle_names_a_blocked_global", _merge_pickle_names_a_global, "pytorch_model.bin", run_too=False),
    # issue 25: ranges
    config_case("reference_point_beyond_accuracy", "reference_point[0]", **_objectives([5.0, 5.0])),
    config_case("reference_point_at_the_top", "reference_point[1]", **_objectives([0.0, 1.0])),
    config_case("heartbeat_s_1e15", "execution.heartbeat_s", execution__heartbeat_s=1e15),
    config_case("threads_2_40", "execution.threads", execution__threads=2**40),
    Case("status_top_zero", _status_top("0"), "--top", run_too=False),
    Case("status_top_negative", _status_top("-5"), "--top", run_too=False),
    # issue 25: an export never writes into the run directory
    Case("export_out_inside_run_dir", _export_into_run_dir("best"), "is inside the run directory", run_too=False),
    Case(
        "export_out_ps_best_overwrite",
        _export_into_run_dir("ps_best", "--overwrite"),
        "is inside the run directory",
        run_too=False,
    ),
    Case("export_out_is_run_dir", _export_into_run_dir("", "--overwrite"), "is the run directory", run_too=False),
    # issue 25: `check` runs the rules the worker runs (each once failed every trial after "config OK")
    config_case("protocol_validation_all_items", "search.protocol.validation", search__protocol={"validation": 4}),
    config_case(
        "protocol_batch_past_the_pool", "search.protocol.batch", search__protocol={"validation": 1, "batch": 4}
    ),
    config_case("protocol_batch_past_the_items", "search.protocol.batch", search__protocol={"batch": 5}),
    Case("dfs_protocol_validation_all_items", _dfs_protocol(validation=9), "search.dfs.protocol.validation"),
    config_case(
        "chat_template_without_one", "evaluation.tasks[0].chat_template", evaluation__tasks=_task(chat_template=True)
    ),
    Case("source_tokenizer_missing", _source_tokenizer("missing"), "no tokenizer"),
    Case("source_tokenizer_unreadable", _source_tokenizer("truncated"), "tokenizer in"),
    Case("eval_without_tokenizer", _eval_source_without_tokenizer, "no tokenizer", run_too=False),
    # issue 25: dataset sources (a save_to_disk folder), in tasks and in heldout_tasks
    Case("dataset_arrow_corrupt", _dataset("arrow_corrupt"), "evaluation.tasks[0].dataset"),
    Case("dataset_arrow_missing", _dataset("arrow_missing"), "evaluation.tasks[0].dataset"),
    Case("dataset_dict_json_truncated", _dataset("dict_json_truncated"), "dataset_dict.json"),
    Case("dataset_split_empty", _dataset("empty_split"), "split 'empty' has no rows"),
    Case("dataset_slice_past_the_end", _dataset("", slice="100:200"), "evaluation.tasks[0].dataset.slice"),
    Case("dataset_slice_stop_past_the_end", _dataset("", slice="0:25"), "evaluation.tasks[0].dataset.slice"),
    Case("dataset_null_field", _dataset("null_prompt"), "column 'prompt' is null in row 7"),
    Case("heldout_dataset_arrow_corrupt", _dataset("arrow_corrupt", group="held"), "heldout_tasks[0].dataset"),
    Case("heldout_dataset_arrow_missing", _dataset("arrow_missing", group="held"), "heldout_tasks[0].dataset"),
    Case("heldout_dataset_dict_json_truncated", _dataset("dict_json_truncated", group="held"), "dataset_dict.json"),
    Case("heldout_dataset_split_empty", _dataset("empty_split", group="held"), "split 'empty' has no rows"),
    Case(
        "heldout_dataset_slice_past_the_end",
        _dataset("", slice="-30:", group="held"),
        "evaluation.heldout_tasks[0].dataset.slice",
    ),
    Case("heldout_dataset_null_field", _dataset("null_prompt", group="held"), "column 'prompt' is null in row 7"),
    # issue 25: Hub ids an export names the models by
    config_case(
        "hub_id_a_path",
        "models.sources.1.hub_id",
        models={
            **BASE_CONFIG["models"],
            "sources": [
                *BASE_CONFIG["models"]["sources"][:1],
                {"path": str(ZOO / "expert_math"), "hub_id": str(ZOO / "expert_math")},
            ],
        },
    ),
    config_case(
        "base_hub_id_one_part", "models.base_hub_id", models={**BASE_CONFIG["models"], "base_hub_id": "base-model"}
    ),
    # issue 25: a study continues under the config it was run under (trials ranked together must mean the same)
    Case(
        "resume_after_editing_bounds",
        _edited_run("resume", search__space__weight_bounds=[0.0, 3.0]),
        "search.space.weight_bounds changed",
        run_too=False,
    ),
    Case(
        "resume_after_editing_a_task_limit",
        _edited_run("resume", evaluation__tasks__0__limit=3),
        "evaluation.tasks[0].limit changed",
        run_too=False,
    ),
    Case("resume_after_editing_the_seed", _edited_run("resume", seed=7), "seed changed", run_too=False),
    Case(
        "resume_after_editing_the_sampler",
        _edited_run("resume", search__optimizer__sampler="tpe"),
        "search.optimizer.sampler changed",
        run_too=False,
    ),
    Case(
        "resume_after_editing_objectives",
        _edited_run("resume", "multi", evaluation__objectives__1__metric="ja_sub/acc_value"),
        "was made with other objectives",
        run_too=False,
    ),
    Case(
        "status_after_editing_a_task_limit",
        _edited_run("status", evaluation__tasks__0__limit=3),
        "--accept-config-change",
        run_too=False,
    ),
    Case(
        "export_after_editing_objectives",
        _edited_run("export", "multi", evaluation__objectives__0__metric="ja_sub/acc_value"),
        "was made with other objectives",
        run_too=False,
    ),
    Case(
        "report_after_editing_the_reference_point",
        _edited_run("report", "multi", evaluation__reference_point=[0.1, 0.2]),
        "evaluation.reference_point changed",
        run_too=False,
    ),
    config_case(
        "lm_eval_task_name_unknown",
        "evaluation.tasks[0].tasks",
        evaluation__tasks=[
            {
                "name": "lm",
                "type": "lm_eval",
                "tasks": ["zoo_no_such_task"],
                "include_path": str(ZOO / "tasks" / "lm_eval"),
            }
        ],
        evaluation__fitness=[{"metric": "lm/zoo_no_such_task/exact_match,first_word"}],
    ),
]


def _argv_variants(case: Case, env: Env) -> list[list[str]]:
    argv = case.make(env)
    if case.run_too and argv[0] == "check":
        return [argv, ["run", argv[1], "--no-progress", "--no-final-table"]]
    return [argv]


class _ValuesExecutor:
    """Scores a recipe by its hash, as two objectives (no model loaded): a multi-objective study in a second."""

    slots = 1

    def __init__(self, cfg: Any, template: Any) -> None:
        self.pending: list[tuple[int, Any]] = []

    def submit(self, key: int, recipe: Any) -> None:
        self.pending.append((key, recipe))

    def wait(self) -> tuple[int, Any]:
        from evolve.worker import Outcome

        key, recipe = self.pending.pop(0)
        a, b = int(recipe.hash()[:6], 16) / 16**6, int(recipe.hash()[6:12], 16) / 16**6
        return key, Outcome(worker="fake", metrics={"ja_sub/acc": a, "ja_sub/lang_ok": b}, values=[a, b])

    def close(self) -> None:
        pass


@pytest.fixture(scope="module")
def finished_runs(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """Finished runs of the base config, scored by a stand-in (the cases edit their config and continue them)."""
    from evolve.config import parse_config
    from evolve.loop import run_search
    from tests.evolve.fake_run import HashScoreExecutor

    built: dict[str, Path] = {}

    def finished(kind: str) -> Path:
        if kind not in built:
            run_dir = tmp_path_factory.mktemp(f"finished-{kind}") / "run"
            changes = _objectives([0.0, 0.0]) if kind == "multi" else {}
            data = Env(run_dir.parent).config(**changes)
            executor = _ValuesExecutor if kind == "multi" else HashScoreExecutor
            run_search(parse_config(data), progress=False, executor_factory=executor)
            built[kind] = run_dir
        return built[kind]

    return finished


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_input_gets_one_line(
    case: Case, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch, finished_runs
) -> None:
    monkeypatch.chdir(tmp_path)  # nothing may be written here either
    env = Env(tmp_path, finished_runs)
    for argv in _argv_variants(case, env):
        before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
        t0 = time.perf_counter()
        code = main(argv)
        elapsed = time.perf_counter() - t0
        captured = capsys.readouterr()
        err = captured.err.strip()
        assert code == 2, f"{argv[0]}: exit {code}, stderr: {err[-2000:]}"
        assert err.count("\n") == 0 and err.startswith("error: "), f"{argv[0]}: not one error line: {err[-2000:]}"
        assert case.expect in err, f"{argv[0]}: {err}"
        assert PASSWORD not in err + captured.out
        assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before, f"{argv[0]} wrote files"
        if case.fast is not None:
            assert elapsed < case.fast, f"{argv[0]} took {elapsed:.2f} s"


def test_the_table_is_big_enough() -> None:
    print(f"{len(CASES)} hostile inputs")
    assert len(CASES) >= 25


def test_read_only_output_dir_is_refused_before_anything_is_written(tmp_path, capsys, monkeypatch) -> None:
    """A read-only disk: real permissions (mode 0555) for a normal user; root writes through those, so as root the
    file system is reported read-only the way statvfs reports a read-only mount."""
    monkeypatch.chdir(tmp_path)
    env = Env(tmp_path)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    if os.geteuid() == 0:
        import evolve.config

        real = os.statvfs

        class ReadOnly:
            def __init__(self, result):
                self._r = result
                self.f_flag = result.f_flag | os.ST_RDONLY

            def __getattr__(self, name):
                return getattr(self._r, name)

        monkeypatch.setattr(
            evolve.config.os, "statvfs", lambda p: ReadOnly(real(p)) if str(p).startswith(str(locked)) else real(p)
        )
    try:
        config = env.write(env.config(output_dir=str(locked / "run")))
        for argv in (["check", config], ["run", config, "--no-progress"]):
            assert main(argv) == 2
            err = capsys.readouterr().err.strip()
            assert err.count("\n") == 0 and err.startswith("error: ") and "output_dir" in err, err
            assert "read-only" in err or "no permission" in err, err
            assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o755)


def test_check_validates_and_reports_the_stages_that_run(capsys) -> None:
    """`stages: [dfs]`: the DFS space is built and reported (not the PS space the config also describes)."""
    assert main(["check", str(ROOT / "configs" / "tiny_jp_math_dfs.yaml")]) == 0
    out = capsys.readouterr().out
    assert "dfs: 2 repeats x (4 + 4) layers = 16 slots" in out and "sampler cmaes" in out, out
    assert "ps:" not in out and "checkpoints compatible" not in out, out
    assert main(["check", str(ROOT / "configs" / "tiny_jp_math.yaml")]) == 0
    out = capsys.readouterr().out
    assert "ps: 3 checkpoints compatible, 12 parameters, 150 trials, sampler cmaes" in out, out


def test_run_header_names_the_budget_and_sampler_of_the_stages_that_run(tmp_path, capsys, monkeypatch) -> None:
    from merge_core.errors import EvomergeError

    def stop(cfg, **_):
        raise EvomergeError("stopped by the test before the search")

    monkeypatch.setattr(evolve.loop, "run_search", stop)
    env = Env(tmp_path)
    dfs = copy.deepcopy(DFS)
    dfs["budget"] = {"max_trials": 7}
    dfs["optimizer"] = {"sampler": "tpe"}
    config = env.write(env.config(search__stages=["dfs"], search__dfs=dfs))
    assert main(["run", config, "--no-progress"]) == 2
    out = capsys.readouterr().out
    assert "dfs 7 trials, tpe" in out and "2 trials" not in out and "random" not in out, out


def test_evaluators_report_the_metric_names_they_declare() -> None:
    """`metric_names` (what `evolve check` compares fitness metrics against) is what `evaluate` returns."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evals import build_evaluator

    model = AutoModelForCausalLM.from_pretrained(str(ZOO / "base"), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(ZOO / "base"))
    text = ZOO / "tasks" / "ja_sub" / "dev.jsonl"
    specs = [
        {"type": "generation", "task_dir": str(ZOO / "tasks" / "ja_sub"), "limit": 2, "max_new_tokens": 2},
        {
            "type": "generation",
            "task_dir": str(ZOO / "tasks" / "ja_sub"),
            "limit": 2,
            "max_new_tokens": 2,
            "gold_prob": False,
        },
        {"type": "perplexity", "text_file": str(text), "limit": 2},
    ]
    for spec in specs:
        evaluator = build_evaluator(spec)
        fields = {k: v for k, v in spec.items() if k != "type"}
        assert set(evaluator.evaluate(model, tok)) == set(type(evaluator).metric_names(**fields)), spec


def test_alias_bomb_is_refused_in_little_time_and_memory() -> None:
    """Nine nested levels of ten aliases (10**9 values expanded): refused in well under a second and a few MB, while
    a config that uses aliases sensibly (a shared task definition) still loads."""
    import tracemalloc

    from merge_core.errors import EvomergeError
    from merge_core.yamlio import load_yaml

    bomb = 'l0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n' + "".join(
        f"l{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 10) + "]\n" for i in range(1, 10)
    )
    tracemalloc.start()
    t0 = time.perf_counter()
    with pytest.raises(EvomergeError, match="alias"):
        load_yaml(bomb, "bomb.yaml")
    elapsed, peak = time.perf_counter() - t0, tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert elapsed < 1.0 and peak < 5e6, (elapsed, peak)
    shared = "task: &t {name: ja_sub, limit: 4}\ntasks: [*t, *t]\n"
    assert load_yaml(shared, "ok.yaml") == {
        "task": {"name": "ja_sub", "limit": 4},
        "tasks": [{"name": "ja_sub", "limit": 4}] * 2,
    }


def test_merge_keys_may_be_overridden_but_literal_keys_not_repeated() -> None:
    from merge_core.errors import EvomergeError
    from merge_core.yamlio import load_yaml

    assert load_yaml("base: &b {x: 1, y: 2}\nmine:\n  <<: *b\n  x: 5\n", "ok.yaml")["mine"] == {"x": 5, "y": 2}
    with pytest.raises(EvomergeError, match=r"r\.yaml: duplicate key 'x' \(line 2 and line 4\)"):
        load_yaml("a:\n  x: 1\n  y: 2\n  x: 3\n", "r.yaml")


def test_dfs_genome_is_bounded() -> None:
    """Slots (L_A + L_B) * repeats <= 4096 and matrix scales (L_A + L_B)**2 <= 16384: an error, not a CMA-ES with a
    covariance matrix of gigabytes. Sakana's setting (2 x 32 layers, 3 repeats, matrix) is well inside."""
    from merge_core.errors import EvomergeError
    from search_spaces.dfs import DataFlowSpace

    assert DataFlowSpace("a", "b", 32, 32, repeats=3).dim == 64 * 3 + 64 * 64 + 1
    with pytest.raises(EvomergeError, match="search.dfs.space.repeats: 65 repeats of 64 layers"):
        DataFlowSpace("a", "b", 32, 32, repeats=65, scales="none")
    with pytest.raises(EvomergeError, match="search.dfs.space.scales: 'matrix' over 160 layers"):
        DataFlowSpace("a", "b", 80, 80, repeats=1)
    assert DataFlowSpace("a", "b", 80, 80, repeats=1, scales="model_pair").dim == 160 + 5
