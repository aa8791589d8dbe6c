"""End-to-end merges on tiny generated checkpoints: reload with transformers, expected tensors, in-memory ==
on-disk, CLI.
"""

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from evolve.cli import main
from merge_core import methods, sparsify
from merge_core.checkpoint import Checkpoint
from merge_core.materialize import Materializer
from merge_core.merge import run_merge
from merge_core.recipe import MergeRecipe
from zoo.synthetic import make_tiny_checkpoint

TENSOR = "model.layers.1.mlp.up_proj.weight"


def trio(root, family="llama", dtype=torch.float32, max_shard_size=None, layers=4):
    base = make_tiny_checkpoint(root / f"{family}-base", family, seed=0, dtype=dtype, num_layers=layers)
    a = make_tiny_checkpoint(
        root / f"{family}-a",
        family,
        seed=1,
        dtype=dtype,
        from_checkpoint=str(base),
        noise=0.05,
        max_shard_size=max_shard_size,
    )
    b = make_tiny_checkpoint(root / f"{family}-b", family, seed=2, dtype=dtype, from_checkpoint=str(base), noise=0.05)
    return str(base), str(a), str(b)


def recipe(method, base, a, b, **extra):
    params_a = {"weight": 0.6, "density": 0.5}
    params_b = {"weight": 0.4, "density": 0.7}
    spec = methods.METHODS[method]
    keep = set(spec.tensor_params)
    d = {
        "merge_method": method,
        "base_model": base,
        "models": [
            {"model": a, "parameters": {k: v for k, v in params_a.items() if k in keep}},
            {"model": b, "parameters": {k: v for k, v in params_b.items() if k in keep}},
        ],
        "seed": 7,
        **extra,
    }
    if spec.kind == "linear":
        d["models"].append({"model": base, "parameters": {"weight": 0.2}})
    if spec.kind == "slerp":
        d["models"] = [{"model": base}, {"model": a}]
        d["parameters"] = {"t": [0.0, 0.3, 1.0]}
    return MergeRecipe.from_dict(d)


def load_tensor(ckpt_dir, name):
    return Checkpoint.open(str(ckpt_dir)).tensor(name)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return trio(tmp_path_factory.mktemp("llama"))


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_ties_merge_reloads_and_matches_hand_computed_tensor(tmp_path, family):
    base, a, b = trio(tmp_path, family)
    out = run_merge(recipe("ties", base, a, b), tmp_path / "out")
    model = AutoModelForCausalLM.from_pretrained(out)
    got = dict(model.named_parameters())[TENSOR].detach()
    tb, ta, tbb = (load_tensor(p, TENSOR) for p in (base, a, b))
    want = methods.generalized_task_arithmetic(
        tb,
        [ta - tb, tbb - tb],
        [0.6, 0.4],
        [0.5, 0.7],
        sparsification="magnitude",
        consensus="sum",
        normalize=True,
        rescale=False,
    )  # ties
    assert torch.equal(got, want.to(got.dtype))
    assert type(model).__name__.lower().startswith(family.replace("qwen2", "qwen2"))


def test_bf16_sources_accumulate_in_float32(tmp_path):
    base, a, b = trio(tmp_path, dtype=torch.bfloat16)
    out = run_merge(recipe("task_arithmetic", base, a, b), tmp_path / "out")
    got = load_tensor(out, TENSOR)
    assert got.dtype == torch.bfloat16
    tb, ta, tbb = (load_tensor(p, TENSOR).float() for p in (base, a, b))
    want = tb + (0.6 * (ta - tb) + 0.4 * (tbb - tb))  # GTA: base + sum of weighted deltas
    assert torch.equal(got, want.to(torch.bfloat16))


