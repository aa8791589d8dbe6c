"""The run config: one YAML file -> a validated pydantic model; every error names the field's YAML path, in one line."""

from __future__ import annotations

import os
import re
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    PrivateAttr,
    Tag,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic_core import PydanticCustomError

from evolve.fitness import FitnessTerm, Objective
from evolve.urls import expand_env, persisted_url, redact_url
from merge_core.errors import EvomergeError
from merge_core.recipe import DTYPES, freeze_params
from merge_core.yamlio import load_yaml, read_text
from search_spaces.ps import ps_method

MAX_NAME = 100  # run, task and alias names: they name directories, studies and Optuna parameters
MAX_SEED = 2**32  # seeds feed numpy (Optuna's samplers, pycma), which takes 0 <= seed < 2**32
MAX_REPEATS = 1000  # dfs repeats (the slot count is bounded again, with the layer counts, by DataFlowSpace)
DType = Literal[DTYPES]  # type: ignore[valid-type]  # merge_core.recipe.DTYPES, as a schema type
SamplerName = Literal["cmaes", "pycma", "tpe", "random", "nsga2", "gp"]  # evolve.samplers.make_sampler builds each
MULTI_OBJECTIVE_SAMPLERS = ("nsga2", "tpe", "gp", "random")  # the ones that take several objectives


def _name_chars(v: str, purpose: str = "") -> str:
    """Task and run names: letters, digits, '_', '-' or '.' (they name metrics, run directories and studies)."""
    if not re.fullmatch(r"[A-Za-z0-9_\-\.]+", v):
        raise ValueError(f"'{v}' must be letters, digits, '_', '-' or '.'{purpose}")
    return v


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)  # every float finite


