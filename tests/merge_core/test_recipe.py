"""Recipes: mergekit YAML round trip, per-tensor parameter resolution (gradients, filters, precedence), errors;
data-flow recipes (LayerPath) and load_recipe's dispatch."""

import math

import pytest

from merge_core.errors import EvomergeError
from merge_core.plan import locate, resolve_parameter, validate_layout
from merge_core.recipe import DataFlowRecipe, LayerPath, MergeRecipe, load_recipe


def identity_path(num_layers: int) -> LayerPath:
    """A's own layers in order, every scale 1: the path that reproduces A."""
    return LayerPath(tuple((0, i) for i in range(num_layers)), (1.0,) * num_layers)


MERGEKIT_YAML = """
merge_method: dare_ties
base_model: org/base
models:
  - model: org/ja
    parameters:
      weight: [0.0, 0.5, 1.0]
      density:
        - filter: self_attn
          value: 0.2
        - filter: mlp
          value: 0.8
  - model: org/math
    parameters:
      weight: 0.7
parameters:
  density: 0.5
  normalize: false
dtype: bfloat16
"""


def param(recipe, tensor, name, model=None, num_layers=5):
    site = locate(recipe, tensor, num_layers)
    return resolve_parameter(recipe, site, tensor, name, model)


def test_mergekit_yaml_round_trip_is_lossless():
    r = MergeRecipe.from_yaml(MERGEKIT_YAML)
    again = MergeRecipe.from_yaml(r.to_yaml())
    assert again == r and again.hash() == r.hash()
    exported = MergeRecipe.from_yaml(r.to_yaml(mergekit=True))
    assert "seed" not in r.to_dict(mergekit=True)
    assert exported == r  # seed defaults to 0 on re-import
    assert r.models == ("org/ja", "org/math", "org/base") and r.sources == ("org/ja", "org/math")


def test_recipe_is_hashable_and_hash_changes_with_values():
    r = MergeRecipe.from_yaml(MERGEKIT_YAML)
    r2 = MergeRecipe.from_yaml(MERGEKIT_YAML.replace("weight: 0.7", "weight: 0.71"))
    assert len({r, r2, MergeRecipe.from_yaml(MERGEKIT_YAML)}) == 2
    assert r.hash() != r2.hash()


def test_gradient_spreads_over_layers_like_mergekit():
    r = MergeRecipe.from_yaml(MERGEKIT_YAML)
    # 5 layers: t = i/4, scaled = t*2 over [0, 0.5, 1]
    got = [param(r, f"model.layers.{i}.mlp.up_proj.weight", "weight", "org/ja") for i in range(5)]
    assert got == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])
    # outside the layers mergekit 0.1.5 reads every gradient at t = 0 (plan.py, plan_module)
    assert param(r, "model.embed_tokens.weight", "weight", "org/ja") == 0.0
    assert param(r, "lm_head.weight", "weight", "org/ja") == 0.0
    assert param(r, "model.norm.weight", "weight", "org/ja") == 0.0


def test_gradient_interpolates_between_entries():
    r = MergeRecipe.from_yaml(MERGEKIT_YAML.replace("[0.0, 0.5, 1.0]", "[0.0, 1.0, 0.0, 1.0]"))
    # 5 layers, 4 entries: scaled = i/4*3 -> 0, 0.75, 1.5, 2.25, 3
    got = [param(r, f"model.layers.{i}.self_attn.q_proj.weight", "weight", "org/ja") for i in range(5)]
    assert got == pytest.approx([0.0, 0.75, 0.5, 0.25, 1.0])


def test_filters_first_match_and_fallthrough_to_global():
    r = MergeRecipe.from_yaml(MERGEKIT_YAML)
    assert param(r, "model.layers.1.self_attn.k_proj.weight", "density", "org/ja") == 0.2
    assert param(r, "model.layers.1.mlp.down_proj.weight", "density", "org/ja") == 0.8
    # no filter matches a norm: falls through to the global density
    assert param(r, "model.layers.1.input_layernorm.weight", "density", "org/ja") == 0.5
    assert param(r, "model.layers.1.mlp.down_proj.weight", "density", "org/math") == 0.5
    assert param(r, "model.layers.1.mlp.down_proj.weight", "normalize") is False
    assert param(r, "model.layers.1.mlp.down_proj.weight", "lambda") is None


