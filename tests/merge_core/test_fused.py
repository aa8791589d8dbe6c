"""The fused GTA consensus gives, bit for bit (signed zeros included), what the plain formula gives: a mask per
source from sign agreement, a zero-started sum of the masked weighted deltas and of the masked weights."""

import pytest
import torch

from merge_core import methods


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
