"""The search subcommands of `evolve`: run, resume, status, export, report, check, eval, zoo."""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from evolve.cli import command
from evolve.config import RunConfig, load_config, redact_url
from merge_core.errors import EvomergeError

log = logging.getLogger(__name__)


def resolve_run(target: str) -> RunConfig:
    """A config file, or a run directory holding the config.yaml that `evolve run` saved there."""
    p = Path(target)
    if p.is_dir():
        if not (p / "config.yaml").is_file():
            raise EvomergeError(f"{p}: not a run directory (no config.yaml); pass the run's config file")
        return load_config(p / "config.yaml").in_run_dir(p)  # its study.db is the one next to it
    return load_config(p)


def _print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    print("  ".join("-" * widths[c] for c in columns))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(widths[c]) for c in columns))


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    return "" if v is None else str(v)


# ---- run / resume -----------------------------------------------------------------------------


def _run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="run config YAML (or, for resume, a run directory)")
    p.add_argument("--no-progress", action="store_true", help="no live progress line")
    p.add_argument("--no-final-table", action="store_true", help="skip the held-out table at the end")


def _run_cmd_args(p: argparse.ArgumentParser) -> None:
    _run_args(p)
    p.add_argument("--seed", type=int, default=None,
                   help="override the config's seed; the run is then named NAME-seedN unless --name is given")
    p.add_argument("--name", default=None, help="override the config's name (and so its run directory and default storage)")


@command("run", "search merge recipes for a config (continues the study if it exists)")(_run_cmd_args)
def cmd_run(args: argparse.Namespace) -> int:
    return _search(with_overrides(resolve_run(args.config), seed=args.seed, name=args.name), args)


def with_overrides(cfg: RunConfig, *, seed: int | None = None, name: str | None = None) -> RunConfig:
    """`evolve run --seed/--name`: a changed seed gets its own run directory, so it never continues another seed's study.

    A renamed run's directory is named after it, next to the original one (runs/NEW, or beside output_dir or the
    run directory the config was read from)."""
    from evolve.config import parse_config

    if seed is None and name is None:
        return cfg
    data = cfg.model_dump(mode="json")
    if seed is not None and seed != cfg.seed:
        data["seed"] = seed
        data["name"] = f"{cfg.name}-seed{seed}"
    if name is not None:
        data["name"] = name
    if data["name"] == cfg.name:  # the same run: the same run directory
        return parse_config(data, where="--seed/--name", base_dir=None).in_run_dir(cfg.run_dir)
    if cfg.output_dir is not None or cfg.run_dir != Path(f"runs/{cfg.name}"):
        data["output_dir"] = str(cfg.run_dir.parent / data["name"])
    return parse_config(data, where="--seed/--name", base_dir=None)


def _resume_args(p: argparse.ArgumentParser) -> None:
    _run_args(p)
    p.add_argument("--restart", action="store_true",
                   help="start the search over when its study is gone (default: refuse)")


@command("resume", "continue a killed or finished search (RUN_DIR or config)")(_resume_args)
def cmd_resume(args: argparse.Namespace) -> int:
    cfg = resolve_run(args.config)
    if not (cfg.run_dir / "config.yaml").is_file() and cfg.storage is None:
        raise EvomergeError(f"{cfg.run_dir}: no search to resume there yet; use `evolve run`")
    if not args.restart:
        _require_study(cfg)
    return _search(cfg, args)


def _require_study(cfg: RunConfig) -> None:
    """Resume continues a study: refuse, in one line, when it is gone (a new one would start silently)."""
    from evolve.loop import study_name

    name = study_name(cfg, cfg.search.stages[0])
    gone = f"study '{name}' is gone from {redact_url(cfg.storage_url)}"
    hint = "pass --restart to start the search over (or restore the study)"
    if cfg.storage_url.startswith("sqlite:///"):
        from sqlalchemy.engine import make_url

        db = make_url(cfg.storage_url).database
        if db and db != ":memory:" and not Path(db).is_file():
            raise EvomergeError(f"{cfg.run_dir}: the search's database {db} does not exist; {hint}")
    import optuna

    try:
        names = optuna.study.get_all_study_names(storage=cfg.storage_url)
    except Exception as e:  # noqa: BLE001 - any storage failure: one line, no password
        from evolve.urls import redact_text

        raise EvomergeError(f"storage {redact_url(cfg.storage_url)}: cannot open ({type(e).__name__}: "
                            f"{redact_text(str(e), cfg.storage_url).splitlines()[0][:200]})") from None
    if name not in names:
        raise EvomergeError(f"{gone}; {hint}")


