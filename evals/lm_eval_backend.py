"""lm-eval backend: score the live model on lm-evaluation-harness tasks, and write lm-eval YAML for our JSONL tasks.

Built once per worker: the TaskManager (defaults indexed only when a task is not in `include_path`)
and the task dict. Each call wraps the live model in `HFLM(pretrained=model)` (reused while the same
model object comes back) and runs `lm_eval.evaluator.evaluate` with request caching off, so in-place
weight updates are always seen. `simple_evaluate` is avoided: it re-probes the environment per call.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml
from transformers import PreTrainedModel, PreTrainedTokenizerBase

import evals.spec as spec
from evals.base import Evaluator, ItemScores
from evals.data import split_path, subsample_indices
from evals.extract import FIRST_WORD_PATTERN, NUMBER_PATTERN
from evals.lm import PROMPT_FIELD, check_template
from merge_core.errors import EvomergeError

log = logging.getLogger(__name__)

SPLITS = ("train", "dev", "test")


def build_task_manager(tasks: Sequence[str], include_path: str | Path | Sequence[str | Path] | None) -> Any:
    """A TaskManager over `include_path`; lm-eval's ~15k built-in tasks are indexed only if a task is not found
    there."""
    from lm_eval.tasks import TaskManager

    paths = [str(p) for p in ([include_path] if isinstance(include_path, (str, Path)) else include_path or [])]
    for path in paths:
        if not Path(path).exists():
            raise EvomergeError(f"lm_eval include_path does not exist: {path}")
    if paths:
        manager = TaskManager(include_path=paths, include_defaults=False)
        if all(t in manager.all_tasks for t in tasks):
            return manager
    manager = TaskManager(include_path=paths or None, include_defaults=True)
    missing = [t for t in tasks if t not in manager.all_tasks]
    if missing:
        raise EvomergeError(f"lm_eval tasks not found: {missing} (check the task names and include_path {paths})")
    return manager


def load_task_dict(tasks: Sequence[str], manager: Any) -> dict[Any, Any]:
    """The tasks loaded once: `TaskManager.load` where lm-eval has it, else the older `get_task_dict`."""
    if hasattr(manager, "load"):
        return manager.load(list(tasks))
    from lm_eval.tasks import get_task_dict

    return get_task_dict(list(tasks), manager)


def leaf_tasks(task_dict: Mapping[Any, Any]) -> dict[str, Any]:
    """The Task objects of a task dict, groups flattened (both the legacy nested and the {"tasks": ...} form)."""
    found: dict[str, Any] = {}
    for key, value in task_dict.items():
        if isinstance(value, Mapping):
            found |= leaf_tasks(value)
        elif hasattr(value, "eval_docs"):
            found[str(key)] = value
    return found


def numeric_results(results: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """``{"<task>/<metric>,<filter>": value}`` for every numeric, non-stderr metric (``sample_len`` etc. dropped)."""
    flat: dict[str, float] = {}
    for task, metrics in results.items():
        for key, value in metrics.items():
            if "," not in key or "_stderr" in key or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            flat[f"{task}/{key}"] = float(value)
    return flat


class LmEvalEvaluator(Evaluator):
    """lm-eval tasks scored on the live model.

    Returns every ``"<task>/<metric>,<filter>"`` (e.g. ``"ja_sub/exact_match,first_word"``) and, for each
    entry of `metrics` (task -> ``"<metric>,<filter>"`` or ``[metric, filter]``), the headline ``"<task>"``.
    `limit` draws the same items as the native evaluators (`subsample_indices(n, limit, seed, limit_mode)`): a
    seeded sample, or with `limit_mode="first"` lm-eval's first `limit`.
    """

    def __init__(
        self,
        tasks: Sequence[str],
        *,
        include_path: str | Path | Sequence[str | Path] | None = None,
        metrics: Mapping[str, str | Sequence[str]] | None = None,
        name: str = "lm_eval",
        limit: int | None = None,
        limit_mode: str = spec.LIMIT_MODE,
        seed: int = 0,
        batch_size: int = spec.BATCH_SIZE,
        num_fewshot: int | None = None,
        max_length: int | None = None,
    ) -> None:
        if isinstance(tasks, str) or not tasks:
            raise EvomergeError(f"lm_eval tasks must be a non-empty list of task names, got {tasks!r}")
        self.name = name
        self.tasks = list(tasks)
        self.metrics = {t: m if isinstance(m, str) else ",".join(m) for t, m in (metrics or {}).items()}
        unknown = sorted(set(self.metrics) - set(self.tasks))
        if unknown:
            raise EvomergeError(f"lm_eval metrics name tasks that are not evaluated: {unknown} (tasks: {self.tasks})")
        self.batch_size = batch_size
        self.max_length = max_length
        self.task_dict = load_task_dict(self.tasks, build_task_manager(self.tasks, include_path))
        self._configure_tasks(num_fewshot, seed)
        self.samples = self._sample_indices(limit, seed, limit_mode)
        self._lm: Any = None
        self._lm_for: tuple[int, int] | None = None

    @classmethod
    def metric_names(cls, **_: Any) -> None:
        """Unknown before the tasks run: ``<task>/<metric>,<filter>`` names come from the task YAMLs (see the class
        docstring); `validate_run` checks their shape only."""
        return None

    def _leaf_tasks(self) -> dict[str, Any]:
        return leaf_tasks(self.task_dict)

    def _configure_tasks(self, num_fewshot: int | None, seed: int) -> None:
        """Set the shot count (as simple_evaluate does: a config's explicit 0 wins) and the few-shot seed."""
        for task in self._leaf_tasks().values():
            configured = task.get_config("num_fewshot")
            if num_fewshot is not None and configured != 0:
                task.set_config(key="num_fewshot", value=num_fewshot)
            elif configured is None:
                task.set_config(key="num_fewshot", value=0)
            task.set_fewshot_seed(seed=seed)

    def _sample_indices(self, limit: int | None, seed: int, mode: str) -> dict[str, list[int]] | None:
        if limit is None:
            return None
        return {
            name: subsample_indices(len(task.eval_docs), limit, seed, mode) for name, task in self._leaf_tasks().items()
        }

    def lm(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> Any:
        """The HFLM wrapping this live model (rebuilt only when a different model or tokenizer object arrives)."""
        from lm_eval.models.huggingface import HFLM

        key = (id(model), id(tokenizer))
        if self._lm is None or self._lm_for != key or self._lm.model is not model:
            extra = {"max_length": self.max_length} if self.max_length else {}
            self._lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=self.batch_size, **extra)
            self._lm_for = key
        return self._lm

    def evaluate(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> dict[str, float]:
        return self._run(model, tokenizer, log_samples=False)[0]

    def evaluate_items(
        self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase
    ) -> tuple[dict[str, float], dict[str, ItemScores]]:
        """`evaluate`'s metrics and, per leaf task, its per-sample values (`per_sample_scores`) from lm-eval's logged
        samples: the items of the held-out table's intervals and paired tests."""
        metrics, output = self._run(model, tokenizer, log_samples=True)
        return metrics, per_sample_scores(output.get("samples") or {}, self._leaf_tasks())

    def item_counts(self) -> dict[str, int]:
        """Items per leaf task (its `limit` draw, or every evaluation document)."""
        return {
            name: len(self.samples[name]) if self.samples else len(task.eval_docs)
            for name, task in self._leaf_tasks().items()
        }

    def _run(
        self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, *, log_samples: bool
    ) -> tuple[dict[str, float], dict[str, Any]]:
        from lm_eval.evaluator import evaluate

        with tasks_set_generation_length(model):
            output = evaluate(
                self.lm(model, tokenizer),
                self.task_dict,
                samples=self.samples,
                cache_requests=False,
                bootstrap_iters=0,
                log_samples=log_samples,
            )
        flat = numeric_results(output["results"])
        for task, key in self.metrics.items():
            if f"{task}/{key}" not in flat:
                available = sorted(k.split("/", 1)[1] for k in flat if k.startswith(f"{task}/"))
                raise EvomergeError(f"lm_eval metrics.{task}: {key!r} not in the results (available: {available})")
            flat[task] = flat[f"{task}/{key}"]
        return flat, output


@contextmanager
def tasks_set_generation_length(model: PreTrainedModel) -> Iterator[None]:
    """lm-eval asks for each task's generation length as `max_length`; a `max_new_tokens` in the model's generation
    config (a checkpoint's generation_config.json) would take precedence in transformers, so it is lifted meanwhile."""
    config = getattr(model, "generation_config", None)
    shipped = getattr(config, "max_new_tokens", None)
    if shipped is not None:
        config.max_new_tokens = None
    try:
        yield
    finally:
        if shipped is not None:
            config.max_new_tokens = shipped


def per_sample_scores(samples: Mapping[str, Sequence[Mapping[str, Any]]], leaves: Mapping[str, Any]) -> dict:
    """``{leaf task: ItemScores}`` from lm-eval's logged samples: for every metric the task aggregates by a plain
    mean (exact_match, acc, acc_norm, ...), its value on each document, keyed ``"<metric>,<filter>"`` like the
    results (so ``"<task>/<leaf>/<metric>,<filter>"`` names the same number in both), documents in doc_id order.
    Metrics aggregated otherwise (corpus BLEU, F1, perplexity) have no per-item form and are left out."""
    from lm_eval.api.metrics import mean

    out: dict[str, ItemScores] = {}
    for leaf, rows in samples.items():
        task = leaves.get(leaf)
        if task is None:
            continue
        averaged = {m for m, fn in task.aggregation().items() if fn is mean}
        by_key: dict[str, dict[int, float]] = {}
        for row in rows:
            for metric in row.get("metrics", ()):
                value = row.get(metric)
                if metric in averaged and isinstance(value, (int, float)):
                    by_key.setdefault(f"{metric},{row['filter']}", {})[int(row["doc_id"])] = float(value)
        docs = sorted({d for values in by_key.values() for d in values})
        values = {k: [v[d] for d in docs] for k, v in by_key.items() if len(v) == len(docs)}
        if values:
            out[leaf] = ItemScores(0, values)
    return out


# ---------------------------------------------------------------- YAML for our JSONL tasks


def _jinja_template(prompt_template: str | None) -> str:
    """Our ``{prompt}`` template as Jinja (literal pieces containing braces are wrapped in raw blocks)."""
    if prompt_template is None:
        return "{{prompt}}"
    pieces = [f"{{% raw %}}{p}{{% endraw %}}" if "{" in p else p for p in prompt_template.split(PROMPT_FIELD)]
    return "{{prompt}}".join(pieces)


def _answer_filter(extract: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(filter entry, exact_match options) reproducing a native extractor: "first_word", "last_number" or a regex."""
    if extract == "first_word":
        steps = [{"function": "regex", "regex_pattern": FIRST_WORD_PATTERN}]
        return {"name": "first_word", "filter": steps + [{"function": "take_first"}]}, {}
    if extract == "last_number":
        steps = [{"function": "regex", "regex_pattern": f"({NUMBER_PATTERN})", "group_select": -1}]
        return {"name": "last_number", "filter": steps + [{"function": "take_first"}]}, {"regexes_to_ignore": [","]}
    steps = [{"function": "regex", "regex_pattern": extract}]
    return {"name": "regex", "filter": steps + [{"function": "take_first"}]}, {}


def jsonl_task_config(
    task_name: str,
    data_dir: str | Path,
    *,
    split: str = "test",
    stop: Sequence[str] = (),
    extract: str = "first_word",
    max_new_tokens: int = spec.MAX_NEW_TOKENS,
    prompt_template: str | None = None,
    absolute: bool = True,
) -> dict[str, Any]:
    """One of our generation JSONL tasks as an lm-eval generate_until task config.

    `extract` is "first_word", "last_number" (the filter is named after it) or a regex whose first group
    is the answer (filter "regex"); the metric is exact_match against the ``answer`` field, so the result
    key is ``"exact_match,<filter>"``. Data files are absolute paths, or with ``absolute=False`` written as
    ``data_dir`` was given (a relative one then resolves from the working directory when lm-eval loads the
    task, as run configs do: for YAMLs shipped in a repository). Differences from the native scorer: no
    number normalization beyond dropping commas ("7.0" != "7"), full-width digits not converted, and no
    language check.
    """
    data_dir = Path(data_dir).resolve() if absolute else Path(data_dir)
    data_files = {s: (data_dir / f"{s}.jsonl").as_posix() for s in SPLITS if (data_dir / f"{s}.jsonl").is_file()}
    split_path(data_dir, split)  # raises when the evaluated split is missing
    answer_filter, match_options = _answer_filter(extract)
    config: dict[str, Any] = {
        "task": task_name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": data_files},
        "test_split": split,
        "output_type": "generate_until",
        "doc_to_text": _jinja_template(check_template(prompt_template)),
        "doc_to_target": "answer",
        "generation_kwargs": {"until": list(stop), "do_sample": False, "max_gen_toks": max_new_tokens},
        "filter_list": [answer_filter],
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True, **match_options}],
        "metadata": {"version": 1.0},
    }
    if "train" in data_files and split != "train":
        config |= {"training_split": "train", "fewshot_split": "train"}
    return config


def write_jsonl_task_group(
    group: str, data_dirs: Mapping[str, str | Path], out_dir: str | Path, **options: Any
) -> list[Path]:
    """Write tasks (name -> JSONL folder, same `options`) as lm-eval writes a task family; returns the paths.

    `_<group>_template_yaml` holds the fields all tasks share (not a task: lm-eval indexes only `*.yaml`),
    each `<task>.yaml` holds ``include:`` of it and its own fields, and `_<group>.yaml` is the group
    (``group: <group>``, ``task: [...]``, no aggregate: each task is scored on its own).
    """
    configs = [jsonl_task_config(name, data_dir, **options) for name, data_dir in data_dirs.items()]
    shared = {k: v for k, v in configs[0].items() if k != "task" and all(c.get(k) == v for c in configs)}
    out = Path(out_dir)
    template = f"_{group}_template_yaml"
    paths = [write_task_yaml(out / template, shared)]
    for config in configs:
        own = {k: v for k, v in config.items() if k not in shared}
        paths.append(write_task_yaml(out / f"{config['task']}.yaml", {"include": template, **own}))
    members = {"group": group, "task": [c["task"] for c in configs], "metadata": {"version": 1.0}}
    paths.append(write_task_yaml(out / f"_{group}.yaml", members))
    return paths


def write_task_yaml(path: Path, config: Mapping[str, Any]) -> Path:
    """Write one lm-eval task (or group, or template) file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(dict(config), allow_unicode=True, sort_keys=False), encoding="utf-8")
    log.info("wrote lm-eval config %s", path)
    return path
