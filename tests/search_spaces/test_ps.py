"""Parameter-space genome: names, bounds, decode -> per-tensor values, encode(decode(x)) == x."""

import pytest

from merge_core.errors import EvomergeError
from merge_core.plan import locate, resolve_parameter
from merge_core.recipe import MergeRecipe
from search_spaces.ps import ParameterSpace


def value(recipe, tensor, param, model, num_layers):
    return resolve_parameter(recipe, locate(recipe, tensor, num_layers), tensor, param, model)


def test_zoo_shaped_space_has_twelve_readable_coordinates():
    s = ParameterSpace(
        "task_arithmetic",
        "base",
        ["zoo/ja", "zoo/math"],
        4,
        ["ja", "math"],
        layers_per_group=1,
        weight_bounds=(0.0, 2.5),
        weight_x0=1.0,
    )
    assert s.dim == 12
    assert s.names[:3] == ["embed.ja.weight", "embed.math.weight", "L00.ja.weight"]
    assert s.names[-1] == "head.math.weight"
    assert s.bounds == [(0.0, 2.5)] * 12 and s.x0 == [1.0] * 12


def test_decode_puts_each_value_on_its_own_tensors():
    s = ParameterSpace("dare_ties", "base", ["a", "b"], 8, ["a", "b"], layers_per_group=4, modules=True)
    assert "L04-07.mlp.b.density" in s.names
    x = [round(0.05 + 0.01 * i, 4) for i in range(s.dim)]
    r = s.decode(x)
    want = dict(zip(s.names, x))
    assert value(r, "model.layers.5.mlp.down_proj.weight", "density", "b", 8) == want["L04-07.mlp.b.density"]
    assert value(r, "model.layers.2.self_attn.o_proj.weight", "weight", "a", 8) == want["L00-03.attn.a.weight"]
    assert value(r, "model.layers.7.post_attention_layernorm.weight", "weight", "a", 8) == want["L04-07.other.a.weight"]
    assert value(r, "model.embed_tokens.weight", "weight", "b", 8) == want["embed.b.weight"]
    assert value(r, "lm_head.weight", "density", "a", 8) == want["head.a.density"]
    assert value(r, "model.norm.weight", "weight", "b", 8) == want["head.b.weight"]
    assert s.encode(r) == pytest.approx(x)
    assert MergeRecipe.from_yaml(r.to_yaml()) == r  # exact mergekit-compatible recipe
    assert r.to_dict(mergekit=True)["merge_method"] == "dare_ties"


def test_layer_filters_do_not_bleed_between_layer_1_and_10():
    s = ParameterSpace("task_arithmetic", "base", ["a"], 12, ["a"], layers_per_group=1)
    x = [float(i) / 20 for i in range(s.dim)]
    r = s.decode(x)
    names = s.names
    assert value(r, "model.layers.1.mlp.up_proj.weight", "weight", "a", 12) == x[names.index("L01.a.weight")]
    assert value(r, "model.layers.10.mlp.up_proj.weight", "weight", "a", 12) == x[names.index("L10.a.weight")]


def test_without_embed_head_groups_they_follow_the_first_and_last_groups():
    s = ParameterSpace("ties", "base", ["a"], 4, ["a"], layers_per_group=2, embed_head_groups=False)
    assert s.names == ["L00-01.a.weight", "L00-01.a.density", "L02-03.a.weight", "L02-03.a.density"]
    r = s.decode([0.1, 0.2, 0.3, 0.4])
    assert value(r, "model.embed_tokens.weight", "weight", "a", 4) == 0.1
    assert value(r, "lm_head.weight", "density", "a", 4) == 0.4


def test_values_are_clipped_into_bounds_and_slerp_has_t_per_group():
    s = ParameterSpace("task_arithmetic", "base", ["a"], 2, ["a"], weight_bounds=(0.0, 1.0))
    r = s.decode([5.0, -1.0, 0.5])
    assert s.encode(r) == [1.0, 0.0, 0.5]
    sl = ParameterSpace("slerp", "base", ["a"], 2, ["a"], layers_per_group=1)
    assert sl.names == ["embed.t", "L00.t", "L01.t", "head.t"]
    assert value(sl.decode([0.1, 0.2, 0.3, 0.4]), "model.layers.1.mlp.up_proj.weight", "t", None, 2) == 0.3


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(method="nope"), "search.space.method: 'nope' is not supported"),
        (dict(layers_per_group=3), "search.space.layers_per_group: must divide num_hidden_layers=4"),
        (dict(method="slerp"), "slerp interpolates the base and exactly one source"),
    ],
)
def test_bad_space_settings(kwargs, message):
    args = dict(method="ties", base="base", sources=["a", "b"], num_layers=4, aliases=["a", "b"])
    args.update(kwargs)
    with pytest.raises(EvomergeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ParameterSpace(**args)