def _search(cfg: RunConfig, args: argparse.Namespace) -> int:
    from evolve.loop import best_trial, run_search

    print(f"search '{cfg.name}': storage {redact_url(cfg.storage_url)}, {cfg.search.budget.max_trials} trials, "
          f"{cfg.search.optimizer.sampler}, backend {cfg.execution.backend}")
    result = run_search(cfg, progress=not args.no_progress)
    best = best_trial(result.study)
    print(f"stopped: {result.stopped_because}. best trial {best.number}: fitness {best.value:.4f} {_metrics_line(best.user_attrs.get('metrics'))}")
    if not args.no_final_table and cfg.evaluation.heldout_split:
        from evolve.baselines import heldout_table

        rows = heldout_table(cfg)
        print(f"\nheld-out ({cfg.evaluation.heldout_split} split):")
        _print_table(rows, ["model", *[k for k in rows[0] if k != "model"]])
    return 0


def _metrics_line(metrics: dict | None) -> str:
    return ", ".join(f"{k}={v:.4f}" for k, v in (metrics or {}).items())


# ---- status / report --------------------------------------------------------------------------


def _run_target_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run directory or config file")
    p.add_argument("--top", type=int, default=10, help="how many of the best trials to list")
    p.add_argument("--stage", choices=["ps", "dfs"], default=None, help="which stage's study (default: the last)")


@command("status", "table of the best trials of a search")(_run_target_args)
def cmd_status(args: argparse.Namespace) -> int:
    import optuna
    from optuna.trial import TrialState

    from evolve.loop import counted

    cfg = resolve_run(args.run)
    study = _load_study(cfg, args.stage)
    trials = study.get_trials(deepcopy=False)
    states = {s.name: sum(t.state == s for t in trials) for s in TrialState}
    print(f"study '{cfg.name}' ({redact_url(cfg.storage_url)}): {sum(counted(t) for t in trials)}/"
          f"{cfg.search.budget.max_trials} trials; " + ", ".join(f"{k.lower()} {v}" for k, v in states.items() if v))
    complete = sorted((t for t in trials if t.state == TrialState.COMPLETE), key=lambda t: -t.value)[: args.top]
    if not complete:
        print("no complete trial yet")
        return 0
    metric_keys = sorted({k for t in complete for k in (t.user_attrs.get("metrics") or {})})
    rows = [{"trial": t.number, "fitness": t.value, **(t.user_attrs.get("metrics") or {}),
             "worker": t.user_attrs.get("worker", "")} for t in complete]
    _print_table(rows, ["trial", "fitness", *metric_keys, "worker"])
    del optuna
    return 0


@command("report", "plots and an HTML page for a search")(_run_target_args)
def cmd_report(args: argparse.Namespace) -> int:
    from evolve.report import write_report

    cfg = resolve_run(args.run)
    stage = args.stage or cfg.search.stages[-1]
    paths = write_report(_load_study(cfg, stage), cfg.run_dir / ("report" if stage == cfg.search.stages[0] else f"report-{stage}"), title=f"{cfg.name} ({stage})")
    for p in paths:
        print(f"wrote {p}")
    return 0


def _load_study(cfg: RunConfig, stage: str | None = None):
    import optuna

    from evolve.loop import study_name

    name = study_name(cfg, stage or cfg.search.stages[-1])
    try:
        return optuna.load_study(study_name=name, storage=cfg.storage_url)
    except KeyError:
        raise EvomergeError(f"no study '{name}' in {redact_url(cfg.storage_url)}; run `evolve run` first") from None


# ---- export -----------------------------------------------------------------------------------


def _export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run directory or config file")
    p.add_argument("--out", required=True, help="output directory (new or empty; see --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out (only once the new export is complete)")
    p.add_argument("--trial", type=int, default=None, help="trial number (default: the best)")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-heldout", action="store_true", help="skip scoring the export on the held-out split")
    p.add_argument("--stage", choices=["ps", "dfs"], default=None, help="which stage's study (default: the last)")


