"""Parameter space (PS): per layer group (x module kind) x source, a weight and a density, decoded to filter conditions.

Every group compiles to mergekit filter conditions on exact tensor-name substrings (``layers.3.mlp.``,
``embed_tokens``...), so a decoded recipe is an ordinary mergekit config that ``mergekit-yaml`` reproduces.
Coordinates are the parameters themselves inside box bounds (weight in [lo, hi], density in [min, 1]), so
the names and values Optuna shows are the recipe's.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from merge_core.errors import EvomergeError
from merge_core.recipe import Cond, MergeRecipe, OutputSlice, SliceSource

if TYPE_CHECKING:
    from merge_core.methods import MethodSpec

MODULE_KINDS = ("attn", "mlp", "other")  # a layer group's modules (`modules: true`): self_attn.*, mlp.*, the rest
_LAYER_GROUP = re.compile(r"^L(\d+)(?:-(\d+))?$")  # L08 (one layer), L08-15 (a range); `all` is every layer
_MODULE_FILTER = {"attn": "self_attn.", "mlp": "mlp.", "other": ""}
HEAD_FILTERS = ("lm_head", "model.norm.")
_PROBE_SUFFIX = {"attn": "self_attn.q_proj.weight", "mlp": "mlp.up_proj.weight", "other": "input_layernorm.weight"}


def ps_method(name: str, num_sources: int) -> MethodSpec:
    """The spec of `search.space.method` if the parameter space can search it over `num_sources` sources."""
    from merge_core.methods import get_method  # torch: parameter names parse without it (evolve report)

    spec = get_method(name, "search.space.method")
    if spec.kind == "slerp" and num_sources != 1:
        raise EvomergeError("search.space.method: slerp interpolates the base and exactly one source")
    if spec.kind == "model_stock":
        raise EvomergeError("search.space.method: model_stock has no per-source parameters to search")
    return spec


def parse_param_name(name: str) -> tuple[str, str | None, str | None, str]:
    """``L08-15.mlp.math.density`` -> ("L08-15", "mlp", "math", "density"); ``L00.t`` -> ("L00", None, None, "t").

    Group first, an optional module (attn | mlp | other), the source alias (absent for global parameters,
    may itself contain dots), the parameter last: the names `ParameterSpace.names` writes.
    """
    parts = name.split(".")
    if len(parts) < 2 or not all(parts):
        raise EvomergeError(f"parameter name '{name}' is not GROUP[.MODULE][.SOURCE].PARAM")
    group, rest, param = parts[0], parts[1:-1], parts[-1]
    module = rest.pop(0) if rest and rest[0] in MODULE_KINDS else None
    return group, module, (".".join(rest) or None), param


def group_order(group: str) -> tuple:
    """Sort key: embed, then layer groups by first layer (``all`` spans every layer), then head; unknown names last."""
    if group == "embed":
        return (0, 0, group)
    if group == "all":
        return (1, -1, group)
    m = _LAYER_GROUP.match(group)
    if m:
        return (1, int(m.group(1)), group)
    if group == "head":
        return (2, 0, group)
    return (3, 0, group)


@dataclass(frozen=True)
class Group:
    """A set of tensors sharing one value per (source, parameter): some layers' modules, or embed/head."""

    name: str
    layers: tuple[int, ...] = ()
    module: str | None = None  # attn | mlp | other | None (whole layers)
    special: str | None = None  # "embed" | "head"
    extra: tuple[str, ...] = ()  # embed/head filters folded into the first/last layer group

    def filters(self) -> list[str]:
        if self.special == "embed":
            return ["embed_tokens"]
        if self.special == "head":
            return list(HEAD_FILTERS)
        prefix = _MODULE_FILTER[self.module] if self.module else ""
        return [*self.extra, *(f"layers.{i}.{prefix}" for i in self.layers)]

    def probe(self) -> str:
        """A tensor name inside the group, to read a recipe's value for it (encode)."""
        if self.special == "embed":
            return "model.embed_tokens.weight"
        if self.special == "head":
            return "lm_head.weight"
        return f"model.layers.{self.layers[0]}.{_PROBE_SUFFIX[self.module or 'mlp']}"


@dataclass(frozen=True)
class Coord:
    group: Group
    source: str | None  # None for global parameters such as slerp's t
    param: str
    low: float
    high: float
    x0: float


