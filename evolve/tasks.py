"""The evaluation tasks of a run config: one pydantic model per task type (generation, choice, perplexity, lm_eval),
whose fields are its evaluator's constructor fields (`evals`), validated strictly, each error in one line naming the
field. `Task` is their union, told apart by `type`."""

from __future__ import annotations

import re
import typing
from typing import Annotated, Any, Literal, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic_core import PydanticCustomError

from evals import spec

MAX_NAME = 100  # run, task and alias names: they name directories, studies and Optuna parameters
MAX_SEED = 2**32  # seeds feed numpy (Optuna's samplers, pycma), which takes 0 <= seed < 2**32


def name_chars(v: str, purpose: str = "") -> str:
    """Task and run names: letters, digits, '_', '-' or '.' (they name metrics, run directories and studies)."""
    if not re.fullmatch(r"[A-Za-z0-9_\-\.]+", v):
        raise ValueError(f"'{v}' must be letters, digits, '_', '-' or '.'{purpose}")
    return v


_Count = lambda minimum: Annotated[int, Field(ge=minimum)]  # noqa: E731
_Paths = str | list[str]
_ERROR_LOC_NOISE = ("function-", "list[", "dict[", "str", "int", "bool", "nullable", "constrained-", "literal[")


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
    limit_mode: Literal[spec.LIMIT_MODES] = spec.LIMIT_MODE  # type: ignore[valid-type]  # which `limit` items
    seed: Annotated[int, Field(ge=0, lt=MAX_SEED)] = 0
    batch_size: _Count(1) = spec.BATCH_SIZE

    @field_validator("name")
    @classmethod
    def _name_ok(cls, v: str) -> str:
        return name_chars(v)

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
    # "auto": the most sequences of the task's longest prompt + answer that the worker's memory plan leaves room for
    # (at most AUTO_BATCH_CAP), decided when the worker starts
    batch_size: _Count(1) | Literal[spec.AUTO_BATCH] = spec.BATCH_SIZE  # type: ignore[valid-type]

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
    type: Literal[spec.GENERATION] = spec.GENERATION
    dataset: GenerationDataset | None = None
    max_new_tokens: _Count(1) = spec.MAX_NEW_TOKENS
    stop: list[str] = []
    extract: str | dict[str, Any] = spec.EXTRACT
    language_check: dict[str, Any] | None = None
    gold_prob: bool = spec.GOLD_PROB
    extract_gold: bool = False
    chat_template: bool = False  # each prompt as one user turn of the tokenizer's chat template


class ChoiceTask(_ItemsTask):
    type: Literal[spec.CHOICE]
    dataset: ChoiceDataset | None = None


class PerplexityTask(_Task):
    type: Literal[spec.PERPLEXITY]
    text_file: str
    max_length: _Count(2) = spec.PERPLEXITY_MAX_LENGTH


class LmEvalTask(_Task):
    type: Literal[spec.LM_EVAL]
    tasks: Annotated[list[str], Field(min_length=1)]
    include_path: _Paths | None = None
    metrics: dict[str, _Paths] | None = None
    num_fewshot: _Count(0) | None = None
    max_length: _Count(2) | None = None


TASK_TYPES = spec.TASK_TYPES  # evals.EVALUATOR_TYPES builds each
_TASK_MODELS = (GenerationTask, ChoiceTask, PerplexityTask, LmEvalTask)
_TASK_KIND = {model: typing.get_args(model.model_fields["type"].annotation)[0] for model in _TASK_MODELS}


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
