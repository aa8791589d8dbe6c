"""The memory plan: three Mistral-7B-sized sources on an 80 GB GPU, a 141 GB GPU and a 24 GB CPU (shapes from a
meta-device model, nothing allocated), and a Materializer that applies the plan's choice or refuses up front."""

import pytest
import torch
from transformers import AutoModelForCausalLM, MistralConfig

from merge_core import memplan
from merge_core.errors import EvomergeError
from merge_core.materialize import Materializer
from tests.merge_core.test_merge import recipe, trio
from zoo.synthetic import MISTRAL_7B as MISTRAL_7B_SHAPE

GIB = 2**30
MISTRAL_7B = MistralConfig(**MISTRAL_7B_SHAPE)


@pytest.fixture(scope="module")
def mistral_shapes():
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(MISTRAL_7B, dtype=torch.bfloat16)
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def plan_7b(shapes, available_gib, sparsification, device="cuda:0"):
    return memplan.plan_memory(
        shapes,
        device=device,
        available=int(available_gib * GIB),
        n_models=3,  # base + two fine-tunes
        n_sources=2,
        load_dtype=torch.bfloat16,
        live_dtype=torch.bfloat16,
        sparsification=sparsification,
        evaluator_bytes=memplan.evaluator_reserve(MISTRAL_7B, 16, 1024, torch.bfloat16),
    )


def test_mistral_7b_shapes_are_7_2_billion_parameters(mistral_shapes):
    assert sum(torch.Size(s).numel() for s in mistral_shapes.values()) == 7_241_732_096


@pytest.mark.parametrize("method", ["magnitude", "random"])
def test_80_gb_gpu_keeps_bf16_sources_without_cache(mistral_shapes, method):
    plan = plan_7b(mistral_shapes, 79.1, method)  # an H100 80GB reports 79.1 GiB
    assert (plan.resident, plan.cache) == ("sources", False)
    assert plan.part("3 sources (bfloat16)") == 3 * 7_241_732_096 * 2
    assert plan.total <= plan.budget
    line = plan.line()
    assert "memory plan on cuda:0" in line and "live model (bfloat16) 13.49 GiB" in line and "(not task vectors" in line


def test_141_gb_gpu_keeps_float32_task_vectors_and_the_magnitude_keys(mistral_shapes):
    plan = plan_7b(mistral_shapes, 139.8, "magnitude")  # an H200 141GB
    assert (plan.resident, plan.cache) == ("task_vectors", True)
    assert plan.part("2 float32 task vectors") == 2 * 7_241_732_096 * 4
    assert "magnitude key cache" in plan.line()


@pytest.mark.parametrize(
    ("sparsification", "rescale", "default", "scratch"),
    [
        ("magnitude", False, False, 11),  # 1 (boundary mask) + 10 (building the key order: there is room for it)
        ("random", True, True, 4),
        (None, False, False, 0),
        ("magnitude", True, False, 19),
    ],
)
def test_fused_kernels_plan_one_eager_merge_and_a_scratch_per_worker(sparsification, rescale, default, scratch):
    """merge_core.fused keeps no float32 buffers: one eager merge of the largest tensor at a time (a kernel's check,
    or a tensor it declines), and per worker a boundary mask (magnitude, 1 byte per element), a rescale scratch
    (4 bytes) and, where the method does not rescale by default, |δ| for ||δ||_1 (4 bytes)."""
    shapes = {"embed": (1000, 100), "big": (800, 100), "small": (10, 10)}
    kwargs = dict(device="cpu", available=10**10, n_models=3, n_sources=2, load_dtype=torch.bfloat16,
                  live_dtype=torch.bfloat16, sparsification=sparsification, workers=2, resident="task_vectors",
                  rescale=rescale, rescale_default=default)  # fmt: skip
    eager = memplan.plan_memory(shapes, **kwargs).part("merge workspace")
    fused = memplan.plan_memory(shapes, **kwargs, fused=True).part("merge workspace")
    per_tensor = 4 * (memplan.WORK_BUFFERS + 2)
    assert eager == per_tensor * (100_000 + 80_000)
    assert fused == per_tensor * 100_000 + scratch * 100_000 * 2


def test_fused_ties_keeps_the_key_order_where_it_fits():
    """The key order (int32 per task-vector element, its sort's int64 + int16 temporaries per worker) comes first
    and is dropped, with a note, where it does not fit."""
    shapes = {"embed": (1000, 100), "big": (800, 100)}
    kwargs = dict(device="cpu", n_models=3, n_sources=2, load_dtype=torch.bfloat16, live_dtype=torch.bfloat16,
                  sparsification="magnitude", workers=2, fused=True)  # fmt: skip
    roomy = memplan.plan_memory(shapes, available=10**10, **kwargs)
    assert roomy.index and roomy.part("magnitude key order (int32)") == 2 * 180_000 * 4
    per_tensor = 4 * (memplan.WORK_BUFFERS + 2)
    assert roomy.part("merge workspace") == per_tensor * 100_000 + (1 + memplan.SORT_BYTES) * 100_000 * 2
    tight = memplan.plan_memory(shapes, available=int(roomy.total / memplan.HEADROOM) - 1, **kwargs)
    assert (tight.resident, tight.cache, tight.index) == ("task_vectors", True, False)
    assert "(not task vectors + cache + key order: needs" in tight.line()
    assert not memplan.plan_memory(shapes, available=10**10, **{**kwargs, "fused": False}).index


