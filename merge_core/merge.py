"""Merge tensor by tensor: ``compute_tensor`` computes one tensor from its plan (merge_core.plan), the one compute
step shared by the on-disk merge (``run_merge``: checkpoints in, a sharded checkpoint out) and the in-memory
Materializer; it is also where the way a tensor is computed is chosen (eager methods, or compiled kernels).
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeVar

import torch

from merge_core import methods
from merge_core.checkpoint import Checkpoint, validate_compatible
from merge_core.errors import EvomergeError
from merge_core.plan import TensorPlan, check_recipe, plan_tensor
from merge_core.recipe import DTYPES, MergeRecipe
from merge_core.sparsify import dare_generator
from merge_core.writer import ShardedWriter, copy_model_files, staged_output

if TYPE_CHECKING:
    from merge_core.fused import FusedMerge

log = logging.getLogger(__name__)

TORCH_DTYPES = {name: getattr(torch, name) for name in DTYPES}
RECIPE_FILE = "recipe.evomerge.yaml"  # the recipe a merged checkpoint was made with, written next to its weights


class TensorInputs(Protocol):
    """Where a tensor's inputs come from: checkpoints on disk, or tensors resident on a device."""

    def tensor(self, model: str, name: str) -> torch.Tensor:
        """The model's tensor on the compute device: float32, or a narrower float dtype the methods upcast."""

    def delta(self, model: str, name: str) -> torch.Tensor:
        """The task vector (model - base), float32, on the compute device."""

    # Optional: ``precomputed(model, name, spec, seed) -> sparsify.Precomputed | None``, candidate-independent
    # sparsification inputs a worker caches across candidates (the Materializer has it; checkpoints do not).


