"""The one scoring seam: a `Scorer` holds a live model (a backend), its tokenizer and the evaluators built from the
config's tasks; `apply` puts a candidate into the model, `score` scores it item by item where the evaluators can.
The search worker, the elite re-scoring, the held-out table, export and `evolve eval` all score through it."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from evals import build_evaluator
from evals.base import OWN_ITEMS, Evaluator, ItemEvaluator, ItemScores
from evolve.backends import Backend, CheckpointBackend, DataFlowBackend, make_backend
from evolve.config import RunConfig
from evolve.engines import fit_batches, start_engine
from evolve.tasks import Task
from merge_core.errors import EvomergeError
from merge_core.recipe import Recipe

log = logging.getLogger("evomerge")

Evaluators = list[tuple[str, Evaluator]]  # (task name, evaluator), in the config's order


TOKENIZER_MODEL_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "tiktoken.model")


def load_tokenizer(path: str | Path, *, trust_remote_code: bool = False, model: str | None = None) -> Any:
    """The tokenizer a model is scored with (the files in its directory), or a one-line error naming the model:
    no tokenizer files, or files the installed libraries cannot read (a sentencepiece or tiktoken model without
    its package, a corrupt tokenizer.json). The Scorer loads every tokenizer through this, and `evolve check` loads
    each one the run will use, so a run never fails on one after its search."""
    from transformers import AutoTokenizer

    path = Path(path)
    name = model or str(path)
    vocab_files = [*(path / f for f in TOKENIZER_MODEL_FILES), *path.glob("*.model"), *path.glob("*.tiktoken")]
    if not any(f.is_file() for f in vocab_files):
        raise EvomergeError(
            f"model '{name}': no tokenizer ({', '.join(TOKENIZER_MODEL_FILES[:4])}) in {path}; "
            "the run scores this model with its own tokenizer: add its tokenizer files"
        )
    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except Exception as err:  # noqa: BLE001 - transformers raises many kinds here; all are one line for the user
        first = next((line.strip() for line in str(err).splitlines() if line.strip()), "")
        raise EvomergeError(
            f"model '{name}': its tokenizer in {path} cannot be loaded ({type(err).__name__}: {first[:200]}); "
            "the run scores this model with its own tokenizer: fix or replace its tokenizer files"
        ) from None


def build_evaluators(
    tasks: Sequence[Task],
    *,
    seed: int,
    split: str | None = None,
    limit: int | None = None,
    heldout: bool = False,
    limit_mode: str | None = None,
) -> Evaluators:
    """(task name, evaluator) pairs; the held-out variant swaps the split and the limit (and, when given, how the
    limit picks items: `limit_mode`)."""
    out = []
    for task in tasks:
        spec = task.evaluator_spec()
        spec.setdefault("seed", seed)
        if heldout:
            if split is not None and getattr(task, "task_dir", None) is not None:  # a dataset task keeps its split
                spec["split"] = split
            spec["limit"] = limit
            if limit_mode is not None:
                spec["limit_mode"] = limit_mode
        spec.pop("name")
        out.append((task.name, build_evaluator(spec)))
    return out


def record_key(task: str, record: str) -> str:
    """The name of one of a task's per-item records: the task's own items, or `task/sub-task`."""
    return task if record == OWN_ITEMS else f"{task}/{record}"


def score_items(
    evaluators: Evaluators,
    model: Any,
    tokenizer: Any,
    upto: dict[str, int] | None = None,
    scored: dict[str, ItemScores] | None = None,
) -> tuple[dict[str, float], dict[str, ItemScores]]:
    """(metrics, per-item scores by record): an `ItemEvaluator`'s items are scored one by one, up to `upto[task]`
    items of its order when given, continuing the ItemScores in `scored` (racing scores chunk by chunk); any other
    evaluator is scored whole, with its per-item records."""
    metrics: dict[str, float] = {}
    out = dict(scored or {})
    for name, evaluator in evaluators:
        if isinstance(evaluator, ItemEvaluator):
            have = out[name].n if name in out else 0
            stop = None if upto is None else upto[name]
            if stop is None or stop > have:
                more = evaluator.score_items(model, tokenizer, have, stop)
                out[name] = out[name].extend(more) if name in out else more
            values = evaluator.aggregate(out[name])
        else:
            values, records = evaluator.evaluate_items(model, tokenizer)
            out |= {record_key(name, r): s for r, s in records.items()}
        for key, value in values.items():
            metrics[f"{name}/{key}"] = float(value)
    return metrics, out


def item_totals(evaluators: Evaluators) -> dict[str, int]:
    """Items per record (an lm-eval task's per leaf task, `name/leaf`)."""
    return {record_key(name, r): n for name, ev in evaluators for r, n in ev.item_counts().items()}


class Scorer:
    """A live model, its tokenizer and the evaluators: `apply` a candidate, `score` it. With `execution.engine:
    vllm`, a vLLM engine beside the live model generates for the generation and choice tasks; each applied
    candidate is written into it (`evolve.engines`)."""

    def __init__(self, cfg: RunConfig, backend: Backend, evaluators: Evaluators):
        self.backend = backend
        self.model = backend.model
        self.tokenizer = load_tokenizer(backend.tokenizer_path, trust_remote_code=cfg.models.trust_remote_code)
        self.evaluators = evaluators
        self.engine = None
        if isinstance(backend, DataFlowBackend):
            if cfg.execution.engine == "vllm":
                log.warning(
                    "execution.engine: vllm: data-flow candidates are scored by the native path "
                    "(a vLLM engine holds one ordinary model, not a layer path over two)"
                )
        else:
            self.engine = start_engine(cfg, self.model, backend.tokenizer_path, self.tokenizer, evaluators)
            if self.engine is not None:
                self.engine.load(self.model, owner=self)
        fit_batches(backend, self.model, self.tokenizer, evaluators)

    @classmethod
    def for_recipes(cls, cfg: RunConfig, template: Recipe, evaluators: Evaluators) -> Scorer:
        """Candidates like `template`: their sources (or models A and B) resident once, each written in place."""
        return cls(cfg, make_backend(cfg, template), evaluators)

    @classmethod
    def for_checkpoint(cls, cfg: RunConfig, path: str, evaluators: Evaluators) -> Scorer:
        """One checkpoint, loaded as it is."""
        return cls(cfg, CheckpointBackend(cfg, path), evaluators)

    @property
    def engine_name(self) -> str:
        """What generates: "native", or "vllm <version>"."""
        return "native" if self.engine is None else self.engine.name

    def apply(self, recipe: Recipe) -> None:
        self.backend.apply(recipe)
        if self.engine is not None:
            self.engine.load(self.model, owner=self)

    def score(
        self, upto: dict[str, int] | None = None, scored: dict[str, ItemScores] | None = None
    ) -> tuple[dict[str, float], dict[str, ItemScores]]:
        """`score_items` of the live model (see there for `upto` and `scored`); a shared engine that another scorer
        has loaded since gets this scorer's weights back first."""
        if self.engine is not None and not self.engine.holds(self):
            self.engine.load(self.model, owner=self)
        return score_items(self.evaluators, self.model, self.tokenizer, upto, scored)

    def totals(self) -> dict[str, int]:
        return item_totals(self.evaluators)