def test_slices_give_each_slice_its_own_t_and_parameters():
    text = """
merge_method: ties
base_model: b
slices:
  - sources:
      - {model: a, layer_range: [0, 2], parameters: {weight: [0.0, 1.0]}}
      - {model: b, layer_range: [0, 2]}
    parameters: {density: 0.3}
  - sources:
      - {model: a, layer_range: [2, 5], parameters: {weight: [1.0, 2.0]}}
      - {model: b, layer_range: [2, 5]}
    parameters: {density: 0.9}
"""
    r = MergeRecipe.from_yaml(text)
    validate_layout(r, 5)
    w = [param(r, f"model.layers.{i}.mlp.up_proj.weight", "weight", "a") for i in range(5)]
    assert w == pytest.approx([0.0, 1.0, 1.0, 1.5, 2.0])
    d = [param(r, f"model.layers.{i}.mlp.up_proj.weight", "density", "a") for i in range(5)]
    assert d == [0.3, 0.3, 0.9, 0.9, 0.9]
    assert param(r, "model.embed_tokens.weight", "density", "a") == 0.3  # first slice
    assert param(r, "lm_head.weight", "weight", "a") == 1.0  # last slice, t = 0 (mergekit's post_weights)
    assert param(r, "lm_head.weight", "density", "a") == 0.9
    assert MergeRecipe.from_yaml(r.to_yaml()) == r


TIES_GRADIENT = """
merge_method: ties
base_model: b
models:
  - model: a
    parameters: {weight: [0.2, 0.9], density: [0.9, 0.3]}
  - model: c
    parameters: {weight: 0.5, density: 0.5}
"""


def test_gradients_outside_layers_follow_mergekit_models_form():
    """The issue's recipe: weight [0.2, 0.9], density [0.9, 0.3] over 4 layers; values computed by hand.

    Layers: t = i/3, value = first + t * (last - first). Embedding, final norm and head: t = 0 (first entries),
    as mergekit 0.1.5's MergePlanner.plan_module reads pre_weights and post_weights with ConfigReader(t=0).
    """
    r = MergeRecipe.from_yaml(TIES_GRADIENT)
    # the pre/post weights of llama, mistral and qwen2 in mergekit 0.1.5's architecture JSONs
    embed, norm, head = "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"
    expected = {  # tensor: (weight, density)
        embed: (0.2, 0.9),
        "model.layers.0.self_attn.q_proj.weight": (0.2, 0.9),
        "model.layers.1.mlp.down_proj.weight": (0.2 + 0.7 / 3, 0.9 - 0.6 / 3),  # t = 1/3: 0.4333, 0.7
        "model.layers.2.input_layernorm.weight": (0.2 + 1.4 / 3, 0.9 - 1.2 / 3),  # t = 2/3: 0.6667, 0.5
        "model.layers.3.mlp.up_proj.weight": (0.9, 0.3),
        norm: (0.2, 0.9),
        head: (0.2, 0.9),
    }
    for tensor, (w, d) in expected.items():
        got = (param(r, tensor, "weight", "a", num_layers=4), param(r, tensor, "density", "a", num_layers=4))
        assert got == pytest.approx((w, d)), tensor
        assert param(r, tensor, "weight", "c", num_layers=4) == 0.5  # scalars are the same everywhere