def compute_tensor(
    plan: TensorPlan,
    inputs: TensorInputs,
    device: torch.device,
    workspace: methods.Workspace | None = None,
    fused: FusedMerge | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The merged tensor (float32) for one plan: gather the method's inputs, then compute it. With fused kernels
    and ``out`` (the tensor the result goes to), a GTA merge is written into ``out`` by FusedMerge.write (a compiled
    kernel, else the eager merge) and ``out`` is returned, in its dtype; otherwise methods.merge_tensor computes it
    eagerly (with a workspace, the result may be a view of its buffers: use it before the workspace's next merge)."""
    spec, name, contributors = plan.spec, plan.name, plan.contributors
    gta = spec.kind == "gta"
    cache = getattr(inputs, "precomputed", None) if gta and spec.sparsification else None
    base = inputs.tensor(plan.base, name) if plan.base is not None else None
    tensors = [] if gta else [inputs.tensor(m, name) for m in contributors]
    deltas = [inputs.delta(m, name) for m in contributors] if gta else None
    tensor_params = [plan.model_params[m] for m in contributors]
    generators = [dare_generator(plan.seed, name, m, device) for m in contributors] if spec.stochastic else None
    precomputed = [cache(m, name, spec, plan.seed) for m in contributors] if cache is not None else None
    if gta and fused is not None and out is not None and base is not None and deltas is not None:
        return fused.write(
            base, deltas, **methods.gta_arguments(spec, dict(plan.params), tensor_params), generators=generators,
            precomputed=precomputed, workspace=workspace, out=out,
        )  # fmt: skip
    return methods.merge_tensor(
        spec, base=base, tensors=tensors, deltas=deltas, params=dict(plan.params), tensor_params=tensor_params,
        generators=generators, precomputed=precomputed, workspace=workspace,
    )  # fmt: skip


T = TypeVar("T")


def tensor_workers(device: torch.device) -> int:
    """Tensors merged at once: two on a CPU with two or more cores (the single-threaded parts of one tensor,
    random draws and selections, overlap the other's), one on a GPU."""
    return min(2, os.cpu_count() or 1) if device.type == "cpu" else 1


def map_tensors(
    fn: Callable[[str], T], names: Iterable[str], workers: int, window: int | None = None
) -> Iterator[tuple[str, T]]:
    """(name, fn(name)) in the order of `names`, computing up to `workers` at once (threads; torch releases the
    GIL). Each tensor's result depends on its name alone, so the results are those of a plain loop. At most
    `window` (default `workers`) results are pending at once: a larger window keeps every worker busy past a large
    tensor, for an `fn` whose results hold no memory."""
    if workers <= 1:
        for name in names:
            yield name, fn(name)
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: deque = deque()
        for name in names:
            pending.append((name, pool.submit(fn, name)))
            if len(pending) >= (window or workers):
                done_name, future = pending.popleft()
                yield done_name, future.result()
        while pending:
            done_name, future = pending.popleft()
            yield done_name, future.result()


# ---- inputs from checkpoints on disk ----------------------------------------------------------


class CheckpointInputs:
    """Tensors read from checkpoints per output tensor (the on-disk merge): load, cast to the recipe dtype, upcast."""

    def __init__(
        self,
        checkpoints: Mapping[str, Checkpoint],
        base: str | None,
        load_dtype: torch.dtype | None,
        device: torch.device,
    ):
        self.checkpoints, self.base, self.load_dtype, self.device = checkpoints, base, load_dtype, device
        self._cache: dict[tuple[str, str], torch.Tensor] = {}

    def tensor(self, model: str, name: str) -> torch.Tensor:
        key = (model, name)
        if key not in self._cache:
            self._cache[key] = load_as_float32(self.checkpoints[model].tensor(name), self.load_dtype, self.device)
        return self._cache[key]

    def delta(self, model: str, name: str) -> torch.Tensor:
        assert self.base is not None
        return self.tensor(model, name) - self.tensor(self.base, name)

    def clear(self) -> None:
        self._cache.clear()


def load_as_float32(t: torch.Tensor, load_dtype: torch.dtype | None, device: torch.device) -> torch.Tensor:
    """mergekit casts inputs to the recipe's ``dtype`` on load; we then compute in float32."""
    t = t.to(device)
    if load_dtype is not None:
        t = t.to(load_dtype)
    return t.float()


def open_models(
    recipe: MergeRecipe, *, allow_pickle: bool = False, trust_remote_code: bool = False
) -> dict[str, Checkpoint]:
    """Open every model the recipe names and check they can be merged."""
    ckpts = {
        m: Checkpoint.open(m, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code) for m in recipe.models
    }
    validate_compatible(ckpts, recipe.base_model)
    return ckpts


def output_dtype(recipe: MergeRecipe, reference: Checkpoint) -> torch.dtype:
    name = recipe.out_dtype or recipe.dtype
    if name is not None:
        return TORCH_DTYPES[name]
    return reference.dtype(next(n for n in reference.names if n.endswith(".weight")))


def run_merge(
    recipe: MergeRecipe,
    out_dir: str | Path,
    *,
    device: str = "cpu",
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    max_shard_bytes: int = 5 * 2**30,
    progress: Callable[[Iterable[str]], Iterable[str]] = lambda it: it,
    overwrite: bool = False,
) -> Path:
    """Merge on disk: stream every tensor through compute_tensor into a sharded safetensors HF checkpoint.

    All or nothing: `out_dir` must be new or empty (or `overwrite`), and never an input model or inside one; the
    checkpoint is written to a temporary sibling that takes `out_dir`'s place once complete (see staged_output)."""
    ckpts = open_models(recipe, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    reference = ckpts[recipe.base_model or recipe.models[0]]
    check_recipe(recipe, reference.num_layers)
    dev = resolve_device(device)
    out_dtype = output_dtype(recipe, reference)
    plans = {name: plan_tensor(recipe, name, reference.num_layers) for name in reference.names}  # fail before writing
    tokenizer_src = None
    if recipe.tokenizer_source not in (None, "base"):
        tokenizer_src = ckpts.get(recipe.tokenizer_source)
        if tokenizer_src is None:
            tokenizer_src = Checkpoint.open(recipe.tokenizer_source, trust_remote_code=trust_remote_code)
    read = [c.path for c in ckpts.values()] + ([tokenizer_src.path] if tokenizer_src is not None else [])
    load_dtype = TORCH_DTYPES.get(recipe.dtype or "")

    def merged(name: str) -> torch.Tensor:
        inputs = CheckpointInputs(ckpts, recipe.base_model, load_dtype, dev)  # one per tensor: threads share none
        return compute_tensor(plans[name], inputs, dev).to(out_dtype).cpu()

    with staged_output(out_dir, overwrite=overwrite, inputs=read) as tmp:
        writer = ShardedWriter(tmp, max_shard_bytes=max_shard_bytes)
        for name, tensor in map_tensors(merged, progress(reference.names), tensor_workers(dev)):
            writer.add(name, tensor)
        writer.finalize()
        copy_model_files(reference, tmp, out_dtype, tokenizer_src=tokenizer_src)
        (tmp / RECIPE_FILE).write_text(recipe.to_yaml())
    return Path(out_dir)


def resolve_device(device: str | None) -> torch.device:
    """'cuda' when asked for (error if absent), 'cpu', or None/'auto' for cuda-when-present."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise EvomergeError(f"device: '{device}' was asked for but no CUDA device is available (use --device cpu)")
    if not (device == "cpu" or device.startswith("cuda")):
        raise EvomergeError(f"device: '{device}' is not cpu, cuda, cuda:N or auto")
    return torch.device(device)
