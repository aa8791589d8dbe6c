"""The search subcommands of `evolve`: run, resume, status, export, report, check, eval, zoo."""
from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from evolve.cli import EXIT_INTERRUPTED, command
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
    gone = f"study '{name}' is not in {redact_url(cfg.storage_url)}: nothing to resume (deleted, or never started)"
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

    from evolve.config import validate_run

    validate_run(cfg)  # every input checked before anything is written or a study opened
    stages = "; ".join(f"{s} {b.max_trials} trials, {o.sampler}" for s in cfg.search.stages for _, o, b in [cfg.search.stage(s)])
    print(f"search '{cfg.name}': storage {redact_url(cfg.storage_url)}, {stages}, backend {cfg.execution.backend}")
    with _second_interrupt_exits():
        try:
            result = run_search(cfg, progress=not args.no_progress)
            best = best_trial(result.study)
            print(f"stopped: {result.stopped_because}. best trial {best.number}: fitness {best.value:.4f} {_metrics_line(best.user_attrs.get('metrics'))}")
            if not args.no_final_table and cfg.evaluation.heldout_split:
                from evolve.baselines import heldout_table

                rows = heldout_table(cfg)
                print(f"\nheld-out ({cfg.evaluation.heldout_split} split):")
                _print_table(rows, ["model", *[k for k in rows[0] if k != "model"]])
        except KeyboardInterrupt:  # finished trials are told; trials in flight stay RUNNING and continue in place
            print(f"\ninterrupted: finished trials are recorded; `evolve resume {shlex.quote(str(cfg.run_dir))}` "
                  "continues", file=sys.stderr)
            return EXIT_INTERRUPTED
    return 0


@contextmanager
def _second_interrupt_exits() -> Iterator[None]:
    """Ctrl-C: the first raises KeyboardInterrupt (the search stops after recording what finished); a second one,
    while that is being done, exits at once (the record stays consistent: it survives SIGKILL too)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pressed = []

    def handler(signum: int, frame: Any) -> None:
        if pressed:
            os.write(2, b"\ninterrupted again: stopped at once\n")
            os._exit(EXIT_INTERRUPTED)
        pressed.append(signum)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


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
    url = cfg.storage_url
    if url.startswith("sqlite:///"):  # reading must not create an empty database (or its directory)
        from sqlalchemy.engine import make_url

        db = make_url(url).database
        if db and db != ":memory:" and not Path(db).is_file():
            raise EvomergeError(f"no study '{name}': {db} does not exist; run `evolve run` first")
    try:
        return optuna.load_study(study_name=name, storage=_read_storage(url))
    except KeyError:
        raise EvomergeError(f"no study '{name}' in {redact_url(url)}; run `evolve run` first") from None
    except Exception as e:  # noqa: BLE001 - unreachable server, missing driver, corrupt file: one line, no password
        from evolve.urls import redact_text

        cause = e
        while cause.__cause__ is not None or getattr(cause, "orig", None) is not None:
            cause = getattr(cause, "orig", None) or cause.__cause__
        missing = getattr(cause, "name", None) if isinstance(cause, ModuleNotFoundError) else None
        detail = (f"the database driver module '{missing}' is not installed" if missing else
                  f"{type(cause).__name__}: {' '.join(redact_text(str(cause), url).split())[:200]}")
        raise EvomergeError(f"storage {redact_url(url)}: cannot open ({detail})") from None


CONNECT_TIMEOUT_S = 10


def _read_storage(url: str):
    """An RDB storage for reading a study; a server that does not answer fails within CONNECT_TIMEOUT_S."""
    from optuna.storages import RDBStorage

    network = url.split(":", 1)[0].split("+", 1)[0] in ("postgresql", "mysql")
    kwargs = {"connect_args": {"connect_timeout": CONNECT_TIMEOUT_S}} if network else {}
    return RDBStorage(url, engine_kwargs=kwargs, skip_table_creation=True) if network else url


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
    from evolve.config import validate_run

    cfg = load_config(args.config)
    stages = validate_run(cfg, where=args.config, offline=args.offline)
    print(f"{args.config}: config OK{' (offline: checkpoints not opened)' if args.offline else ''}; " + "; ".join(stages))
    return 0


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
