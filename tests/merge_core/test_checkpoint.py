"""Tests for merge_core.checkpoint: lazy reading, pickle refusal, sharded writing, model files, compatibility."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from merge_core.checkpoint import Checkpoint, layer_index, module_kind, validate_compatible
from merge_core.errors import EvomergeError, IncompatibleModelsError
from merge_core.writer import ShardedWriter, copy_model_files
from zoo.synthetic import DEFAULT_WORDS, TEST_SIZES, make_tiny_checkpoint

DROPPED = "model.layers.1.mlp.up_proj.weight"


def _state_dict(path: Path) -> dict[str, torch.Tensor]:
    return AutoModelForCausalLM.from_pretrained(path).state_dict()


def _assert_matches_model(ckpt: Checkpoint, path: Path) -> None:
    expected = _state_dict(path)
    assert ckpt.names == sorted(expected)
    for name, tensor in expected.items():
        assert ckpt.shape(name) == tuple(tensor.shape)
        assert ckpt.dtype(name) == tensor.dtype
        assert torch.equal(ckpt.tensor(name), tensor), name


def _rewrite(src: Checkpoint, out: Path, skip: str = "") -> Checkpoint:
    """A copy of `src` through ShardedWriter and copy_model_files, without tensor `skip`."""
    writer = ShardedWriter(out)
    for name in src.names:
        if name != skip:
            writer.add(name, src.tensor(name))
    writer.finalize()
    copy_model_files(src, out, torch.float32)
    return Checkpoint.open(str(out))


# --------------------------------------------------------------------------- reading


def test_open_single_file_is_lazy_and_matches_model(tiny_llama_trio):
    base = tiny_llama_trio[0]
    ckpt = Checkpoint.open(str(base))
    assert ckpt.name == str(base) and ckpt.path == base
    assert not ckpt._shards  # nothing opened for data yet
    assert (ckpt.model_type, ckpt.architectures) == ("llama", ["LlamaForCausalLM"])
    assert (ckpt.num_layers, ckpt.vocab_size, ckpt.tied_embeddings) == (4, ckpt.config.vocab_size, False)
    _assert_matches_model(ckpt, base)


def test_open_sharded_reads_each_shard_lazily(tiny_sharded_llama, tiny_llama_trio):
    index = json.loads((tiny_sharded_llama / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    ckpt = Checkpoint.open(str(tiny_sharded_llama))
    ckpt.tensor("model.layers.3.self_attn.o_proj.weight")
    assert len(ckpt._shards) == 1
    _assert_matches_model(ckpt, tiny_llama_trio[0])  # same seed and sizes as the trio's base


def test_open_bf16_keeps_dtype(tiny_bf16_trio):
    ckpt = Checkpoint.open(str(tiny_bf16_trio[1]))
    assert ckpt.dtype("model.embed_tokens.weight") == torch.bfloat16
    assert ckpt.tensor("model.embed_tokens.weight").dtype == torch.bfloat16


def test_unknown_tensor_name(tiny_llama_trio):
    ckpt = Checkpoint.open(str(tiny_llama_trio[0]))
    with pytest.raises(EvomergeError, match=r"has no tensor 'model\.nope'$"):
        ckpt.tensor("model.nope")


@pytest.fixture(scope="module")
def pickled_dirs(tiny_llama_trio, tmp_path_factory) -> tuple[Path, Path]:
    """The trio's base as one pytorch_model.bin, and as two .bin shards with an index."""
    base = tiny_llama_trio[0]
    state = _state_dict(base)
    single, sharded = tmp_path_factory.mktemp("bin_single"), tmp_path_factory.mktemp("bin_sharded")
    torch.save(state, single / "pytorch_model.bin")
    names = sorted(state)
    halves = {"pytorch_model-00001-of-00002.bin": names[::2], "pytorch_model-00002-of-00002.bin": names[1::2]}
    for file, part in halves.items():
        torch.save({n: state[n] for n in part}, sharded / file)
    weight_map = {n: file for file, part in halves.items() for n in part}
    (sharded / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    for folder in (single, sharded):
        shutil.copyfile(base / "config.json", folder / "config.json")
    return single, sharded


@pytest.mark.parametrize("which, file", [(0, "pytorch_model.bin"), (1, "pytorch_model.bin.index.json")])
def test_pickle_refused_unless_allowed(pickled_dirs, tiny_llama_trio, which, file):
    path = pickled_dirs[which]
    with pytest.raises(EvomergeError) as err:
        Checkpoint.open(str(path))
    assert str(err.value) == (
        f"model '{path}': weights are only in pickled '{file}', which can run code when loaded; "
        "convert it to safetensors, or set `allow_pickle: true` if you trust it"
    )
    _assert_matches_model(Checkpoint.open(str(path), allow_pickle=True), tiny_llama_trio[0])


@pytest.mark.parametrize(
    "name, reason",
    [
        ("/no/such/dir", "not an existing directory and not a valid hub id"),
        ("nobody/no-such-model", "offline and not in the local hub cache"),
    ],
)
def test_unknown_path_or_hub_id(name, reason):
    with pytest.raises(EvomergeError) as err:
        Checkpoint.open(name)
    assert str(err.value) == f"model '{name}': not a local directory and could not be fetched from the hub ({reason})"


def test_directory_without_weights(tiny_llama_trio, tmp_path):
    shutil.copyfile(tiny_llama_trio[0] / "config.json", tmp_path / "config.json")
    with pytest.raises(EvomergeError, match=r"no model\.safetensors, model\.safetensors\.index\.json or pytorch"):
        Checkpoint.open(str(tmp_path))


def test_remote_code_config_needs_the_flag(tmp_path):
    config = {"model_type": "evo_custom", "auto_map": {"AutoConfig": "configuration_evo.EvoConfig"}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(EvomergeError) as err:
        Checkpoint.open(str(tmp_path))
    assert str(err.value) == (
        f"model '{tmp_path}': model_type 'evo_custom' needs the repository's own code; "
        "set `trust_remote_code: true` if you trust it"
    )


# --------------------------------------------------------------------------- writing


def test_writer_round_trip_in_several_shards(tiny_llama_trio, tmp_path):
    src = Checkpoint.open(str(tiny_llama_trio[1]))
    writer = ShardedWriter(tmp_path, max_shard_bytes=20_000)
    for name in src.names:
        writer.add(name, src.tensor(name))
    assert writer.finalize() == tmp_path / "model.safetensors.index.json"
    copy_model_files(src, tmp_path, torch.float32)

    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert index["metadata"]["total_size"] == sum(src.tensor(n).nbytes for n in src.names)
    assert not list(tmp_path.glob("*.tmp"))
    reloaded, original = _state_dict(tmp_path), _state_dict(src.path)
    assert all(torch.equal(reloaded[n], original[n]) for n in original)


def test_writer_single_shard_replaces_stale_shards(tiny_llama_trio, tmp_path):
    src = Checkpoint.open(str(tiny_llama_trio[0]))
    for limit in (20_000, 2**30):  # second export into the same directory fits one file
        writer = ShardedWriter(tmp_path, max_shard_bytes=limit)
        for name in src.names:
            writer.add(name, src.tensor(name))
        writer.finalize()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_writer_stores_views_and_shared_tensors_alone(tmp_path):
    full = torch.arange(12.0).reshape(3, 4)
    writer = ShardedWriter(tmp_path)
    writer.add("row", full[1])
    writer.add("a", full)
    writer.add("b", full)
    writer.finalize()
    ckpt_tensors = load_file(tmp_path / "model.safetensors")
    assert torch.equal(ckpt_tensors["row"], full[1]) and torch.equal(ckpt_tensors["b"], full)
    with pytest.raises(EvomergeError, match="'a' added twice"):
        writer.add("a", full)


def test_copy_model_files_sets_dtype_and_loads_tokenizer(tiny_bf16_trio, tiny_llama_trio, tmp_path):
    src, tok_src = Checkpoint.open(str(tiny_llama_trio[0])), Checkpoint.open(str(tiny_bf16_trio[0]))
    writer = ShardedWriter(tmp_path)
    for name in src.names:
        writer.add(name, src.tensor(name).to(torch.bfloat16))
    writer.finalize()
    copy_model_files(src, tmp_path, torch.bfloat16, tokenizer_src=tok_src)

    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    assert (tmp_path / "generation_config.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype="auto")
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    text = "the cat has 3 apple"
    expected = AutoTokenizer.from_pretrained(tok_src.path)(text)["input_ids"]
    assert AutoTokenizer.from_pretrained(tmp_path)(text)["input_ids"] == expected


# --------------------------------------------------------------------------- compatibility


def _other(tmp_path: Path, **kwargs) -> Checkpoint:
    sizes = {**TEST_SIZES, **kwargs}
    return Checkpoint.open(str(make_tiny_checkpoint(tmp_path / "other", seed=5, **sizes)))


@pytest.fixture(scope="module")
def llama(tiny_llama_trio) -> dict[str, Checkpoint]:
    return {name: Checkpoint.open(str(p)) for name, p in zip(("base", "a", "b"), tiny_llama_trio)}


def test_compatible_trio_passes(llama, tmp_path):
    """Three distinct models with one layout pass whichever is the base; the same check on the same trio with
    one member a different shape refuses it (so passing means "compared and compatible", not "not compared")."""
    ref = llama["base"]
    assert all(
        c.names == ref.names and [c.shape(n) for n in c.names] == [ref.shape(n) for n in ref.names]
        for c in llama.values()
    )
    assert not torch.equal(llama["a"].tensor("lm_head.weight"), ref.tensor("lm_head.weight"))  # not copies
    for base in ("base", "a", "b", None):
        validate_compatible(llama, base)  # raises on any difference it finds
    odd = {**llama, "b": _other(tmp_path, intermediate_size=48)}
    for base in ("base", "a", None):
        with pytest.raises(IncompatibleModelsError, match=r"mlp\.down_proj\.weight' has shape \[32, (48|64)\]"):
            validate_compatible(odd, base)


def test_base_must_be_one_of_the_models(llama):
    with pytest.raises(EvomergeError, match=r"^base model 'c' is not among the models \['a', 'b', 'base'\]$"):
        validate_compatible(llama, "c")


def _incompatible(models: dict[str, Checkpoint], base: str | None = "base") -> str:
    with pytest.raises(IncompatibleModelsError) as err:
        validate_compatible(models, base)
    assert "\n" not in str(err.value)
    return str(err.value)


def test_different_family(llama, tiny_mistral_trio):
    models = {"base": llama["base"], "m": Checkpoint.open(str(tiny_mistral_trio[1]))}
    assert _incompatible(models) == (
        "model 'm': architecture family 'mistral' differs from base 'base' 'llama'; merge models of the same family"
    )


def test_missing_tensor(llama, tmp_path):
    models = {"base": llama["base"], "cut": _rewrite(llama["a"], tmp_path, skip=DROPPED)}
    assert _incompatible(models) == f"model 'cut': tensor '{DROPPED}' missing (present in base 'base')"
    models = {"cut": models["cut"], "base": llama["base"]}
    assert _incompatible(models, None) == f"model 'base': has tensor '{DROPPED}' that model 'cut' lacks"


def test_shape_mismatch(llama, tmp_path):
    models = {"base": llama["base"], "wide": _other(tmp_path, intermediate_size=48)}
    assert _incompatible(models) == (
        "model 'wide': tensor 'model.layers.0.mlp.down_proj.weight' has shape [32, 48] but base 'base' has [32, 64]"
    )


def test_vocab_mismatch(llama, tmp_path):
    models = {"base": llama["base"], "big": _other(tmp_path, words=[*DEFAULT_WORDS, *"x y z".split()])}
    v = llama["base"].vocab_size
    assert _incompatible(models) == (
        f"model 'big': vocabulary size {v + 3} differs from base 'base' {v} "
        f"(model.embed_tokens.weight [{v + 3}, 32] vs [{v}, 32]); merge models that share a tokenizer"
    )


def test_tied_vs_untied(llama, tmp_path):
    models = {"base": llama["base"], "tied": _other(tmp_path, tie_word_embeddings=True)}
    assert models["tied"].tied_embeddings and "lm_head.weight" not in models["tied"]
    assert _incompatible(models) == (
        "model 'tied': ties lm_head to the input embeddings but base 'base' has a separate lm_head.weight; "
        "merge models with the same tie_word_embeddings"
    )


def test_layer_count(llama, tmp_path):
    models = {"base": llama["base"], "short": _other(tmp_path, num_layers=2)}
    assert _incompatible(models) == (
        "model 'short': 2 layers but base 'base' has 4; parameter-space merges need the same depth"
    )


# --------------------------------------------------------------------------- tensor names


@pytest.mark.parametrize(
    "name, layer, kind",
    [
        ("model.embed_tokens.weight", None, "embed"),
        ("lm_head.weight", None, "head"),
        ("model.norm.weight", None, "other"),
        ("model.layers.0.self_attn.q_proj.weight", 0, "attn"),
        ("model.layers.11.self_attn.k_proj.bias", 11, "attn"),  # Qwen2 q/k/v biases
        ("model.layers.3.mlp.down_proj.weight", 3, "mlp"),
        ("model.layers.2.input_layernorm.weight", 2, "other"),
        ("model.layers.2.post_attention_layernorm.weight", 2, "other"),
        ("transformer.h.1.attention.dense.weight", None, "attn"),
    ],
)
def test_layer_index_and_module_kind(name, layer, kind):
    assert (layer_index(name), module_kind(name)) == (layer, kind)


def test_every_layer_tensor_is_classified(tiny_qwen2_trio):
    ckpt = Checkpoint.open(str(tiny_qwen2_trio[0]))
    kinds = {module_kind(n) for n in ckpt.names}
    assert kinds == {"embed", "head", "attn", "mlp", "other"}
    assert {layer_index(n) for n in ckpt.names} == {None, 0, 1}
    assert "model.layers.0.self_attn.q_proj.bias" in ckpt


def test_staged_output_removes_what_killed_writers_left_and_nothing_else(tmp_path, caplog):
    """A `.NAME.tmp-PID` whose process is gone and that has not changed for an hour is a killed writer's partial
    output: removed by the next write of NAME. A fresh one, a live process's, and a `.NAME.old-PID` (a previous
    output mid-replacement) stay."""
    import subprocess
    import sys

    from merge_core.writer import STALE_PARTIAL_S, staged_output

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "merged"
    hour_ago = time.time() - STALE_PARTIAL_S - 60
    partials = {
        "stale": tmp_path / f".merged.tmp-{dead.pid}",
        "fresh": tmp_path / f".merged.tmp-{dead.pid + 100000}",
        "live": tmp_path / f".merged.tmp-{os.getppid()}",
        "old": tmp_path / f".merged.old-{dead.pid}",
        "other": tmp_path / f".merged2.tmp-{dead.pid}",
    }
    for name, path in partials.items():
        (path / "sub").mkdir(parents=True)
        (path / "sub" / "model.safetensors").write_bytes(b"partial")
        if name != "fresh":
            for p in (path, path / "sub", path / "sub" / "model.safetensors"):
                os.utime(p, (hour_ago, hour_ago))
    with caplog.at_level("INFO"), staged_output(out) as tmp:
        (tmp / "config.json").write_text("{}")
    assert (out / "config.json").is_file()
    assert [n for n, p in partials.items() if not p.exists()] == ["stale"]
    assert "left by a killed process" in caplog.text and "restore it by hand" in caplog.text
