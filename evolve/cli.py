"""The `evolve` command: merge, run, resume, status, report, export, check, eval. User errors print one line and exit
2. Modules that import torch or Optuna are imported inside the commands, so `evolve --help` stays fast."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shlex
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from evolve.config import RunConfig, load_config, parse_config
from evolve.urls import redact_url
from merge_core.errors import EvomergeError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a Ctrl-C


# ---- evolve merge -----------------------------------------------------------------------------


def cmd_merge(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from merge_core.merge import run_merge
    from merge_core.recipe import MergeRecipe

    recipe = MergeRecipe.load(args.recipe)
    out = run_merge(
        recipe,
        args.out,
        device=args.device,
        allow_pickle=args.allow_pickle,
        trust_remote_code=args.trust_remote_code,
        max_shard_bytes=parse_size(args.shard_size, "--shard-size"),
        progress=lambda names: tqdm(list(names), desc=f"merging ({recipe.merge_method})", unit="tensor"),
        overwrite=args.overwrite,
    )
    print(f"wrote {out}")
    return 0


def parse_size(text: str, what: str) -> int:
    """'5GB', '500MB', '1.5GiB' -> bytes; a positive size of at least one byte, or a one-line error."""
    units = {
        "KB": 10**3,
        "MB": 10**6,
        "GB": 10**9,
        "TB": 10**12,
        "KIB": 2**10,
        "MIB": 2**20,
        "GIB": 2**30,
        "TIB": 2**40,
        "B": 1,
    }
    t = text.strip().upper()
    for unit in sorted(units, key=len, reverse=True):
        if t.endswith(unit):
            try:
                number = float(t[: -len(unit)])
            except ValueError:
                break
            if not math.isfinite(number) or number * units[unit] < 1:
                raise EvomergeError(f"{what}: '{text}' must be a positive size such as 5GB or 500MB")
            return int(number * units[unit])
    raise EvomergeError(f"{what}: '{text}' is not a size such as 5GB or 500MB")


def positive(value: int | None, flag: str, what: str) -> int | None:
    """A count given on the command line: None (not given) or at least 1, else a one-line error naming the flag."""
    if value is not None and value < 1:
        raise EvomergeError(f"{flag}: {value} is not a positive number of {what}; give 1 or more")
    return value


# ---- run / resume -----------------------------------------------------------------------------


def resolve_run(target: str) -> RunConfig:
    """A config file, or a run directory holding the config.yaml that `evolve run` saved there."""
    p = Path(target)
    if p.is_dir():
        if not (p / "config.yaml").is_file():
            raise EvomergeError(f"{p}: not a run directory (no config.yaml); pass the run's config file")
        return load_config(p / "config.yaml").in_run_dir(p)  # its study.db is the one next to it
    return load_config(p)


def cmd_run(args: argparse.Namespace) -> int:
    return _search(with_overrides(resolve_run(args.config), seed=args.seed, name=args.name), args)


def with_overrides(cfg: RunConfig, *, seed: int | None = None, name: str | None = None) -> RunConfig:
    """`evolve run --seed/--name`: a changed seed gets its own run directory, so it never continues another seed's
    study.

    A renamed run's directory is named after it, next to the original one (runs/NEW, or beside output_dir or the
    run directory the config was read from)."""
    if seed is None and name is None:
        return cfg
    data = cfg.model_dump(mode="json")
    if seed is not None and seed != cfg.seed:
        data["seed"] = seed
        data["name"] = f"{cfg.name}-seed{seed}"
    if name is not None:
        data["name"] = name
    if data["name"] == cfg.name:  # the same run: the same run directory
        return parse_config(data, where="--seed/--name").in_run_dir(cfg.run_dir)
    if cfg.output_dir is not None or cfg.run_dir != Path(f"runs/{cfg.name}"):
        data["output_dir"] = str(cfg.run_dir.parent / data["name"])
    return parse_config(data, where="--seed/--name")


def cmd_resume(args: argparse.Namespace) -> int:
    cfg = resolve_run(args.config)
    if not (cfg.run_dir / "config.yaml").is_file() and cfg.storage is None:
        raise EvomergeError(f"{cfg.run_dir}: no search to resume there yet; use `evolve run`")
    if not args.restart:
        _require_study(cfg)
    return _search(cfg, args)


def _require_study(cfg: RunConfig) -> None:
    """Resume continues a study: refuse, in one line, when it is gone (a new one would start silently)."""
    import optuna

    from evolve.study import cannot_open, missing_database, read_storage, study_name

    name = study_name(cfg, cfg.search.stages[0])
    hint = "pass --restart to start the search over (or restore the study)"
    db = missing_database(cfg.storage_url)
    if db:
        raise EvomergeError(f"{cfg.run_dir}: the search's database {db} does not exist; {hint}")
    try:
        names = optuna.study.get_all_study_names(storage=read_storage(cfg.storage_url))
    except Exception as e:  # noqa: BLE001 - any storage failure: one line, no password
        raise cannot_open(cfg.storage_url, e) from None
    if name not in names:
        raise EvomergeError(
            f"study '{name}' is not in {redact_url(cfg.storage_url)}: nothing to resume (deleted, or "
            f"never started); {hint}"
        )


def _search(cfg: RunConfig, args: argparse.Namespace) -> int:
    from evolve.checks import validate_run
    from evolve.cost import cost_lines
    from evolve.loop import run_search
    from evolve.pareto import is_multi
    from evolve.study import best_trial, rescored

    validate_run(cfg)  # every input checked before anything is written or a study opened
    stages = "; ".join(
        f"{s} {b.max_trials} trials, {o.sampler}" for s in cfg.search.stages for _, o, b in [cfg.search.stage(s)]
    )
    print(f"search '{cfg.name}': storage {redact_url(cfg.storage_url)}, {stages}, backend {cfg.execution.backend}")
    for line in cost_lines(cfg):
        print(line)
    with _second_interrupt_exits():
        try:
            result = run_search(cfg, progress=not args.no_progress, accept_config_change=args.accept_config_change)
            best = best_trial(result.study)
            r = rescored(result.study).get(best.number)
            if is_multi(result.study.directions):  # several objectives: the front, and its balanced member
                from evolve.front import front_summary

                print(f"stopped: {result.stopped_because}. {front_summary(result.study, cfg)}")
            else:
                print(
                    f"stopped: {result.stopped_because}. best trial {best.number}: fitness {best.value:.4f} "
                    f"{_metrics_line(best.user_attrs.get('metrics'))}"
                    + (f"; re-scored on {r['items_scored']} items: fitness {r['fitness']:.4f}" if r else "")
                )
            if not args.no_final_table and cfg.evaluation.heldout_split and cfg.evaluation.heldout_scored():
                from evolve.baselines import heldout_table

                rows = heldout_table(cfg)
                print(f"\nheld-out ({cfg.evaluation.heldout_split} split) [95% bootstrap interval over items]:")
                _print_table(rows, ["model", *[k for k in rows[0] if k != "model" and not k.startswith("_")]])
                _print_comparisons(rows)
        except KeyboardInterrupt:  # finished trials are told; trials in flight stay RUNNING and continue in place
            print(
                f"\ninterrupted: finished trials are recorded; `evolve resume {shlex.quote(str(cfg.run_dir))}` "
                "continues",
                file=sys.stderr,
            )
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


def _print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    rows = [{k: _with_interval(v, (r.get("_ci") or {}).get(k)) for k, v in r.items()} for r in rows]
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    print("  ".join("-" * widths[c] for c in columns))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(widths[c]) for c in columns))


def _print_comparisons(rows: list[dict[str, Any]]) -> None:
    from evolve.baselines import heldout_comparisons

    for label, comparison in heldout_comparisons(rows):
        print(comparison.line(label))


def _with_interval(value: Any, ci: tuple[float, float] | None) -> Any:
    return value if ci is None or not isinstance(value, float) else f"{value:.4f} [{ci[0]:.4f}, {ci[1]:.4f}]"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    return "" if v is None else str(v)


# ---- status / report / export -----------------------------------------------------------------


def cmd_status(args: argparse.Namespace) -> int:
    from optuna.trial import TrialState

    from evolve.config_edits import check_study_config
    from evolve.items import decode_items, items_scored, tokens_generated
    from evolve.pareto import is_multi
    from evolve.stats import metric_intervals
    from evolve.study import best_first, best_trial, counted, load_study, rescored

    positive(args.top, "--top", "trials")
    cfg = resolve_run(args.run)
    stage = args.stage or cfg.search.stages[-1]
    study = load_study(cfg, stage)
    check_study_config(cfg, study)
    trials = study.get_trials(deepcopy=False)
    states = {s.name: sum(t.state == s for t in trials) for s in TrialState}
    print(
        f"study '{study.study_name}' ({redact_url(cfg.storage_url)}): {sum(counted(t) for t in trials)}/"
        f"{cfg.search.stage(stage)[2].max_trials} trials; "
        + ", ".join(f"{k.lower()} {v}" for k, v in states.items() if v)
    )
    print(_spending(trials, items_scored, tokens_generated))
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    if pruned:
        used = sum(items_scored(t.user_attrs.get("items")) for t in pruned)
        print(
            f"stopped early by racing: {len(pruned)} trials, {used} items in all; latest: trial {pruned[-1].number}, "
            f"{pruned[-1].user_attrs.get('stopped', '')}"
        )
    if is_multi(study.directions):  # several objectives: the Pareto front instead of a ranking
        from evolve.front import print_front

        print_front(study, cfg, _print_table)
        return 0
    complete = best_first(trials)[: args.top]
    if not complete:
        print("no complete trial yet")
        return 0
    rescores = rescored(study)
    terms = cfg.evaluation.fitness
    metric_keys = sorted({k for t in complete for k in (t.user_attrs.get("metrics") or {})})
    rows = []
    for t in complete:
        items = t.user_attrs.get("items")
        ci = metric_intervals(decode_items(items), terms) if items else {}
        row = {
            "trial": t.number,
            "fitness": t.value,
            **(t.user_attrs.get("metrics") or {}),
            "items": items_scored(items) or None,
            "rescored": (rescores.get(t.number) or {}).get("fitness"),
            "worker": t.user_attrs.get("worker", ""),
            "_ci": ci,
        }
        rows.append(row)
    columns = ["trial", "fitness", *metric_keys, "items", *(["rescored"] if rescores else []), "worker"]
    print("[95% bootstrap intervals over the items each trial scored]")
    _print_table(rows, columns)
    if rescores:
        pick = best_trial(study)
        r = rescores[pick.number]
        print(
            f"pick: trial {pick.number}, re-scored fitness {r['fitness']:.4f} on {r['items_scored']} items "
            f"(search fitness {pick.value:.4f}); {len(rescores)} elites re-scored"
        )
    return 0


def _spending(trials: list, items_scored: Callable, tokens_generated: Callable) -> str:
    """Items scored, tokens generated and candidates per hour over the study's finished trials."""
    from evolve.study import candidates_per_hour

    done = [t for t in trials if t.datetime_complete is not None]
    items = sum(items_scored(t.user_attrs.get("items")) for t in done)
    tokens = sum(tokens_generated(t.user_attrs.get("items")) for t in done)
    rate = candidates_per_hour(done)
    rate = f"{rate:.0f} candidates/hour" if rate else "candidates/hour unknown"
    return f"spent: {items} items scored, {tokens} tokens generated, {rate}"


