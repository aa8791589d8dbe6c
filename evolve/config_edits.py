"""Editing a run's config between a run and its resume: which fields a study may continue under, and the refusal of
the others.

Each study keeps the config it runs under (its `config` user attr, written by `evolve.study.open_study`). A resumed
search, `status`, `report` and `export` compare the config they were given (the run directory's `config.yaml`, or
the config file) with it, field by field. Fields that decide what a trial means (its recipe, its items, how it is
scored and ranked, the sampler's stream) may not change under a study: the trials before and after would be
ranked together under different rules. They are refused in one line naming the fields, unless the search is
continued with `--accept-config-change` (then the study records the new config, and which fields changed at which
trial, in its `config_changes` attr). The fields in `EDITABLE` change how or how long the search runs, or what is
done with its result, and may be edited freely.
"""

from __future__ import annotations

import fnmatch
import shlex
from typing import Any

import optuna
import yaml

from evolve.config import RunConfig, dump_config, parse_config
from evolve.study import check_objectives, missing_database, read_storage, study_name
from merge_core.errors import EvomergeError

# Dotted paths (fnmatch patterns, list items as [N]) of the fields an edit may change under a running study.
EDITABLE = (
    "search.budget.*",  # how long: max_trials, max_minutes, patience, max_consecutive_failures, max_items
    "search.dfs.budget.*",
    "execution.backend",  # where and how fast (a trial is the same measurement on any of them)
    "execution.workers",
    "execution.device",
    "execution.ray_address",
    "execution.cpus_per_worker",
    "execution.gpus_per_worker",
    "execution.threads",
    "execution.shared_study",
    "execution.heartbeat_s",
    "execution.vllm.kv_cache_gib",  # the engine's memory, caches and logs (the engine itself is not editable: its
    "execution.vllm.cache_dir",  # greedy answers can differ from the native path's on a few items)
    "execution.vllm.log_level",
    "storage",  # where the study is (found by its name there)
    "output_dir",  # where the run directory is
    "models.allow_pickle",  # permissions, not models
    "models.trust_remote_code",
    "models.base_hub_id",  # how an export names the models
    "models.sources[[]*[]].hub_id",
    "evaluation.tasks[[]*[]].batch_size",  # scores do not depend on the batch size (evals.lm)
    "evaluation.heldout_split",  # the held-out table and export, after the search
    "evaluation.heldout_limit",
    "evaluation.heldout_tasks*",
)
CHANGES_ATTR = "config_changes"  # study user attr: [{"trial": first trial under the new config, "fields": [...]}]
_MISSING = object()


def editable(path: str) -> bool:
    return any(fnmatch.fnmatchcase(path, pattern) for pattern in EDITABLE)


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    """{dotted path: value}: mappings and lists of mappings are walked (`tasks[0].limit`); other values are leaves."""
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out |= _flat(value, f"{prefix}.{key}" if prefix else str(key))
        return out or {prefix: {}}
    if isinstance(node, list) and node and all(isinstance(x, dict) for x in node):
        return {k: v for i, x in enumerate(node) for k, v in _flat(x, f"{prefix}[{i}]").items()}
    return {prefix: node}


def _as_run_now(stored: str) -> dict[str, Any]:
    """A stored config as this version writes it (fields added since with their defaults), or as stored when it no
    longer parses."""
    data = yaml.safe_load(stored)
    try:
        return yaml.safe_load(dump_config(parse_config(data)))
    except EvomergeError:
        return data if isinstance(data, dict) else {}


def changed_fields(stored: str, cfg: RunConfig) -> list[str]:
    """The fields (dotted paths) that decide what a trial means and differ between the config a study was run
    under (`stored`) and `cfg`."""
    then, now = _flat(_as_run_now(stored)), _flat(yaml.safe_load(dump_config(cfg)))
    paths = list(now) + [p for p in then if p not in now]
    return [p for p in paths if then.get(p, _MISSING) != now.get(p, _MISSING) and not editable(p)]


def _existing_study(cfg: RunConfig, stage: str) -> optuna.Study | None:
    """A stage's study when it exists (read only; a storage that cannot be read is left to `open_study` to report)."""
    url = cfg.storage_url
    if missing_database(url):
        return None
    try:
        return optuna.load_study(study_name=study_name(cfg, stage), storage=read_storage(url))
    except Exception:  # noqa: BLE001 - no such study, no tables yet, or unreachable: nothing to compare here
        return None


def _refusal(cfg: RunConfig, study: optuna.Study, fields: list[str]) -> EvomergeError:
    shown = ", ".join(fields[:6]) + (f" and {len(fields) - 6} more" if len(fields) > 6 else "")
    run = shlex.quote(str(cfg.run_dir))
    return EvomergeError(
        f"study '{study.study_name}' was run under another config: {shown} changed, and trials scored under "
        f"different rules would be ranked together; restore {'it' if len(fields) == 1 else 'them'}, give the run a "
        f"new name, or continue under the new config with `evolve resume {run} --accept-config-change`"
    )


def check_study_config(cfg: RunConfig, study: optuna.Study) -> None:
    """For a reader (status, report, export): refuse a config whose meaningful fields differ from the study's (its
    objectives first: those no flag can change)."""
    check_objectives(study, cfg)
    stored = study.user_attrs.get("config")
    fields = changed_fields(stored, cfg) if stored else []
    if fields:
        raise _refusal(cfg, study, fields)


def check_resume_config(cfg: RunConfig, *, accept: bool = False) -> dict[str, list[str]]:
    """Before a search continues its studies: {study name: changed fields} of each existing stage study whose
    config differs in meaning from `cfg`; a one-line refusal unless `accept`."""
    changes = {}
    for stage in cfg.search.stages:
        study = _existing_study(cfg, stage)
        if study is not None:
            check_objectives(study, cfg)  # a study's objectives never change, accepted or not
        stored = study.user_attrs.get("config") if study is not None else None
        fields = changed_fields(stored, cfg) if stored else []
        if fields and not accept:
            raise _refusal(cfg, study, fields)
        if fields:
            changes[study.study_name] = fields
    return changes


def record_config(study: optuna.Study, cfg: RunConfig, fields: list[str]) -> None:
    """The study now runs under `cfg`: its `config` attr, and, when fields that change what a trial means were
    accepted, which ones from which trial on (`config_changes`)."""
    text = dump_config(cfg)
    if study.user_attrs.get("config") != text:
        study.set_user_attr("config", text)
    if fields:
        history = list(study.user_attrs.get(CHANGES_ATTR) or [])
        history.append({"trial": len(study.trials), "fields": fields})
        study.set_user_attr(CHANGES_ATTR, history)
