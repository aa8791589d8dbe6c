"""Merge methods against hand-computed tensors, and the selection masks against their sort-based definitions."""

from __future__ import annotations

import math

import pytest
import torch

from merge_core.errors import EvomergeError
from merge_core.methods import METHODS, generalized_task_arithmetic, linear, merge_tensor, model_stock, slerp
from merge_core.sparsify import (
    bernoulli_mask,
    dare_generator,
    magnitude_mask,
    magnitude_outliers_mask,
    rank_magnitude_sample,
)


def sign_consensus(weighted_deltas, method="sum"):
    """m_i = [sign(d_i) == sign-election(d)], per element; sign(0) never agrees (the elected sign is + where
    sum_i d_i >= 0 ("sum") or sum_i sign(d_i) >= 0 ("count"))."""
    stacked = torch.stack(list(weighted_deltas))
    votes = stacked.sum(0) if method == "sum" else torch.sign(stacked).sum(0)
    majority_positive = votes >= 0
    return [((delta > 0) == majority_positive) & (delta != 0) for delta in weighted_deltas]


def gta(name: str, base, deltas, weights, densities=None, *, gammas=None, epsilons=None, generators=None, **params):
    """METHODS[name] on one tensor through the real entry point, merge_tensor (params: normalize, rescale, lambda_)."""
    given = {"density": densities, "gamma": gammas, "epsilon": epsilons}
    per = [{"weight": w, **{k: v[i] for k, v in given.items() if v is not None}} for i, w in enumerate(weights)]
    params = {("lambda" if k == "lambda_" else k): v for k, v in params.items()}
    return merge_tensor(
        METHODS[name],
        base=base,
        tensors=[base + d for d in deltas],
        deltas=deltas,
        params=params,
        tensor_params=per,
        generators=generators,
    )


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def close(actual: torch.Tensor, expected: torch.Tensor, atol: float = 1e-6) -> None:
    assert actual.dtype == torch.float32
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0)


def stable_top_k(delta: torch.Tensor, k: int) -> torch.Tensor:
    """The definition: a stable descending sort by |delta|, first k positions."""
    order = torch.sort(delta.abs().reshape(-1).float(), descending=True, stable=True).indices
    mask = torch.zeros(delta.numel(), dtype=torch.bool)
    mask[order[:k]] = True
    return mask.reshape(delta.shape)


# ----------------------------------------------------------------------------- linear, slerp


def test_linear_with_and_without_normalize():
    a, b = t(1, 2), t(3, 4)
    close(linear([a, b], [1.0, 3.0], normalize=False), t(10, 14))  # 1*[1,2] + 3*[3,4]
    close(linear([a, b], [1.0, 3.0]), t(2.5, 3.5))  # / (1 + 3)
    with pytest.raises(EvomergeError, match="sum to 0"):
        linear([a, b], [1.0, -1.0])


def test_slerp_orthogonal_endpoints_and_midpoint():
    v0, v1 = t(2, 0), t(0, 2)
    close(slerp(0.0, v0, v1), v0)
    close(slerp(1.0, v0, v1), v1)
    # θ = π/2: sin(π/4)/sin(π/2) on each, i.e. (v0 + v1)/√2, which keeps |v| = 2
    close(slerp(0.5, v0, v1), t(math.sqrt(2), math.sqrt(2)))


def test_slerp_at_45_degrees():
    # θ = π/4, t = 1/2: both coefficients sin(π/8)/sin(π/4) = 0.5411961
    close(slerp(0.5, t(1, 0), t(1, 1)), t(2 * 0.5411961, 0.5411961))


def test_slerp_colinear_falls_back_to_lerp():
    close(slerp(0.25, t(1, 2), t(2, 4)), t(1.25, 2.5))  # cos = 1 > 0.9995
    close(slerp(0.25, t(1, 2), t(-1, -2)), t(0.5, 1.0))  # cos = -1, |cos| > 0.9995


# ----------------------------------------------------------------------------- masks


