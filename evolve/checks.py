"""Run checks: everything knowable before a search starts that the config file's schema cannot know (evaluator
fields and data, fitness metric names, method parameters, the output directory, the device, every checkpoint and
search space of the stages that will run). `evolve check` runs them, and so do `evolve run`/`resume` before they
write anything."""

from __future__ import annotations

import os
import re
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from evals import evaluator_class
from evals.data import DatasetNotCached, dataset_rows, hub_offline
from evals.lm import require_chat_template
from evolve.config import RunConfig, SourceModel, Space
from evolve.cost import task_items
from evolve.protocol import n_items, search_items
from evolve.scoring import build_evaluators, load_tokenizer
from evolve.spaces import build_space, dfs_shape_source, open_checkpoint
from merge_core.dataflow import check_compatible_configs
from merge_core.errors import EvomergeError
from merge_core.merge import open_models, resolve_device
from merge_core.methods import check_parameter
from merge_core.plan import check_recipe, setting_values
from merge_core.recipe import freeze_params
from search_spaces.ps import ps_method


def validate_run(cfg: RunConfig, *, where: str | None = None, offline: bool = False) -> list[str]:
    """Check what the config-file schema cannot: evaluator fields and data, the fitness metrics' names, fixed method
    parameters, the output directory, and (unless `offline`) every checkpoint and search space of the stages that
    will run. Called by `evolve check` and before `evolve run`/`resume` does anything: it writes nothing and opens
    no study. Raises a one-line EvomergeError (prefixed with `where`, the config file); returns one summary line
    per stage, then a "note: ..." line for each thing it could not check (a dataset not in the local cache)."""
    try:
        return _validate_run(cfg, offline)
    except EvomergeError as e:
        raise EvomergeError(f"{where}: {e}" if where else str(e)) from None


def _validate_run(cfg: RunConfig, offline: bool) -> list[str]:
    _check_fitness_metrics(cfg)
    _check_engine(cfg)
    notes, counts = _check_tasks(cfg, offline=offline)
    _check_protocols(cfg, counts)
    if "ps" in cfg.search.stages:
        _check_space_params(cfg.search.space, cfg.models.sources)
    _check_writable_dir(cfg.run_dir, "output_dir" if cfg.output_dir else "run directory")
    if not offline:
        try:
            resolve_device(cfg.execution.device)
        except EvomergeError as e:
            raise EvomergeError(f"execution.{e}") from None
    if not offline:
        _check_heldout_tokenizers(cfg)
    lines = []
    for stage in cfg.search.stages:
        _, opt, budget = cfg.search.stage(stage)
        run = f"{budget.max_trials} trials, sampler {opt.sampler}"
        lines.append(
            f"{stage}: {run} (checkpoints not opened)" if offline else f"{stage}: {_check_stage(cfg, stage)}, {run}"
        )
    return lines + [f"note: {n}" for n in notes]


def _check_engine(cfg: RunConfig) -> None:
    """`execution.engine: vllm` needs vLLM importable here (its extra, in its own environment)."""
    if cfg.execution.engine == "vllm":
        from evals.vllm_engine import INSTALL_HINT, vllm_available

        if not vllm_available():
            raise EvomergeError(f"execution.engine: vllm: vLLM is not installed in this environment; {INSTALL_HINT}")


def _check_dataset(task: Any, where: str) -> str | None:
    """A dataset task's split, fields and slice, read from disk or the local `datasets` cache only (offline mode
    forced: nothing is downloaded, nothing waits on the network); a note when the data is not there to check."""
    source = task.dataset.model_dump()
    label = f"{source['path']}" + (f" ({source['name']})" if source["name"] else "") + f" split {source['split']}"
    try:
        dataset_rows(task.type, source, offline=True)  # an empty split or selection, a null field: refused there
    except DatasetNotCached:
        return f"{where}.dataset: {label}: not cached; not checked (split, fields); `evolve run` downloads it"
    except EvomergeError as e:
        msg = str(e)
        raise EvomergeError(f"{where}.{msg}" if msg.startswith("dataset.") else f"{where}.dataset: {msg}") from None
    return None


