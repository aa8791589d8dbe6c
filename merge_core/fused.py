"""One compiled kernel per tensor for a GTA candidate (task arithmetic, TIES, DARE): the Materializer's re-merge.

Eager PyTorch runs a TIES candidate as about ten passes over each tensor (mask, weighted product, sign election,
agreement, masked sum, divisor, division, base, output cast), each reading and writing float32 buffers. Here
torch.compile (inductor: C++ on CPU, Triton on GPU) fuses them into one loop that reads each task vector once
(and its 2-byte magnitude key or 4-byte DARE draw inside the mask) and writes the output dtype straight into the
live model's parameter.

``FusedMerge.write`` merges one tensor into its parameter (merge_core.merge.compute_tensor calls it where a worker
has kernels): by a compiled kernel, or, where the kernels decline, by the eager merge. Results are bit for bit those
of ``methods.generalized_task_arithmetic`` followed by the cast to the parameter's dtype: every operation is the
eager one, in the eager order (the weighted products are exact, as m is 0 or 1; sums run source by source as eager
adds them; the divisor's zero fix, the division, λ, the base and the cast follow). Two pieces are computed outside
the kernel so that nothing is reordered:

- a magnitude mask is "the k largest |δ|, ties to the lower index": from the cached ``sparsify.MagnitudeKeys``
  the threshold value v (the k-th largest |δ|) and the index cut among the elements equal to v are found on the
  few elements sharing v's key; in the kernel the mask is |δ| > v or (|δ| = v and index < cut);
- with rescale, ||δ ⊙ m||_1 is summed by the eager ``sum`` over |δ ⊙ m| written by a first compiled kernel, as
  ``sparsify.l1_norm`` sums it (a compiled reduction would order the sum differently).

Each variant (sources, sparsification, consensus, normalize, rescale, λ, dtypes, device) compiles once per process
(dynamic shapes: every tensor is passed flat, so one graph serves every length) and is checked on its first tensor
against the eager merge; a mismatch, or a compiler that fails (no C++ compiler, no Triton), turns the variant off
with one warning and the eager merge runs from then on. A variant's compile and check hold a lock; after that its
kernels run in the Materializer's worker threads at once (dynamo serializes any recompilation itself). Tensors
the kernels decline are merged eagerly one at a time (methods.generalized_task_arithmetic). Other
sparsifications (magnitude_outliers, della), tensors without cached keys and merges without a target tensor stay
eager. So does the linear method: eager adds each w_i·x_i with
ATen's vectorized fused multiply-add (one rounding), which inductor's C++ backend does not emit; a kernel of
separate multiplies and adds differs in the last bit (measured).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import os
import threading
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from merge_core import methods, sparsify
from merge_core.methods import Consensus, Workspace
from merge_core.sparsify import Precomputed, Sparsification

log = logging.getLogger(__name__)

ENV = "EVOMERGE_FUSED"  # "0" turns the fused path off, "1" on, whatever the Materializer was asked
AUTO_MIN_ELEMENTS = 50_000_000  # "auto": fuse when a model has at least this many elements (the compile pays back)


@dataclass(frozen=True)
class Variant:
    """What a compiled graph is specialized on (everything else is a runtime input)."""

    count: int
    sparsification: str | None
    consensus: str | None
    normalize: bool
    rescale: bool
    scaled: bool  # λ != 1
    base_dtype: torch.dtype
    out_dtype: torch.dtype
    device: str


def enabled(requested: bool | str, total_elements: int) -> bool:
    """Whether a Materializer fuses: the EVOMERGE_FUSED environment variable when set, else ``requested``
    (True, False or "auto": models of at least AUTO_MIN_ELEMENTS elements, where one compile per worker pays back)."""
    env = os.environ.get(ENV)
    if env in ("0", "1"):
        return env == "1"
    if requested == "auto":
        return total_elements >= AUTO_MIN_ELEMENTS
    return bool(requested)


class FusedMerge:
    """The compiled merge kernels of one worker (thread-safe: compiled calls hold ``lock``).

    A variant whose compile or call fails (no C++ compiler, no Triton, ...) or whose first tensor differs from the
    eager merge is turned off, with one warning, and merged eagerly from then on; out of memory is raised. Once a
    variant is checked, its kernels run in the worker threads concurrently."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self._kernels: dict[Variant, tuple[Callable, Callable | None]] = {}
        self._verified: set[Variant] = set()
        self._off: dict[Variant, str] = {}
        self.broken: str | None = None  # the last compile or call failure, for reports
        self.fused_tensors = 0  # tensors merged by a compiled kernel (for logs and tests)

    def supports(self, sparsification: str | None, count: int) -> bool:
        return (sparsification is None or sparsification in sparsify.FUSED) and count > 0

    def write(
        self,
        base: Tensor,
        deltas: Sequence[Tensor],
        weights: Sequence[float],
        densities: Sequence[float] | None = None,
        *,
        out: Tensor,
        sparsification: str | None,
        consensus: str | None,
        normalize: bool,
        rescale: bool,
        lambda_: float = 1.0,
        precomputed: Sequence[Precomputed | None] | None = None,
        workspace: Workspace | None = None,
        **eager_only: Any,
    ) -> Tensor:
        """methods.generalized_task_arithmetic's merge, with its arguments (``eager_only``: gammas, epsilons,
        generators, which only the sparsifications left to the eager merge read), cast into ``out`` (e.g. a live
        model's parameter), which is returned: written by a compiled kernel, or, where the kernels decline, by the
        eager merge in fresh buffers, one such merge at a time under the lock (the memory plan of a fused worker
        counts one). The same bits as the eager float32 result copied into ``out``."""
        count = len(deltas)
        weights = methods.per_source(weights, count, None, "weights")
        densities = methods.per_source(densities, count, 1.0, "densities")
        precomputed = methods.per_source(precomputed, count, None, "precomputed")
        eager = functools.partial(
            methods.generalized_task_arithmetic, base, deltas, weights, densities, sparsification=sparsification,
            consensus=consensus, normalize=normalize, rescale=rescale, lambda_=lambda_, precomputed=precomputed,
            **eager_only,
        )  # fmt: skip
        if self._compiled(
            base, deltas, weights, densities, sparsification=sparsification, consensus=consensus,
            normalize=normalize, rescale=rescale, lambda_=lambda_, precomputed=precomputed, out=out, eager=eager,
            workspace=workspace,
        ):  # fmt: skip
            return out
        with self.lock:  # one eager merge at a time beside the kernels, in fresh buffers: what the memory plan counts
            return out.copy_(eager())

    def _compiled(
        self,
        base: Tensor,
        deltas: Sequence[Tensor],
        weights: Sequence[float],
        densities: Sequence[float],
        *,
        sparsification: str | None,
        consensus: str | None,
        normalize: bool,
        rescale: bool,
        lambda_: float,
        precomputed: Sequence[Precomputed | None],
        out: Tensor,
        eager: Callable[[], Tensor],
        workspace: Workspace | None = None,
    ) -> bool:
        """Write the merge into ``out`` with a compiled kernel and return True, or return False (nothing written)
        when this case stays eager. ``eager()`` computes the same merge eagerly (float32): it checks a variant's
        first tensor. With rescale, |δ ⊙ m| goes to the workspace's first buffer (else a fresh tensor)."""
        count = len(deltas)
        if not self.supports(sparsification, count) or not out.is_contiguous():
            return False
        rescale = rescale and sparsification is not None  # eager ignores rescale without a sparsification
        inputs = _runtime_inputs(deltas, weights, densities, sparsification, normalize, rescale, precomputed)
        if inputs is None:
            return False
        variant = Variant(
            count, sparsification, consensus if count else None, normalize, rescale, lambda_ != 1,
            base.dtype, out.dtype, str(out.device),
        )  # fmt: skip
        if variant in self._off:
            return False
        per_source, total = inputs
        scalars = _scalar_tensors(per_source, total, lambda_, out.device)
        flat = [d.reshape(-1) for d in deltas]
        draws = [p.uniform.reshape(-1) for p in precomputed] if sparsification == Sparsification.RANDOM else []  # type: ignore[union-attr]

        def run(main: Callable, norms: Callable | None) -> None:
            if rescale:
                scratch = workspace.buffer(0, flat[0]) if workspace is not None else torch.empty_like(flat[0])
                scalars["factor"] = _rescale_factors(norms, flat, draws, scalars, per_source, scratch)
            main(flat, draws, scalars, base.reshape(-1), out.view(-1))

        return self._run(variant, run, out, eager)

    def _run(self, variant: Variant, run: Callable, out: Tensor, eager: Callable[[], Tensor]) -> bool:
        """``run(main, norms)`` with the variant's compiled kernels (compiled on first use), checked against
        ``eager()`` on the variant's first tensor; False when the variant fails (it is then off). A variant's
        compile and check hold the lock; once checked, its kernels run in every worker thread at once (dynamo
        serializes any recompilation itself)."""
        if variant in self._verified:
            try:
                run(*self._kernels[variant])
            except (torch.OutOfMemoryError, MemoryError):
                raise
            except Exception as err:  # noqa: BLE001 (a recompilation that fails)
                return self._turn_off(variant, err)
            with self.lock:
                self.fused_tensors += 1
            return True
        with self.lock:
            if variant in self._off:
                return False
            try:
                run(*(self._kernels.get(variant) or self._compile(variant)))
            except (torch.OutOfMemoryError, MemoryError):
                raise
            except Exception as err:  # noqa: BLE001 (a compiler that cannot run: no C++ compiler, no Triton, ...)
                return self._turn_off(variant, err, locked=True)
            if variant not in self._verified:
                expected = eager().to(out.dtype)
                if not _same_bits(out, expected):
                    self._off[variant] = "differs from the eager merge"
                    log.warning("fused merge kernel for %s differs from the eager merge: off", _label(variant))
                    out.copy_(expected)
                    return True
                self._verified.add(variant)
            self.fused_tensors += 1
        return True

    def _turn_off(self, variant: Variant, err: Exception, locked: bool = False) -> bool:
        """Record a failed compile or call: the variant is merged eagerly from now on (one warning). False."""
        with contextlib.nullcontext() if locked else self.lock:
            self.broken = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            self._verified.discard(variant)
            self._off[variant] = self.broken
        log.warning("fused merge kernel off for %s (eager merge from now on): %s", _label(variant), self.broken)
        return False

    def _compile(self, variant: Variant) -> tuple[Callable, Callable | None]:
        options = {"eager_numerics.division_rounding": True, "eager_numerics.disable_ftz": True}
        compile_ = _compiler(options if variant.device.startswith("cuda") else None)
        main = compile_(_own_code(_main_kernel(variant)))
        norms = compile_(_own_code(_abs_masked_kernel(variant))) if variant.rescale else None
        self._kernels[variant] = (main, norms)
        return main, norms


