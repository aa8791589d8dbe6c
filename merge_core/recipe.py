"""Recipes: plain, hashable merges as data (read from YAML, written back, hashed); nothing here interprets them.

``Recipe`` is one of two kinds, read from YAML by ``load_recipe`` (``merge_method: dataflow`` selects the second):

* ``MergeRecipe``: a parameter-space merge in mergekit's YAML format;
* ``DataFlowRecipe``: a data-flow merge (Sakana's DFS), models A and B and the ``LayerPath`` run through them.

A MergeRecipe is mergekit's configuration (``merge_method``, ``base_model``, ``models`` or ``slices``,
``parameters`` with filters and gradient lists, ``dtype``...) plus one evomerge field, ``seed``
(DARE / DELLA masks). How its parameters resolve per tensor is the merge plan's business (merge_core.plan).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

from merge_core.errors import EvomergeError
from merge_core.yamlio import load_yaml, read_text

# A parameter setting, frozen: scalar | tuple of scalars (gradient) | tuple of Cond (filters).
Setting = Any
Params = tuple[tuple[str, Setting], ...]
MODEL_NAMES = ("A", "B")  # a data-flow path's models, by index


@dataclass(frozen=True)
class Cond:
    """A conditional parameter: applies when ``filter`` is a substring of the tensor name."""

    value: Setting
    filter: str | None = None


@dataclass(frozen=True)
class SliceSource:
    model: str
    layer_range: tuple[int, int] | None = None  # None: all layers (the `models:` form)
    parameters: Params = ()


@dataclass(frozen=True)
class OutputSlice:
    sources: tuple[SliceSource, ...]
    parameters: Params = ()


@dataclass(frozen=True)
class MergeRecipe:
    """One merge, as data. ``slices`` holds one slice with ``layer_range=None`` for the ``models:`` form."""

    merge_method: str
    slices: tuple[OutputSlice, ...]
    base_model: str | None = None
    parameters: Params = ()
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    seed: int = 0
    models_form: bool = field(default=True, compare=True)

    # ---- construction -------------------------------------------------------------------------
    @staticmethod
    def from_dict(d: Mapping[str, Any], where: str = "recipe") -> MergeRecipe:
        return _recipe_from_dict(d, where)

    @staticmethod
    def from_yaml(text: str, where: str = "recipe") -> MergeRecipe:
        return _recipe_from_dict(_mapping(text, where), where)

    @staticmethod
    def load(path: str | Path) -> MergeRecipe:
        p = Path(path)
        if not p.is_file():
            raise EvomergeError(f"{p}: recipe file not found")
        return MergeRecipe.from_yaml(read_text(p, "recipe file"), where=str(p))

    # ---- serialization ------------------------------------------------------------------------
    def to_dict(self, mergekit: bool = False) -> dict[str, Any]:
        """Plain data in mergekit's layout; ``mergekit=True`` drops evomerge-only keys."""
        d: dict[str, Any] = {"merge_method": self.merge_method}
        if self.base_model is not None:
            d["base_model"] = self.base_model
        if self.models_form:
            d["models"] = [_source_dict(s) for s in self.slices[0].sources]
        else:
            d["slices"] = [_slice_dict(s) for s in self.slices]
        if self.parameters:
            d["parameters"] = _thaw_params(self.parameters)
        for key in ("dtype", "out_dtype", "tokenizer_source"):
            if getattr(self, key) is not None:
                d[key] = getattr(self, key)
        if not mergekit:
            d["seed"] = self.seed
        return d

    def to_yaml(self, mergekit: bool = False) -> str:
        return yaml.dump(self.to_dict(mergekit=mergekit), Dumper=_FlowListDumper, sort_keys=False)

    def save(self, path: str | Path, mergekit: bool = False) -> None:
        Path(path).write_text(self.to_yaml(mergekit=mergekit))

    def hash(self) -> str:
        """A stable content hash (the search loop's cache key)."""
        return _content_hash(self.to_dict())

    # ---- structure ----------------------------------------------------------------------------
    @property
    def models(self) -> tuple[str, ...]:
        """Every model a tensor is gathered from, in mergekit's order (slice sources, then base if absent)."""
        names = [s.model for s in self.slices[0].sources]
        if self.base_model is not None and self.base_model not in names:
            names.append(self.base_model)
        return tuple(names)

    @property
    def sources(self) -> tuple[str, ...]:
        """The models other than the base."""
        return tuple(m for m in self.models if m != self.base_model)

    def replace(self, **changes: Any) -> MergeRecipe:
        return dataclasses.replace(self, **changes)