def _check_tasks(cfg: RunConfig, offline: bool) -> tuple[list[str], dict[str, int | None]]:
    """The data files exist; dataset sources are read from disk or the local cache (never downloaded; a note for
    each not there); unless offline, the data: native evaluators are built (their data read, templates,
    extractors and language checks parsed) for the search split and the held-out split, and lm-eval task names
    are looked up. Returns the notes, and each search task's item count as its evaluator has them (offline: as
    the data files give them; None where unknown)."""
    ev = cfg.evaluation
    counts: dict[str, int | None] = {t.name: task_items(t) for t in ev.tasks}
    notes, missing = [], set()
    for group, tasks in (("tasks", ev.tasks), ("heldout_tasks", ev.heldout_tasks)):
        for i, task in enumerate(tasks):
            spec = task.evaluator_spec()
            if getattr(task, "dataset", None) is not None:
                note = _check_dataset(task, f"evaluation.{group}[{i}]")
                if note:
                    notes.append(note)
                    missing.add(task.name)
            for key in ("task_dir", "text_file"):
                if not offline and isinstance(spec.get(key), str) and not Path(spec[key]).exists():
                    raise EvomergeError(f"evaluation.{group}[{i}].{key}: {spec[key]} does not exist")
    remote = cfg.execution.backend == "ray" and bool(cfg.execution.ray_address or os.environ.get("RAY_ADDRESS"))
    if offline or remote:  # on a Ray cluster the workers read the data, perhaps from paths only they have
        return notes, counts
    with_datasets = any(getattr(t, "dataset", None) is not None for t in [*ev.tasks, *ev.heldout_tasks])
    # lm-eval's task index takes long; a dataset not cached was noted above (building would download it)
    native = lambda ts: [t for t in ts if t.type != "lm_eval" and t.name not in missing]  # noqa: E731

    def search() -> None:
        counts.update((name, n_items(e)) for name, e in build_evaluators(native(ev.tasks), seed=cfg.seed))

    for label, build in (
        ("evaluation.tasks", search),
        (
            f"evaluation.heldout_split '{ev.heldout_split}'",
            lambda: (
                build_evaluators(
                    native(ev.heldout_scored()),
                    seed=cfg.seed,
                    split=ev.heldout_split,
                    limit=ev.heldout_limit,
                    heldout=True,
                )
                if ev.heldout_split
                else None
            ),
        ),
    ):
        try:
            with hub_offline() if with_datasets else nullcontext():  # never a download
                build()
        except EvomergeError as e:
            raise EvomergeError(f"{label}: {e}") from None
    _check_lm_eval_names(cfg)
    return notes, counts


def _check_lm_eval_names(cfg: RunConfig) -> None:
    """Every lm-eval task name is one lm-eval finds (in include_path, else among its own tasks): the lookup the
    worker's evaluator makes, without loading the tasks' data."""
    from evals.lm_eval_backend import build_task_manager

    for group in ("tasks", "heldout_tasks"):
        for i, task in enumerate(getattr(cfg.evaluation, group)):
            if task.type == "lm_eval":
                try:
                    build_task_manager(task.tasks, task.include_path)
                except EvomergeError as e:
                    raise EvomergeError(f"evaluation.{group}[{i}].tasks: {e}") from None


def _check_protocols(cfg: RunConfig, counts: dict[str, int | None]) -> None:
    """Each stage's item protocol leaves every search task items to search and a batch that fits
    (`protocol.search_items`, the rule the worker applies to every trial)."""
    for stage in cfg.search.stages:
        protocol = cfg.search.protocol_of(stage)
        if protocol is None:
            continue
        for name, n in counts.items():
            if n is not None:
                search_items(n, protocol.validation, protocol.batch, name, cfg.search.protocol_path(stage))


def _check_fitness_metrics(cfg: RunConfig) -> None:
    """Each fitness metric is one its task reports (evaluator classes declare theirs: `metric_names`). lm_eval
    tasks' names come from the task YAMLs, so only their shape is checked: `<task>/<lm-eval task>/<metric>,<filter>`,
    or `<task>/<lm-eval task>` for a task given a headline metric in the task's `metrics`."""
    tasks = {t.name: t for t in cfg.evaluation.tasks}
    for field, i, full in cfg.evaluation.named_metrics():
        name, metric = full.split("/", 1)
        task = tasks[name]
        spec = {k: v for k, v in task.evaluator_spec().items() if k != "type"}
        names = evaluator_class(task.type).metric_names(**spec)
        where = f"evaluation.{field}[{i}].metric: '{full}'"
        if names is None:
            headline = metric in (spec.get("metrics") or {})
            if not headline and not re.fullmatch(r"[^/,]+/[^/,]+,[^/,]+", metric):
                raise EvomergeError(
                    f"{where}: an lm_eval task reports '{name}/<lm-eval task>/<metric>,<filter>' (e.g. "
                    f"'{name}/ja_sub/exact_match,first_word'), or '{name}/<lm-eval task>' for a task "
                    "named in its `metrics`"
                )
        elif metric not in names:
            raise EvomergeError(f"{where}: {task.type} task '{name}' reports {', '.join(names)}; no '{metric}'")