class SourceModel(_Strict):
    path: str = Field(min_length=1, description="local directory or hub id")
    alias: str | None = Field(default=None, max_length=MAX_NAME)

    @field_validator("alias")
    @classmethod
    def _alias_ok(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[A-Za-z0-9_\-]+", v):
            raise ValueError(f"'{v}' must be letters, digits, '_' or '-' (it names Optuna parameters)")
        return v


class Models(_Strict):
    base: str | None = None
    sources: list[SourceModel] = Field(min_length=1)
    allow_pickle: bool = False
    trust_remote_code: bool = False

    @field_validator("sources", mode="before")
    @classmethod
    def _paths_as_sources(cls, v: Any) -> Any:
        return [{"path": s} if isinstance(s, str) else s for s in v] if isinstance(v, list) else v

    def aliases(self) -> list[str]:
        return [s.alias or Path(s.path.rstrip("/")).name.lower() for s in self.sources]

    @model_validator(mode="after")
    def _distinct_models(self) -> Models:
        """The base is not a source, and no source is listed twice (each would count double in the merge)."""
        norm = lambda p: os.path.normpath(os.path.expanduser(p))  # noqa: E731
        paths = [norm(s.path) for s in self.sources]
        for i, p in enumerate(paths):
            if self.base is not None and p == norm(self.base):
                raise ValueError(f"sources[{i}]: '{self.sources[i].path}' is the base model; list it only as `base`")
            if p in paths[:i]:
                raise ValueError(f"sources[{i}]: '{self.sources[i].path}' is listed twice")
        return self


class Space(_Strict):
    type: Literal["ps"] = "ps"
    method: str = "dare_ties"
    layers_per_group: int | None = Field(default=None, ge=1)
    modules: bool = False
    embed_head_groups: bool = True
    weight_bounds: tuple[float, float] = (0.0, 1.0)
    density_bounds: tuple[float, float] = (0.05, 1.0)
    x0: dict[Literal["weight", "density"], float] = Field(default_factory=lambda: {"weight": 0.5, "density": 0.5})
    params: dict[str, Any] = Field(default_factory=dict, description="fixed global method parameters")
    dtype: DType | None = None

    @model_validator(mode="after")
    def _bounds(self) -> Space:
        lo, hi = self.weight_bounds
        if not lo < hi:
            raise ValueError(f"weight_bounds: low {lo} must be below high {hi}")
        dlo, dhi = self.density_bounds
        if not 0 < dlo < dhi <= 1:
            raise ValueError(f"density_bounds: need 0 < low < high <= 1, got [{dlo}, {dhi}]")
        w = self.x0.get("weight", 0.5)
        if not lo <= w <= hi:
            raise ValueError(f"x0.weight: {w} is outside weight_bounds [{lo}, {hi}]")
        d = self.x0.get("density", 0.5)
        if not dlo <= d <= dhi:
            raise ValueError(f"x0.density: {d} is outside density_bounds [{dlo}, {dhi}]")
        return self


class DataFlow(_Strict):
    """The data-flow (DFS) space: A's and B's layers repeated `repeats` times, an indicator per slot, hop scales."""

    model_a: str | None = Field(
        default=None, description="path/hub id or source alias; default: the base (PS result in a hybrid)"
    )
    model_b: str = Field(description="path/hub id or source alias")
    repeats: int = Field(default=3, ge=1, le=MAX_REPEATS)
    scales: Literal["matrix", "model_pair", "slot", "none"] = "matrix"
    max_path_length: int | None = Field(default=None, ge=2)
    scale_bounds: tuple[float, float] = (0.0, 2.0)

    @model_validator(mode="after")
    def _scale_bounds(self) -> DataFlow:
        lo, hi = self.scale_bounds
        if not lo < hi:
            raise ValueError(f"scale_bounds: low {lo} must be below high {hi}")
        return self


class Optimizer(_Strict):
    sampler: SamplerName = "cmaes"
    sigma0: float = Field(default=1 / 6, gt=0)
    popsize: int | None = Field(default=None, ge=2)


class Budget(_Strict):
    max_trials: int = Field(default=100, ge=1)
    max_minutes: float | None = Field(default=None, gt=0)
    patience: int | None = Field(default=None, ge=1, description="stop after this many trials without improvement")
    max_consecutive_failures: int = Field(default=10, ge=1)
    max_items: int | None = Field(default=None, ge=1, description="stop once trials have scored this many items")


class Protocol(_Strict):
    """Which items of each search task a stage scores (`evolve.protocol`). The last `validation` items of every
    search task are kept out of the search; once the stage's budget is spent its `top_k` best trials are re-scored
    on them and the best there is the stage's pick. The search scores the other items: all of them, or with
    `batch`, `batch` of them per trial, the same batch for `every` consecutive trials (a CMA-ES generation: set
    `every` to its popsize) and the next stretch of the run's item order for the next ones. The paper's DFS
    protocol (Akiba et al. 2024) is validation 200, batch 200, every = the population (128)."""

    validation: int = Field(default=0, ge=0, description="the last items of each search task, kept for the pick")
    batch: int | None = Field(default=None, ge=1, description="items per trial (default: every search item)")
    every: int = Field(default=1, ge=1, description="consecutive trials that share one batch")
    top_k: int = Field(default=10, ge=1, description="the best trials by search fitness re-scored on validation")

    @model_validator(mode="after")
    def _something(self) -> Protocol:
        if not self.validation and self.batch is None:
            raise ValueError("give validation (items kept for the pick), batch (items per trial) or both")
        if self.batch is None and "every" in self.model_fields_set:
            raise ValueError("every: trials sharing one batch; it needs `batch`")
        if not self.validation and "top_k" in self.model_fields_set:
            raise ValueError("top_k: trials re-scored on the validation items; it needs `validation`")
        return self


class DataFlowStage(_Strict):
    space: DataFlow
    optimizer: Optimizer = Field(default_factory=Optimizer)
    budget: Budget = Field(default_factory=Budget)
    protocol: Protocol | None = None


class Search(_Strict):
    stages: list[Literal["ps", "dfs"]] = Field(default_factory=lambda: ["ps"])
    space: Space = Field(default_factory=Space)
    optimizer: Optimizer = Field(default_factory=Optimizer)
    budget: Budget = Field(default_factory=Budget)
    protocol: Protocol | None = Field(default=None, description="the ps stage's items: see Protocol")
    dfs: DataFlowStage | None = None

    @model_validator(mode="after")
    def _stages(self) -> Search:
        if (
            not self.stages
            or len(set(self.stages)) != len(self.stages)
            or (self.stages[0] == "dfs" and len(self.stages) > 1)
        ):
            raise ValueError(f"stages: one of [ps], [dfs] or [ps, dfs], got {self.stages}")
        if "dfs" in self.stages and self.dfs is None:
            raise ValueError("dfs: a dfs stage needs a `search.dfs` section (space: {model_b, repeats, scales, ...})")
        return self

    def stage(self, name: str) -> tuple[Any, Optimizer, Budget]:
        """(space settings, optimizer, budget) of one stage."""
        if name == "dfs":
            assert self.dfs is not None
            return self.dfs.space, self.dfs.optimizer, self.dfs.budget
        return self.space, self.optimizer, self.budget

    def protocol_of(self, name: str) -> Protocol | None:
        """The stage's item protocol (None: every search item for every trial, the pick by search fitness)."""
        if name == "dfs":
            assert self.dfs is not None
            return self.dfs.protocol
        return self.protocol


_Count = lambda minimum: Annotated[int, Field(ge=minimum)]  # noqa: E731
_Paths = str | list[str]
_ERROR_LOC_NOISE = ("function-", "list[", "dict[", "str", "int", "bool", "nullable")


def _nested_fields(model: type[BaseModel], loc: tuple) -> list[str]:
    """The field names of the sub-model at `loc` (field names, Optional unwrapped) inside `model`."""
    for part in loc:
        annotation = model.model_fields[part].annotation
        model = next(a for a in (annotation, *typing.get_args(annotation)) if isinstance(a, type))
    return sorted(model.model_fields)


class _Task(BaseModel):
    """One evaluator: its name prefixes its metrics; the fields given go to its constructor (evals.build_evaluator)
    as written: strict types, nothing coerced, and only the fields given (the evaluator keeps its defaults)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)
    name: str = Field(max_length=MAX_NAME)
    limit: _Count(1) | None = None
    seed: Annotated[int, Field(ge=0, lt=MAX_SEED)] = 0
    batch_size: _Count(1) = 8

    @field_validator("name")
    @classmethod
    def _name_ok(cls, v: str) -> str:
        return _name_chars(v)

    @model_validator(mode="wrap")
    @classmethod
    def _one_line(cls, data: Any, handler: Any) -> Any:
        """An evaluator field's error as 'field[index]: message, got value'; an unknown one with the allowed fields."""
        try:
            return handler(data)
        except ValidationError as e:
            err = e.errors()[0]
            if not err["loc"]:  # a model-level rule naming its field: 'field: message'
                raise
            key, *rest = err["loc"]
            if err["type"] == "extra_forbidden" and rest:  # a nested model's unknown field, with the allowed ones
                path = ".".join(str(x) for x in err["loc"])
                raise PydanticCustomError(
                    "nested_field",
                    "{path}: not a field here (allowed: {allowed})",
                    {"path": path, "allowed": ", ".join(_nested_fields(cls, err["loc"][:-1]))},
                ) from None
            if err["type"] == "extra_forbidden":
                allowed = ", ".join(sorted(set(cls.model_fields) - {"name", "type"}))
                raise PydanticCustomError(
                    "task_field",
                    "{key}: not a field of {kind} tasks (allowed: {allowed})",
                    {"key": key, "kind": _TASK_KIND[cls], "allowed": allowed},
                ) from None
            if key in ("name", "type") or err["type"] == "missing":
                raise
            where = "".join(
                f"[{x}]" if isinstance(x, int) else f".{x}" for x in rest if not str(x).startswith(_ERROR_LOC_NOISE)
            )
            msg = re.sub(r"^Value error, ", "", err["msg"])
            raise ValueError(f"{key}{where}: {msg}, got {err['input']!r}"[:300]) from None

    @model_serializer(mode="wrap")
    def _given_fields(self, handler: Any) -> dict[str, Any]:
        """Only the fields the config gives (and name, type): the evaluator's own defaults and the run seed apply."""
        data = handler(self)
        return {"name": data["name"], "type": data["type"], **{k: data[k] for k in data if k in self.model_fields_set}}

    def evaluator_spec(self, **overrides: Any) -> dict[str, Any]:
        return {**self.model_dump(), **overrides}


class _DataModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class GenerationFields(_DataModel):
    """Item field -> dataset column."""

    prompt: str = "prompt"
    answer: str = "answer"
    id: str | None = Field(default=None, description="default: the row's index in the split")


class ChoiceFields(_DataModel):
    """Item field -> dataset column."""

    prompt: str = "prompt"
    choices: str = "choices"
    label: str = "label"
    id: str | None = Field(default=None, description="default: the row's index in the split")


class _DatasetSource(_DataModel):
    """Task data from `datasets`: a hub id (loaded with load_dataset(path, name, split=, revision=), cached as
    `datasets` caches) or a local save_to_disk folder (load_from_disk; `split` names a DatasetDict's split)."""

    path: str = Field(min_length=1, description="hub id or local datasets.save_to_disk folder")
    name: str | None = Field(default=None, description="the dataset's configuration")
    split: str | None = None
    revision: str | None = None
    slice: str | None = Field(default=None, description="'start:stop' rows of the split (Python slice semantics)")

    @field_validator("slice")
    @classmethod
    def _slice_ok(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"(-?\d+)?:(-?\d+)?", v):
            raise ValueError("expected 'start:stop' (e.g. '0:869' or '869:')")
        return v


class GenerationDataset(_DatasetSource):
    fields: GenerationFields = Field(default_factory=GenerationFields)


class ChoiceDataset(_DatasetSource):
    fields: ChoiceFields = Field(default_factory=ChoiceFields)


class _ItemsTask(_Task):
    """Items from JSONL splits (`task_dir`, split `split`, held-out split `evaluation.heldout_split`) or from a
    `dataset` (its own split; not rescored in the held-out table: name held-out data in `heldout_tasks`)."""

    task_dir: str | None = None
    split: str = "dev"
    prompt_template: str | None = None
    delimiter: str = " "

    @model_validator(mode="after")
    def _one_source(self) -> _ItemsTask:
        has_dataset = getattr(self, "dataset", None) is not None
        if self.task_dir is None and not has_dataset:
            raise ValueError("task_dir: required (a folder of JSONL splits), unless the task names a `dataset`")
        if self.task_dir is not None and has_dataset:
            raise ValueError("dataset: give task_dir (JSONL splits) or dataset (a datasets source), not both")
        if has_dataset and "split" in self.model_fields_set:
            raise ValueError("split: a dataset task takes its split from dataset.split")
        return self


class GenerationTask(_ItemsTask):
    type: Literal["generation"] = "generation"
    dataset: GenerationDataset | None = None
    max_new_tokens: _Count(1) = 32
    stop: list[str] = []
    extract: str | dict[str, Any] = "last_number"
    language_check: dict[str, Any] | None = None
    gold_prob: bool = True
    extract_gold: bool = False
    chat_template: bool = False  # each prompt as one user turn of the tokenizer's chat template


class ChoiceTask(_ItemsTask):
    type: Literal["choice"]
    dataset: ChoiceDataset | None = None


class PerplexityTask(_Task):
    type: Literal["perplexity"]
    text_file: str
    max_length: _Count(2) = 512


class LmEvalTask(_Task):
    type: Literal["lm_eval"]
    tasks: Annotated[list[str], Field(min_length=1)]
    include_path: _Paths | None = None
    metrics: dict[str, _Paths] | None = None
    num_fewshot: _Count(0) | None = None
    max_length: _Count(2) | None = None


_TASK_KIND = {GenerationTask: "generation", ChoiceTask: "choice", PerplexityTask: "perplexity", LmEvalTask: "lm_eval"}
TASK_TYPES = tuple(_TASK_KIND.values())  # evals.EVALUATOR_TYPES builds each


def _task_type(v: Any) -> Any:
    return v.get("type", "generation") if isinstance(v, dict) else getattr(v, "type", None)


Task = Annotated[
    # noqa below: the members are a tuple built at runtime, which `X | Y` cannot spell (ruff's UP007 fix drops the
    # Union and leaves a bare tuple, so the module no longer imports)
    Union[tuple(Annotated[model, Tag(kind)] for model, kind in _TASK_KIND.items())],  # type: ignore[valid-type]  # noqa: UP007
    Discriminator(
        _task_type,
        custom_error_type="task_type",
        custom_error_message=f"Input should be {', '.join(map(repr, TASK_TYPES))}",
    ),
]


class Racing(_Strict):
    """Score candidates chunk by chunk and stop one that cannot plausibly beat the incumbent (`evolve.racing`)."""

    chunk: int = Field(default=40, ge=1, description="items per chunk (over all tasks)")
    alpha: float = Field(default=0.05, gt=0, lt=1, description="error rate of stopping a candidate that would win")
    min_items: int = Field(default=40, ge=2, description="no candidate is stopped before this many items")
    test: Literal["t", "wilcoxon"] = "t"


class Rescore(_Strict):
    """Re-score the top_k trials by search fitness on more items before the winner is picked."""

    top_k: int = Field(default=5, ge=1)
    split: str | None = Field(default=None, description="default: each task's own split")
    limit: int | None = Field(default=None, ge=1, description="items per task (default: all of the split)")


class Evaluation(_Strict):
    tasks: list[Task] = Field(min_length=1)
    fitness: list[FitnessTerm] | None = Field(default=None, min_length=1, description="one weighted sum")
    objectives: list[Objective] | None = Field(
        default=None, min_length=2, description="instead of fitness: a multi-objective search over these metrics"
    )
    reference_point: list[float] | None = Field(
        default=None, description="hypervolume reference, one value per objective (default: derived, evolve.pareto)"
    )
    heldout_tasks: list[Task] = Field(default_factory=list, description="scored only for the final table and export")
    heldout_split: str | None = "test"
    heldout_limit: int | None = Field(default=None, ge=1)
    racing: Racing | None = None
    rescore: Rescore | None = None

    @property
    def multi_objective(self) -> bool:
        return self.objectives is not None

    def named_metrics(self) -> list[tuple[str, int, str]]:
        """(field, index, metric) of each fitness term or objective."""
        field, terms = ("objectives", self.objectives) if self.objectives is not None else ("fitness", self.fitness)
        return [(field, i, t.metric) for i, t in enumerate(terms or [])]

    def _check_objectives(self) -> None:
        """Multi-objective: distinct metrics, a reference point with one finite value per objective, and nothing that
        ranks candidates by one number (racing against an incumbent, re-scoring the best k)."""
        metrics = [o.metric for o in self.objectives or []]
        for i, m in enumerate(metrics):
            if m in metrics[:i]:
                raise ValueError(f"objectives[{i}].metric: '{m}' is listed twice")
        if self.reference_point is not None and len(self.reference_point) != len(metrics):
            raise ValueError(
                f"reference_point: {len(self.reference_point)} values for {len(metrics)} objectives; give one per "
                "objective, in their order"
            )
        for field in ("racing", "rescore"):
            if getattr(self, field) is not None:
                raise ValueError(
                    f"{field}: ranks candidates by one fitness, which a multi-objective search does not have; remove "
                    f"`{field}`, or use a weighted `fitness` instead of `objectives`"
                )

    def heldout_scored(self) -> list[Any]:
        """The tasks of the held-out table: `tasks` read from JSONL splits (scored on `heldout_split`) and every
        `heldout_tasks` entry. A `tasks` entry with a `dataset` is left out (its data is what the search fitted);
        held-out data from a dataset is a `heldout_tasks` entry with its own `dataset`."""
        return [t for t in self.tasks if getattr(t, "dataset", None) is None] + list(self.heldout_tasks)

    @model_validator(mode="after")
    def _metrics_name_tasks(self) -> Evaluation:
        names = [t.name for t in self.tasks]
        all_names = names + [t.name for t in self.heldout_tasks]
        if len(set(all_names)) != len(all_names):
            raise ValueError(f"tasks: task names must be unique across tasks and heldout_tasks, got {all_names}")
        if (self.fitness is None) == (self.objectives is None):
            raise ValueError(
                "fitness: give either `fitness` (one weighted sum) or `objectives` (two or more metrics, each with a "
                f"direction, for a multi-objective search), {'not both' if self.fitness else 'one is required'}"
            )
        for field, i, metric in self.named_metrics():
            task = metric.split("/", 1)[0]
            if "/" not in metric or task not in names:
                raise ValueError(f"{field}[{i}].metric: '{metric}' must be '<task>/<metric>' with task one of {names}")
        if self.objectives is not None:
            self._check_objectives()
        elif self.reference_point is not None:
            raise ValueError("reference_point: a hypervolume reference is for `objectives` (a multi-objective search)")
        if self.racing is not None:
            for t in self.tasks:
                if t.type in ("lm_eval", "perplexity"):
                    raise ValueError(
                        f"racing: task '{t.name}' is {t.type}, which racing cannot score item by item against "
                        "the incumbent; racing needs generation and choice tasks (or remove racing)"
                    )
        return self


class Execution(_Strict):
    backend: Literal["local", "ray"] = "local"
    workers: int = Field(default=1, ge=1)
    device: str = "auto"
    dtype: DType = "float32"
    ray_address: str | None = None
    cpus_per_worker: float = Field(default=0.5, gt=0)
    threads: int | None = Field(
        default=None,
        ge=1,
        description="torch CPU threads in each process that merges or scores (default: torch's, one per core); 1 "
        "for tiny models or a CPU shared with other jobs, where more threads only wait on each other",
    )
    gpus_per_worker: float = Field(default=0.0, ge=0)
    shared_study: bool = Field(default=False, description="allow several `evolve run` processes on one study")
    heartbeat_s: int = Field(
        default=60,
        ge=1,
        description="shared_study: each process records a heartbeat of its running trials this often; a trial "
        "whose heartbeat stopped for 3x as long (its process died) is failed and re-run by another process",
    )

    @field_validator("device")
    @classmethod
    def _device_ok(cls, v: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", v):
            raise ValueError(f"'{v}' is not auto, cpu, cuda or cuda:N")
        return v

    @model_validator(mode="after")
    def _local_is_one(self) -> Execution:
        if self.backend == "local" and self.workers != 1:
            raise ValueError(
                f"workers: the local backend runs one in-process worker; use backend: ray for {self.workers}"
            )
        return self


class RunConfig(_Strict):
    name: str = Field(max_length=MAX_NAME)
    seed: int = Field(default=0, ge=0, lt=MAX_SEED, description="search seed; numpy's range, [0, 2**32)")
    models: Models
    search: Search = Field(default_factory=Search)
    evaluation: Evaluation
    execution: Execution = Field(default_factory=Execution)
    storage: str | None = Field(
        default=None,
        description="Optuna storage URL; default sqlite:///<run dir, absolute>/study.db; "
        "${ENV_VAR} is expanded when used, a literal password is never written",
    )
    output_dir: str | None = None

    @field_validator("name")
    @classmethod
    def _name_ok(cls, v: str) -> str:
        _name_chars(v, " (it names the run directory and study)")
        if v in (".", ".."):
            raise ValueError(f"'{v}' is not a name: it names the run directory, one path component (e.g. my-run)")
        return v

    @field_validator("storage")
    @classmethod
    def _storage_ok(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^(sqlite|postgresql|postgresql\+\w+|mysql|mysql\+\w+)://", v):
            raise ValueError(
                f"'{redact_url(v)}' is not an Optuna RDB URL (sqlite:///path.db or postgresql://user@host/db)"
            )
        return v

    @model_validator(mode="after")
    def _aliases_unique(self) -> RunConfig:
        aliases = self.models.aliases()
        if len(set(aliases)) != len(aliases):
            raise ValueError(f"models.sources: aliases {aliases} collide; give each source an 'alias'")
        return self

    @model_validator(mode="after")
    def _protocols(self) -> RunConfig:
        """A stage's item protocol needs tasks scored item by item, and one rule for the pick."""
        ev = self.evaluation
        for stage in self.search.stages:
            pr = self.search.protocol_of(stage)
            if pr is None:
                continue
            where = "search.protocol" if stage == "ps" else "search.dfs.protocol"
            for t in ev.tasks:
                if t.type == "lm_eval":
                    raise ValueError(
                        f"{where}: task '{t.name}' is lm_eval, scored whole; a protocol (validation items, batches) "
                        "needs generation, choice or perplexity tasks"
                    )
            if pr.batch is not None and ev.racing is not None:
                raise ValueError(
                    f"{where}.batch: racing compares a candidate with the incumbent on the same items, and batches "
                    "change the items; use one of them"
                )
            if pr.validation and ev.rescore is not None:
                raise ValueError(
                    f"{where}.validation: the pick is re-scored on the validation items; evaluation.rescore is a "
                    "second rule for it; use one of them"
                )
            if pr.validation and getattr(ev, "objectives", None) is not None:
                raise ValueError(
                    f"{where}.validation: a multi-objective search keeps its Pareto front; the validation pick is "
                    "for one fitness"
                )
        return self

    @model_validator(mode="after")
    def _multi_objective_sampler(self) -> RunConfig:
        """Several objectives need a sampler that handles them (evolve.samplers: nsga2, tpe, gp, random)."""
        if self.evaluation.objectives is None:
            return self
        for stage in self.search.stages:
            _, opt, _ = self.search.stage(stage)
            if opt.sampler not in MULTI_OBJECTIVE_SAMPLERS:
                where = "search.optimizer.sampler" if stage == "ps" else "search.dfs.optimizer.sampler"
                raise ValueError(
                    f"{where}: '{opt.sampler}' optimizes one value and evaluation.objectives has "
                    f"{len(self.evaluation.objectives)}; use {', '.join(MULTI_OBJECTIVE_SAMPLERS)} "
                    "(or a weighted `fitness`)"
                )
        return self

    # ---- derived -------------------------------------------------------------------------------
    # The run directory this config was read from (`evolve status|resume|export|report RUN_DIR`), wherever it
    # was moved or copied; None for a config file, whose run directory is output_dir or runs/NAME (from the CWD).
    _loaded_from: Path | None = PrivateAttr(default=None)

    @property
    def run_dir(self) -> Path:
        if self._loaded_from is not None:
            return self._loaded_from
        return Path(self.output_dir or f"runs/{self.name}")

    @property
    def storage_url(self) -> str:
        """The URL to connect with: the configured one (``${VAR}`` expanded), else the run directory's study.db
        by absolute path (so neither the working directory nor a moved run directory changes which study it is)."""
        if self.storage:
            return expand_env(self.storage)
        return f"sqlite:///{self.run_dir.resolve() / 'study.db'}"

    def in_run_dir(self, run_dir: Path) -> RunConfig:
        """This config as read from its run directory: that directory is the run's, whatever output_dir says."""
        cfg = self.model_copy()
        cfg._loaded_from = Path(run_dir)
        return cfg


def load_config(path: str | Path) -> RunConfig:
    """A run config file: UTF-8 YAML without duplicate keys or alias bombs (merge_core.yamlio), then validated."""
    p = Path(path)
    data = load_yaml(read_text(p, "config file"), where=str(p))
    return parse_config(data, where=str(p))


def parse_config(data: Any, where: str = "config") -> RunConfig:
    if not isinstance(data, dict):
        raise EvomergeError(f"{where}: expected a mapping with name, models, evaluation")
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise EvomergeError(f"{where}: {format_validation_error(e)}") from None


def format_validation_error(e: ValidationError) -> str:
    """The first error as 'yaml.path: message'."""
    err = e.errors()[0]
    parts = [x for i, x in enumerate(err["loc"]) if not (x in TASK_TYPES and i and isinstance(err["loc"][i - 1], int))]
    if err["type"] == "task_type":
        parts.append("type")
    elif err["type"] == "task_field":  # an unknown evaluator field, as `evaluation.tasks[0].field`
        parts = [*parts[:-2], f"{parts[-2]}[{parts[-1]}]"]
    loc = ".".join(str(x) for x in parts if not str(x).startswith("function-")) or "(top level)"
    msg = err["msg"]
    msg = re.sub(r"^(Value error|Assertion failed), ", "", msg)
    if err["type"] == "extra_forbidden":
        msg = "unknown field (check the spelling against the documented config)"
    elif err["type"] == "missing":
        msg = "required field is missing"
    m = re.match(r"^([A-Za-z0-9_\.\[\]]+): (.*)$", msg)
    if m:  # a model-level validator naming a sub-field: join it onto the path
        loc = m.group(1) if loc == "(top level)" else f"{loc}.{m.group(1)}"
        msg = m.group(2)
    return f"{loc}: {msg}"


def dump_config(cfg: RunConfig) -> str:
    """The config as written to the run directory and the study: without a literal storage password."""
    data = cfg.model_dump(mode="json")
    data["storage"] = persisted_url(data.get("storage"))
    return yaml.safe_dump(data, sort_keys=False)


# ---- everything knowable before a search starts -------------------------------------------------


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
    notes = _check_tasks(cfg, offline=offline)
    _check_fitness_metrics(cfg)
    if "ps" in cfg.search.stages:
        _check_space_params(cfg.search.space, cfg.models.sources)
    _check_writable_dir(cfg.run_dir, "output_dir" if cfg.output_dir else "run directory")
    if not offline:
        from merge_core.merge import resolve_device

        try:
            resolve_device(cfg.execution.device)
        except EvomergeError as e:
            raise EvomergeError(f"execution.{e}") from None
    lines = []
    for stage in cfg.search.stages:
        _, opt, budget = cfg.search.stage(stage)
        run = f"{budget.max_trials} trials, sampler {opt.sampler}"
        lines.append(
            f"{stage}: {run} (checkpoints not opened)" if offline else f"{stage}: {_check_stage(cfg, stage)}, {run}"
        )
    return lines + [f"note: {n}" for n in notes]


def _check_dataset(task: Any, where: str) -> str | None:
    """A dataset task's split, fields and slice, read from disk or the local `datasets` cache only (offline mode
    forced: nothing is downloaded, nothing waits on the network); a note when the data is not there to check."""
    from evals.data import DatasetNotCached, dataset_rows

    source = task.dataset.model_dump()
    label = f"{source['path']}" + (f" ({source['name']})" if source["name"] else "") + f" split {source['split']}"
    try:
        rows = dataset_rows(task.type, source, offline=True)
    except DatasetNotCached:
        return f"{where}.dataset: {label}: not cached; not checked (split, fields); `evolve run` downloads it"
    except EvomergeError as e:
        msg = str(e)
        raise EvomergeError(f"{where}.{msg}" if msg.startswith("dataset.") else f"{where}.dataset: {msg}") from None
    if not rows:
        raise EvomergeError(f"{where}.dataset.slice: '{source['slice']}' selects none of the split's rows")
    return None


def _check_tasks(cfg: RunConfig, offline: bool) -> list[str]:
    """The data files exist; dataset sources are read from disk or the local cache (never downloaded; a note for
    each not there); unless offline, the data: native evaluators are built (their data read, templates,
    extractors and language checks parsed) for the search split and the held-out split. Returns the notes."""
    ev = cfg.evaluation
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
        return notes
    from contextlib import nullcontext

    from evolve.worker import build_evaluators

    with_datasets = any(getattr(t, "dataset", None) is not None for t in [*ev.tasks, *ev.heldout_tasks])
    if with_datasets:
        from evals.data import hub_offline

    # lm-eval's task index takes long; a dataset not cached was noted above (building would download it)
    native = lambda ts: [t for t in ts if t.type != "lm_eval" and t.name not in missing]  # noqa: E731
    for label, build in (
        ("evaluation.tasks", lambda: build_evaluators(native(ev.tasks), seed=cfg.seed)),
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
    return notes


def _check_fitness_metrics(cfg: RunConfig) -> None:
    """Each fitness metric is one its task reports (evaluator classes declare theirs: `metric_names`). lm_eval
    tasks' names come from the task YAMLs, so only their shape is checked: `<task>/<lm-eval task>/<metric>,<filter>`,
    or `<task>/<lm-eval task>` for a task given a headline metric in the task's `metrics`."""
    from evals import EVALUATOR_TYPES

    tasks = {t.name: t for t in cfg.evaluation.tasks}
    for field, i, full in cfg.evaluation.named_metrics():
        name, metric = full.split("/", 1)
        task = tasks[name]
        spec = {k: v for k, v in task.evaluator_spec().items() if k != "type"}
        names = EVALUATOR_TYPES[task.type].metric_names(**spec)
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
    from merge_core.methods import check_parameter
    from merge_core.plan import setting_values

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


TOKENIZER_MODEL_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "tiktoken.model")


def _check_stage(cfg: RunConfig, stage: str) -> str:
    """Open the stage's checkpoints (headers and configs only) and build its space; a summary of what was checked."""
    from evolve.loop import build_space, dfs_model_a
    from merge_core.checkpoint import Checkpoint
    from merge_core.dataflow import check_compatible_configs
    from merge_core.merge import open_models
    from merge_core.plan import check_recipe

    opts = dict(allow_pickle=cfg.models.allow_pickle, trust_remote_code=cfg.models.trust_remote_code)
    if stage == "ps":
        space = build_space(cfg, "ps")
        recipe = space.decode(space.x0)
        ckpts = open_models(recipe, **opts)
        reference = ckpts[recipe.base_model or recipe.models[0]]
        check_recipe(recipe, reference.num_layers, where="search.space (its x0 recipe)")
        _check_tokenizer(reference)
        return f"{len(ckpts)} checkpoints compatible, {space.dim} parameters"
    space = build_space(cfg, "dfs")  # opens A (the base while a hybrid's PS merge is not written yet) and B
    a = dfs_model_a(cfg)
    pending = a == str(cfg.run_dir / "ps_best") and not Path(a).exists()
    ca = Checkpoint.open(cfg.models.base or cfg.models.sources[0].path if pending else a, **opts)
    cb = Checkpoint.open(space.model_b, **opts)
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
    _check_tokenizer(ca)
    return (
        f"{space.repeats} repeats x ({space.layers_a} + {space.layers_b}) layers = {space.num_slots} slots, "
        f"{space.dim} parameters"
    )


def _check_tokenizer(ckpt: Any) -> None:
    """The candidates are scored with this checkpoint's tokenizer: its files must be there."""
    vocab_files = [
        *(ckpt.path / f for f in TOKENIZER_MODEL_FILES),
        *ckpt.path.glob("*.model"),
        *ckpt.path.glob("*.tiktoken"),
    ]
    if not any(f.is_file() for f in vocab_files):
        raise EvomergeError(
            f"model '{ckpt.name}': no tokenizer ({', '.join(TOKENIZER_MODEL_FILES[:4])}) in {ckpt.path}; "
            "the search scores candidates with this model's tokenizer: add its tokenizer files"
        )
