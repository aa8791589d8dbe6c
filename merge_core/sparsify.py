"""Sparsification of a task vector, with mergekit 0.1.5's semantics: which elements a merge keeps, and the names.

Pure functions over tensors (float32 results; randomness only from explicit generators, seeded per (seed, tensor
name, model) by `dare_generator`), and the closed vocabulary of sparsification methods with what each one allows:
which have a candidate-independent part a worker caches (`CACHEABLE`: magnitude keys, DARE draws), which draw
random masks (`STOCHASTIC`) and which merge_core.fused compiles (`FUSED`). Every other module reads these sets.

- a magnitude mask keeps k = max(1, int(density * n)) elements (ties: the lower flat index); density <= 0 keeps
  none, >= 1 all. It selects by `kthvalue`, not sort, or from `MagnitudeKeys` (the int16 high half of each
  |delta| float32, read in one pass, and a histogram).
- `rescale=True` multiplies a sparsified task vector by ||delta||_1 / ||masked||_1 for every sparsification
  (magnitude, random/DARE, magnitude_outliers, della); skipped when either norm < RESCALE_EPS.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

import torch
from torch import Tensor

from merge_core.errors import EvomergeError


class Sparsification(str, Enum):
    """A sparsification method, by its mergekit name (a member is equal to, hashes and prints as, that string)."""

    MAGNITUDE = "magnitude"  # TIES: the largest |delta|
    RANDOM = "random"  # DARE: a Bernoulli(density) mask
    MAGNITUDE_OUTLIERS = "magnitude_outliers"  # breadcrumbs: the largest after the top gamma are dropped
    DELLA_MAGPRUNE = "della_magprune"  # DELLA: Bernoulli masks whose keep probability rises with |delta|'s rank

    def __str__(self) -> str:
        return self.value


SPARSIFICATIONS: frozenset[str] = frozenset(Sparsification)  # membership for plain names too
KEYED = frozenset({Sparsification.MAGNITUDE, Sparsification.MAGNITUDE_OUTLIERS})  # masks from magnitude keys
CACHEABLE = KEYED | {Sparsification.RANDOM}  # a candidate-independent part (keys, DARE draws): Precomputed
STOCHASTIC = frozenset({Sparsification.RANDOM, Sparsification.DELLA_MAGPRUNE})  # random masks: dare_generator
FUSED = frozenset({Sparsification.MAGNITUDE, Sparsification.RANDOM})  # what merge_core.fused compiles (and none)
DEFAULT_GAMMA = 0.01  # magnitude_outliers: the fraction of largest magnitudes dropped (mergekit's default)
DEFAULT_EPSILON = 0.15  # della_magprune: the spread of keep probabilities around density (mergekit's default)
KEYED_MIN = 2**16  # from this many elements, magnitude masks select through magnitude_keys, not kthvalue (faster)
RESCALE_EPS = 1e-7  # mergekit's rescaled_masked_tensor: no rescale when either L1 norm is below this


@dataclass(frozen=True)
class MagnitudeKeys:
    """A task vector's magnitude keys: key_j = float32 bits of |delta_j| >> 16 (its bfloat16 truncation, as int16),
    monotone in |delta_j| (equal magnitudes share a key), and at_least[i] = #{j : key_j >= low + i}.

    The k largest |delta| are then every element with key > b plus a selection among the few with key == b, where
    b is the smallest key with at_least >= k: one pass over 2 bytes per element instead of a sort or a selection
    over all of them (see _top_k_mask_keyed)."""

    keys: Tensor
    low: int
    at_least: Tensor
    order: Tensor | None = None  # key_order(keys): flat indices by ascending key, ascending within a key (int32)


@dataclass(frozen=True)
class Precomputed:
    """Candidate-independent inputs of one task vector's sparsification, cached by a worker across candidates.

    keys: magnitude_keys(delta) (magnitude masks select from them; see MagnitudeKeys);
    uniform: the U[0, 1) draws of its DARE generator (the random mask becomes uniform < density);
    l1: ||delta||_1. Each gives bit-identical results to computing it afresh.
    """

    keys: MagnitudeKeys | None = None
    uniform: Tensor | None = None
    l1: Tensor | None = None


def magnitude_keys(delta: Tensor) -> MagnitudeKeys:
    """MagnitudeKeys of a non-empty task vector: one pass reading the high halves of the float32 words (sign
    cleared) into int16, and one histogram of those; no sort."""
    if _LITTLE_ENDIAN:  # the high 16 bits of a float32 are the odd int16 of its two
        high_halves = f32(delta).contiguous().view(torch.int16).reshape(-1, 2)[:, 1]
        keys = torch.bitwise_and(high_halves, 0x7FFF)  # |delta| bits >> 16
    else:
        keys = f32(delta).abs().view(torch.int32).bitwise_right_shift(16).to(torch.int16).reshape(-1)
    counts = torch.bincount(keys)  # length max key + 1
    low = int(torch.count_nonzero(torch.cumsum(counts, 0) == 0))  # the smallest key present
    at_least = counts[low:].flip(0).cumsum(0).flip(0)
    return MagnitudeKeys(keys=keys.reshape(delta.shape), low=low, at_least=at_least)


def key_order(keys: MagnitudeKeys) -> Tensor:
    """The flat indices of a task vector's elements sorted by key, stably (int32): the elements of key b are then
    one slice, ascending, so a magnitude threshold needs no scan of the keys (merge_core.fused)."""
    return torch.sort(keys.keys.reshape(-1), stable=True).indices.to(torch.int32)


_LITTLE_ENDIAN = sys.byteorder == "little"


def f32(tensor: Tensor) -> Tensor:
    """x -> float32(x) (no copy when already float32; never modify the result in place)."""
    return tensor.to(torch.float32)


# ----------------------------------------------------------------------------- masks


def _top_k_mask(magnitudes: Tensor, k: int) -> Tensor:
    """Bool mask of the first k entries of a stable descending sort of `magnitudes` (ties: lower flat index wins)."""
    flat = magnitudes.reshape(-1)
    n = flat.numel()
    if k <= 0:
        return torch.zeros(magnitudes.shape, dtype=torch.bool, device=magnitudes.device)
    if k >= n:
        return torch.ones(magnitudes.shape, dtype=torch.bool, device=magnitudes.device)
    threshold = torch.kthvalue(flat, n - k + 1).values  # the k-th largest value
    keep = flat > threshold
    missing = k - int(torch.count_nonzero(keep))
    ties = torch.nonzero(flat == threshold).squeeze(1)
    keep[ties[:missing]] = True
    return keep.reshape(magnitudes.shape)


def _top_k_mask_keyed(delta: Tensor, keys: MagnitudeKeys, k: int, out: Tensor | None = None) -> Tensor:
    """_top_k_mask(|delta|, k) from magnitude_keys(delta): key > b, plus the top of the elements with key == b.
    Written into ``out`` (delta's shape, bool or float32 0/1) when given."""
    n = delta.numel()
    if k <= 0 or k >= n:
        if out is not None:
            return out.fill_(k > 0)
        return torch.full(delta.shape, k > 0, dtype=torch.bool, device=delta.device)
    b, above, boundary = boundary_elements(keys, k)  # ascending indices: ties keep the lower index
    keep = torch.gt(keys.keys.reshape(-1), b, out=None if out is None else out.view(-1))
    chosen = _top_k_mask(f32(delta.reshape(-1).index_select(0, boundary)).abs(), k - above)
    keep.index_fill_(0, boundary[chosen], True)  # index_select / index_fill_: cheaper than advanced indexing
    return keep.reshape(delta.shape)


def boundary_elements(keys: MagnitudeKeys, k: int) -> tuple[int, int, Tensor]:
    """For the k largest |delta| (0 < k < n): the key b of the k-th largest, how many elements have a key above b,
    and the flat indices, ascending, of those whose key is b (a slice of ``keys.order`` when kept, else a scan)."""
    at_least = keys.at_least
    j = int(torch.count_nonzero(at_least >= k)) - 1  # at_least falls with the key: b = low + j
    above = int(at_least[j + 1]) if j + 1 < at_least.numel() else 0
    if keys.order is not None:  # key < b before the slice, > b after it
        n = keys.keys.numel()
        return keys.low + j, above, keys.order[n - int(at_least[j]) : n - above].to(torch.int64)
    return keys.low + j, above, torch.nonzero(keys.keys.reshape(-1) == keys.low + j).squeeze(1)


def magnitude_mask(
    delta: Tensor, density: float, keys: MagnitudeKeys | None = None, out: Tensor | None = None
) -> Tensor:
    """Keep the k = max(1, int(density·n)) largest |delta| (ties: lower index); density ≤ 0 keeps none, ≥ 1 all.
    With ``keys`` (magnitude_keys(delta), made here for a large tensor) the selection reads 2 bytes per element
    and selects among the few that share the threshold's key. Bool, or written into ``out`` (e.g. float32 0/1)."""
    if density >= 1 or density <= 0 or delta.numel() == 0:
        keep_all = density >= 1
        if out is not None:
            return out.fill_(keep_all)
        return torch.full(delta.shape, keep_all, dtype=torch.bool, device=delta.device)
    k = max(1, int(density * delta.numel()))
    keys = keys if keys is not None or delta.numel() < KEYED_MIN else magnitude_keys(delta)
    if keys is not None:
        return _top_k_mask_keyed(delta, keys, k, out)
    mask = _top_k_mask(f32(delta).abs(), k)
    return mask if out is None else out.copy_(mask)


def magnitude_outliers_mask(
    delta: Tensor, density: float, gamma: float = DEFAULT_GAMMA, keys: MagnitudeKeys | None = None
) -> Tensor:
    """Drop the top min(int(γ·n), n - int(density·n)) |delta|, keep the next int(density·n) (breadcrumbs)."""
    if density >= 1:
        return torch.ones(delta.shape, dtype=torch.bool, device=delta.device)
    n = delta.numel()
    target = int(density * n)
    if target <= 0:
        return torch.zeros(delta.shape, dtype=torch.bool, device=delta.device)
    outliers = min(int(gamma * n), n - target)
    keys = keys if keys is not None or n < KEYED_MIN else magnitude_keys(delta)
    if keys is not None:
        return _top_k_mask_keyed(delta, keys, outliers + target) & ~_top_k_mask_keyed(delta, keys, outliers)
    magnitudes = f32(delta).abs()
    return _top_k_mask(magnitudes, outliers + target) & ~_top_k_mask(magnitudes, outliers)


def bernoulli_mask(
    shape: Sequence[int],
    density: float,
    generator: torch.Generator | None,
    device: torch.device | str = "cpu",
    uniform: Tensor | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """m_j = [u_j < density], u_j ~ U[0, 1) (drawn from ``generator``, or the given draws), as float32 0/1
    (into ``out`` when given; the draws then go there first)."""
    if uniform is None:
        uniform = dare_uniform(shape, generator, device, out=out)
    return torch.lt(uniform, density, out=torch.empty_like(uniform) if out is None else out)  # one pass


def dare_uniform(
    shape: Sequence[int],
    generator: torch.Generator | None,
    device: torch.device | str = "cpu",
    out: Tensor | None = None,
) -> Tensor:
    """The U[0, 1) draws bernoulli_mask makes from ``generator`` (cacheable while the generator's seed is fixed)."""
    return torch.rand(tuple(shape), generator=generator, dtype=torch.float32, device=device, out=out)


def rescaled(delta: Tensor, mask: Tensor, rescale: bool, l1: Tensor | None = None) -> Tensor:
    """delta ⊙ m, times ||delta||_1 / ||delta ⊙ m||_1 when rescale (unless either norm < 1e-7)."""
    masked = f32(delta) * (mask if mask.dtype == torch.float32 else mask.to(torch.float32))  # a bool operand is slower
    return masked.mul_(rescale_factor(delta, masked, l1)) if rescale else masked


def rescale_factor(delta: Tensor, masked: Tensor, l1: Tensor | None, scratch: Tensor | None = None) -> Tensor:
    """||delta||_1 / ||masked||_1 by l1_ratio. The norms are abs then sum (``scratch`` holds the absolute values
    when given), as everywhere a norm is cached."""
    before = l1 if l1 is not None else l1_norm(delta, scratch)
    after = l1_norm(masked, scratch)
    return l1_ratio(before, after)


def l1_ratio(before: Tensor, after: Tensor) -> Tensor:
    """before / after, or 1 when either L1 norm is below RESCALE_EPS (0-dim tensors: no host sync)."""
    degenerate = (before < RESCALE_EPS) | (after < RESCALE_EPS)
    return torch.where(degenerate, torch.ones_like(before), before / after)


def l1_norm(x: Tensor, scratch: Tensor | None = None) -> Tensor:
    """sum_j |x_j| in float32 (the one way every L1 norm of a task vector is computed, cached or not)."""
    return torch.abs(f32(x), out=scratch).sum()


def _della_probabilities(delta: Tensor, density: float, epsilon: float) -> Tensor:
    """p = density - ε + 2ε·(rank - 1)/(n - 1), rank ascending in |delta| along dim 1 (1-D: one row)."""
    rows = f32(delta).abs()
    rows = rows.unsqueeze(0) if rows.dim() < 2 else rows
    n = rows.shape[1]
    order = torch.sort(rows, dim=1, descending=True, stable=True).indices  # ties: lower index ranks higher
    position = torch.arange(n, dtype=torch.float32, device=rows.device).reshape(1, n, *[1] * (rows.dim() - 2))
    rank_norm = torch.empty_like(rows).scatter_(1, order, (1.0 - position / max(n - 1, 1)).expand_as(rows))
    if n == 1:  # mergekit divides 0 by 0 here and fails; one element per row gets the mid probability
        rank_norm.fill_(0.5)
    return rank_norm.mul_(2 * epsilon).add_(density - epsilon).reshape(delta.shape)


def rank_magnitude_sample(
    delta: Tensor, density: float, epsilon: float, generator: torch.Generator | None, rescale: bool
) -> Tensor:
    """DELLA: delta ⊙ Bernoulli(p), p ∈ [density-ε, density+ε] rising with |delta|'s rank in its row (dim 1)."""
    if density >= 1:
        return f32(delta)
    if density <= 0:
        return torch.zeros_like(delta, dtype=torch.float32)
    if density + epsilon >= 1 or density - epsilon <= 0:
        raise EvomergeError(
            f"della epsilon must keep density ± epsilon inside (0, 1); got density={density}, epsilon={epsilon}"
        )
    mask = torch.bernoulli(_della_probabilities(delta, density, epsilon), generator=generator)
    return rescaled(delta, mask, rescale)


def sparsify(
    delta: Tensor,
    density: float,
    method: str | None,
    *,
    rescale: bool = False,
    gamma: float = DEFAULT_GAMMA,
    epsilon: float = DEFAULT_EPSILON,
    generator: torch.Generator | None = None,
    precomputed: Precomputed | None = None,
) -> Tensor:
    """delta ⊙ mask(method, density) (optionally L1-rescaled); density ≥ 1 or no method returns delta unchanged."""
    if method is None or (density >= 1 and method in SPARSIFICATIONS):
        return f32(delta)
    pre = precomputed or Precomputed()
    if method == Sparsification.MAGNITUDE:
        return rescaled(delta, magnitude_mask(delta, density, pre.keys), rescale, pre.l1)
    if method == Sparsification.RANDOM:
        return rescaled(
            delta, bernoulli_mask(delta.shape, density, generator, delta.device, pre.uniform), rescale, pre.l1
        )
    if method == Sparsification.MAGNITUDE_OUTLIERS:
        return rescaled(delta, magnitude_outliers_mask(delta, density, gamma, pre.keys), rescale, pre.l1)
    if method == Sparsification.DELLA_MAGPRUNE:
        return rank_magnitude_sample(delta, density, epsilon, generator, rescale)
    raise EvomergeError(f"unknown sparsification {method!r}; use one of {', '.join(Sparsification)}")


def dare_generator(seed: int, tensor_name: str, model: str, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded with sha256(seed, tensor name, model) (stable across processes, unlike hash())."""
    digest = hashlib.sha256(f"{int(seed)}\x00{tensor_name}\x00{model}".encode()).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
