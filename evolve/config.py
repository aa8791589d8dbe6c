"""The run config: one YAML file -> a validated pydantic model; every error names the field's YAML path, in one line."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from evolve.urls import expand_env, persisted_url, redact_url
from merge_core.errors import EvomergeError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SourceModel(_Strict):
    path: str = Field(description="local directory or hub id")
    alias: Optional[str] = None

    @field_validator("alias")
    @classmethod
    def _alias_ok(cls, v: Optional[str]) -> Optional[str]:
        if v is not None and not re.fullmatch(r"[A-Za-z0-9_\-]+", v):
            raise ValueError(f"'{v}' must be letters, digits, '_' or '-' (it names Optuna parameters)")
        return v


class Models(_Strict):
    base: Optional[str] = None
    sources: list[SourceModel] = Field(min_length=1)
    allow_pickle: bool = False
    trust_remote_code: bool = False

    @field_validator("sources", mode="before")
    @classmethod
    def _paths_as_sources(cls, v: Any) -> Any:
        return [{"path": s} if isinstance(s, str) else s for s in v] if isinstance(v, list) else v

    def aliases(self) -> list[str]:
        return [s.alias or Path(s.path.rstrip("/")).name.lower() for s in self.sources]


class Space(_Strict):
    type: Literal["ps"] = "ps"
    method: str = "dare_ties"
    layers_per_group: Optional[int] = Field(default=None, ge=1)
    modules: bool = False
    embed_head_groups: bool = True
    weight_bounds: tuple[float, float] = (0.0, 1.0)
    density_bounds: tuple[float, float] = (0.05, 1.0)
    x0: dict[Literal["weight", "density"], float] = Field(default_factory=lambda: {"weight": 0.5, "density": 0.5})
    params: dict[str, Any] = Field(default_factory=dict, description="fixed global method parameters")
    dtype: Optional[Literal["float32", "float16", "bfloat16"]] = None

    @model_validator(mode="after")
    def _bounds(self) -> "Space":
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

    model_a: Optional[str] = Field(default=None, description="path/hub id or source alias; default: the base (PS result in a hybrid)")
    model_b: str = Field(description="path/hub id or source alias")
    repeats: int = Field(default=3, ge=1)
    scales: Literal["matrix", "model_pair", "slot", "none"] = "matrix"
    max_path_length: Optional[int] = Field(default=None, ge=2)
    scale_bounds: tuple[float, float] = (0.0, 2.0)

    @model_validator(mode="after")
    def _scale_bounds(self) -> "DataFlow":
        lo, hi = self.scale_bounds
        if not lo < hi:
            raise ValueError(f"scale_bounds: low {lo} must be below high {hi}")
        return self


class Optimizer(_Strict):
    sampler: Literal["cmaes", "pycma", "tpe", "random", "nsga2"] = "cmaes"
    sigma0: float = Field(default=1 / 6, gt=0)
    popsize: Optional[int] = Field(default=None, ge=2)


class Budget(_Strict):
    max_trials: int = Field(default=100, ge=1)
    max_minutes: Optional[float] = Field(default=None, gt=0)
    patience: Optional[int] = Field(default=None, ge=1, description="stop after this many trials without improvement")
    max_consecutive_failures: int = Field(default=10, ge=1)


class DataFlowStage(_Strict):
    space: DataFlow
    optimizer: Optimizer = Field(default_factory=Optimizer)
    budget: Budget = Field(default_factory=Budget)


class Search(_Strict):
    stages: list[Literal["ps", "dfs"]] = Field(default_factory=lambda: ["ps"])
    space: Space = Field(default_factory=Space)
    optimizer: Optimizer = Field(default_factory=Optimizer)
    budget: Budget = Field(default_factory=Budget)
    dfs: Optional[DataFlowStage] = None

    @model_validator(mode="after")
    def _stages(self) -> "Search":
        if not self.stages or len(set(self.stages)) != len(self.stages) or (self.stages[0] == "dfs" and len(self.stages) > 1):
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


class FitnessTerm(_Strict):
    metric: str = Field(description="'<task>/<metric>' as the evaluator reports it")
    weight: float = 1.0
    direction: Literal["max", "min"] = "max"


class Task(BaseModel):
    """One evaluator: its name prefixes its metrics; the other keys go to evals.build_evaluator."""

    model_config = ConfigDict(extra="allow", frozen=True)
    name: str
    type: Literal["generation", "choice", "perplexity", "lm_eval"] = "generation"

    @field_validator("name")
    @classmethod
    def _name_ok(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_\-\.]+", v):
            raise ValueError(f"'{v}' must be letters, digits, '_', '-' or '.'")
        return v

    def evaluator_spec(self, **overrides: Any) -> dict[str, Any]:
        return {**self.model_dump(), **overrides}


class Evaluation(_Strict):
    tasks: list[Task] = Field(min_length=1)
    fitness: list[FitnessTerm] = Field(min_length=1)
    heldout_tasks: list[Task] = Field(default_factory=list, description="scored only for the final table and export")
    heldout_split: Optional[str] = "test"
    heldout_limit: Optional[int] = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _metrics_name_tasks(self) -> "Evaluation":
        names = [t.name for t in self.tasks]
        all_names = names + [t.name for t in self.heldout_tasks]
        if len(set(all_names)) != len(all_names):
            raise ValueError(f"tasks: task names must be unique across tasks and heldout_tasks, got {all_names}")
        for i, term in enumerate(self.fitness):
            task = term.metric.split("/", 1)[0]
            if "/" not in term.metric or task not in names:
                raise ValueError(f"fitness[{i}].metric: '{term.metric}' must be '<task>/<metric>' with task one of {names}")
        return self


class Execution(_Strict):
    backend: Literal["local", "ray"] = "local"
    workers: int = Field(default=1, ge=1)
    device: str = "auto"
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    ray_address: Optional[str] = None
    cpus_per_worker: float = Field(default=0.5, gt=0)
    gpus_per_worker: float = Field(default=0.0, ge=0)
    shared_study: bool = Field(default=False, description="allow several `evolve run` processes on one study")

    @field_validator("device")
    @classmethod
    def _device_ok(cls, v: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", v):
            raise ValueError(f"'{v}' is not auto, cpu, cuda or cuda:N")
        return v

    @model_validator(mode="after")
    def _local_is_one(self) -> "Execution":
        if self.backend == "local" and self.workers != 1:
            raise ValueError(f"workers: the local backend runs one in-process worker; use backend: ray for {self.workers}")
        return self


class RunConfig(_Strict):
    name: str
    seed: int = 0
    models: Models
    search: Search = Field(default_factory=Search)
    evaluation: Evaluation
    execution: Execution = Field(default_factory=Execution)
    storage: Optional[str] = Field(default=None, description="Optuna storage URL; default sqlite:///<run dir, absolute>/study.db; "
                                   "${ENV_VAR} is expanded when used, a literal password is never written")
    output_dir: Optional[str] = None

    @field_validator("name")
    @classmethod
    def _name_ok(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_\-\.]+", v):
            raise ValueError(f"'{v}' must be letters, digits, '_', '-' or '.' (it names the run directory and study)")
        if v in (".", ".."):
            raise ValueError(f"'{v}' is not a name: it names the run directory, one path component (e.g. my-run)")
        return v

    @field_validator("storage")
    @classmethod
    def _storage_ok(cls, v: Optional[str]) -> Optional[str]:
        if v is not None and not re.match(r"^(sqlite|postgresql|postgresql\+\w+|mysql|mysql\+\w+)://", v):
            raise ValueError(f"'{redact_url(v)}' is not an Optuna RDB URL (sqlite:///path.db or postgresql://user@host/db)")
        return v

    @model_validator(mode="after")
    def _aliases_unique(self) -> "RunConfig":
        aliases = self.models.aliases()
        if len(set(aliases)) != len(aliases):
            raise ValueError(f"models.sources: aliases {aliases} collide; give each source an 'alias'")
        return self

    # ---- derived -------------------------------------------------------------------------------
    # The run directory this config was read from (`evolve status|resume|export|report RUN_DIR`), wherever it
    # was moved or copied; None for a config file, whose run directory is output_dir or runs/NAME (from the CWD).
    _loaded_from: Optional[Path] = PrivateAttr(default=None)

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

    def in_run_dir(self, run_dir: Path) -> "RunConfig":
        """This config as read from its run directory: that directory is the run's, whatever output_dir says."""
        cfg = self.model_copy()
        cfg._loaded_from = Path(run_dir)
        return cfg


def load_config(path: str | Path) -> RunConfig:
    p = Path(path)
    if not p.is_file():
        raise EvomergeError(f"{p}: config file not found")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise EvomergeError(f"{p}: not valid YAML ({' '.join(str(e).split())})") from None
    return parse_config(data, where=str(p), base_dir=p.parent)


def parse_config(data: Any, where: str = "config", base_dir: Path | None = None) -> RunConfig:
    if not isinstance(data, dict):
        raise EvomergeError(f"{where}: expected a mapping with name, models, evaluation")
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise EvomergeError(f"{where}: {format_validation_error(e)}") from None


def format_validation_error(e: ValidationError) -> str:
    """The first error as 'yaml.path: message'."""
    err = e.errors()[0]
    loc = ".".join(str(x) for x in err["loc"] if not str(x).startswith("function-")) or "(top level)"
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