@pytest.mark.parametrize("density", [0.01, 0.1, 0.37, 0.5, 0.9, 0.999])
def test_magnitude_mask_equals_stable_sort_definition(density):
    gen = torch.Generator().manual_seed(7)
    random = torch.randn(33, 31, generator=gen)
    ties_heavy = torch.randint(-3, 4, (40, 25), generator=gen).float()  # 7 values, many ties (and zeros)
    for delta in (random, ties_heavy):
        k = max(1, int(density * delta.numel()))
        mask = magnitude_mask(delta, density)
        assert mask.dtype == torch.bool and int(mask.sum()) == k
        assert torch.equal(mask, stable_top_k(delta, k))


def test_magnitude_mask_edges():
    delta = t(0.5, -3.0, 2.0, -3.0)
    assert magnitude_mask(delta, 1.0).all()
    assert not magnitude_mask(delta, 0.0).any()
    assert magnitude_mask(delta, 0.1).tolist() == [False, True, False, False]  # k = max(1, 0): the tie's lower index
    assert magnitude_mask(delta, 0.5).tolist() == [False, True, False, True]


def test_magnitude_outliers_mask_drops_top_gamma_then_keeps_target():
    delta = t(0.3, -1.0, 0.5, 0.9, -0.1, 0.7, 0.2, -0.8, 0.6, 0.4)
    # n=10: target 5, top int(0.1*10)=1 dropped (|-1.0|), keep the next five: 0.9 0.8 0.7 0.6 0.5
    assert magnitude_outliers_mask(delta, 0.5, gamma=0.1).tolist() == [
        False, False, True, True, False, True, False, True, True, False,
    ]  # fmt: skip
    # target 9 + top 2 > 10: only 10 - 9 = 1 outlier is dropped
    assert magnitude_outliers_mask(delta, 0.95, gamma=0.2).tolist() == [True, False] + [True] * 8
    assert magnitude_outliers_mask(delta, 1.0).all()
    assert not magnitude_outliers_mask(delta, 0.05).any()  # int(0.5) = 0 kept, as in mergekit


@pytest.mark.parametrize("density,gamma", [(0.3, 0.01), (0.5, 0.1), (0.9, 0.2)])
def test_magnitude_outliers_mask_equals_stable_sort_definition(density, gamma):
    delta = torch.randint(-4, 5, (30, 20), generator=torch.Generator().manual_seed(3)).float()
    n = delta.numel()
    target = int(density * n)
    skip = min(int(gamma * n), n - target)
    expected = stable_top_k(delta, skip + target) & ~stable_top_k(delta, skip)
    assert torch.equal(magnitude_outliers_mask(delta, density, gamma), expected)


def test_bernoulli_mask_is_zero_one_with_the_keep_rate():
    mask = bernoulli_mask((200, 100), 0.3, torch.Generator().manual_seed(0), "cpu")
    assert mask.dtype == torch.float32 and set(mask.unique().tolist()) <= {0.0, 1.0}
    assert abs(mask.mean().item() - 0.3) < 0.01


def test_sign_consensus_sum_versus_count():
    d = [t(3, 0, -1), t(-1, 2, -1), t(-1, -1, 0)]
    # sum:   [1, 1, -2]  -> +, +, -     count: [-1, 0, -2] -> -, +, -
    by_sum = [[True, False, True], [False, True, True], [False, False, False]]
    by_count = [[False, False, True], [True, True, True], [True, False, False]]
    assert [m.tolist() for m in sign_consensus(d, "sum")] == by_sum
    assert [m.tolist() for m in sign_consensus(d, "count")] == by_count


# ----------------------------------------------------------------------------- GTA family


def test_task_arithmetic_with_lambda():
    base, deltas = t(1, 2), [t(1, 0), t(0, 2)]
    close(gta("task_arithmetic", base, deltas, [0.5, 1.0], lambda_=2.0), t(2, 6))  # [1,2] + 2*([0.5,0] + [0,2])
    close(gta("task_arithmetic", base, deltas, [0.5, 1.0], normalize=True), t(1 + 0.5 / 1.5, 2 + 2 / 1.5))