def test_sharded_input_gives_the_same_merge(tmp_path):
    base, a, b = trio(tmp_path / "plain")
    base2, a2, b2 = trio(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "llama-a" / "model.safetensors.index.json").exists()
    out1 = run_merge(recipe("dare_ties", base, a, b), tmp_path / "o1")
    r2 = recipe("dare_ties", base2, a2, b2)
    out2 = run_merge(r2.replace(slices=r2.slices), tmp_path / "o2", max_shard_bytes=30_000)
    assert (out2 / "model.safetensors.index.json").exists()
    m1, m2 = AutoModelForCausalLM.from_pretrained(out1), AutoModelForCausalLM.from_pretrained(out2)
    # DARE masks are seeded by (seed, tensor, model name) and the model names differ between the two trios: compare TIES
    out3 = run_merge(recipe("ties", base2, a2, b2), tmp_path / "o3")
    out4 = run_merge(recipe("ties", base, a, b), tmp_path / "o4")
    s3, s4 = (
        load_file(out3 / "model.safetensors") if (out3 / "model.safetensors").exists() else None,
        load_file(out4 / "model.safetensors"),
    )
    assert s3 is not None and s3.keys() == s4.keys()
    assert all(torch.equal(s3[k], s4[k]) for k in s4)
    del m1, m2


@pytest.mark.parametrize(
    "method",
    ["linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "slerp", "breadcrumbs", "della", "model_stock"],
)
def test_in_memory_materialization_is_bit_identical_to_on_disk(tmp_path, llama, method):
    base, a, b = llama
    r = recipe(method, base, a, b)
    if method == "della":
        r = MergeRecipe.from_dict(
            {
                **r.to_dict(),
                "models": [
                    {"model": a, "parameters": {"weight": 0.6, "density": 0.5, "epsilon": 0.1}},
                    {"model": b, "parameters": {"weight": 0.4, "density": 0.7, "epsilon": 0.1}},
                ],
            }
        )
    out = run_merge(r, tmp_path / "disk")
    disk = AutoModelForCausalLM.from_pretrained(out)
    mat = Materializer(r, device="cpu")
    live = mat.new_model()
    mat.apply(r, live)
    disk_params = dict(disk.named_parameters())
    for name, p in live.named_parameters():
        assert torch.equal(p, disk_params[name]), name


@pytest.mark.parametrize("method", ["ties", "dare_ties", "breadcrumbs"])
def test_cached_keys_and_uniforms_give_the_on_disk_merge_for_later_candidates(tmp_path, llama, method):
    base, a, b = llama
    first = recipe(method, base, a, b)
    later = MergeRecipe.from_yaml(first.to_yaml().replace("0.6", "1.3").replace("0.5", "0.2").replace("0.7", "0.9"))
    disk = dict(AutoModelForCausalLM.from_pretrained(run_merge(later, tmp_path / "disk")).named_parameters())
    cached = Materializer(first, device="cpu")
    fresh = Materializer(first, device="cpu", precompute=False)
    assert cached.precompute and not fresh.precompute
    live = cached.new_model()
    cached.apply(first, live)  # fills the cache
    cached.apply(later, live)  # other weights and densities: masks from the cached keys / uniforms
    for name, p in live.named_parameters():
        assert torch.equal(p, disk[name]), name
    reseeded = later.replace(seed=later.seed + 1)  # DARE draws follow the recipe's seed, never a stale cache
    cached.apply(reseeded, live)
    other = fresh.new_model()
    fresh.apply(reseeded, other)
    assert all(torch.equal(p, q) for p, q in zip(live.parameters(), other.parameters()))


def test_magnitude_keys_select_like_the_selection_with_ties_by_index():
    delta = torch.tensor([[0.5, -0.5, 0.1], [0.5, 0.0, -0.9]])
    keys = sparsify.magnitude_keys(delta)
    assert keys.at_least.tolist()[-1] == 1 and int(keys.at_least[0]) == 6  # -0.9 alone in the top key
    assert sparsify.magnitude_mask(delta, 0.34, keys).tolist() == [[True, False, False], [False, False, True]]
    g = torch.Generator().manual_seed(0)
    cases = [delta, torch.randn(257, generator=g), torch.randn(64, 9, generator=g).to(torch.bfloat16).float()]
    cases.append(torch.where(torch.rand(300, generator=g) < 0.4, 0.25, torch.randn(300, generator=g)))  # many ties
    cases.append(torch.tensor([0.0, -0.0, 1e-30, -1e-30, 3.0, float("inf")]))
    for d in cases:
        keys = sparsify.magnitude_keys(d)
        for density in (0.01, 0.2, 0.34, 0.5, 0.67, 0.9, 0.999):
            assert torch.equal(sparsify.magnitude_mask(d, density, keys), sparsify.magnitude_mask(d, density))
            assert torch.equal(
                sparsify.magnitude_outliers_mask(d, density, 0.2, keys),
                sparsify.magnitude_outliers_mask(d, density, 0.2),
            )
    large = torch.randn(sparsify.KEYED_MIN + 5, generator=g).to(torch.bfloat16).float()  # keys made on the fly
    for density in (0.1, 0.5, 0.9):
        k = max(1, int(density * large.numel()))
        assert torch.equal(sparsify.magnitude_mask(large, density), sparsify._top_k_mask(large.abs(), k))


def test_materializer_rewrites_in_place_and_task_vector_mode_matches_source_mode(llama):
    base, a, b = llama
    r1 = recipe("ties", base, a, b)
    r2 = MergeRecipe.from_yaml(r1.to_yaml().replace("0.6", "1.3"))
    tv = Materializer(r1, device="cpu", resident="task_vectors")
    src = Materializer(r1, device="cpu", resident="sources")
    model = tv.new_model()
    ptr = model.model.layers[1].mlp.up_proj.weight.data_ptr()
    tv.apply(r2, model)
    first = {n: p.clone() for n, p in model.named_parameters()}
    src.apply(r2, model)
    assert model.model.layers[1].mlp.up_proj.weight.data_ptr() == ptr  # written in place, no new tensors
    assert all(torch.equal(first[n], p) for n, p in model.named_parameters())
    tv.apply(r1, model)
    assert not torch.equal(first[TENSOR], dict(model.named_parameters())[TENSOR])


def test_gradient_recipe_resolves_per_layer(tmp_path, llama):
    base, a, b = llama
    text = f"""
merge_method: task_arithmetic
base_model: {base}
models:
  - model: {a}
    parameters:
      weight: [0.0, 1.5]
"""
    (tmp_path / "r.yaml").write_text(text)
    assert main(["merge", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "out"), "--device", "cpu"]) == 0
    for layer in range(4):
        name = f"model.layers.{layer}.self_attn.o_proj.weight"
        tb, ta = load_tensor(base, name), load_tensor(a, name)
        w = layer / 3 * 1.5
        assert torch.allclose(load_tensor(tmp_path / "out", name), tb + w * (ta - tb), atol=1e-6), layer