def test_gradients_outside_layers_follow_mergekit_slices_form():
    """Slices: the embedding reads the first slice at t = 0, norm and head the LAST slice at t = 0, even when
    that slice has one layer (whose own t is 1)."""
    text = """
merge_method: ties
base_model: b
parameters: {density: [0.8, 0.2]}
slices:
  - sources:
      - {model: a, layer_range: [0, 3], parameters: {weight: [0.1, 0.5]}}
      - {model: b, layer_range: [0, 3]}
  - sources:
      - {model: a, layer_range: [3, 5], parameters: {weight: [1.0, 2.0]}}
      - {model: b, layer_range: [3, 5]}
    parameters: {density: [0.6, 0.4]}
  - sources:
      - {model: a, layer_range: [5, 6], parameters: {weight: [0.3, 0.7]}}
      - {model: b, layer_range: [5, 6]}
"""
    r = MergeRecipe.from_yaml(text)
    validate_layout(r, 6)
    expected = {  # tensor: (weight of a, density of a)
        "model.embed_tokens.weight": (0.1, 0.8),  # slice 0, t = 0
        "model.layers.1.self_attn.o_proj.weight": (0.3, 0.5),  # slice 0, t = 1/2
        "model.layers.2.mlp.gate_proj.weight": (0.5, 0.2),  # slice 0, t = 1
        "model.layers.3.mlp.gate_proj.weight": (1.0, 0.6),  # slice 1, t = 0
        "model.layers.4.mlp.gate_proj.weight": (2.0, 0.4),  # slice 1, t = 1
        "model.layers.5.mlp.gate_proj.weight": (0.7, 0.2),  # slice 2 (one layer): t = 1, global density
        "model.norm.weight": (0.3, 0.8),  # slice 2, t = 0
        "lm_head.weight": (0.3, 0.8),
    }
    for tensor, (w, d) in expected.items():
        got = (param(r, tensor, "weight", "a", num_layers=6), param(r, tensor, "density", "a", num_layers=6))
        assert got == pytest.approx((w, d)), tensor


def test_per_layer_filters_select_exact_layers():
    text = """
merge_method: task_arithmetic
base_model: b
models:
  - model: a
    parameters:
      weight:
        - {filter: "layers.1.", value: 0.1}
        - {filter: "layers.10.", value: 1.0}
        - {value: 0.5}
"""
    r = MergeRecipe.from_yaml(text)
    assert param(r, "model.layers.1.mlp.up_proj.weight", "weight", "a", num_layers=12) == 0.1
    assert param(r, "model.layers.10.mlp.up_proj.weight", "weight", "a", num_layers=12) == 1.0
    assert param(r, "model.layers.11.mlp.up_proj.weight", "weight", "a", num_layers=12) == 0.5


@pytest.mark.parametrize(
    "text, message",
    [
        ("models: [{model: a}]", "recipe: merge_method: required"),
        ("merge_method: ties\nbase_model: b\n", "recipe: give exactly one of 'models' or 'slices'"),
        ("merge_method: ties\nmodels: []\n", "recipe: models: at least one model is required"),
        ("merge_method: ties\nmodels: [{model: a}]\nmodel_stock: 1\n", "recipe: unknown key 'model_stock'"),
        ("merge_method: ties\nmodels: [{parameters: {}}]\n", "recipe: models[0]: needs 'model'"),
        (
            "merge_method: ties\nmodels: [{model: a, parameters: {weight: .nan}}]\n",
            "recipe: models[0].parameters.weight: must be finite",
        ),
        (
            "merge_method: ties\nmodels: [{model: a, parameters: {weight: {filter: mlp}}}]\n",
            "a conditional parameter needs 'value'",
        ),
        (
            "merge_method: ties\nslices: [{sources: [{model: a, layer_range: [3, 1]}]}]\n",
            "recipe: slices[0].sources[0].layer_range: must be [start, end)",
        ),
        ("merge_method: ties\nmodels: [{model: a}]\ndtype: fp8\n", "recipe: dtype: 'fp8' is not one of"),
        ("merge_method: ties\nmodels: [{model: a}]\nseed: x\n", "recipe: seed: must be an integer"),
        ("[1, 2", "recipe: not valid YAML"),
        (
            "merge_method: ties\nslices: [{sources: [{model: a, layer_range: [0, 2]}], base_model: c}]\n",
            "recipe: slices[0]: unsupported key 'base_model'",
        ),
        (
            "merge_method: ties\nmodels: [{model: a, paramters: {weight: 1}}]\n",
            "recipe: models[0]: unsupported key 'paramters'",
        ),
    ],
)
def test_malformed_recipes_give_one_line_errors(text, message):
    with pytest.raises(EvomergeError) as e:
        MergeRecipe.from_yaml(text)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_rearranging_slices_are_refused():
    text = """
merge_method: passthrough
slices:
  - sources: [{model: a, layer_range: [2, 4]}]
  - sources: [{model: a, layer_range: [0, 2]}]
"""
    r = MergeRecipe.from_yaml(text)
    with pytest.raises(EvomergeError, match="rearranges layers"):
        validate_layout(r, 4)
    with pytest.raises(EvomergeError, match="slices cover 4 layers but the models have 6"):
        validate_layout(
            MergeRecipe.from_yaml(
                text.replace("[2, 4]", "[0, 2]").replace(
                    "[0, 2]}]\n  - sources: [{model: a, layer_range: [0, 2]",
                    "[0, 2]}]\n  - sources: [{model: a, layer_range: [2, 4]",
                )
            ),
            6,
        )


