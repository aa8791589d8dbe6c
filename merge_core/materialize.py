"""In-memory materialization for the search loop: sources resident on the worker's device, each candidate
written into a live model in place.
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any, Literal

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from merge_core import fused, memplan, methods, sparsify
from merge_core.checkpoint import Checkpoint
from merge_core.errors import EvomergeError
from merge_core.merge import (
    TORCH_DTYPES,
    compute_tensor,
    load_as_float32,
    map_tensors,
    open_models,
    output_dtype,
    resolve_device,
    tensor_workers,
)
from merge_core.plan import check_recipe, method_spec, plan_tensor
from merge_core.recipe import MergeRecipe
from merge_core.sparsify import CACHEABLE, FUSED, KEYED, Sparsification

log = logging.getLogger(__name__)

Resident = memplan.Resident


class Materializer:
    """Built once per worker from a template recipe (method, base, models); ``apply`` writes any candidate
    with the same models into a live model, tensor by tensor, with no file reads.

    Resident state, chosen before anything is loaded by a memory plan (merge_core.memplan: one log line with
    the bytes of each part, or a one-line EvomergeError when nothing fits): each model's tensors cast to the
    recipe's ``dtype`` (as the on-disk merge loads them), or, for task-arithmetic-family methods, the base and the
    float32 task vectors when they fit (``resident="task_vectors"``), so per candidate only the
    candidate-dependent work remains. Either way the values fed to the merge are the ones the on-disk merge
    computes, so results are bit-identical.

    With ``precompute`` (default: when the plan has room), sparsifying methods also keep, per task vector, what no
    candidate changes: its magnitude keys (TIES, breadcrumbs: a mask for any density reads 2 bytes per element),
    the DARE uniform draws for the recipe's seed, and the L1 norm. They are filled during the first ``apply``.
    Where the plan has room (``plan.index``), fused TIES also keeps each task vector's key order (int32), built
    during the second ``apply``: a mask's threshold is then found without scanning the keys.
    The plan counts the live model (``live_dtype``, default the output dtype) and the evaluator's KV cache and
    activations for ``evaluator_batch`` = (sequences, tokens each) beside it, and a generation engine's bytes,
    ``engine_reserve(config, parameters, itemsize)`` (a vLLM engine's copy of the weights and its KV cache).

    With ``fuse`` (default "auto": models of 50M+ elements; the EVOMERGE_FUSED environment variable, 0 or 1,
    overrides), task arithmetic, TIES and DARE candidates are written by one compiled kernel per tensor
    (merge_core.fused: bit-identical, checked against the eager merge on each kernel's first tensor; the eager
    merge wherever no compiler runs).
    """

    def __init__(
        self,
        template: MergeRecipe,
        *,
        device: str | None = "auto",
        resident: Resident = "auto",
        precompute: bool | Literal["auto"] = "auto",
        allow_pickle: bool = False,
        trust_remote_code: bool = False,
        live_dtype: torch.dtype | None = None,
        evaluator_batch: tuple[int, int] | None = None,
        fuse: bool | Literal["auto"] = "auto",
        engine_reserve: Callable[[Any, int, int], int] | None = None,
    ):
        t0 = time.perf_counter()
        self.template = template
        self.device = resolve_device(device)
        self.trust_remote_code = trust_remote_code
        ckpts = open_models(template, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
        self.reference: Checkpoint = ckpts[template.base_model or template.models[0]]
        self.num_layers = self.reference.num_layers
        check_recipe(template, self.num_layers)
        self.out_dtype = output_dtype(template, self.reference)
        self.spec = method_spec(template)
        load_dtype = TORCH_DTYPES.get(template.dtype or "")
        self.names = list(self.reference.names)
        self._name_set = set(self.names)
        self._largest = max((math.prod(self.reference.shape(n)) for n in self.names), default=0)  # elements
        ref = self.reference
        gta = self.spec.kind == "gta"
        self.workers = tensor_workers(self.device)  # tensors merged at once by apply
        total = sum(math.prod(ref.shape(n)) for n in self.names)
        fuse_gta = gta and fused.enabled(fuse, total)
        rescale_default = self.spec.global_params.get("rescale") is True
        self.plan = memplan.plan_memory(
            {n: ref.shape(n) for n in self.names},
            device=str(self.device),
            available=memplan.available_bytes(self.device),
            n_models=len(template.models),
            n_sources=len(template.sources) if gta else 0,
            load_dtype=load_dtype or ref.dtype(next((n for n in self.names if n.endswith(".weight")), self.names[0])),
            live_dtype=live_dtype or self.out_dtype,
            sparsification=self.spec.sparsification,
            evaluator_bytes=memplan.evaluator_reserve(ref.config, *evaluator_batch, live_dtype or self.out_dtype)
            if evaluator_batch
            else 0,
            resident=resident,
            precompute=precompute,
            workers=self.workers,
            method_kind=self.spec.kind,
            fused=fuse_gta,
            rescale=rescale_default or _sets_rescale(template),
            rescale_default=rescale_default,
            engine_bytes=engine_reserve(ref.config, total, (live_dtype or self.out_dtype).itemsize)
            if engine_reserve
            else 0,
        )
        log.info(self.plan.line())
        keep_deltas = self.plan.resident == "task_vectors"
        self._tensors: dict[tuple[str, str], torch.Tensor] = {}
        self._deltas: dict[tuple[str, str], torch.Tensor] = {}
        base = template.base_model
        for name in self.names:
            if keep_deltas:
                assert base is not None
                self._tensors[(base, name)] = stored = _resident(ckpts[base].tensor(name), load_dtype, self.device)
                base_f32 = stored.float()
                for m in template.sources:
                    source = load_as_float32(ckpts[m].tensor(name), load_dtype, self.device)
                    self._deltas[(m, name)] = source.sub_(base_f32)
            else:
                for m, ck in ckpts.items():
                    self._tensors[(m, name)] = _resident(ck.tensor(name), load_dtype, self.device)
        release_free_memory(self.device)
        self.resident_bytes = sum(
            t.numel() * t.element_size() for t in (*self._tensors.values(), *self._deltas.values())
        )
        self._precomputed: dict[tuple[str, str], tuple[sparsify.Precomputed, int | None]] = {}  # (cache, its DARE seed)
        self._applies = 0
        self.precompute = self.plan.cache and self.spec.sparsification in CACHEABLE
        sparsification = self.spec.sparsification  # fused where the plan counted it (memplan.plan_memory)
        fusable = sparsification is None or (self.plan.cache and sparsification in FUSED)
        self.fused = fused.FusedMerge() if fuse_gta and fusable and self.plan.resident == "task_vectors" else None
        self.build_seconds = time.perf_counter() - t0
        log.info(
            "materializer: %d tensors resident on %s (%.1f MiB, %s) in %.1fs",
            len(self.names),
            self.device,
            self.resident_bytes / 2**20,
            "task vectors" if keep_deltas else "sources",
            self.build_seconds,
        )

    # ---- TensorInputs ---------------------------------------------------------------------------
    def tensor(self, model: str, name: str) -> torch.Tensor:
        """The resident tensor as stored (the load dtype): the methods upcast it to float32 exactly, or, for the
        base of a task-arithmetic method, add it to the float32 result as it is (no float32 copy)."""
        return self._tensors[(model, name)]

    def delta(self, model: str, name: str) -> torch.Tensor:
        cached = self._deltas.get((model, name))
        if cached is not None:
            return cached
        assert self.template.base_model is not None
        return self.tensor(model, name).float() - self.tensor(self.template.base_model, name).float()

    def precomputed(self, model: str, name: str, spec: methods.MethodSpec, seed: int) -> sparsify.Precomputed | None:
        """The cached magnitude keys / DARE uniforms of a task vector, and its L1 norm for a method that rescales by
        default (computed on first use; a recipe that turns rescale on elsewhere computes the norm per candidate),
        or None when off."""
        if not self.precompute or spec.sparsification not in CACHEABLE:
            return None
        key = (model, name)
        pre, pre_seed = self._precomputed.get(key, (sparsify.Precomputed(), None))
        needs_keys = spec.sparsification in KEYED and pre.keys is None
        needs_uniform = spec.sparsification == Sparsification.RANDOM and (pre.uniform is None or pre_seed != seed)
        needs_l1 = pre.l1 is None and spec.global_params.get("rescale") is True  # rescaling by default (DARE)
        if needs_keys or needs_uniform or needs_l1:
            delta = self.delta(model, name)
            keys = sparsify.magnitude_keys(delta) if needs_keys and delta.numel() else pre.keys
            if needs_uniform:
                generator = sparsify.dare_generator(seed, name, model, self.device)
                uniform, pre_seed = sparsify.dare_uniform(delta.shape, generator, self.device), seed
            else:
                uniform = pre.uniform
            pre = sparsify.Precomputed(keys=keys, uniform=uniform, l1=sparsify.l1_norm(delta) if needs_l1 else pre.l1)
            self._precomputed[key] = (pre, pre_seed)
            release_free_memory(self.device)  # the fill's temporaries, between cache tensors: no resident holes
        elif self.plan.index and self._applies and pre.keys is not None and pre.keys.order is None:
            # the key order, on the apply after the keys' (the first apply stays as fast as without it)
            if pre.keys.keys.numel() < 2**31:
                pre = dataclasses.replace(pre, keys=dataclasses.replace(pre.keys, order=sparsify.key_order(pre.keys)))
                self._precomputed[key] = (pre, pre_seed)
                release_free_memory(self.device)
        return pre

    # ---- the live model -------------------------------------------------------------------------
    def new_model(self, dtype: torch.dtype | None = None) -> PreTrainedModel:
        """The worker's live model: the reference checkpoint's architecture and weights, on device, in
        ``dtype`` (default: the recipe's output dtype). Candidates are written into it by ``apply``."""
        model = AutoModelForCausalLM.from_pretrained(
            str(self.reference.path), dtype=dtype or self.out_dtype, trust_remote_code=self.trust_remote_code
        )
        if self.device.type == "cpu":  # parameters may be copy-on-write pages of the checkpoint's memory map:
            for p in model.parameters():  # own them now, not page by page in the first apply (tied ones stay tied)
                p.data = p.data.clone()
        return model.to(self.device).eval()

    @torch.no_grad()
    def apply(self, recipe: MergeRecipe, model: PreTrainedModel) -> None:
        """Write the merge of ``recipe`` into ``model``'s parameters in place, one tensor at a time."""
        self._check_same_models(recipe)
        params = dict(model.named_parameters())
        missing = [n for n in params if n not in self._name_set]
        if missing:
            raise EvomergeError(f"live model parameter {missing[0]} has no tensor in {self.reference.name}")

        local, workspaces = threading.local(), []  # one methods.Workspace per thread, reused from tensor to tensor

        def write(name: str) -> None:
            if not hasattr(local, "workspace"):
                local.workspace = methods.Workspace(self._largest)
                workspaces.append(local.workspace)
            plan = plan_tensor(recipe, name, self.num_layers)
            param = params[name]
            with torch.no_grad():  # grad mode is per thread
                merged = compute_tensor(plan, self, self.device, local.workspace, self.fused, param)
                if merged is not param:  # a compiled kernel wrote param itself
                    param.copy_(merged)  # before the next merge reuses the workspace

        names = list(params)
        if self.fused is not None and not self._applies:  # the kernels' first-tensor check on the largest tensor,
            largest = max(names, key=lambda n: params[n].numel())  # alone: the peak the memory plan counts
            write(largest)
            names.remove(largest)
        for _ in map_tensors(write, names, self.workers, window=len(names)):  # write() returns nothing
            pass
        for workspace in workspaces:  # the evaluator gets the memory back between candidates
            workspace.release()
        release_free_memory(self.device)
        self._applies += 1

    def _check_same_models(self, recipe: MergeRecipe) -> None:
        t = self.template
        if (recipe.models, recipe.base_model, recipe.dtype) != (t.models, t.base_model, t.dtype):
            raise EvomergeError(
                "recipe: a Materializer applies recipes over the models, base and dtype it was built with"
            )
        spec = method_spec(recipe)
        if spec.kind != self.spec.kind:
            raise EvomergeError(
                f"recipe: merge_method {spec.name} needs a Materializer built for a {spec.kind} method, "
                f"not {self.spec.name}"
            )
        check_recipe(recipe, self.num_layers)


def _sets_rescale(recipe: MergeRecipe) -> bool:
    """Whether any global or slice parameter of the recipe sets ``rescale`` (true anywhere: the plan's worst case)."""

    def true_anywhere(value: object) -> bool:  # a scalar, a gradient (tuple) or filters (tuple of Cond)
        return value is True or (isinstance(value, tuple) and any(true_anywhere(getattr(v, "value", v)) for v in value))

    params = [*recipe.parameters, *(p for s in recipe.slices for p in s.parameters)]
    return any(name == "rescale" and true_anywhere(value) for name, value in params)


def release_free_memory(device: torch.device) -> None:
    """On CPU, hand the C heap's free pages back to the system (glibc malloc_trim): the temporaries of a build or an
    apply otherwise stay in the process's resident memory as holes between resident tensors."""
    if device.type == "cpu" and _LIBC is not None:
        _LIBC.malloc_trim(0)


def _load_libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:  # not glibc (macOS, musl): nothing to trim
        return None


_LIBC = _load_libc()


def _resident(t: torch.Tensor, load_dtype: torch.dtype | None, device: torch.device) -> torch.Tensor:
    """A tensor as it lives on the worker: on device, in the load dtype (exactly what load_as_float32 upcasts)."""
    t = t.to(device)
    out = t.to(load_dtype) if load_dtype is not None else t
    return out.clone() if out.data_ptr() == t.data_ptr() and device.type == "cpu" else out


__all__ = ["Materializer", "load_as_float32"]
