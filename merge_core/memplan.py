"""The memory plan of an in-memory merge worker, decided before anything is loaded.

From one checkpoint's tensor shapes (a safetensors header, or a meta-device model) and the device's available
memory (free CUDA memory, or MemAvailable of /proc/meminfo on CPU), choose what stays resident and say it in one
log line with the bytes of each part:

- the sources in the load dtype (every model, base included), or the base in the load dtype plus one float32
  task vector (source - base) per source: task vectors skip a subtraction per candidate, sources take half the
  bytes (bf16 task vectors would not be bit-identical to the on-disk merge, so they are never chosen);
- the sparsification cache (magnitude keys: int16 per task-vector element, and, for the fused kernels, their key
  order: int32 per element; DARE draws: float32 per element);
- the live model in its dtype; the merge workspace (float32 buffers of the largest tensors merged at once);
- the evaluator's reserve: KV cache, logits and MLP activations at the configured batch and sequence length.

Options are tried in order of speed (task vectors + cache (+ key order), task vectors, sources + cache, sources);
the first whose total fits in HEADROOM of the available memory is taken. When none fits, a one-line EvomergeError
names the shortfall: refused up front, never out of memory half-way through loading.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from merge_core.errors import EvomergeError
from merge_core.sparsify import CACHEABLE, FUSED, Sparsification

Resident = Literal["auto", "task_vectors", "sources"]
HEADROOM = 0.9  # the plan may use this fraction of the available memory (allocator slack, the runtime itself)
PROMPT_TOKENS = 512  # assumed prompt length of one evaluation sequence when sizing the evaluator's KV cache
KEY_BYTES = 2  # int16 magnitude key per task-vector element (sparsify.magnitude_keys)
HISTOGRAM_BINS = 2**15  # at most this many int64 counts per task vector (sparsify.MagnitudeKeys)
UNIFORM_BYTES = 4  # float32 DARE draw per task-vector element
INDEX_BYTES = 4  # int32 key order per task-vector element (sparsify.key_order; fused magnitude masks)
SORT_BYTES = 10  # per element of the tensor whose key order is being built: int64 indices + int16 sorted keys
# float32 buffers of one tensor's GTA merge (methods.generalized_task_arithmetic): one per source (its weighted,
# sparsified task vector, the mask first), + WORK_BUFFERS (elected sign, scratch, divisor), + one per model when
# sources are resident (each upcast); DELLA adds its keep probabilities, sort order (int64) and mask
WORK_BUFFERS = 3
DELLA_BYTES = 16  # per element: float32 probabilities + int64 sort order + float32 mask
GIB = 2**30


@dataclass(frozen=True)
class MemoryPlan:
    """What a worker keeps on its device, and the bytes of each part."""

    device: str
    available: int
    resident: Literal["task_vectors", "sources"]
    cache: bool  # keep the candidate-independent sparsification inputs (magnitude keys, DARE draws)
    parts: tuple[tuple[str, int], ...]  # (what, bytes)
    note: str = ""
    index: bool = False  # keep each task vector's key order too (fused magnitude masks without a scan)

    @property
    def total(self) -> int:
        return sum(b for _, b in self.parts)

    @property
    def budget(self) -> int:
        return int(HEADROOM * self.available)

    def part(self, prefix: str) -> int:
        """Bytes of the parts whose name starts with `prefix` (0 when none)."""
        return sum(b for what, b in self.parts if what.startswith(prefix))

    def line(self) -> str:
        parts = ", ".join(f"{what} {_gib(b)}" for what, b in self.parts if b)
        return (
            f"memory plan on {self.device}: {_gib(self.total)} of {_gib(self.budget)} usable "
            f"({HEADROOM:.0%} of {_gib(self.available)} available): {parts}{self.note}"
        )


def plan_memory(
    shapes: Mapping[str, Sequence[int]],
    *,
    device: str,
    available: int,
    n_models: int,
    n_sources: int,
    load_dtype: torch.dtype,
    live_dtype: torch.dtype | None,
    sparsification: str | None = None,
    evaluator_bytes: int = 0,
    engine_bytes: int = 0,
    resident: Resident = "auto",
    precompute: bool | Literal["auto"] = "auto",
    workers: int = 1,
    method_kind: str | None = None,
    fused: bool = False,
    rescale: bool = False,
    rescale_default: bool = False,
) -> MemoryPlan:
    """The fastest resident layout that fits (see the module docstring); n_sources = task vectors (0: a method
    without them, whose sources are always resident as loaded; "linear" as `method_kind` upcasts one input at a
    time); `workers` tensors are merged at once (each with its
    own workspace); `fused`: merge_core.fused writes the GTA candidates (its kernels keep no float32 buffers: one
    eager merge of a tensor checks each kernel, and each worker holds a rescale scratch or a boundary mask);
    raises EvomergeError when nothing fits."""
    numels = [math.prod(s) for s in shapes.values()]
    params = sum(numels)
    cacheable = n_sources > 0 and sparsification in CACHEABLE
    layouts = ("task_vectors", "sources") if n_sources > 0 else ("sources",)
    if resident != "auto":
        if resident == "task_vectors" and n_sources == 0:
            raise EvomergeError("resident: task_vectors needs a task-arithmetic method with a base_model")
        layouts = (resident,)
    caches = (True, False) if cacheable and precompute == "auto" else (bool(precompute is True and cacheable),)
    options = []
    combos = [
        (layout, cache, index)
        for layout in layouts
        for cache in caches
        for index in ((True, False) if fused and cache and sparsification == Sparsification.MAGNITUDE else (False,))
        if not index or layout == "task_vectors"
    ]
    for layout, cache, index in combos:
        parts: list[tuple[str, int]] = []
        if layout == "task_vectors":
            parts.append((f"base ({_name(load_dtype)})", params * load_dtype.itemsize))
            parts.append((f"{n_sources} float32 task vectors", n_sources * params * 4))
        else:
            parts.append((f"{n_models} sources ({_name(load_dtype)})", n_models * params * load_dtype.itemsize))
        if cache and sparsification == Sparsification.RANDOM:
            parts.append(("DARE draw cache (float32)", n_sources * params * UNIFORM_BYTES))
        elif cache:
            histograms = sum(8 * min(HISTOGRAM_BINS, n + 1) for n in numels)
            parts.append(("magnitude key cache (int16)", n_sources * (params * KEY_BYTES + histograms)))
            if index:
                parts.append(("magnitude key order (int32)", n_sources * params * INDEX_BYTES))
        if live_dtype is not None:
            parts.append((f"live model ({_name(live_dtype)})", params * live_dtype.itemsize))
        if n_sources == 0:  # linear, slerp, model_stock: a float32 result and the inputs upcast
            per_tensor = 4 * (2 if method_kind == "linear" else 1 + n_models)
        else:
            sources_f32 = n_models if layout == "sources" else 0  # each input upcast while a tensor is merged
            per_tensor = 4 * (WORK_BUFFERS + n_sources + sources_f32)
            per_tensor += DELLA_BYTES if sparsification == Sparsification.DELLA_MAGPRUNE else 0
        largest = sorted(numels, reverse=True)[: max(1, workers)]
        fusable = sparsification is None or (cache and sparsification in FUSED)
        if fused and layout == "task_vectors" and fusable:
            # per element and worker: the boundary mask of a magnitude threshold; the rescale scratch, and
            # |δ| for ||δ||_1 where no method default caches it
            scratch = (1 if sparsification == Sparsification.MAGNITUDE else 0) + (4 if rescale else 0)
            scratch += 4 if rescale and not rescale_default else 0
            scratch += SORT_BYTES if index else 0  # building a key order (once, in a worker's apply)
            workspace = per_tensor * largest[0] + scratch * largest[0] * max(1, workers)
        else:
            workspace = per_tensor * sum(largest)
        parts.append(("merge workspace", workspace))
        parts.append(("evaluator reserve", int(evaluator_bytes)))
        parts.append(("generation engine (weights, KV cache)", int(engine_bytes)))
        options.append(
            MemoryPlan(
                device=device, available=int(available), resident=layout, cache=cache, parts=tuple(parts), index=index
            )  # fmt: skip
        )
    for i, plan in enumerate(options):
        if plan.total <= plan.budget:
            if i == 0:
                return plan
            dropped = options[0]
            extras = (" + cache" if dropped.cache else "") + (" + key order" if dropped.index else "")
            note = f" (not {dropped.resident.replace('_', ' ')}{extras}: needs "
            return MemoryPlan(**{**plan.__dict__, "note": f"{note}{_gib(dropped.total)})"})
    smallest = options[-1]
    short = smallest.total - smallest.budget
    raise EvomergeError(
        f"memory plan: the smallest layout needs {_gib(smallest.total)} on {device} "
        f"({', '.join(f'{w} {_gib(b)}' for w, b in smallest.parts if b)}) but {_gib(smallest.budget)} is usable "
        f"({HEADROOM:.0%} of {_gib(available)} available), short by {_gib(short)}: use a device with more "
        "memory, fewer or smaller models, or a smaller evaluation batch_size"
    )


def kv_bytes_per_token(config: Any, itemsize: int) -> int:
    """Bytes of K and V for one token in every layer (2 · layers · kv_heads · head_dim · dtype size)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = int(text.num_attention_heads)
    kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(text, "head_dim", None) or text.hidden_size // heads)
    return 2 * int(text.num_hidden_layers) * kv_heads * head_dim * itemsize