def _label(variant: Variant) -> str:
    return (
        f"{variant.count} sources, sparsification {variant.sparsification}, consensus {variant.consensus}, "
        f"normalize {variant.normalize}, rescale {variant.rescale}, {variant.out_dtype} on {variant.device}"
    )


def describe(kernels: FusedMerge | None) -> str:
    """For reports: "compiled (N tensors)" when kernels wrote tensors, else "eager" (why, if the compiler failed)."""
    if kernels is not None and kernels.fused_tensors:
        return f"compiled ({kernels.fused_tensors} tensors)"
    return f"eager ({kernels.broken})" if kernels is not None and kernels.broken else "eager"


def _own_code(fn: Callable) -> Callable:
    """fn with a code object of its own: torch.compile keeps its graphs (and counts recompilations against its
    limit of 8) per code object, and every variant's closure shares the one code object of its factory."""
    code = fn.__code__.replace(co_name=f"{fn.__name__}_{next(_SERIAL)}")
    return types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)


_SERIAL = itertools.count()


def _compiler(options: dict | None) -> Callable[[Callable], Callable]:
    return lambda fn: torch.compile(fn, dynamic=True, fullgraph=True, options=options)


# ----------------------------------------------------------------------------- what the kernels are fed


@dataclass(frozen=True)
class _Source:
    weight: float
    threshold: float = 0.0  # magnitude: the k-th largest |δ| (inf: keep none, -inf: keep all)
    cut: int = 0  # magnitude: elements equal to threshold are kept below this flat index
    density: float = 1.0  # random: kept where u < density
    l1: Tensor | None = None  # rescale: ||δ||_1


