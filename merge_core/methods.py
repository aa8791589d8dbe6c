"""Merge methods as pure functions over one tensor name's tensors, with mergekit 0.1.5's semantics.

Every function upcasts its inputs to float32, computes in float32 and returns float32; the caller
casts to the storage dtype. Randomness (DARE, DELLA) comes only from explicit `torch.Generator`s
(merge_core.sparsify.dare_generator). No I/O, no recipes: the merge plan (merge_core.plan) resolves a recipe's
parameters per tensor and merge_core.merge calls these functions (or a compiled kernel of merge_core.fused).

Conventions shared with mergekit 0.1.5 (read from its source, not paraphrased from memory):
- task vectors are sparsified as merge_core.sparsify does (masks, rescale);
- `lambda` scales the merged task vector after the optional normalization, for every GTA method.
- `int8_mask` is accepted for YAML compatibility; it only sets mergekit's mask storage dtype.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Literal

import torch
from torch import Tensor

from merge_core.errors import EvomergeError
from merge_core.sparsify import (
    DEFAULT_EPSILON,
    DEFAULT_GAMMA,
    SPARSIFICATIONS,
    STOCHASTIC,
    Precomputed,
    Sparsification,
    bernoulli_mask,
    f32,
    magnitude_mask,
    magnitude_outliers_mask,
    rescale_factor,
    sparsify,
)


class Consensus(str, Enum):
    """A sign consensus (mergekit's ConsensusMethod): how the sign each element keeps is elected."""

    SUM = "sum"  # the sign of sum_i d_i (TIES)
    COUNT = "count"  # the sign of sum_i sign(d_i)

    def __str__(self) -> str:
        return self.value


CONSENSUS_METHODS: frozenset[str] = frozenset(Consensus)  # membership for plain names too


# ----------------------------------------------------------------------------- linear, slerp


def linear(tensors: Sequence[Tensor], weights: Sequence[float], normalize: bool = True) -> Tensor:
    """sum_i w_i x_i, divided by sum_i w_i when normalize."""
    if len(tensors) != len(weights) or not tensors:
        raise EvomergeError(f"linear needs one weight per tensor; got {len(tensors)} tensors, {len(weights)} weights")
    total = float(sum(weights))
    if normalize and total == 0.0:
        raise EvomergeError(f"linear with normalize=true needs weights that do not sum to 0; got {list(weights)}")
    merged = torch.zeros_like(tensors[0], dtype=torch.float32)
    for tensor, weight in zip(tensors, weights):
        merged.add_(f32(tensor), alpha=float(weight))
    return merged.div_(total) if normalize else merged


def slerp(t: float, v0: Tensor, v1: Tensor, dot_threshold: float = 0.9995, eps: float = 1e-8) -> Tensor:
    """sin((1-t)θ)/sinθ·v0 + sin(tθ)/sinθ·v1, cosθ = <v0/|v0|, v1/|v1|>; lerp when |cosθ| > dot_threshold."""
    if v0.shape != v1.shape:
        raise EvomergeError(f"slerp needs tensors of one shape; got {tuple(v0.shape)} and {tuple(v1.shape)}")
    a, b = f32(v0), f32(v1)
    norm_a, norm_b = a.norm().item(), b.norm().item()
    norm_a, norm_b = (norm_a if norm_a > eps else 1.0), (norm_b if norm_b > eps else 1.0)
    dot = 0.0 if a.numel() == 0 else (a.reshape(-1) @ b.reshape(-1)).item() / (norm_a * norm_b)
    dot = min(1.0, max(-1.0, dot))
    if a.numel() == 0 or abs(dot) > dot_threshold:
        coef_a, coef_b = 1.0 - t, t
    else:
        theta = math.acos(dot)
        coef_a, coef_b = math.sin((1.0 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)
    return a.mul(coef_a).add_(b, alpha=coef_b)


# ----------------------------------------------------------------------------- generalized task arithmetic


def _weighted_sparse(
    delta: Tensor,
    weight: float,
    density: float,
    method: str | None,
    *,
    rescale: bool,
    gamma: float,
    epsilon: float,
    generator: torch.Generator | None,
    precomputed: Precomputed | None,
    out: Tensor,
    scratch: Tensor,
) -> Tensor:
    """w·sparsify(delta), bit for bit, written into ``out`` (float32, delta's shape; ``scratch`` is a second one):
    the mask as float32 0/1 in ``out``, then one pass -0 + (w·m)·δ, whose products are exact (m is 0 or 1) and
    whose -0 start keeps every signed zero; with rescale, (δ·m)·factor·w as sparsify then _weighted compute it."""
    if method is None or (density >= 1 and method in SPARSIFICATIONS):
        return torch.mul(delta, float(weight), out=out)
    pre = precomputed or Precomputed()
    if method == Sparsification.MAGNITUDE:
        mask = magnitude_mask(delta, density, pre.keys, out=out)
    elif method == Sparsification.RANDOM:
        mask = bernoulli_mask(delta.shape, density, generator, delta.device, pre.uniform, out=out)
    elif method == Sparsification.MAGNITUDE_OUTLIERS:
        mask = out.copy_(magnitude_outliers_mask(delta, density, gamma, pre.keys))
    else:  # della_magprune, unknown names: the plain path
        return _weighted(sparsify(delta, density, method, rescale=rescale, gamma=gamma, epsilon=epsilon,
                                  generator=generator, precomputed=precomputed), delta, float(weight))  # fmt: skip
    if not rescale:
        return torch.addcmul(_scalar(-0.0, out), mask, delta, value=float(weight), out=mask)
    masked = torch.mul(delta, mask, out=mask)
    masked.mul_(rescale_factor(delta, masked, pre.l1, scratch))
    return masked.mul_(float(weight))


def _scalar(value: float, like: Tensor) -> Tensor:
    return torch.full((), value, dtype=torch.float32, device=like.device)


class Workspace:
    """Float32 buffers one thread reuses from tensor to tensor: a fresh large CPU tensor costs a page fault per
    4 KiB, about as much as one pass over it. ``buffer(i, like)`` is a view of the i-th, grown on demand; a merge
    given a workspace returns a view of one of them, which must be used before that workspace's next merge.
    ``min_numel`` (e.g. the largest tensor's) sizes every buffer once: growing them tensor by tensor would leave
    freed blocks in the C allocator's per-thread arenas, resident until trimmed."""

    def __init__(self, min_numel: int = 0) -> None:
        self._buffers: list[Tensor] = []
        self.min_numel = min_numel

    def buffer(self, i: int, like: Tensor) -> Tensor:
        n = like.numel()
        while len(self._buffers) <= i:
            self._buffers.append(torch.empty(0, dtype=torch.float32, device=like.device))
        if self._buffers[i].numel() < n or self._buffers[i].device != like.device:
            self._buffers[i] = torch.empty(max(n, self.min_numel), dtype=torch.float32, device=like.device)
        return self._buffers[i][:n].view(like.shape)

    def release(self) -> None:
        """Drop every buffer (the next merge allocates them again)."""
        self._buffers.clear()


def _buffer(workspace: Workspace | None, i: int, like: Tensor) -> Tensor:
    """Workspace buffer i shaped like ``like``, or a fresh float32 tensor without a workspace."""
    if workspace is None:
        return torch.empty(like.shape, dtype=torch.float32, device=like.device)
    return workspace.buffer(i, like)


def _majority_sign(weighted_deltas: Sequence[Tensor], method: str, out: Tensor | None = None) -> Tensor:
    """The elected sign as float32 ±1 (into ``out`` when given): +1 where sum_i d_i ≥ 0 ("sum") or
    sum_i sign(d_i) ≥ 0 ("count").

    "sum" adds the deltas without a +0 start: the total is -0 only where every d_i is ±0, and those elements
    agree with no sign, so electing - there (copysign(1, -0) = -1) changes nothing."""
    if method not in CONSENSUS_METHODS:
        raise EvomergeError(f"unknown consensus {method!r}; use one of {', '.join(Consensus)}")
    first = weighted_deltas[0]
    if method == Consensus.SUM:
        if len(weighted_deltas) == 1:
            total = f32(first)
        else:
            total = torch.add(first, weighted_deltas[1], out=out)
        for delta in weighted_deltas[2:]:
            total = total.add_(delta)
    else:
        total = torch.zeros(first.shape, dtype=torch.float32, device=first.device, out=out)
        for delta in weighted_deltas:
            total.add_(torch.sign(delta))
        total.add_(0.0)  # -0 (no votes) elects +, as sum_i sign(d_i) ≥ 0 does
    return torch.copysign(_scalar(1.0, total), total, out=out)


def per_source(values: Sequence[Any] | None, count: int, default: Any, name: str) -> list[Any]:
    """values as a list of length count, or [default] * count when None."""
    if values is None:
        return [default] * count
    if len(values) != count:
        raise EvomergeError(f"{name} needs one value per source ({count}); got {len(values)}")
    return list(values)


def generalized_task_arithmetic(
    base: Tensor,
    deltas: Sequence[Tensor],
    weights: Sequence[float],
    densities: Sequence[float] | None = None,
    *,
    sparsification: str | None,
    consensus: str | None,
    normalize: bool,
    rescale: bool,
    lambda_: float = 1.0,
    gammas: Sequence[float] | None = None,
    epsilons: Sequence[float] | None = None,
    generators: Sequence[torch.Generator | None] | None = None,
    precomputed: Sequence[Precomputed | None] | None = None,
    workspace: Workspace | None = None,
) -> Tensor:
    """base + λ·(Σ_i m_i w_i s(δ_i)) / (Σ_i m_i w_i if normalize), s = sparsify, m = sign consensus (or 1).

    Every temporary is one of count + 3 float32 buffers (w_i s(δ_i) in buffer i, then the sign, a scratch and the
    divisor), taken from ``workspace`` when given (the result is then a view of buffer 0) or from a fresh one:
    buffer reuse only, the result is the same."""
    count = len(deltas)
    if count == 0:
        return f32(base)
    weights = per_source(weights, count, None, "weights")
    densities = per_source(densities, count, 1.0, "densities")
    gammas = per_source(gammas, count, DEFAULT_GAMMA, "gammas")
    epsilons = per_source(epsilons, count, DEFAULT_EPSILON, "epsilons")
    generators = per_source(generators, count, None, "generators")
    precomputed = per_source(precomputed, count, None, "precomputed")
    workspace = workspace if workspace is not None else Workspace()
    weighted = (
        _weighted_sparse(
            d, w, p, sparsification, rescale=rescale, gamma=g, epsilon=e, generator=r, precomputed=c,
            out=workspace.buffer(i, d), scratch=workspace.buffer(count, d),
        )
        for i, (d, w, p, g, e, r, c) in enumerate(
            zip(deltas, weights, densities, gammas, epsilons, generators, precomputed)
        )
    )  # fmt: skip
    if consensus is None:
        mixed, divisor = _plain_sum(weighted, weights)
    else:
        mixed, divisor = _consensus_sum(list(weighted), weights, consensus, normalize, workspace)
    if normalize:
        mixed.div_(divisor)
    if lambda_ != 1:
        mixed.mul_(lambda_)
    return mixed.add_(base if base.dtype in _EXACT_IN_F32 else f32(base))  # bf16 + float32: upcast on the fly


_EXACT_IN_F32 = (torch.float32, torch.bfloat16, torch.float16)  # float32 holds every value of these exactly


def _weighted(sparsified: Tensor, delta: Tensor, weight: float) -> Tensor:
    """w·s as a fresh tensor (in place when sparsify already made a copy of delta)."""
    return sparsified * weight if sparsified is delta else sparsified.mul_(weight)


def _plain_sum(weighted: Iterable[Tensor], weights: Sequence[float]) -> tuple[Tensor, float]:
    """(Σ_i w_i δ_i, Σ_i w_i) with |Σ w_i| < 1e-8 -> 1, accumulated one source at a time."""
    iterator = iter(weighted)
    mixed = next(iterator)
    for delta in iterator:
        mixed.add_(delta)
    total = float(sum(float(w) for w in weights))
    return mixed, (1.0 if abs(total) < 1e-8 else total)


def _consensus_sum(
    weighted: list[Tensor],
    weights: Sequence[float],
    consensus: str,
    normalize: bool = True,
    workspace: Workspace | None = None,
) -> tuple[Tensor, Tensor | None]:
    """(Σ_i m_i w_i δ_i, Σ_i m_i w_i with zero divisors -> 1, or None without normalize), m_i = sign agreement
    with the elected sign; the sum overwrites weighted[0] (the w_i δ_i are this merge's own buffers).

    Three passes per source (four with the divisor), buffers count .. count + 2 of the workspace: m_i =
    [δ_i·sign > 0] as float32 (sign(0) never agrees), then mixed += δ_i·m_i and divisor += w_i·m_i. The products
    are exact (m_i is 0 or 1), so the sums are the ones a separate mask, product and sum give, bit for bit; mixed
    starts at +0 as a zero-filled sum does. Zero divisors become 1 by adding [divisor == 0] (exact)."""
    count, first = len(weighted), weighted[0]
    sign = _majority_sign(weighted, consensus, out=_buffer(workspace, count, first))
    zero = _scalar(0.0, sign)
    scratch = _buffer(workspace, count + 1, first) if count > 1 else sign
    mixed = divisor = None
    for i, (delta, weight) in enumerate(zip(weighted, weights)):
        agree = sign if i == count - 1 else scratch  # the last source's agreement overwrites the sign
        torch.gt(torch.mul(delta, sign, out=agree), 0, out=agree)  # 1.0 where δ_i has the elected sign
        mixed = torch.addcmul(zero, delta, agree, out=delta) if mixed is None else mixed.addcmul_(delta, agree)
        if normalize and divisor is None:
            divisor = torch.mul(agree, float(weight), out=_buffer(workspace, count + 2, first))
        elif normalize:
            divisor.add_(agree, alpha=float(weight))
    assert mixed is not None
    if divisor is not None:
        divisor.add_(torch.eq(divisor, 0, out=sign))  # the sign buffer is free: the last agreement is used
    return mixed, divisor


# ----------------------------------------------------------------------------- model stock


def model_stock(base: Tensor, tensors: Sequence[Tensor], filter_wise: bool = False) -> Tensor:
    """t·mean(w_i) + (1-t)·w_0, t = N·cos/(1+(N-1)cos) (0 if singular), cos = mean pairwise cos(w_i - w_0)."""
    if len(tensors) < 2:
        raise EvomergeError(f"model_stock needs a base and at least 2 other models; got {len(tensors)} besides it")
    w0 = f32(base)
    rows = (lambda x: x.unsqueeze(0) if x.dim() == 1 else x) if filter_wise else (lambda x: x.reshape(-1))
    offsets = [rows(f32(w)) - rows(w0) for w in tensors]
    cosines = [_cosine(a, b) for i, a in enumerate(offsets) for b in offsets[i + 1 :]]
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    n = len(tensors)
    denominator = 1 + (n - 1) * cos
    singular = denominator.abs() < 1e-6
    safe_denominator = torch.where(singular, torch.ones_like(cos), denominator)
    t = torch.where(singular, torch.zeros_like(cos), n * cos / safe_denominator)
    average = sum(rows(f32(w)) for w in tensors) / n
    return (t * average + (1 - t) * rows(w0)).reshape(base.shape)


def _cosine(a: Tensor, b: Tensor) -> Tensor:
    """<a, b> / max(|a|·|b|, 1e-6) along the last dim, clamped to [-1, 1]."""
    return ((a * b).sum(dim=-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp(min=1e-6)).clamp(-1, 1)


@dataclass(frozen=True)
class MethodSpec:
    """A merge method as mergekit 0.1.5 declares it: its kind, its parameters and their defaults (None = required)."""

    name: str
    kind: Literal["linear", "slerp", "gta", "model_stock"]
    sparsification: Sparsification | None = None
    consensus: Consensus | None = None
    needs_base: bool = True
    global_params: dict[str, Any] = field(default_factory=dict)
    tensor_params: dict[str, Any] = field(default_factory=dict)

    @property
    def stochastic(self) -> bool:
        """Whether the method draws random masks (DARE, DELLA): pass it one `dare_generator` per source."""
        return self.sparsification in STOCHASTIC


def check_parameter(name: str, value: Any) -> str | None:
    """Why `value` cannot be parameter `name` (None when it can). Stricter than mergekit where mergekit would
    silently merge something else: a density above 1 keeps everything (no sparsification), one at or below 0
    drops the model, and a string fails mid-merge."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if name in _BOOL_PARAMS:
        return None if isinstance(value, bool) else f"must be true or false, got {value!r}"
    if name in _NUMBER_RANGES:
        lo, hi, lo_open, hi_open, meaning = _NUMBER_RANGES[name]
        ok = number and (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
        if not ok:
            interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
            return f"must be a number in {interval} ({meaning}), got {value!r}"
        return None
    if name in ("weight", "lambda"):
        return None if number else f"must be a number, got {value!r}"
    return None


_BOOL_PARAMS = ("normalize", "rescale", "int8_mask", "filter_wise")
_NUMBER_RANGES: dict[str, tuple[float, float, bool, bool, str]] = {  # low, high, low open, high open, meaning
    "density": (0.0, 1.0, True, False, "the fraction of each task vector kept"),
    "t": (0.0, 1.0, False, False, "0 is the base model, 1 the other"),
    "gamma": (0.0, 1.0, False, True, "the fraction of largest magnitudes dropped"),
    "epsilon": (0.0, 1.0, False, True, "the spread of DELLA's keep probabilities around density"),
}


def _gta_spec(
    name: str, sparsification: Sparsification | None, consensus: Consensus | None, normalize: bool, rescale: bool
) -> MethodSpec:
    """A GTA method's spec with mergekit's shared and per-model parameters."""
    extra = {
        Sparsification.MAGNITUDE_OUTLIERS: {"gamma": DEFAULT_GAMMA},
        Sparsification.DELLA_MAGPRUNE: {"epsilon": DEFAULT_EPSILON},
    }.get(sparsification, {})
    return MethodSpec(
        name=name,
        kind="gta",
        sparsification=sparsification,
        consensus=consensus,
        global_params={"int8_mask": False, "normalize": normalize, "rescale": rescale, "lambda": 1.0},
        tensor_params={"weight": None, "density": 1.0, **extra},
    )


METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        MethodSpec(
            "linear", "linear", needs_base=False, global_params={"normalize": True}, tensor_params={"weight": None}
        ),
        MethodSpec("slerp", "slerp", global_params={"t": None}),
        MethodSpec("model_stock", "model_stock", global_params={"filter_wise": False}),
        _gta_spec("task_arithmetic", None, None, normalize=False, rescale=False),
        _gta_spec("ties", Sparsification.MAGNITUDE, Consensus.SUM, normalize=True, rescale=False),
        _gta_spec("dare_ties", Sparsification.RANDOM, Consensus.SUM, normalize=False, rescale=True),
        _gta_spec("dare_linear", Sparsification.RANDOM, None, normalize=False, rescale=True),
        _gta_spec("breadcrumbs", Sparsification.MAGNITUDE_OUTLIERS, None, normalize=False, rescale=False),
        _gta_spec("breadcrumbs_ties", Sparsification.MAGNITUDE_OUTLIERS, Consensus.SUM, normalize=False, rescale=False),
        _gta_spec("della", Sparsification.DELLA_MAGPRUNE, Consensus.SUM, normalize=True, rescale=True),
        _gta_spec("della_linear", Sparsification.DELLA_MAGPRUNE, None, normalize=False, rescale=True),
    )
}


def get_method(name: str, field: str = "merge_method") -> MethodSpec:
    """The spec of a supported method; otherwise a one-line error naming `field`."""
    if name not in METHODS:
        raise EvomergeError(f"{field}: '{name}' is not supported (choose from {', '.join(sorted(METHODS))})")
    return METHODS[name]


def _resolved(defaults: dict[str, Any], given: dict[str, Any], method: str) -> dict[str, Any]:
    """given over defaults; a default of None marks a required parameter."""
    values = {**defaults, **given}
    missing = [name for name, value in values.items() if value is None and name in defaults]
    if missing:
        raise EvomergeError(f"merge method {method!r} needs parameter(s) {', '.join(missing)}")
    return values


def gta_arguments(spec: MethodSpec, params: dict[str, Any], tensor_params: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """generalized_task_arithmetic's method arguments (weights, densities, sparsification, consensus, normalize,
    rescale, λ, gammas, epsilons) for a GTA spec and one tensor's global and per-source parameters."""
    glob = _resolved(spec.global_params, params, spec.name)
    per = [_resolved(spec.tensor_params, p, spec.name) for p in tensor_params]
    return dict(
        weights=[p["weight"] for p in per], densities=[p["density"] for p in per],
        sparsification=spec.sparsification, consensus=spec.consensus, normalize=bool(glob["normalize"]),
        rescale=bool(glob["rescale"]), lambda_=float(glob["lambda"]),
        gammas=[p.get("gamma", DEFAULT_GAMMA) for p in per], epsilons=[p.get("epsilon", DEFAULT_EPSILON) for p in per],
    )  # fmt: skip


def merge_tensor(
    spec: MethodSpec,
    *,
    base: Tensor | None,
    tensors: Sequence[Tensor],
    deltas: Sequence[Tensor] | None = None,
    params: dict[str, Any],
    tensor_params: Sequence[dict[str, Any]],
    generators: Sequence[torch.Generator | None] | None = None,
    precomputed: Sequence[Precomputed | None] | None = None,
    workspace: Workspace | None = None,
) -> Tensor:
    """spec's method on one tensor; tensors: non-base sources (linear: every listed input); deltas: source - base;
    precomputed: per source, cached candidate-independent sparsification inputs (GTA methods; results unchanged);
    workspace: reused float32 buffers (GTA methods; the result may then be a view of one of them)."""
    glob = _resolved(spec.global_params, params, spec.name)
    per = [_resolved(spec.tensor_params, p, spec.name) for p in tensor_params]
    if spec.needs_base and base is None:
        raise EvomergeError(f"merge method {spec.name!r} needs a base model")
    if spec.kind == "linear":
        return linear(tensors, [p["weight"] for p in per], glob["normalize"])
    if spec.kind == "slerp":
        if len(tensors) != 1:
            raise EvomergeError(f"slerp merges the base with exactly one other model; got {len(tensors)}")
        return slerp(float(glob["t"]), base, tensors[0])
    if spec.kind == "model_stock":
        return model_stock(base, tensors, bool(glob["filter_wise"]))
    if deltas is None:
        raise EvomergeError(f"merge method {spec.name!r} needs task vectors (source - base)")
    return generalized_task_arithmetic(
        base, deltas, **gta_arguments(spec, glob, per), generators=generators, precomputed=precomputed,
        workspace=workspace,
    )  # fmt: skip