def test_ties_worked_example():
    base = torch.ones(5)
    deltas = [
        t(0.5, -0.2, 0.1, 0.4, -0.3),  # top 3 -> [0.5, 0, 0, 0.4, -0.3]
        t(-0.6, 0.3, 0.2, -0.1, 0.05),  # top 3 -> [-0.6, 0.3, 0.2, 0, 0], weight 0.5 -> [-0.3, 0.15, 0.1, 0, 0]
        t(0.2, 0.4, -0.5, 0.3, 0.1),  # top 3 -> [0, 0.4, -0.5, 0.3, 0]
    ]
    # summed mass [0.2, 0.55, -0.4, 0.7, -0.3] elects + + - + -; disjoint mean over agreeing weights:
    # [0.5/1, (0.15+0.4)/(0.5+1), -0.5/1, (0.4+0.3)/(1+1), -0.3/1]
    merged = gta("ties", base, deltas, [1.0, 0.5, 1.0], [0.6, 0.6, 0.6])
    close(merged, t(1.5, 1 + 0.55 / 1.5, 0.5, 1.35, 0.7))


def test_ties_zero_divisor_and_rescale():
    merged = gta("ties", torch.zeros(3), [t(0, 2, 0), t(0, 0, 0)], [1.0, 1.0], [0.5, 0.5])
    close(merged, t(0, 2, 0))  # no agreeing source at 0 and 2: divisor 1, no NaN
    # rescale: kept [0, 4] of [1, 4] times L1 ratio 5/4
    close(gta("ties", torch.zeros(2), [t(1, 4)], [1.0], [0.5], rescale=True), t(0, 5))


def test_dare_keeps_elements_unchanged_or_l1_rescaled():
    delta = torch.randn(1000, generator=torch.Generator().manual_seed(1))
    gen = lambda: [dare_generator(0, "w", "a")]  # noqa: E731
    plain = gta("dare_linear", torch.zeros(1000), [delta], [1.0], [0.3], rescale=False, generators=gen())
    kept = plain != 0
    assert 200 < int(kept.sum()) < 400
    assert torch.equal(plain[kept], delta[kept])
    scaled = gta("dare_linear", torch.zeros(1000), [delta], [1.0], [0.3], generators=gen())
    ratio = delta.abs().sum() / delta[kept].abs().sum()  # mergekit 0.1.5: rescale = L1 norm ratio
    close(scaled, plain * ratio, atol=1e-5)
    assert abs(ratio.item() * 0.3 - 1) < 0.15  # ~ 1/density on a large tensor


def test_dare_expectation_over_seeds_is_delta():
    delta = torch.randn(256, generator=torch.Generator().manual_seed(2))
    runs = [
        gta("dare_linear", torch.zeros(256), [delta], [1.0], [0.5], generators=[dare_generator(seed, "w", "a")])
        for seed in range(300)
    ]
    mean = torch.stack(runs).mean(0)
    assert ((mean - delta).norm() / delta.norm()).item() < 0.1


def test_dare_generator_is_deterministic_per_seed_name_model():
    assert dare_generator(1234, "model.layers.0.mlp.up_proj.weight", "m1").initial_seed() == 1166207728847390018
    same = [bernoulli_mask((64,), 0.5, dare_generator(5, "w", "m"), "cpu") for _ in range(2)]
    assert torch.equal(*same)
    assert not torch.equal(same[0], bernoulli_mask((64,), 0.5, dare_generator(5, "v", "m"), "cpu"))
    assert not torch.equal(same[0], bernoulli_mask((64,), 0.5, dare_generator(5, "w", "n"), "cpu"))
    assert not torch.equal(same[0], bernoulli_mask((64,), 0.5, dare_generator(6, "w", "m"), "cpu"))


