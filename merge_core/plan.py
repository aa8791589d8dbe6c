"""The merge plan: a recipe read tensor by tensor, as mergekit 0.1.5 reads it. A recipe is plain data
(merge_core.recipe); this module alone interprets it for a merge: which method, which models play which part,
whether it fits the models' layers, and every parameter of every tensor (``plan_tensor`` -> ``TensorPlan``, what
merge_core.merge computes a tensor from, with no recipe in sight).

Parameters resolve per tensor exactly as mergekit does:

* precedence: the model's entry in its slice (or ``models``) > the slice's ``parameters`` > global ``parameters``;
* a list of numbers is a gradient over the layers of a slice: ``t = i / (n - 1)`` for the i-th of n layers,
  ``scaled = t * (len - 1)``, ``i0 = int(scaled)``, linear interpolation between entries i0 and i0 + 1;
* a list of ``{filter, value}`` conditions takes the first whose filter is a substring of the tensor name
  (``None`` or ``"*"`` matches everything); no match falls through to the next level;
* tensors outside the layers are read at t = 0 (a gradient gives them its first entry): the embedding with the
  first slice's parameters, the final norm and the head with the last slice's. This is mergekit 0.1.5's planner
  (``plan.py``, ``MergePlanner.plan_module``: one ``ConfigReader(t=0)`` for ``pre_weights`` with
  ``for_out_slice(slices[0])`` and for ``post_weights`` with ``for_out_slice(slices[-1])``; only the layers get
  ``with_t(i / (n - 1))``, ``t = 1`` for a one-layer slice). In the ``models:`` form there is one slice, so all
  three use the ``models`` entries' first gradient value.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from merge_core import methods
from merge_core.checkpoint import layer_index
from merge_core.errors import EvomergeError
from merge_core.recipe import MergeRecipe, OutputSlice, Params, Setting


@dataclass(frozen=True)
class TensorPlan:
    """Everything needed to compute one output tensor: the method, the models it reads, the seed of its random
    masks, and the resolved global and per-model parameters."""

    name: str
    spec: methods.MethodSpec
    base: str | None  # the base the method merges onto (None for linear, whose base is one of the contributors)
    contributors: tuple[str, ...]  # the models whose tensors (linear, slerp, model_stock) or task vectors it merges
    seed: int  # DARE / DELLA masks: sparsify.dare_generator(seed, tensor name, model)
    params: Mapping[str, Any]
    model_params: Mapping[str, Mapping[str, Any]]  # model -> resolved per-model parameters


def method_spec(recipe: MergeRecipe) -> methods.MethodSpec:
    return methods.get_method(recipe.merge_method)


def check_recipe(recipe: MergeRecipe, num_layers: int, where: str = "recipe") -> None:
    """Structural checks that need no tensors: method, base, models, parameter names, slice layout."""
    spec = method_spec(recipe)
    validate_layout(recipe, num_layers, where)
    if spec.needs_base and recipe.base_model is None:
        raise EvomergeError(f"{where}: base_model: required by {spec.name}")
    if spec.kind == "slerp" and (len(recipe.models) != 2 or recipe.base_model not in recipe.models):
        raise EvomergeError(
            f"{where}: slerp merges exactly two models, one of them the base_model (got {len(recipe.models)})"
        )
    if spec.kind == "model_stock" and len(recipe.sources) < 2:
        raise EvomergeError(f"{where}: model_stock needs a base_model and at least two other models")
    if spec.kind == "gta" and not recipe.sources:
        raise EvomergeError(f"{where}: {spec.name} needs at least one model besides the base_model")
    known = set(spec.global_params) | set(spec.tensor_params)
    for where_p, params in _all_param_sets(recipe, where):
        for key, setting in params:
            if key not in known:
                raise EvomergeError(
                    f"{where_p}.{key}: not a parameter of {spec.name} (known: {', '.join(sorted(known))})"
                )
            for value in setting_values(setting):
                problem = methods.check_parameter(key, value)
                if problem:
                    raise EvomergeError(f"{where_p}.{key}: {problem}")


def setting_values(setting: Any) -> Iterable[Any]:
    """Every value a parameter setting can resolve to: the scalar, each gradient point, each filter's value."""
    if isinstance(setting, tuple):
        for item in setting:
            yield from setting_values(getattr(item, "value", item))
    else:
        yield setting


def _all_param_sets(recipe: MergeRecipe, where: str) -> Iterable[tuple[str, Any]]:
    yield f"{where}: parameters", recipe.parameters
    for i, sl in enumerate(recipe.slices):
        yield f"{where}: slices[{i}].parameters", sl.parameters
        for j, s in enumerate(sl.sources):
            yield f"{where}: {'models' if recipe.models_form else f'slices[{i}].sources'}[{j}].parameters", s.parameters


