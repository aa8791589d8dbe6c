"""The compiled GTA kernels (merge_core.fused) write, bit for bit, what the eager merge casts into the parameter;
a compiler that fails or a kernel that differs leaves the eager merge in charge."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import AutoModelForCausalLM

from merge_core import fused, methods, sparsify
from merge_core.materialize import Materializer
from merge_core.recipe import MergeRecipe
from tests.merge_core.test_merge import recipe, run_merge, trio

N = 2 * sparsify.KEYED_MIN + 3  # keyed magnitude masks; odd, so no vector width divides it


def task_vectors(count: int, seed: int) -> list[torch.Tensor]:
    """bf16-valued deltas (many equal magnitudes: ties at every threshold), zeros of both signs, exact cancellations."""
    g = torch.Generator().manual_seed(seed)
    deltas = []
    for i in range(count):
        d = (torch.randn(N, generator=g) * 0.02).to(torch.bfloat16).float()
        d[i::5] = 0.0
        d[i + 1 :: 7] = -0.0
        d[::11] = 0.0625 * (-1) ** i
        deltas.append(d)
    return deltas


def cached(deltas: list[torch.Tensor], seed: int) -> list[sparsify.Precomputed]:
    g = torch.Generator().manual_seed(seed + 100)
    return [
        sparsify.Precomputed(
            keys=sparsify.magnitude_keys(d), uniform=torch.rand(N, generator=g), l1=sparsify.l1_norm(d)
        )
        for d in deltas
    ]


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])


VARIANTS = {
    "ties": dict(count=2, sparsification="magnitude", consensus="sum", normalize=True, rescale=False, lambda_=1.0),
    "dare_ties": dict(count=2, sparsification="random", consensus="sum", normalize=False, rescale=True, lambda_=1.0),
    "task_arithmetic": dict(count=3, sparsification=None, consensus=None, normalize=False, rescale=False, lambda_=0.8),
    "ties_count": dict(count=3, sparsification="magnitude", consensus="count", normalize=True, rescale=False,
                       lambda_=1.3),
    "dare_linear": dict(count=2, sparsification="random", consensus=None, normalize=True, rescale=True, lambda_=1.0),
}  # fmt: skip
CANDIDATES = [
    ((0.9, 0.4, 0.5), (0.5, 0.5, 0.3)),  # weights summing to 1.3 (normalize divides by it), and below
    ((1.0, -1.0, 0.2), (0.9, 0.02, 0.6)),
    ((0.3, 0.7, 1.1), (0.0, 0.97, 1.0)),
]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_compiled_kernel_writes_the_eager_merge_bit_for_bit(variant: str) -> None:
    """Several candidates through one compiled graph (weights, densities and thresholds are runtime inputs), into a
    bf16 parameter over a bf16 base and into a float32 one over a float32 base; densities 0 and 1 included."""
    spec = dict(VARIANTS[variant])
    count = spec.pop("count")
    deltas = task_vectors(count, seed=count)
    pre = cached(deltas, seed=count)
    kernels = fused.FusedMerge()
    for dtype in (torch.bfloat16, torch.float32):
        base = torch.randn(N, generator=torch.Generator().manual_seed(7)).to(dtype)
        base[::13] = -0.0
        for weights, densities in CANDIDATES:
            weights, densities = list(weights[:count]), list(densities[:count])
            if spec["rescale"] and max(densities) >= 1:
                densities = [min(d, 0.95) for d in densities]  # density 1 under rescale stays eager (tested apart)
            expected = methods.generalized_task_arithmetic(base, deltas, weights, densities, precomputed=pre, **spec)
            out = torch.full((N,), float("nan"), dtype=dtype)
            before = kernels.fused_tensors
            got = kernels.write(base, deltas, weights, densities, precomputed=pre, out=out, **spec)
            assert got is out and kernels.fused_tensors == before + 1, (kernels.broken, kernels._off)
            assert torch.equal(bits(out), bits(expected.to(dtype))), (variant, dtype, weights, densities)
    assert kernels.broken is None and not kernels._off


def test_magnitude_threshold_reproduces_the_keyed_mask() -> None:
    g = torch.Generator().manual_seed(3)
    many_ties = torch.where(torch.rand(N, generator=g) < 0.6, 0.25, torch.randn(N, generator=g))
    cases = [task_vectors(1, seed=5)[0], many_ties]
    for delta in cases:
        keys = sparsify.magnitude_keys(delta)
        index = torch.arange(N)
        ordered = sparsify.MagnitudeKeys(keys.keys, keys.low, keys.at_least, sparsify.key_order(keys))
        assert torch.equal(keys.keys.reshape(-1)[ordered.order.long()].diff() >= 0, torch.ones(N - 1, dtype=torch.bool))
        for density in (0.0, 1e-5, 0.2, 0.5, 0.61, 0.999, 1.0):
            found = fused.magnitude_threshold(delta, keys, density)
            assert found is not None and fused.magnitude_threshold(delta, ordered, density) == found  # no scan
            v, cut = found
            mask = (delta.abs() > v) | ((delta.abs() == v) & (index < cut))
            assert torch.equal(mask, sparsify.magnitude_mask(delta, density, keys)), density


def test_unsupported_cases_stay_eager() -> None:
    deltas = task_vectors(2, seed=1)
    base, out = torch.zeros(N), torch.empty(N)
    kernels = fused.FusedMerge()
    args = dict(consensus="sum", normalize=True, rescale=False, out=out)
    no_keys = kernels.write(base, deltas, [0.5, 0.5], [0.5, 0.5], sparsification="magnitude", **args)
    outliers = kernels.write(
        base, deltas, [0.5, 0.5], [0.5, 0.5], sparsification="magnitude_outliers", precomputed=cached(deltas, 1), **args
    )
    expected = methods.generalized_task_arithmetic(
        base, deltas, [0.5, 0.5], [0.5, 0.5], sparsification="magnitude_outliers", precomputed=cached(deltas, 1),
        consensus="sum", normalize=True, rescale=False,
    )  # fmt: skip
    assert no_keys is out and outliers is out and kernels.fused_tensors == 0  # written by the eager merge
    assert torch.equal(bits(out), bits(expected))


def test_a_compiler_that_fails_leaves_the_eager_merge(monkeypatch, caplog) -> None:
    def no_compiler(options):
        def compile_(fn):
            def call(*args):
                raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\nmore text")

            return call

        return compile_

    monkeypatch.setattr(fused, "_compiler", no_compiler)
    deltas = task_vectors(2, seed=2)
    base, out = torch.zeros(N), torch.zeros(N)
    kernels = fused.FusedMerge()
    pre = cached(deltas, 2)
    spec = dict(sparsification="magnitude", consensus="sum", normalize=True, rescale=False, precomputed=pre)
    with caplog.at_level(logging.WARNING, logger="merge_core.fused"):
        got = kernels.write(base, deltas, [0.6, 0.4], [0.5, 0.5], out=out, **spec)
    expected = methods.generalized_task_arithmetic(base, deltas, [0.6, 0.4], [0.5, 0.5], **spec)
    assert got is out and torch.equal(bits(out), bits(expected)) and kernels.fused_tensors == 0  # eager wrote it
    assert kernels.broken == "RuntimeError: InvalidCxxCompiler: No working C++ compiler found"
    assert "fused merge kernel off for 2 sources, sparsification magnitude" in caplog.text
    assert fused.describe(kernels) == f"eager ({kernels.broken})"


def test_out_of_memory_in_a_kernel_is_raised(monkeypatch) -> None:
    def oom(options):
        def compile_(fn):
            def call(*args):
                raise torch.OutOfMemoryError("CUDA out of memory")

            return call

        return compile_

    monkeypatch.setattr(fused, "_compiler", oom)
    deltas = task_vectors(2, seed=2)
    with pytest.raises(torch.OutOfMemoryError):
        fused.FusedMerge().write(
            torch.zeros(N), deltas, [0.6, 0.4], sparsification=None, consensus=None, normalize=False, rescale=False,
            out=torch.zeros(N),
        )  # fmt: skip


def test_rescale_without_sparsification_and_nan_thresholds_give_the_eager_merge() -> None:
    """rescale is ignored without a sparsification (as eager ignores it); a NaN at a magnitude threshold has no
    (v, cut) form, so that tensor is merged eagerly and the kernels stay on."""
    deltas = task_vectors(2, seed=6)
    base, kernels = torch.zeros(N), fused.FusedMerge()
    plain = dict(sparsification=None, consensus="sum", normalize=True, rescale=True)
    out = torch.empty(N)
    got = kernels.write(base, deltas, [0.6, 0.4], out=out, **plain)
    expected = methods.generalized_task_arithmetic(base, deltas, [0.6, 0.4], **plain)
    assert got is out and torch.equal(bits(out), bits(expected)) and kernels.fused_tensors == 1
    nan = [d.clone() for d in deltas]
    nan[0][: N // 2] = float("nan")
    pre = cached(nan, 6)
    ties = dict(sparsification="magnitude", consensus="sum", normalize=True, rescale=False, precomputed=pre)
    got = kernels.write(base, nan, [0.6, 0.4], [0.3, 0.5], out=out, **ties)
    expected = methods.generalized_task_arithmetic(base, nan, [0.6, 0.4], [0.3, 0.5], **ties)
    assert got is out and torch.equal(bits(out), bits(expected)) and expected.isnan().any()
    assert kernels.fused_tensors == 1 and not kernels._off


def test_a_kernel_that_differs_is_turned_off_and_the_eager_result_kept(monkeypatch, caplog) -> None:
    def wrong(variant):
        def main(deltas, draws, scalars, base, out):
            out.copy_(base + 1)

        return main

    monkeypatch.setattr(fused, "_main_kernel", wrong)
    deltas = task_vectors(2, seed=4)
    base, out = torch.zeros(N), torch.empty(N)
    kernels = fused.FusedMerge()
    spec = dict(sparsification=None, consensus=None, normalize=False, rescale=False)
    with caplog.at_level(logging.WARNING, logger="merge_core.fused"):
        got = kernels.write(base, deltas, [0.6, 0.4], out=out, **spec)
    expected = methods.generalized_task_arithmetic(base, deltas, [0.6, 0.4], **spec)
    assert got is out and torch.equal(bits(out), bits(expected)) and len(kernels._off) == 1
    assert "differs from the eager merge" in caplog.text
    again = kernels.write(base, deltas, [0.3, 0.7], out=out, **spec)
    expected = methods.generalized_task_arithmetic(base, deltas, [0.3, 0.7], **spec)
    assert again is out and torch.equal(bits(out), bits(expected))  # that variant is eager from now on
    assert kernels.fused_tensors == 0


def test_fusing_is_chosen_by_size_and_the_environment_overrides(monkeypatch) -> None:
    monkeypatch.delenv(fused.ENV, raising=False)
    assert fused.enabled("auto", fused.AUTO_MIN_ELEMENTS) and not fused.enabled("auto", fused.AUTO_MIN_ELEMENTS - 1)
    assert fused.enabled(True, 10) and not fused.enabled(False, 10**12)
    monkeypatch.setenv(fused.ENV, "0")
    assert not fused.enabled(True, 10**12)
    monkeypatch.setenv(fused.ENV, "1")
    assert fused.enabled("auto", 10)


@pytest.mark.parametrize("method", ["ties", "dare_ties", "task_arithmetic"])
def test_materializer_with_compiled_kernels_gives_the_on_disk_merge(tmp_path, method) -> None:
    """Every tensor of a tiny Llama (bf16 live model) through the compiled kernels, for a first candidate and a later
    one from the cache, equals the on-disk merge."""
    base, a, b = trio(tmp_path / "models")
    first = recipe(method, base, a, b)
    later = MergeRecipe.from_yaml(first.to_yaml().replace("0.6", "1.3").replace("0.5", "0.2").replace("0.7", "0.9"))
    mat = Materializer(first, device="cpu", fuse=True)
    assert mat.plan.index == (method == "ties")  # room for the key order: built during the second apply
    live = mat.new_model(torch.bfloat16)
    for i, r in enumerate((first, later, first)):
        mat.apply(r, live)
        disk = AutoModelForCausalLM.from_pretrained(run_merge(r, tmp_path / f"disk{i}"), dtype=torch.bfloat16)
        disk_params = dict(disk.named_parameters())
        for name, p in live.named_parameters():
            assert torch.equal(bits(p.data), bits(disk_params[name].data)), name
    assert mat.fused is not None and mat.fused.broken is None
    assert mat.fused.fused_tensors == 3 * len(list(live.parameters()))  # every tensor of the three applies
    if method == "ties":
        assert all(pre.keys.order is not None for pre, _ in mat._precomputed.values())
