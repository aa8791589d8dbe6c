"""DFS genome: indicator -> hops, framing by A's first/last layers, max length, scale parametrizations."""

import pytest

from merge_core.errors import EvomergeError
from merge_core.recipe import DataFlowRecipe, load_recipe
from search_spaces.dfs import DataFlowSpace


def space(**kw):
    args = dict(model_a="A", model_b="B", layers_a=3, layers_b=2, repeats=2, scales="model_pair")
    args.update(kw)
    return DataFlowSpace(**args)


def genome(s, on, scale=1.0):
    return [0.5 if t in on else -0.5 for t in range(s.num_slots)] + [scale] * (s.dim - s.num_slots)


def test_slots_are_a_then_b_repeated():
    s = space()
    assert s.num_slots == 10
    assert [s.slot(t) for t in range(6)] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (0, 0)]
    assert s.names[:2] == ["I.r0.A00", "I.r0.A01"] and s.names[-5:] == [
        "scale.AA",
        "scale.AB",
        "scale.BA",
        "scale.BB",
        "scale.first",
    ]


def test_x0_is_model_a_alone():
    s = space()
    r = s.decode(s.x0)
    assert r.path.hops == ((0, 0), (0, 1), (0, 2)) and r.path.scales == (1.0, 1.0, 1.0)


def test_indicator_to_hops_with_framing():
    s = space()
    # on: B0 (slot 3), A1 second repetition (slot 6): framed by A0 ... A2
    r = s.decode(genome(s, {3, 6}))
    assert r.path.hops == ((0, 0), (1, 0), (0, 1), (0, 2))
    # nothing on: A's first and last layer only
    assert s.decode(genome(s, set())).path.hops == ((0, 0), (0, 2))


def test_max_path_length_keeps_the_start_and_the_end():
    s = space(max_path_length=4)
    r = s.decode(genome(s, set(range(10))))
    assert len(r.path.hops) == 4 and r.path.hops[0] == (0, 0) and r.path.hops[-1] == (0, 2)


def test_scales_multiply_by_model_pair_and_matrix():
    s = space()
    x = genome(s, {3})
    x[-5:] = [1.1, 1.2, 1.3, 1.4, 0.9]  # AA AB BA BB first
    r = s.decode(x)
    assert r.path.hops == ((0, 0), (1, 0), (0, 2))
    assert r.path.scales == pytest.approx((0.9, 1.2, 1.3))
    m = space(scales="matrix")
    assert m.dim == 10 + 25 + 1
    xm = genome(m, {3})
    xm[m.names.index("W.A00.B00")] = 0.7
    xm[m.names.index("W.B00.A02")] = 1.6
    assert m.decode(xm).path.scales == pytest.approx((1.0, 0.7, 1.6))


def test_recipe_yaml_round_trip_and_encode():
    s = space()
    r = s.decode(genome(s, {3, 4, 6}))
    again = load_recipe(r.to_yaml())
    assert isinstance(again, DataFlowRecipe) and again == r and again.hash() == r.hash()
    assert s.decode(s.encode(r)).path.hops == r.path.hops
    assert "B0" in r.path.describe()


def test_bad_settings():
    with pytest.raises(EvomergeError, match="repeats: must be at least 1"):
        space(repeats=0)
    with pytest.raises(EvomergeError, match="max_path_length: must be at least 2"):
        space(max_path_length=1)
    with pytest.raises(EvomergeError, match="needs model_a, model_b and layer_path"):
        load_recipe("merge_method: dataflow\nmodel_a: x\n")