@pytest.mark.parametrize(("sparsification", "precompute"), [("magnitude_outliers", True), ("magnitude", False)])
def test_fused_plans_the_eager_workspace_where_the_kernels_do_not_run(sparsification, precompute):
    """Breadcrumbs masks, or magnitude masks without the key cache, stay eager in every worker: planned as such."""
    shapes = {"embed": (1000, 100), "big": (800, 100)}
    kwargs = dict(device="cpu", available=10**10, n_models=3, n_sources=2, load_dtype=torch.bfloat16,
                  live_dtype=torch.bfloat16, sparsification=sparsification, workers=2, resident="task_vectors",
                  precompute=precompute)  # fmt: skip
    plain = memplan.plan_memory(shapes, **kwargs).part("merge workspace")
    assert memplan.plan_memory(shapes, **kwargs, fused=True).part("merge workspace") == plain


def test_141_gb_gpu_has_no_room_for_dare_draws_beside_float32_task_vectors(mistral_shapes):
    plan = plan_7b(mistral_shapes, 139.8, "random")
    assert (plan.resident, plan.cache) == ("task_vectors", False)
    assert "DARE" not in plan.line() and "(not task vectors + cache: needs" in plan.line()


def test_24_gb_cpu_refuses_in_one_line_naming_the_shortfall(mistral_shapes):
    with pytest.raises(EvomergeError) as err:
        plan_7b(mistral_shapes, 22.0, "magnitude", device="cpu")
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("memory plan: the smallest layout needs")
    assert "3 sources (bfloat16) 40.47 GiB" in message and "19.80 GiB is usable" in message and "short by" in message


def test_forced_layout_that_does_not_fit_is_refused(mistral_shapes):
    with pytest.raises(EvomergeError, match="short by"):
        memplan.plan_memory(
            mistral_shapes,
            device="cuda:0",
            available=79 * GIB,
            n_models=3,
            n_sources=2,
            load_dtype=torch.bfloat16,
            live_dtype=torch.bfloat16,
            resident="task_vectors",
        )


def test_evaluator_reserve_counts_kv_cache_logits_and_mlp():
    kv = 2 * 32 * 8 * 128 * 16 * 1024 * 2
    logits = 16 * 1024 * 32000 * 4
    mlp = 3 * 16 * 1024 * 14336 * 2
    assert memplan.evaluator_reserve(MISTRAL_7B, 16, 1024, torch.bfloat16) == kv + logits + mlp


@pytest.fixture
def small_trio(tmp_path):
    return trio(tmp_path, dtype=torch.bfloat16)


def test_materializer_applies_the_plan_and_resident_bytes_match_it(small_trio, monkeypatch):
    r = recipe("ties", *small_trio)
    roomy = Materializer(r, device="cpu")
    assert (roomy.plan.resident, roomy.plan.cache, roomy.precompute) == ("task_vectors", True, True)
    assert roomy.resident_bytes == roomy.plan.part("base") + roomy.plan.part("2 float32 task vectors")
    # room for the sources but not for float32 task vectors: the plan says sources, and that is what is loaded
    tight = Materializer(r, device="cpu", resident="sources", precompute=False).plan.total
    monkeypatch.setattr(memplan, "available_bytes", lambda device: int(tight / memplan.HEADROOM) + 1)
    small = Materializer(r, device="cpu")
    assert (small.plan.resident, small.precompute) == ("sources", False) and not small._deltas
    assert small.resident_bytes == small.plan.part("3 sources")
    live = small.new_model()
    small.apply(r, live)
    reference = roomy.new_model()
    roomy.apply(r, reference)
    assert all(torch.equal(p, q) for p, q in zip(live.parameters(), reference.parameters()))


def test_materializer_refuses_before_loading_anything(small_trio, monkeypatch):
    from merge_core.checkpoint import Checkpoint

    def no_loading(self, name, device="cpu"):
        raise AssertionError("a tensor was loaded before the plan refused")

    monkeypatch.setattr(Checkpoint, "tensor", no_loading)
    monkeypatch.setattr(memplan, "available_bytes", lambda device: 2**20)
    with pytest.raises(EvomergeError, match=r"^memory plan: the smallest layout needs .* short by"):
        Materializer(recipe("dare_ties", *small_trio), device="cpu", evaluator_batch=(8, 544))