def test_dare_ties_elects_sign_on_dropped_deltas():
    deltas = [t(1, -2, 3, 1), t(-4, 1, 1, 1)]
    gens = [dare_generator(9, "w", "a"), dare_generator(9, "w", "b")]
    merged = gta("dare_ties", torch.zeros(4), deltas, [1.0, 0.5], [0.5, 0.5], rescale=False, generators=gens)
    gens = [dare_generator(9, "w", "a"), dare_generator(9, "w", "b")]
    kept = [d * bernoulli_mask((4,), 0.5, g, "cpu") * w for d, g, w in zip(deltas, gens, [1.0, 0.5])]
    masks = sign_consensus(kept)
    close(merged, kept[0] * masks[0] + kept[1] * masks[1])  # normalize defaults to False


def test_breadcrumbs_merge():
    delta = t(0.3, -1.0, 0.5, 0.9, -0.1, 0.7, 0.2, -0.8, 0.6, 0.4)
    merged = gta("breadcrumbs", torch.ones(10), [delta], [2.0], [0.5], gammas=[0.1])
    close(merged, t(1, 1, 2.0, 2.8, 1, 2.4, 1, -0.6, 2.2, 1))  # 1 + 2 * kept


def test_della_keep_probabilities_follow_rank():
    row = t(0.1, -0.5, 0.3, 0.2, -0.4)  # ranks 1 5 3 2 4 -> p = 0.1 + 0.8 * (rank-1)/4
    rows = row.repeat(4000, 1)
    sample = rank_magnitude_sample(rows, 0.5, 0.4, torch.Generator().manual_seed(0), rescale=False)
    kept = sample != 0
    assert torch.equal(sample[kept], rows[kept])
    close(kept.float().mean(0), t(0.1, 0.9, 0.5, 0.3, 0.7), atol=0.03)
    with pytest.raises(EvomergeError, match="epsilon"):
        rank_magnitude_sample(row, 0.5, 0.5, None, rescale=False)


def test_della_merges_rescale_by_l1_and_lambda():
    delta = t(0.1, -0.5, 0.3, 0.2, -0.4)
    gen = lambda: [torch.Generator().manual_seed(4)]  # noqa: E731
    sample = rank_magnitude_sample(delta, 0.5, 0.2, gen()[0], rescale=False)
    expected = sample * (delta.abs().sum() / sample.abs().sum())
    close(gta("della_linear", torch.zeros(5), [delta], [1.0], [0.5], epsilons=[0.2], generators=gen()), expected)
    # della: one source, consensus + normalize by the weight 2 -> the same, then lambda 3
    close(
        gta("della", torch.zeros(5), [delta], [2.0], [0.5], epsilons=[0.2], lambda_=3.0, generators=gen()), 3 * expected
    )


# ----------------------------------------------------------------------------- model stock


def test_model_stock_two_sources():
    # offsets [1,0], [1,1]: cos = 1/√2, t = 2cos/(1+cos) = 2(√2-1); average offset [1, 0.5]
    merged = model_stock(t(1, 1), [t(2, 1), t(2, 2)])
    close(merged, t(1 + 2 * (math.sqrt(2) - 1), 1 + (math.sqrt(2) - 1)))
    with pytest.raises(EvomergeError, match="at least 2"):
        model_stock(t(1, 1), [t(2, 1)])


def test_model_stock_filter_wise_and_singular_row():
    base = torch.zeros(2, 2)
    w1, w2 = torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([[1.0, 1.0], [-1.0, 0.0]])
    # row 0 as above; row 1: cos = -1, 1 + (2-1)cos = 0 -> t = 0 keeps the base row
    expected = torch.tensor([[2 * (math.sqrt(2) - 1), math.sqrt(2) - 1], [0, 0]])
    close(model_stock(base, [w1, w2], filter_wise=True), expected)


# ----------------------------------------------------------------------------- dtypes, registry, dispatch