def _runtime_inputs(
    deltas: Sequence[Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    sparsification: str | None,
    normalize: bool,
    rescale: bool,
    precomputed: Sequence[Precomputed | None],
) -> tuple[list[_Source], float] | None:
    """Per source the candidate's scalars, and Σw (plain sum's divisor), or None where the eager path must run."""
    sources = []
    for delta, weight, density, pre in zip(deltas, weights, densities, precomputed):
        if delta.dtype != torch.float32 or not delta.is_contiguous() or delta.numel() == 0:
            return None
        l1 = None
        if sparsification is not None and rescale:
            if density >= 1:
                return None  # eager: no mask, no rescale
            l1 = pre.l1 if pre is not None and pre.l1 is not None else sparsify.l1_norm(delta)
        if sparsification == Sparsification.MAGNITUDE:
            if pre is None or pre.keys is None:
                return None
            found = magnitude_threshold(delta, pre.keys, density)
            if found is None:
                return None
            sources.append(_Source(float(weight), threshold=found[0], cut=found[1], l1=l1))
        elif sparsification == Sparsification.RANDOM:
            if pre is None or pre.uniform is None:
                return None
            # density >= 1 keeps everything (u < 1 always); <= 0 nothing (u >= 0): the eager mask, as it is
            sources.append(_Source(float(weight), density=float(density), l1=l1))
        else:
            sources.append(_Source(float(weight)))
    total = float(sum(float(w) for w in weights))
    return sources, (1.0 if abs(total) < 1e-8 else total)


def magnitude_threshold(delta: Tensor, keys: sparsify.MagnitudeKeys, density: float) -> tuple[float, int] | None:
    """(v, cut) with magnitude_mask(delta, density) = |δ| > v or (|δ| = v and flat index < cut); None when no such
    pair exists (a NaN at the threshold)."""
    n = delta.numel()
    k = max(1, int(density * n)) if 0 < density < 1 else (n if density >= 1 else 0)
    if k >= n:
        return float("-inf"), 0
    if k <= 0:
        return float("inf"), 0
    _, above, boundary = sparsify.boundary_elements(keys, k)  # ascending flat indices
    values = delta.reshape(-1).index_select(0, boundary).abs()
    need = k - above  # taken among the boundary elements, 1 <= need <= len(boundary)
    threshold = torch.kthvalue(values, values.numel() - need + 1).values
    larger = int(torch.count_nonzero(values > threshold))
    equal = boundary[values == threshold]  # ascending
    if equal.numel() < need - larger:  # a NaN threshold (NaN task vectors): the eager merge decides
        return None
    return float(threshold), int(equal[need - larger - 1]) + 1


def _scalar_tensors(sources: list[_Source], total: float, lambda_: float, device: torch.device) -> dict[str, Tensor]:
    """The candidate's scalars as 0-dim tensors (graph inputs: new values never recompile), rounded to float32 as
    eager rounds a Python scalar operand."""

    def f32(values: list[float]) -> Tensor:
        return torch.tensor(values, dtype=torch.float32, device=device)

    return {
        "weight": f32([s.weight for s in sources]),
        "threshold": f32([s.threshold for s in sources]),
        "cut": torch.tensor([s.cut for s in sources], dtype=torch.int64, device=device),
        "density": f32([s.density for s in sources]),
        "total": f32([total]),
        "inverse_total": f32([1.0]) / f32([total]),  # float32 1/Σw: CUDA's eager division by a Python scalar
        "lambda": f32([lambda_]),
    }


def _rescale_factors(
    norms: Callable | None,
    flat: list[Tensor],
    draws: list[Tensor],
    scalars: dict[str, Tensor],
    sources: list[_Source],
    scratch: Tensor,
) -> Tensor:
    """Per source ||δ||_1 / ||δ ⊙ m||_1 (sparsify.l1_ratio), the second summed by eager ``sum`` over |δ ⊙ m| from a
    compiled kernel: the very sum sparsify.rescale_factor takes."""
    assert norms is not None
    factors = []
    for i, delta in enumerate(flat):
        draw = draws[i] if draws else delta
        norms(delta, draw, scalars["threshold"][i], scalars["cut"][i], scalars["density"][i], scratch)
        before, after = sources[i].l1, scratch.sum()
        assert before is not None
        factors.append(sparsify.l1_ratio(before, after))
    return torch.stack(factors)


# ----------------------------------------------------------------------------- the kernels (traced per variant)


def _mask(by_magnitude: bool, delta: Tensor, draw: Tensor, threshold: Tensor, cut: Tensor, density: Tensor) -> Tensor:
    """The source's 0/1 float32 mask, magnitude or random, as sparsify computes it (threshold, cut, density: its
    0-dim scalars)."""
    if by_magnitude:
        magnitude = delta.abs()
        index = torch.arange(delta.shape[0], device=delta.device)
        keep = (magnitude > threshold) | ((magnitude == threshold) & (index < cut))
    else:
        keep = draw < density
    return keep.to(torch.float32)


def _source_mask(by_magnitude: bool, delta: Tensor, draw: Tensor, scalars: dict[str, Tensor], i: int) -> Tensor:
    return _mask(by_magnitude, delta, draw, scalars["threshold"][i], scalars["cut"][i], scalars["density"][i])


def _abs_masked_kernel(variant: Variant) -> Callable:
    by_magnitude = variant.sparsification == Sparsification.MAGNITUDE

    def abs_masked(delta: Tensor, draw: Tensor, threshold: Tensor, cut: Tensor, density: Tensor, out: Tensor) -> None:
        out.copy_((delta * _mask(by_magnitude, delta, draw, threshold, cut, density)).abs())

    return abs_masked


def _main_kernel(variant: Variant) -> Callable:
    """base + λ·(Σ m_i w_i s(δ_i)) / (Σ m_i w_i if normalize), cast into out: methods.generalized_task_arithmetic's
    operations in its order."""
    by_magnitude = variant.sparsification == Sparsification.MAGNITUDE  # read here, not in the traced code
    sum_votes = variant.consensus == Consensus.SUM

    def main(deltas: list[Tensor], draws: list[Tensor], scalars: dict[str, Tensor], base: Tensor, out: Tensor) -> None:
        weight = scalars["weight"]
        weighted = []
        for i, delta in enumerate(deltas):
            if variant.sparsification is None:
                weighted.append(delta * weight[i])
            elif variant.rescale:  # (δ·m)·factor·w
                mask = _source_mask(by_magnitude, delta, draws[i] if draws else delta, scalars, i)
                weighted.append(((delta * mask) * scalars["factor"][i]) * weight[i])
            else:  # -0 + (w·m)·δ
                mask = _source_mask(by_magnitude, delta, draws[i] if draws else delta, scalars, i)
                weighted.append(-0.0 + (weight[i] * mask) * delta)
        if variant.consensus is None:
            mixed = weighted[0]
            for w in weighted[1:]:
                mixed = mixed + w
            if variant.normalize and variant.device.startswith("cuda"):
                mixed = mixed * scalars["inverse_total"][0]  # ATen's CUDA a / scalar is a * (1 / scalar)
            elif variant.normalize:
                mixed = mixed / scalars["total"][0]
        else:
            if sum_votes:
                total = weighted[0]
                for w in weighted[1:]:
                    total = total + w
            else:
                total = 0.0 + torch.sign(weighted[0])
                for w in weighted[1:]:
                    total = total + torch.sign(w)
                total = total + 0.0
            sign = torch.copysign(torch.ones_like(total), total)
            agree = [(w * sign > 0).to(torch.float32) for w in weighted]
            mixed = 0.0 + weighted[0] * agree[0]
            for w, a in zip(weighted[1:], agree[1:]):
                mixed = mixed + w * a
            if variant.normalize:
                divisor = agree[0] * weight[0]
                for i, a in enumerate(agree[1:], start=1):
                    divisor = divisor + weight[i] * a
                divisor = divisor + (divisor == 0).to(torch.float32)
                mixed = mixed / divisor
        if variant.scaled:
            mixed = mixed * scalars["lambda"][0]
        out.copy_((mixed + base.to(torch.float32)).to(out.dtype))

    return main


def _same_bits(a: Tensor, b: Tensor) -> bool:
    """Bitwise equality (NaNs and signed zeros included)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    ints = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(a.contiguous().view(ints), b.contiguous().view(ints))


__all__ = ["FusedMerge", "Variant", "describe", "enabled", "magnitude_threshold"]