def _check_space_params(space: Space, sources: list[SourceModel]) -> None:
    """search.space: a method the PS space can search, and fixed `params` that are its parameters with valid values."""
    spec = ps_method(space.method, len(sources))
    known = set(spec.global_params) | set(spec.tensor_params)
    for key, setting in freeze_params(dict(space.params), "search.space.params"):
        if key not in known:
            raise EvomergeError(
                f"search.space.params.{key}: not a parameter of {spec.name} (known: {', '.join(sorted(known))})"
            )
        for value in setting_values(setting):
            problem = check_parameter(key, value)
            if problem:
                raise EvomergeError(f"search.space.params.{key}: {problem}")


def _check_writable_dir(path: Path, field: str) -> None:
    """`path` is, or can be created as, a directory this process can write in; checked without writing anything."""
    probe = Path(path).expanduser().absolute()
    while not probe.exists():
        if probe.is_symlink():
            raise EvomergeError(f"{field}: {path}: {probe} is a dangling symbolic link")
        probe = probe.parent
    if not probe.is_dir():
        raise EvomergeError(f"{field}: {path}: {probe} is a file, not a directory; choose another {field}")
    if os.statvfs(probe).f_flag & os.ST_RDONLY:
        raise EvomergeError(f"{field}: {path} is on a read-only file system ({probe}); choose a writable {field}")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise EvomergeError(f"{field}: {path}: no permission to write in {probe}; choose a writable {field}")


def _check_stage(cfg: RunConfig, stage: str) -> str:
    """Open the stage's checkpoints (headers and configs only) and build its space; a summary of what was checked."""
    opts = dict(allow_pickle=cfg.models.allow_pickle, trust_remote_code=cfg.models.trust_remote_code)
    if stage == "ps":
        space = build_space(cfg, "ps")
        recipe = space.decode(space.x0)
        ckpts = open_models(recipe, **opts)
        reference = ckpts[recipe.base_model or recipe.models[0]]
        check_recipe(recipe, reference.num_layers, where="search.space (its x0 recipe)")
        _check_tokenizer(cfg, reference, cfg.evaluation.tasks, "evaluation.tasks")
        return f"{len(ckpts)} checkpoints compatible, {space.dim} parameters"
    space = build_space(cfg, "dfs")  # opens A (the base while a hybrid's PS merge is not written yet) and B
    ca = open_checkpoint(cfg, dfs_shape_source(cfg))
    cb = open_checkpoint(cfg, space.model_b)
    try:  # the worker's own rule: B's layers must compute under A's config as under their own
        check_compatible_configs(ca.config.get_text_config(), cb.config.get_text_config())
    except EvomergeError as e:
        raise EvomergeError(f"search.dfs.space.model_b: {e}") from None
    va, vb = (c.config.get_text_config().vocab_size for c in (ca, cb))
    if va != vb:
        raise EvomergeError(
            f"search.dfs.space.model_b: vocab_size {vb} differs from model A's {va}; "
            "data-flow merging runs B's layers on A's embeddings and head"
        )
    _check_tokenizer(cfg, ca, cfg.evaluation.tasks, "evaluation.tasks")
    return (
        f"{space.repeats} repeats x ({space.layers_a} + {space.layers_b}) layers = {space.num_slots} slots, "
        f"{space.dim} parameters"
    )


def _check_tokenizer(cfg: RunConfig, ckpt: Any, tasks: list[Any], field: str) -> None:
    """The tokenizer `tasks` are scored with on this checkpoint loads, as the Scorer loads it, and has a chat
    template where a task asks for one."""
    tokenizer = load_tokenizer(ckpt.path, trust_remote_code=cfg.models.trust_remote_code, model=ckpt.name)
    for i, task in enumerate(tasks):
        if getattr(task, "chat_template", False):
            try:
                require_chat_template(tokenizer, ckpt.name)
            except EvomergeError as e:
                raise EvomergeError(f"{field}[{i}].{e}") from None


def _check_heldout_tokenizers(cfg: RunConfig) -> None:
    """The held-out table (and `evolve export`) scores the base and every source with its own tokenizer."""
    ev = cfg.evaluation
    if not (ev.heldout_split and ev.heldout_scored()):
        return
    for model in [cfg.models.base, *(s.path for s in cfg.models.sources)]:
        if model is not None:
            _check_tokenizer(cfg, open_checkpoint(cfg, model), ev.heldout_scored(), "evaluation.heldout_tasks")