# A trial's `recipe` attr as DFS studies stored it before DataFlowRecipe moved to merge_core (PR for issue 10).
STORED_DFS_RECIPE = (
    "merge_method: dataflow\nmodel_a: data/zoo/a\nmodel_b: data/zoo/b\nlayer_path:\n"
    "- model: A\n  layer: 0\n  scale: 0.9\n- model: B\n  layer: 0\n  scale: 0.8\n"
    "- model: A\n  layer: 1\n  scale: 1.25\n- model: A\n  layer: 2\n  scale: 1.1\n"
)


def test_a_stored_dataflow_recipe_loads_and_serializes_identically():
    r = load_recipe(STORED_DFS_RECIPE)
    assert isinstance(r, DataFlowRecipe) and (r.model_a, r.model_b) == ("data/zoo/a", "data/zoo/b")
    assert r.path == LayerPath(((0, 0), (1, 0), (0, 1), (0, 2)), (0.9, 0.8, 1.25, 1.1))
    assert r.to_yaml() == STORED_DFS_RECIPE
    assert r.hash() == "bae1bc369349ab86"  # the cache key trials of that study were stored under
    assert r.merge_method == "dataflow" and r.path.describe() == "A0(x0.9) B0(x0.8) A1(x1.25) A2(x1.1)"


def test_load_recipe_dispatches_on_merge_method():
    assert load_recipe(MERGEKIT_YAML) == MergeRecipe.from_yaml(MERGEKIT_YAML)
    with pytest.raises(EvomergeError, match="trial 3 recipe: a dataflow recipe needs model_a, model_b and layer_path"):
        load_recipe(
            "merge_method: dataflow\nmodel_a: x\nmodel_b: y\nlayer_path: [{model: C, layer: 0}]\n",
            where="trial 3 recipe",
        )
    with pytest.raises(EvomergeError, match="trial 3 recipe: layer path: hop 0 has negative layer index -1"):
        load_recipe(
            "merge_method: dataflow\nmodel_a: x\nmodel_b: y\nlayer_path: [{model: A, layer: -1}]\n",
            where="trial 3 recipe",
        )
    with pytest.raises(EvomergeError, match="recipe: expected a mapping"):
        load_recipe("- merge_method: dataflow\n")


def test_layer_path_round_trip_and_description() -> None:
    path = LayerPath(((0, 0), (1, 1), (0, 1), (0, 1), (1, 0), (0, 2)), (0.7, 1.3, 1.0, 0.9, 1.1, 1.2))
    again = load_recipe(DataFlowRecipe("a", "b", path).to_yaml()).path
    assert again == path
    assert hash(again) == hash(path)
    assert path.describe() == "A0(x0.7) B1(x1.3) A1 A1(x0.9) B0(x1.1) A2(x1.2)"
    assert identity_path(2) == LayerPath(((0, 0), (0, 1)), (1, 1))


@pytest.mark.parametrize(
    ("hops", "scales", "message"),
    [
        ((), (), "no hops"),
        (((0, 0), (1, 0)), (1.0,), "2 hops but 1 scales"),
        (((2, 0),), (1.0,), "hop 0 names model 2; use 0 \\(A\\) or 1 \\(B\\)"),
        (((0, 0), (0, -1)), (1.0, 1.0), "hop 1 has negative layer index -1"),
        (((0, 0),), (math.nan,), "hop 0 has non-finite scale nan"),
        (((0, "x"),), (1.0,), "hops must be \\(model, layer\\) integer pairs"),
    ],
)
def test_layer_path_validation(hops: tuple, scales: tuple, message: str) -> None:
    with pytest.raises(EvomergeError, match=message):
        LayerPath(hops, scales)