def cmd_report(args: argparse.Namespace) -> int:
    from evolve.config_edits import check_study_config
    from evolve.pareto import is_multi
    from evolve.report import write_report
    from evolve.study import load_study

    positive(args.top, "--top", "trials")
    cfg = resolve_run(args.run)
    stage = args.stage or cfg.search.stages[-1]
    out = cfg.run_dir / ("report" if stage == cfg.search.stages[0] else f"report-{stage}")
    study = load_study(cfg, stage)
    check_study_config(cfg, study)
    heldout = None
    if is_multi(study.directions) and not args.no_heldout:  # the front members' held-out scores (kept in the study)
        from evolve.front import front_heldout

        heldout = front_heldout(cfg, study)
    title = f"{cfg.name} ({stage})"
    for p in write_report(study, out, title=title, reference=cfg.evaluation.reference_point, heldout=heldout):
        print(f"wrote {p}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from evolve.config_edits import check_study_config
    from evolve.export import check_out, export_trial
    from evolve.study import load_study

    cfg = resolve_run(args.run)
    check_out(cfg, Path(args.out))  # before the study is read
    study = load_study(cfg, args.stage)
    check_study_config(cfg, study)
    out = export_trial(
        cfg,
        study,
        Path(args.out),
        trial_number=args.trial,
        device=args.device,
        heldout=not args.no_heldout,
        overwrite=args.overwrite,
    )
    print(f"wrote {out}")
    return 0


# ---- check / eval -----------------------------------------------------------------------------


def cmd_check(args: argparse.Namespace) -> int:
    from evolve.checks import validate_run
    from evolve.cost import cost_lines

    cfg = load_config(args.config)
    lines = validate_run(cfg, where=args.config, offline=args.offline)
    stages = [line for line in lines if not line.startswith("note: ")]
    print(
        f"{args.config}: config OK{' (offline: checkpoints not opened)' if args.offline else ''}; " + "; ".join(stages)
    )
    for line in lines[len(stages) :]:
        print(f"{args.config}: {line}")
    for line in cost_lines(cfg, measured=not args.offline):
        print(f"{args.config}: {line}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from evolve.baselines import score_checkpoint

    positive(args.limit, "--limit", "items")
    cfg = load_config(args.config)
    metrics, _ = score_checkpoint(
        cfg,
        args.checkpoint,
        split=args.split or cfg.evaluation.heldout_split,
        limit=args.limit,
        limit_mode=args.limit_mode,
        device=args.device,
    )
    if args.json:
        print(json.dumps(metrics, indent=2))
    else:
        _print_table([{"metric": k, "value": v} for k, v in metrics.items()], ["metric", "value"])
    return 0


# ---- entry point ------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="evolve", description="Evolutionary optimization of model-merge recipes.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, func, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(func=func)
        return p

    p = command("merge", cmd_merge, "apply one recipe (ours or mergekit's) and write an HF checkpoint")
    p.add_argument("recipe", help="recipe YAML (evomerge's or a mergekit config)")
    p.add_argument(
        "--out", required=True, help="output directory for the HF checkpoint (new or empty; see --overwrite)"
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace a non-empty --out (only once the new checkpoint is complete)"
    )
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda when present)")
    p.add_argument("--shard-size", default="5GB", help="maximum shard size, e.g. 2GB or 500MB")
    p.add_argument(
        "--allow-pickle", action="store_true", help="allow reading pickled .bin checkpoints (runs code from the file)"
    )
    p.add_argument("--trust-remote-code", action="store_true", help="allow models whose config needs remote code")

    run = command("run", cmd_run, "search merge recipes for a config (continues the study if it exists)")
    resume = command("resume", cmd_resume, "continue a killed or finished search (RUN_DIR or config)")
    for p in (run, resume):
        p.add_argument("config", help="run config YAML (or, for resume, a run directory)")
        p.add_argument("--no-progress", action="store_true", help="no live progress line")
        p.add_argument("--no-final-table", action="store_true", help="skip the held-out table at the end")
        p.add_argument(
            "--accept-config-change",
            action="store_true",
            help="continue a study under a config whose fields that decide what a trial means (models, space, "
            "sampler, seed, tasks, fitness, protocol, racing, ...) changed since it ran; without it such a change is "
            "refused (budget, execution, storage, output_dir and held-out settings may always change)",
        )
    run.add_argument(
        "--seed",
        type=int,
        default=None,
        help="override the config's seed; the run is then named NAME-seedN unless --name is given",
    )
    run.add_argument(
        "--name", default=None, help="override the config's name (and so its run directory and default storage)"
    )
    resume.add_argument(
        "--restart", action="store_true", help="start the search over when its study is gone (default: refuse)"
    )

    for p in (
        command("status", cmd_status, "table of the best trials of a search"),
        command("report", cmd_report, "plots and an HTML page for a search"),
    ):
        p.add_argument("run", help="run directory or config file")
        p.add_argument("--top", type=int, default=10, help="how many of the best trials to list")
        p.add_argument("--stage", choices=["ps", "dfs"], default=None, help="which stage's study (default: the last)")
    p.add_argument(
        "--no-heldout", action="store_true", help="several objectives: skip scoring the front members held out"
    )

    p = command("export", cmd_export, "write the best (or a chosen) trial as an HF checkpoint + recipes + model card")
    p.add_argument("run", help="run directory or config file")
    p.add_argument("--out", required=True, help="output directory (new or empty; see --overwrite)")
    p.add_argument(
        "--overwrite", action="store_true", help="replace a non-empty --out (only once the new export is complete)"
    )
    p.add_argument("--trial", type=int, default=None, help="trial number (default: the best)")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-heldout", action="store_true", help="skip scoring the export on the held-out split")
    p.add_argument("--stage", choices=["ps", "dfs"], default=None, help="which stage's study (default: the last)")

    p = command("check", cmd_check, "validate a config (and, unless --offline, the checkpoints' compatibility)")
    p.add_argument("config")
    p.add_argument("--offline", action="store_true", help="validate structure only; open no checkpoint")

    p = command("eval", cmd_eval, "score any HF checkpoint on a config's tasks")
    p.add_argument("checkpoint", help="HF checkpoint directory")
    p.add_argument("--config", required=True, help="a run config whose evaluation.tasks to score")
    p.add_argument("--split", default=None, help="split to score (default: the config's held-out split)")
    p.add_argument(
        "--limit",
        type=int,
        default=None,
        help="items per task (default: all; else the config's heldout_limit): a random sample seeded by the "
        "config's seed, the same items every time, unless --limit-mode first",
    )
    p.add_argument(
        "--limit-mode",
        choices=["sample", "first"],
        default=None,
        help="how a limit picks items: sample (seeded random, evomerge's default) or first (the first N in file "
        "order, as lm_eval --limit does); default: each task's limit_mode (sample)",
    )
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    if args.func is not cmd_merge:  # the other commands use studies: no INFO line from Optuna per trial
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        # Optuna's GP sampler warns once, at import, that without the optional `greenlet` package it runs its
        # L-BFGS-B restarts one after another. That path is the one evomerge ships and measured (greenlet's batched
        # path changes the GP search: the Pareto demo's front went from 7 to 14 members here), so it is no news.
        logging.getLogger("optuna._gp.batched_lbfgsb").addFilter(lambda record: "greenlet" not in record.getMessage())
    try:
        return int(args.func(args) or 0)
    except EvomergeError as e:
        print(f"error: {redact_url(' '.join(str(e).split()))}", file=sys.stderr)  # a URL a library quoted, too
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `evolve status | head`: the reader left; no traceback, and none at exit either
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