# ---- data-flow recipes ------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerPath:
    """The hops of a data-flow model: `hops[t] = (model, layer)` with model 0 = A, 1 = B, and one scale per hop."""

    hops: tuple[tuple[int, int], ...]
    scales: tuple[float, ...]

    def __post_init__(self) -> None:
        try:
            hops = tuple((int(model), int(layer)) for model, layer in self.hops)
            scales = tuple(float(s) for s in self.scales)
        except (TypeError, ValueError) as err:
            raise EvomergeError(
                f"layer path: hops must be (model, layer) integer pairs and scales numbers ({err})"
            ) from err
        object.__setattr__(self, "hops", hops)
        object.__setattr__(self, "scales", scales)
        if not hops:
            raise EvomergeError("layer path: no hops; a path needs at least one (model, layer) hop")
        if len(scales) != len(hops):
            raise EvomergeError(f"layer path: {len(hops)} hops but {len(scales)} scales; give one scale per hop")
        for t, (model, layer) in enumerate(hops):
            if model not in (0, 1):
                raise EvomergeError(f"layer path: hop {t} names model {model}; use 0 (A) or 1 (B)")
            if layer < 0:
                raise EvomergeError(f"layer path: hop {t} has negative layer index {layer}")
        for t, scale in enumerate(scales):
            if not math.isfinite(scale):
                raise EvomergeError(f"layer path: hop {t} has non-finite scale {scale}")

    def __len__(self) -> int:
        return len(self.hops)

    def check_layers(self, num_layers: Sequence[int]) -> None:
        """Raise unless every hop's model exists and its layer is below that model's layer count (A, B)."""
        for t, (model, layer) in enumerate(self.hops):
            if model >= len(num_layers):
                raise EvomergeError(
                    f"layer path: hop {t} uses model B ({self.describe_hop(t)}) but no model B was given"
                )
            if layer >= num_layers[model]:
                raise EvomergeError(
                    f"layer path: hop {t} ({self.describe_hop(t)}) is out of range; "
                    f"model {MODEL_NAMES[model]} has {num_layers[model]} layers"
                )

    def describe_hop(self, t: int) -> str:
        model, layer = self.hops[t]
        scale = self.scales[t]
        return f"{MODEL_NAMES[model]}{layer}" + ("" if scale == 1.0 else f"(x{scale:.4g})")

    def describe(self) -> str:
        """A readable one-liner such as `A0 A1 B3(x0.8) A2`; scales of 1 are left out."""
        return " ".join(self.describe_hop(t) for t in range(len(self.hops)))


@dataclass(frozen=True)
class DataFlowRecipe:
    """A data-flow merge as data: models A and B and the layer path through them.

    YAML: ``merge_method: dataflow``, ``model_a``, ``model_b`` and ``layer_path``, a list of
    ``{model: A|B, layer, scale}`` (the form search studies store in each trial's ``recipe`` attr).
    """

    model_a: str
    model_b: str
    path: LayerPath
    merge_method: ClassVar[str] = "dataflow"

    def to_dict(self) -> dict[str, Any]:
        hops, scales = self.path.hops, self.path.scales
        path = [
            {"model": MODEL_NAMES[model], "layer": layer, "scale": scale} for (model, layer), scale in zip(hops, scales)
        ]
        return {"merge_method": self.merge_method, "model_a": self.model_a, "model_b": self.model_b, "layer_path": path}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def hash(self) -> str:
        """A stable content hash (the search loop's cache key)."""
        return _content_hash(self.to_dict())

    @staticmethod
    def from_dict(d: Mapping[str, Any], where: str = "recipe") -> DataFlowRecipe:
        try:
            hops = tuple((MODEL_NAMES.index(h["model"]), int(h["layer"])) for h in d["layer_path"])
            scales = tuple(float(h.get("scale", 1.0)) for h in d["layer_path"])
            model_a, model_b = str(d["model_a"]), str(d["model_b"])
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise EvomergeError(
                f"{where}: a dataflow recipe needs model_a, model_b and layer_path [{{model: A|B, layer, scale}}] ({e})"
            ) from None
        try:
            return DataFlowRecipe(model_a, model_b, LayerPath(hops, scales))
        except EvomergeError as e:
            raise EvomergeError(f"{where}: {e}") from None


