"""The fused GTA consensus gives, bit for bit (signed zeros included), what the plain formula gives: a mask per
source from sign agreement, a zero-started sum of the masked weighted deltas and of the masked weights."""

import pytest
import torch

from merge_core import methods, sparsify


def plain_consensus_merge(base, deltas, weights, consensus, normalize):
    """The textbook TIES/GTA step, one temporary per operation (the code the fused form replaced)."""
    weighted = [d * w for d, w in zip(deltas, weights)]
    total = torch.zeros_like(weighted[0])
    for x in weighted:
        total.add_(x if consensus == "sum" else torch.sign(x))
    majority = total >= 0
    mixed, divisor = torch.zeros_like(weighted[0]), torch.zeros_like(weighted[0])
    for x, w in zip(weighted, weights):
        agree = (((x > 0) == majority) & (x != 0)).to(torch.float32)
        mixed.add_(x * agree)
        divisor.add_(agree, alpha=w)
    divisor.masked_fill_(divisor == 0, 1.0)
    if normalize:
        mixed.div_(divisor)
    return mixed.add_(base)


def bits(t):
    return t.contiguous().view(torch.int32)


@pytest.mark.parametrize("consensus", ["sum", "count"])
@pytest.mark.parametrize("weights", [(0.6, 0.4), (1.0, -1.0), (0.3, 0.5, 0.2), (0.7,)])
def test_fused_consensus_is_bit_identical_to_the_plain_formula(consensus, weights):
    g = torch.Generator().manual_seed(len(weights))
    n = 4096
    base = torch.randn(n, generator=g)
    base[::97] = -0.0  # a signed zero survives `base + 0` only if the merged delta there is +0, as in the plain form
    deltas = []
    for i in range(len(weights)):
        d = torch.randn(n, generator=g).to(torch.bfloat16).float()
        d[i::5] = 0.0
        d[i + 1 :: 7] = -0.0
        d[::11] = 0.25 * (-1) ** i  # exact cancellations
        deltas.append(d)
    merged = methods.generalized_task_arithmetic(
        base, deltas, list(weights), sparsification=None, consensus=consensus, normalize=True, rescale=False
    )
    expected = plain_consensus_merge(base, deltas, weights, consensus, normalize=True)
    assert torch.equal(bits(merged), bits(expected))


def plain_gta(base, weighted, weights, consensus, normalize):
    """The GTA step over already weighted, sparsified task vectors, one temporary per operation."""
    if consensus is None:
        mixed = weighted[0].clone()
        for x in weighted[1:]:
            mixed.add_(x)
        total = sum(weights)
        divisor = 1.0 if abs(total) < 1e-8 else total
    else:
        total = torch.zeros_like(weighted[0])
        for x in weighted:
            total.add_(x)
        majority = total >= 0
        mixed, divisor = torch.zeros_like(weighted[0]), torch.zeros_like(weighted[0])
        for x, w in zip(weighted, weights):
            agree = (((x > 0) == majority) & (x != 0)).to(torch.float32)
            mixed.add_(x * agree)
            divisor.add_(agree, alpha=w)
        divisor.masked_fill_(divisor == 0, 1.0)
    if normalize:
        mixed = mixed / divisor
    return mixed.add_(base.float())


@pytest.mark.parametrize("method", ["ties", "dare_ties", "breadcrumbs_ties", "dare_linear", "breadcrumbs"])
def test_sparsified_gta_through_a_workspace_is_bit_identical_to_the_plain_formula(method):
    """Masks written as float32 into reused buffers, -0 + (w·m)·δ in one pass, the divisor fixed by adding
    [divisor == 0]: the plain mask, product, rescale, weight and consensus, bit for bit, whether the buffers are
    fresh or a workspace's (reused from a larger tensor to a smaller one and back), with a bf16 base added as is."""
    spec = methods.METHODS[method]
    g = torch.Generator().manual_seed(5)
    workspace = methods.Workspace()
    for n in (sparsify.KEYED_MIN + 1000, 3000, sparsify.KEYED_MIN + 1000):
        base = torch.randn(n, generator=g)
        base[::97] = -0.0
        base = base.to(torch.bfloat16)
        deltas, weights, densities = [], [0.6, -0.3], [0.5, 0.3]
        for i in range(2):
            d = torch.randn(n, generator=g).to(torch.bfloat16).float() * 0.02
            d[i::5], d[i + 1 :: 7] = 0.0, -0.0
            deltas.append(d)
        uniforms = [torch.rand(n, generator=g) for _ in deltas]
        pre = [
            sparsify.Precomputed(keys=sparsify.magnitude_keys(d), uniform=u, l1=d.abs().sum())
            for d, u in zip(deltas, uniforms)
        ]
        expected_weighted = []
        for d, w, p, u in zip(deltas, weights, densities, uniforms):
            if spec.sparsification == "magnitude":
                mask = sparsify.magnitude_mask(d, p)
            elif spec.sparsification == "random":
                mask = u < p
            else:
                mask = sparsify.magnitude_outliers_mask(d, p, 0.01)
            masked = d * mask.to(torch.float32)
            if spec.global_params["rescale"]:
                after = masked.abs().sum()
                masked = masked * (d.abs().sum() / after)
            expected_weighted.append(masked * w)
        expected = plain_gta(base, expected_weighted, weights, spec.consensus, spec.global_params["normalize"])
        for ws in (None, workspace):
            merged = methods.generalized_task_arithmetic(
                base, deltas, weights, densities, sparsification=spec.sparsification, consensus=spec.consensus,
                normalize=spec.global_params["normalize"], rescale=spec.global_params["rescale"], precomputed=pre,
                workspace=ws,
            )  # fmt: skip
            assert torch.equal(bits(merged), bits(expected)), (method, n, ws)


def test_magnitude_keys_read_the_high_half_of_each_float():
    """int16 keys from the high halves of the float32 words equal |delta|'s bits >> 16 (signed zeros, inf, nan)."""
    d = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 3.0, -3.0, float("inf"), float("nan"), 0.25, -0.2500001])
    keys = sparsify.magnitude_keys(d)
    expected = d.abs().view(torch.int32).bitwise_right_shift(16)
    assert keys.keys.dtype == torch.int16 and torch.equal(keys.keys.to(torch.int32), expected)
    assert keys.low == int(expected.min())
    counts = torch.bincount(expected - keys.low)
    assert torch.equal(keys.at_least, counts.flip(0).cumsum(0).flip(0))