def test_cli_merge_bad_inputs_are_one_line_errors(tmp_path, llama, capsys):
    base, a, b = llama
    cases = {
        "missing.yaml": (None, "recipe file not found"),
        "bad_method.yaml": (
            f"merge_method: frankenstein\nbase_model: {base}\nmodels: [{{model: {a}, parameters: {{weight: 1}}}}]\n",
            "merge_method: 'frankenstein' is not supported",
        ),
        "no_weight.yaml": (
            f"merge_method: ties\nbase_model: {base}\nmodels: [{{model: {a}}}]\n",
            f"parameter 'weight' is required for model '{a}'",
        ),
        "typo.yaml": (
            f"merge_method: ties\nbase_model: {base}\n"
            f"models: [{{model: {a}, parameters: {{weight: 1, densty: 0.5}}}}]\n",
            "models[0].parameters.densty: not a parameter of ties",
        ),
        "no_model.yaml": (
            f"merge_method: ties\nbase_model: {base}\n"
            f"models: [{{model: {tmp_path}/nope, parameters: {{weight: 1}}}}]\n",
            "nope",
        ),
    }
    for i, (fname, (text, message)) in enumerate(cases.items()):
        if text is not None:
            (tmp_path / fname).write_text(text)
        argv = ["merge", str(tmp_path / fname), "--out", str(tmp_path / "o")]
        if i == 0:  # one case through a real process: exit code and a single stderr line
            proc = subprocess.run(
                [sys.executable, "-m", "evolve.cli", *argv],
                capture_output=True,
                text=True,
                env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
            )
            code, err = proc.returncode, proc.stderr
        else:
            capsys.readouterr()
            code, err = main(argv), capsys.readouterr().err
        assert code == 2, (fname, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (fname, err)