Recipe = MergeRecipe | DataFlowRecipe


def load_recipe(text: str, where: str = "recipe") -> Recipe:
    """A recipe from YAML text: a DataFlowRecipe for ``merge_method: dataflow``, else a MergeRecipe."""
    d = _mapping(text, where)
    if d.get("merge_method") == DataFlowRecipe.merge_method:
        return DataFlowRecipe.from_dict(d, where)
    return _recipe_from_dict(d, where)


# ---- dict <-> frozen data ----------------------------------------------------------------------


def _mapping(text: str, where: str) -> dict[str, Any]:
    d = load_yaml(text, where)  # safe_load, refusing duplicate keys and alias bombs
    if not isinstance(d, dict):
        raise EvomergeError(f"{where}: expected a mapping with merge_method and models or slices")
    return d


def _content_hash(d: dict[str, Any]) -> str:
    blob = json.dumps(d, sort_keys=True, separators=(",", ":"), default=repr)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _recipe_from_dict(d: Mapping[str, Any], where: str) -> MergeRecipe:
    known = {
        "merge_method",
        "base_model",
        "models",
        "slices",
        "parameters",
        "dtype",
        "out_dtype",
        "tokenizer_source",
        "seed",
        "tokenizer",
        "chat_template",
    }
    unknown = sorted(set(d) - known)
    if unknown:
        raise EvomergeError(f"{where}: unknown key '{unknown[0]}' (known: {', '.join(sorted(known))})")
    method = d.get("merge_method")
    if not isinstance(method, str):
        raise EvomergeError(f"{where}: merge_method: required, a method name such as ties or dare_ties")
    if ("models" in d) == ("slices" in d):
        raise EvomergeError(f"{where}: give exactly one of 'models' or 'slices'")
    if "models" in d:
        models = _as_list(d["models"], f"{where}: models")
        if not models:
            raise EvomergeError(f"{where}: models: at least one model is required")
        sources = tuple(_source(m, f"{where}: models[{i}]", with_range=False) for i, m in enumerate(models))
        slices = (OutputSlice(sources=sources),)
    else:
        raw = _as_list(d["slices"], f"{where}: slices")
        if not raw:
            raise EvomergeError(f"{where}: slices: at least one slice is required")
        slices = tuple(_slice(s, f"{where}: slices[{i}]") for i, s in enumerate(raw))
    seed = d.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise EvomergeError(f"{where}: seed: must be an integer, got {seed!r}")
    for key in ("base_model", "dtype", "out_dtype", "tokenizer_source"):
        if d.get(key) is not None and not isinstance(d[key], str):
            raise EvomergeError(f"{where}: {key}: must be a string, got {d[key]!r}")
    for key in ("dtype", "out_dtype"):
        if d.get(key) is not None and d[key] not in DTYPES:
            raise EvomergeError(f"{where}: {key}: '{d[key]}' is not one of {', '.join(DTYPES)}")
    return MergeRecipe(
        merge_method=method,
        slices=slices,
        base_model=d.get("base_model"),
        parameters=freeze_params(d.get("parameters"), f"{where}: parameters"),
        dtype=d.get("dtype"),
        out_dtype=d.get("out_dtype"),
        tokenizer_source=d.get("tokenizer_source"),
        seed=seed,
        models_form="models" in d,
    )


DTYPES = ("float32", "float16", "bfloat16")


def _slice(d: Any, where: str) -> OutputSlice:
    if not isinstance(d, dict) or "sources" not in d:
        raise EvomergeError(f"{where}: a slice needs 'sources' (a list of {{model, layer_range}})")
    _refuse_unknown(d, ("sources", "parameters"), where)
    sources = tuple(
        _source(s, f"{where}.sources[{i}]", with_range=True)
        for i, s in enumerate(_as_list(d["sources"], f"{where}.sources"))
    )
    return OutputSlice(sources=sources, parameters=freeze_params(d.get("parameters"), f"{where}.parameters"))