def validate_layout(recipe: MergeRecipe, num_layers: int, where: str = "recipe") -> None:
    """Slices must cover the layers in order, each source using the same layers it outputs (no rearranging)."""
    total = 0
    for i, sl in enumerate(recipe.slices):
        n = _slice_len(sl, num_layers)
        for j, s in enumerate(sl.sources):
            if s.layer_range is None:
                continue
            lo, hi = s.layer_range
            if hi - lo != n:
                raise EvomergeError(
                    f"{where}: slices[{i}].sources[{j}].layer_range: all sources of a slice must have the same length"
                )
            if lo != total:
                raise EvomergeError(
                    f"{where}: slices[{i}].sources[{j}].layer_range {list(s.layer_range)} rearranges layers "
                    f"(output position {total}); layer stacking is data-flow merging, not a parameter merge"
                )
        if {s.model for s in sl.sources} != {s.model for s in recipe.slices[0].sources}:
            raise EvomergeError(f"{where}: slices[{i}]: every slice must draw on the same models")
        total += n
    if total != num_layers:
        raise EvomergeError(f"{where}: slices cover {total} layers but the models have {num_layers}")


def plan_tensor(recipe: MergeRecipe, name: str, num_layers: int) -> TensorPlan:
    """Resolve every parameter the method needs for this tensor (defaults filled, required ones checked)."""
    spec = method_spec(recipe)
    site = locate(recipe, name, num_layers)
    params = {}
    for key, default in spec.global_params.items():
        value = resolve_parameter(recipe, site, name, key, None)
        params[key] = default if value is None else value
    model_params: dict[str, dict[str, Any]] = {}
    for model in recipe.models:
        mp = {}
        for key, default in spec.tensor_params.items():
            value = resolve_parameter(recipe, site, name, key, model)
            if value is None and default is None and _needs(spec, model, recipe):
                raise EvomergeError(f"recipe: parameter '{key}' is required for model '{model}' (tensor {name})")
            mp[key] = default if value is None else value
        model_params[model] = mp
    base = recipe.base_model
    if spec.kind == "linear":
        base, contributors = None, recipe.models
    elif spec.kind == "slerp":
        contributors = tuple(m for m in recipe.models if m != base)
    else:
        contributors = recipe.sources
    return TensorPlan(name, spec, base, contributors, recipe.seed, params, model_params)


def _needs(spec: methods.MethodSpec, model: str, recipe: MergeRecipe) -> bool:
    """Per-model parameters are required for every model that contributes a weight (not the GTA/slerp base)."""
    return spec.kind == "linear" or (spec.kind == "gta" and model != recipe.base_model)


@dataclass(frozen=True)
class TensorSite:
    """Where a tensor sits in the output: which slice, and its t."""

    slice_index: int
    t: float


def locate(recipe: MergeRecipe, tensor_name: str, num_layers: int) -> TensorSite:
    """Place an output tensor: the slice holding its layer and t (outside the layers: t = 0, see the module doc)."""
    layer = layer_index(tensor_name)
    if layer is None:
        i = 0 if "embed" in tensor_name else len(recipe.slices) - 1
        return TensorSite(i, 0.0)
    start = 0
    for i, sl in enumerate(recipe.slices):
        n = _slice_len(sl, num_layers)
        if start <= layer < start + n:
            idx = layer - start
            return TensorSite(i, idx / (n - 1) if n > 1 else 1.0)
        start += n
    raise EvomergeError(f"tensor {tensor_name}: layer {layer} is not covered by the recipe's slices ({start} layers)")


def resolve_parameter(recipe: MergeRecipe, site: TensorSite, tensor_name: str, name: str, model: str | None) -> Any:
    """One parameter for one tensor (and model, for per-model parameters), None when unset anywhere."""
    sl = recipe.slices[site.slice_index]
    levels: list[Params] = []
    if model is not None:
        levels += [s.parameters for s in sl.sources if s.model == model]
    levels += [sl.parameters, recipe.parameters]
    for params in levels:
        for key, setting in params:
            if key == name:
                value = evaluate_setting(tensor_name, setting, site.t)
                if value is not None:
                    return value
    return None


def evaluate_setting(tensor_name: str, setting: Setting, t: float) -> Any:
    """mergekit's evaluate_setting: scalar, gradient over t, or first matching filter (None: no match)."""
    if isinstance(setting, (bool, int, float, str)):
        return setting
    if isinstance(setting, tuple):
        if setting and all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in setting):
            scaled = t * (len(setting) - 1)
            i0 = int(scaled)
            i1 = min(len(setting) - 1, i0 + 1)
            frac = scaled - i0
            return (1 - frac) * setting[i0] + frac * setting[i1]
        if setting and all(isinstance(e, (bool, int, float, str)) for e in setting):
            return setting[int(t * (len(setting) - 1))]
        for cond in setting:
            if cond.filter is None or cond.filter == "*" or cond.filter in tensor_name:
                return evaluate_setting(tensor_name, cond.value, t)
        return None
    raise EvomergeError(f"unexpected parameter setting {setting!r}")


def _slice_len(sl: OutputSlice, num_layers: int) -> int:
    lr = sl.sources[0].layer_range
    return num_layers if lr is None else lr[1] - lr[0]