def test_bf16_inputs_give_float32_equal_to_upcast():
    gen = torch.Generator().manual_seed(11)
    base, a, b = (torch.randn(8, 6, generator=gen).bfloat16() for _ in range(3))
    up = [x.float() for x in (base, a, b)]
    close(linear([a, b], [0.3, 0.9]), linear(up[1:], [0.3, 0.9]), atol=0)
    close(slerp(0.3, base, a), slerp(0.3, up[0], up[1]), atol=0)
    close(model_stock(base, [a, b]), model_stock(up[0], up[1:]), atol=0)
    close(gta("ties", base, [a, b], [1.0, 0.5], [0.5, 0.5]), gta("ties", up[0], up[1:], [1.0, 0.5], [0.5, 0.5]), atol=0)
    gens = lambda: [dare_generator(0, "w", m) for m in "ab"]  # noqa: E731
    close(
        gta("dare_ties", base, [a, b], [1.0, 0.5], [0.5, 0.5], generators=gens()),
        gta("dare_ties", up[0], up[1:], [1.0, 0.5], [0.5, 0.5], generators=gens()),
        atol=0,
    )


def test_registry_matches_mergekit_defaults():
    assert set(METHODS) == {
        "linear", "slerp", "task_arithmetic", "ties", "dare_ties", "dare_linear",
        "breadcrumbs", "breadcrumbs_ties", "della", "della_linear", "model_stock",
    }  # fmt: skip
    assert METHODS["ties"].global_params == {"int8_mask": False, "normalize": True, "rescale": False, "lambda": 1.0}
    assert METHODS["dare_ties"].global_params["normalize"] is False and METHODS["dare_ties"].global_params["rescale"]
    assert METHODS["della"].tensor_params == {"weight": None, "density": 1.0, "epsilon": 0.15}
    assert METHODS["breadcrumbs_ties"].tensor_params["gamma"] == 0.01
    assert METHODS["linear"].global_params == {"normalize": True} and not METHODS["linear"].needs_base
    assert METHODS["slerp"].global_params == {"t": None}


def test_merge_tensor_dispatches_with_defaults():
    base, a, b = t(1, 1), t(2, 1), t(2, 2)
    deltas = [a - base, b - base]
    per = [{"weight": 1.0, "density": 0.5}, {"weight": 0.5, "density": 0.5}]
    gens = lambda: [dare_generator(3, "w", m) for m in "ab"]  # noqa: E731
    assert METHODS["dare_ties"].stochastic and METHODS["della"].stochastic and not METHODS["ties"].stochastic
    via = merge_tensor(
        METHODS["dare_ties"], base=base, tensors=[a, b], deltas=deltas, params={}, tensor_params=per, generators=gens()
    )
    close(
        via,
        generalized_task_arithmetic(
            base,
            deltas,
            [1.0, 0.5],
            [0.5, 0.5],
            sparsification="random",
            consensus="sum",
            normalize=False,
            rescale=True,
            generators=gens(),
        ),
    )  # mergekit's defaults
    weights = [{"weight": 1}, {"weight": 3}]
    close(merge_tensor(METHODS["linear"], base=None, tensors=[a, b], params={}, tensor_params=weights), t(2, 1.75))
    slerped = merge_tensor(METHODS["slerp"], base=t(2, 0), tensors=[t(0, 2)], params={"t": 1.0}, tensor_params=[{}])
    close(slerped, t(0, 2))
    stocked = merge_tensor(METHODS["model_stock"], base=base, tensors=[a, b], params={}, tensor_params=[{}, {}])
    close(stocked, model_stock(base, [a, b]))
    with pytest.raises(EvomergeError, match="weight"):
        merge_tensor(METHODS["ties"], base=base, tensors=[a], deltas=deltas[:1], params={}, tensor_params=[{}])


def test_gta_leaves_caller_deltas_untouched_and_rejects_unknown_names():
    delta = t(1, 2)
    plain = {"consensus": None, "normalize": False, "rescale": False}
    close(generalized_task_arithmetic(t(0, 0), [delta], [2.0], sparsification=None, **plain), t(2, 4))
    assert delta.tolist() == [1.0, 2.0]
    with pytest.raises(EvomergeError, match="sparsification"):
        generalized_task_arithmetic(t(0, 0), [delta], [1.0], [0.5], sparsification="top", **plain)
    with pytest.raises(EvomergeError, match="consensus"):
        generalized_task_arithmetic(t(0, 0), [delta], [1.0], sparsification=None, **{**plain, "consensus": "vote"})