def _source(d: Any, where: str, with_range: bool) -> SliceSource:
    if isinstance(d, str):
        return SliceSource(model=d)
    if not isinstance(d, dict) or not isinstance(d.get("model"), str):
        raise EvomergeError(f"{where}: needs 'model' (a local path or hub id)")
    _refuse_unknown(d, ("model", "layer_range", "parameters") if with_range else ("model", "parameters"), where)
    layer_range = None
    if with_range:
        lr = d.get("layer_range")
        if not (isinstance(lr, list) and len(lr) == 2 and all(isinstance(x, int) for x in lr) and lr[0] < lr[1]):
            raise EvomergeError(f"{where}.layer_range: must be [start, end) with start < end, got {lr!r}")
        layer_range = (lr[0], lr[1])
    return SliceSource(
        model=d["model"], layer_range=layer_range, parameters=freeze_params(d.get("parameters"), f"{where}.parameters")
    )


def _refuse_unknown(d: Mapping[str, Any], known: tuple[str, ...], where: str) -> None:
    """Keys mergekit knows but evomerge does not follow (a slice's base_model, residual_weight) are refused, not
    ignored."""
    unknown = sorted(set(d) - set(known))
    if unknown:
        raise EvomergeError(f"{where}: unsupported key '{unknown[0]}' (supported here: {', '.join(known)})")


def freeze_params(p: Any, where: str) -> Params:
    """A parameters mapping as sorted (name, setting) pairs, frozen and checked (one-line errors name ``where``)."""
    if p is None:
        return ()
    if not isinstance(p, dict):
        raise EvomergeError(f"{where}: must be a mapping of parameter name to value")
    return tuple(sorted((str(k), _freeze_setting(v, f"{where}.{k}")) for k, v in p.items()))


def _freeze_setting(v: Any, where: str) -> Setting:
    if isinstance(v, (bool, int, float, str)):
        if isinstance(v, float) and not math.isfinite(v):
            raise EvomergeError(f"{where}: must be finite, got {v}")
        return v
    if isinstance(v, dict):
        if "value" not in v:
            raise EvomergeError(f"{where}: a conditional parameter needs 'value' (and optionally 'filter')")
        f = v.get("filter")
        if f is not None and not isinstance(f, str):
            raise EvomergeError(f"{where}.filter: must be a string")
        return (Cond(value=_freeze_setting(v["value"], f"{where}.value"), filter=f),)
    if isinstance(v, list):
        if not v:
            raise EvomergeError(f"{where}: an empty list is not a parameter value")
        if all(isinstance(e, dict) for e in v):
            return tuple(_freeze_setting(e, f"{where}[{i}]")[0] for i, e in enumerate(v))
        if all(isinstance(e, (bool, int, float, str)) for e in v):
            return tuple(_freeze_setting(e, f"{where}[{i}]") for i, e in enumerate(v))
    raise EvomergeError(
        f"{where}: expected a number, a list of numbers (gradient) or a list of {{filter, value}}; got {v!r}"
    )


def _thaw_setting(s: Setting) -> Any:
    if isinstance(s, tuple):
        if s and all(isinstance(e, Cond) for e in s):
            return [_cond_dict(c) for c in s]
        return list(s)
    return s


def _cond_dict(c: Cond) -> dict[str, Any]:
    d: dict[str, Any] = {}
    if c.filter is not None:
        d["filter"] = c.filter
    d["value"] = _thaw_setting(c.value)
    return d


def _thaw_params(p: Params) -> dict[str, Any]:
    return {k: _thaw_setting(v) for k, v in p}


def _source_dict(s: SliceSource) -> dict[str, Any]:
    d: dict[str, Any] = {"model": s.model}
    if s.layer_range is not None:
        d["layer_range"] = list(s.layer_range)
    if s.parameters:
        d["parameters"] = _thaw_params(s.parameters)
    return d


def _slice_dict(s: OutputSlice) -> dict[str, Any]:
    d: dict[str, Any] = {"sources": [_source_dict(x) for x in s.sources]}
    if s.parameters:
        d["parameters"] = _thaw_params(s.parameters)
    return d


def _as_list(v: Any, where: str) -> list:
    if not isinstance(v, list):
        raise EvomergeError(f"{where}: must be a list")
    return v


class _FlowListDumper(yaml.SafeDumper):
    """Numbers lists (gradients) in flow style, like mergekit's dumper."""


def _represent_list(dumper: yaml.SafeDumper, data: list) -> yaml.Node:
    flow = all(isinstance(e, (int, float)) for e in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_FlowListDumper.add_representer(list, _represent_list)