def evaluator_reserve(config: Any, batch: int, tokens: int, dtype: torch.dtype) -> int:
    """Bytes the evaluator needs beside the weights for `batch` sequences of `tokens`: the KV cache
    (2·layers·kv_heads·head_dim per token), float32 logits for every position, and the MLP's activations."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    intermediate = int(getattr(text, "intermediate_size", None) or 4 * text.hidden_size)
    positions = batch * tokens
    kv = kv_bytes_per_token(config, dtype.itemsize) * positions
    logits = positions * int(text.vocab_size) * 4
    mlp = 3 * positions * intermediate * dtype.itemsize
    return kv + logits + mlp


def fit_batch(config: Any, tokens: int, dtype: torch.dtype, free: int, cap: int) -> int:
    """The most sequences of `tokens` (at most `cap`) whose evaluator reserve fits in `free` bytes; 0 when not even
    one does."""
    fits = [b for b in range(1, cap + 1) if evaluator_reserve(config, b, tokens, dtype) <= free]
    return fits[-1] if fits else 0


def available_bytes(device: torch.device) -> int:
    """Free CUDA memory (torch.cuda.mem_get_info), or MemAvailable from /proc/meminfo on CPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    import psutil

    return int(psutil.virtual_memory().available)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _gib(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB / 100 else f"{n / 2**20:.1f} MiB"


__all__ = ["MemoryPlan", "available_bytes", "evaluator_reserve", "plan_memory"]
