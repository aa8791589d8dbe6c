"""What a search will cost before it runs: items scored and tokens generated per candidate and per stage, and,
once trials of this run have been measured on this machine, the time the rest will take.

Generated tokens are an upper bound (every answer run to `max_new_tokens`; greedy decoding stops earlier at EOS or
a stop string). Item counts come from the task data where it is readable without a download (JSONL files, a
`datasets` folder or cache); otherwise they are stated as unknown.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

from optuna.trial import TrialState

from evals.data import DatasetNotCached, dataset_rows, read_jsonl, split_path
from evolve.config import RunConfig
from evolve.protocol import search_items
from evolve.study import load_study
from merge_core.errors import EvomergeError


@dataclass
class TaskCost:
    name: str
    items: int | None  # per candidate (None: unknown here)
    max_new_tokens: int  # 0: nothing generated (choice, perplexity)


def task_items(task: Any) -> int | None:
    """How many items of `task` a candidate is scored on (its limit applied); its limit alone (None: unknown) when
    the data is not read here (an lm-eval or perplexity task, a hub dataset not cached)."""
    if task.type in ("lm_eval", "perplexity"):
        return task.limit
    try:
        if getattr(task, "dataset", None) is not None:
            n = len(dataset_rows(task.type, task.dataset.model_dump(), offline=True))
        else:
            n = len(read_jsonl(split_path(task.task_dir, task.split)))
    except (DatasetNotCached, EvomergeError, OSError):
        return task.limit
    return n if task.limit is None else min(n, task.limit)


def stage_cost(cfg: RunConfig, stage: str) -> tuple[list[TaskCost], str]:
    """Per task, what one candidate of `stage` scores; and a note on the protocol (batches, validation)."""
    protocol = cfg.search.protocol_of(stage)
    out, notes = [], []
    for task in cfg.evaluation.tasks:
        n = task_items(task)
        if protocol is not None and n is None and protocol.batch is not None:
            n = protocol.batch  # the worker refuses a task with fewer search items
        elif protocol is not None and n is not None:
            n = search_items(n, protocol.validation, protocol.batch, task.name, cfg.search.protocol_path(stage))
        out.append(TaskCost(task.name, n, getattr(task, "max_new_tokens", 0) if task.type == "generation" else 0))
    if protocol is not None and protocol.batch is not None:
        notes.append(f"a batch of {protocol.batch} items per task, new every {protocol.every} trials")
    if protocol is not None and protocol.validation:
        notes.append(f"then the top {protocol.top_k} re-scored on the last {protocol.validation} items of each task")
    if cfg.evaluation.racing is not None:
        r = cfg.evaluation.racing
        notes.append(
            f"racing: a candidate that cannot beat the incumbent stops after {r.min_items}+ items, in chunks of "
            f"{r.chunk}, so these are upper bounds"
        )
    if cfg.evaluation.rescore is not None:
        notes.append(f"then the top {cfg.evaluation.rescore.top_k} re-scored on more items")
    return out, "; ".join(notes)


def _num(x: float) -> str:
    return f"{x:,.0f}" if x < 1e7 else f"{x:.3g}"


def cost_lines(cfg: RunConfig, *, measured: bool = True) -> list[str]:
    """One line per stage: items and (at most) generated tokens per candidate and for the stage's trial budget;
    then what has been measured on this machine (seconds per candidate, ETA), or that nothing has; then whether
    the configured device is here."""
    lines = []
    for stage in cfg.search.stages:
        _, _, budget = cfg.search.stage(stage)
        tasks, note = stage_cost(cfg, stage)
        known = all(t.items is not None for t in tasks)
        items = sum(t.items or 0 for t in tasks)
        tokens = sum((t.items or 0) * t.max_new_tokens for t in tasks)
        per = (
            f"{_num(items)} items, at most {_num(tokens)} generated tokens"
            if known
            else "items not known here (data not cached): "
            + ", ".join(
                f"{t.name}: {_num(t.items) if t.items is not None else '?'} items"
                + (f" x at most {t.max_new_tokens} new tokens" if t.max_new_tokens else "")
                for t in tasks
            )
        )
        total = (
            f"; {budget.max_trials} trials: {_num(items * budget.max_trials)} items, at most "
            f"{_num(tokens * budget.max_trials)} tokens"
            if known
            else f"; {budget.max_trials} trials"
        )
        lines.append(f"cost: {stage}: per candidate {per}{total}" + (f" ({note})" if note else ""))
        if measured:
            lines.append(f"cost: {stage}: {measured_eta(cfg, stage, budget.max_trials)}")
    gpu = device_note(cfg)
    if gpu:
        lines.append(f"cost: {gpu}")
    return lines


def measured_eta(cfg: RunConfig, stage: str, max_trials: int) -> str:
    """Seconds per candidate measured by this run's own trials (merge + evaluation, median), and the time left."""
    try:
        study = load_study(cfg, stage)
        trials = study.get_trials(deepcopy=False)
    except Exception:  # noqa: BLE001 - no study yet (or unreadable): nothing measured
        return "not measured on this machine yet (the progress line of `evolve run` shows the rate and ETA)"
    timed = [
        t.user_attrs["merge_seconds"] + t.user_attrs["eval_seconds"]
        for t in trials
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
        and "cached_from" not in t.user_attrs
        and "eval_seconds" in t.user_attrs
    ]
    if not timed:
        return "not measured on this machine yet (the progress line of `evolve run` shows the rate and ETA)"
    sec = statistics.median(timed)
    done = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL) for t in trials)
    left = max(max_trials - done, 0) * sec / cfg.execution.workers
    return (
        f"measured {sec:.2f} s per candidate (median of {len(timed)} trials of this run); {done} of {max_trials} "
        f"done, about {_duration(left)} left with {cfg.execution.workers} worker(s)"
    )


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def device_note(cfg: RunConfig) -> str | None:
    """Whether the configured device is on this machine: a config that asks for CUDA here, without one, is a GPU
    job, said plainly."""
    import torch

    device = cfg.execution.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        return (
            f"execution.device is {device} and this machine has no CUDA device: this config is a GPU job; run it "
            "on a machine with one (`evolve check` here validates it)"
        )
    return None