@command("export", "write the best (or a chosen) trial as an HF checkpoint + recipes + model card")(_export_args)
def cmd_export(args: argparse.Namespace) -> int:
    from evolve.export import export_trial

    cfg = resolve_run(args.run)
    out = export_trial(cfg, _load_study(cfg, args.stage), Path(args.out), trial_number=args.trial, device=args.device,
                       heldout=not args.no_heldout, overwrite=args.overwrite)
    print(f"wrote {out}")
    return 0


# ---- check / eval -----------------------------------------------------------------------------


def _check_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config")
    p.add_argument("--offline", action="store_true", help="validate structure only; open no checkpoint")


@command("check", "validate a config (and, unless --offline, the checkpoints' compatibility)")(_check_args)
def cmd_check(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    from merge_core.methods import METHODS

    if cfg.search.space.method not in METHODS:
        raise EvomergeError(f"search.space.method: '{cfg.search.space.method}' is not supported (choose from {', '.join(sorted(METHODS))})")
    for i, task in enumerate(cfg.evaluation.tasks):
        _check_task(task, f"evaluation.tasks[{i}]", offline=args.offline)
    for i, task in enumerate(cfg.evaluation.heldout_tasks):
        _check_task(task, f"evaluation.heldout_tasks[{i}]", offline=args.offline)
    if args.offline:
        print(f"{args.config}: config OK (offline: checkpoints not opened)")
        return 0
    from evolve.loop import build_space
    from merge_core.merge import check_recipe, open_models

    space = build_space(cfg)
    recipe = space.decode(space.x0)
    ckpts = open_models(recipe, allow_pickle=cfg.models.allow_pickle, trust_remote_code=cfg.models.trust_remote_code)
    check_recipe(recipe, next(iter(ckpts.values())).num_layers, where=args.config)
    print(f"{args.config}: config OK; {len(ckpts)} checkpoints compatible; search space has {space.dim} parameters")
    return 0


def _check_task(task, where: str, offline: bool) -> None:
    """Field names against the evaluator's constructor (no data loaded); data paths when online."""
    import inspect

    from evals import EVALUATOR_TYPES

    spec = task.evaluator_spec()
    params = inspect.signature(EVALUATOR_TYPES[task.type]).parameters
    unknown = sorted(set(spec) - set(params) - {"type"})
    if unknown:
        raise EvomergeError(f"{where}.{unknown[0]}: not a field of {task.type} tasks (allowed: {', '.join(sorted(params))})")
    data = spec.get("task_dir")
    if not offline and isinstance(data, str) and not Path(data).exists():
        raise EvomergeError(f"{where}.task_dir: {data} does not exist")


def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="HF checkpoint directory")
    p.add_argument("--config", required=True, help="a run config whose evaluation.tasks to score")
    p.add_argument("--split", default=None, help="split to score (default: the config's held-out split)")
    p.add_argument("--limit", type=int, default=None, help="items per task (default: all)")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")


@command("eval", "score any HF checkpoint on a config's tasks")(_eval_args)
def cmd_eval(args: argparse.Namespace) -> int:
    from evolve.baselines import score_checkpoint

    cfg = load_config(args.config)
    metrics = score_checkpoint(cfg, args.checkpoint, split=args.split or cfg.evaluation.heldout_split,
                               limit=args.limit, device=args.device)
    if args.json:
        print(json.dumps(metrics, indent=2))
    else:
        _print_table([{"metric": k, "value": v} for k, v in metrics.items()], ["metric", "value"])
    return 0


# ---- zoo --------------------------------------------------------------------------------------


def _zoo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["build"])
    p.add_argument("--out", default="data/zoo", help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", choices=["full", "ci"], default="full")


@command("zoo", "build the tiny model zoo (base, experts, task data) on this machine")(_zoo_args)
def cmd_zoo(args: argparse.Namespace) -> int:
    from evolve.zoo.build import build_zoo

    out = build_zoo(Path(args.out), seed=args.seed, size=args.size)
    print(f"wrote {out}")
    return 0