@dataclass
class ParameterSpace:
    """PS genome over ``sources`` (paths) merged onto ``base`` with ``method``; see module docstring."""

    method: str
    base: str | None
    sources: Sequence[str]
    num_layers: int
    aliases: Sequence[str]  # one distinct name per source (the config's `models.aliases()`), in parameter names
    layers_per_group: int | None = None  # None: one group for all layers
    modules: bool = False  # split each layer group into attn / mlp / other
    embed_head_groups: bool = True
    weight_bounds: tuple[float, float] = (0.0, 1.0)
    density_bounds: tuple[float, float] = (0.05, 1.0)
    weight_x0: float = 0.5
    density_x0: float = 0.5
    params: dict = field(default_factory=dict)  # fixed global method parameters (normalize, lambda, ...)
    seed: int = 0
    dtype: str | None = None
    coords: list[Coord] = field(init=False)

    def __post_init__(self) -> None:
        spec = ps_method(self.method, len(self.sources))
        n = self.layers_per_group or self.num_layers
        if n < 1 or self.num_layers % n:
            raise EvomergeError(
                f"search.space.layers_per_group: must divide num_hidden_layers={self.num_layers}, got {n}"
            )
        self.coords = [c for g in self._groups(n) for c in self._group_coords(g, spec)]

    # ---- SearchSpace ---------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return len(self.coords)

    @property
    def names(self) -> list[str]:
        return [".".join(p for p in (c.group.name, self._alias_of(c.source), c.param) if p) for c in self.coords]

    @property
    def bounds(self) -> list[tuple[float, float]]:
        return [(c.low, c.high) for c in self.coords]

    @property
    def x0(self) -> list[float]:
        return [c.x0 for c in self.coords]

    def decode(self, x: Sequence[float]) -> MergeRecipe:
        if len(x) != self.dim:
            raise EvomergeError(f"genome has {len(x)} values, the space has {self.dim}")
        per_model: dict[str | None, dict[str, list[Cond]]] = {}
        for c, v in zip(self.coords, x):
            value = min(max(float(v), c.low), c.high)
            conds = per_model.setdefault(c.source, {}).setdefault(c.param, [])
            conds.extend(Cond(value=value, filter=f) for f in c.group.filters())
        sources = [SliceSource(model=s, parameters=_params(per_model.get(s, {}))) for s in self.sources]
        models = sources if self.base is None else [*sources, SliceSource(model=self.base)]
        global_params = {
            **{k: v for k, v in self.params.items()},
            **{k: tuple(v) for k, v in per_model.get(None, {}).items()},
        }
        return MergeRecipe(
            merge_method=self.method,
            slices=(OutputSlice(sources=tuple(models)),),
            base_model=self.base,
            parameters=tuple(sorted(global_params.items())),
            dtype=self.dtype,
            seed=self.seed,
        )

    def encode(self, recipe: MergeRecipe) -> list[float]:
        from merge_core.plan import locate, resolve_parameter  # torch: the space's names parse without it (config)

        x = []
        for c in self.coords:
            name = c.group.probe()
            v = resolve_parameter(recipe, locate(recipe, name, self.num_layers), name, c.param, c.source)
            if v is None:
                raise EvomergeError(f"recipe sets no {c.param} for {c.source or 'the merge'} at {name}")
            x.append(float(v))
        return x

    # ---- layout --------------------------------------------------------------------------------
    def _groups(self, n: int) -> list[Group]:
        groups: list[Group] = []
        if self.embed_head_groups:
            groups.append(Group("embed", special="embed"))
        for start in range(0, self.num_layers, n):
            layers = tuple(range(start, start + n))
            label = (
                "all" if n == self.num_layers else (f"L{start:02d}" if n == 1 else f"L{start:02d}-{start + n - 1:02d}")
            )
            for module in MODULE_KINDS if self.modules else (None,):
                extra: tuple[str, ...] = ()
                if not self.embed_head_groups and module in (None, "other"):
                    extra = (("embed_tokens",) if start == 0 else ()) + (
                        HEAD_FILTERS if start + n == self.num_layers else ()
                    )
                groups.append(Group(label if module is None else f"{label}.{module}", layers, module, extra=extra))
        if self.embed_head_groups:
            groups.append(Group("head", special="head"))
        return groups

    def _group_coords(self, g: Group, spec: MethodSpec) -> list[Coord]:
        if spec.kind == "slerp":
            return [Coord(g, None, "t", 0.0, 1.0, 0.5)]
        wl, wh = self.weight_bounds
        dl, dh = self.density_bounds
        coords = []
        for s in self.sources:
            coords.append(Coord(g, s, "weight", wl, wh, self.weight_x0))
            if "density" in spec.tensor_params and spec.sparsification is not None:
                coords.append(Coord(g, s, "density", dl, dh, self.density_x0))
        return coords

    def _alias_of(self, source: str | None) -> str | None:
        return None if source is None else self.aliases[list(self.sources).index(source)]


def _params(by_param: dict[str, list[Cond]]) -> tuple:
    return tuple(sorted((k, tuple(v)) for k, v in by_param.items()))
