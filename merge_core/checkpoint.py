"""Reading checkpoints: lazy, memory-mapped safetensors (a sharded index, hub ids, pickles only when allowed), tensor
names, and the checks that several checkpoints can be merged (one-line errors). Writing one: merge_core.writer."""

from __future__ import annotations

import json
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

import torch
from huggingface_hub import snapshot_download
from huggingface_hub.errors import GatedRepoError, HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError
from safetensors import safe_open
from transformers import AutoConfig, PretrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from merge_core.errors import EvomergeError, IncompatibleModelsError

SAFETENSORS_SINGLE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_SINGLE = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)
_HUB_PATTERNS = ["*.safetensors", SAFETENSORS_INDEX, "config.json", "generation_config.json", *TOKENIZER_FILES]
_PICKLE_PATTERNS = ["pytorch_model*.bin", PICKLE_INDEX]

_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


# --------------------------------------------------------------------------- tensor names


def layer_index(tensor_name: str) -> int | None:
    """The decoder layer a tensor belongs to (`model.layers.3.mlp...` -> 3), or None outside the layers."""
    match = _LAYER_RE.search(tensor_name)
    return int(match.group(1)) if match else None


def module_kind(tensor_name: str) -> str:
    """'attn', 'mlp', 'embed' (input embeddings), 'head' (lm_head) or 'other' (norms and the rest)."""
    parts = tensor_name.split(".")
    if "embed_tokens" in parts:
        return "embed"
    if "lm_head" in parts:
        return "head"
    if {"self_attn", "attention", "attn"} & set(parts):
        return "attn"
    if {"mlp", "feed_forward"} & set(parts):
        return "mlp"
    return "other"


# --------------------------------------------------------------------------- reading


class _Shard(Protocol):
    """One weight file, opened lazily: shapes and dtypes without reading the data."""

    def shape(self, name: str) -> tuple[int, ...]: ...

    def dtype(self, name: str) -> torch.dtype: ...

    def tensor(self, name: str) -> torch.Tensor: ...


class _SafetensorsShard:
    """A memory-mapped safetensors file."""

    def __init__(self, path: Path) -> None:
        try:
            self._file = safe_open(str(path), framework="pt")
        except Exception as err:  # SafetensorError (corrupt or truncated: the header must cover the file), OSError
            reason = " ".join(str(err).split())[:200] or type(err).__name__
            raise EvomergeError(
                f"{path}: not a readable safetensors file ({reason}); re-download or re-save it"
            ) from None

    def keys(self) -> list[str]:
        return list(self._file.keys())

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._file.get_slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        code = self._file.get_slice(name).get_dtype()
        return _SAFETENSORS_DTYPES[code] if code in _SAFETENSORS_DTYPES else self.tensor(name).dtype

    def tensor(self, name: str) -> torch.Tensor:
        return self._file.get_tensor(name)


class _PickleShard:
    """A pickled torch state dict, loaded with weights_only=True and memory-mapped where the format allows."""

    def __init__(self, path: Path) -> None:
        try:
            try:
                self._tensors = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # legacy (non-zip) format cannot be memory-mapped
                self._tensors = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:  # the weights-only unpickler refused a global: nothing ran
            found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
            named = f"names {found.group(1)}, " if found else "holds something "
            raise EvomergeError(
                f"{path}: its pickle {named}which is not a tensor or state dict, so it was not loaded (no code ran); "
                "convert the checkpoint to safetensors from a source you trust"
            ) from None

    def keys(self) -> list[str]:
        return list(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._tensors[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        return self._tensors[name].dtype

    def tensor(self, name: str) -> torch.Tensor:
        return self._tensors[name]


class Checkpoint:
    """A model directory read lazily: config from config.json, tensors memory-mapped one at a time."""

    def __init__(
        self,
        name: str,
        path: Path,
        config: PretrainedConfig,
        weight_map: dict[str, str],
        pickled: bool,
        trust_remote_code: bool,
    ) -> None:
        """Use `Checkpoint.open`; `weight_map` maps each tensor name to its file under `path`."""
        self.name = name
        self.path = path
        self.config = config
        self.trust_remote_code = trust_remote_code
        self._weight_map = weight_map
        self._pickled = pickled
        self._shards: dict[str, _Shard] = {}

    @classmethod
    def open(cls, path_or_hub_id: str, *, allow_pickle: bool = False, trust_remote_code: bool = False) -> Checkpoint:
        """Open a local model directory, or fetch a hub id's safetensors, config and tokenizer files first."""
        name = str(path_or_hub_id)
        local = Path(name).expanduser()
        if local.is_file():
            raise EvomergeError(f"model '{name}': is a file; pass the model's directory (with config.json)")
        path = local if local.is_dir() else _fetch_from_hub(name, allow_pickle, trust_remote_code)
        config = _read_config(name, path, trust_remote_code)
        weight_map, pickled = _find_weights(name, path, allow_pickle)
        ckpt = cls(name, path, config, weight_map, pickled, trust_remote_code)
        ckpt._verify()
        return ckpt

    def _verify(self) -> None:
        """Every weight file present with a whole header (read now, not mid-merge), and config.json describing
        these tensors: its hidden size the embedding's width, its layer count the layers the tensors hold."""
        headers: dict[str, _SafetensorsShard] = {}  # opened to check, then dropped: reading stays lazy
        for file in sorted(set(self._weight_map.values())):
            if not (self.path / file).is_file():
                raise EvomergeError(
                    f"model '{self.name}': weight file {file} listed in the index is missing from {self.path}"
                )
            if not self._pickled:
                headers[file] = _SafetensorsShard(self.path / file)
        text = self.config.get_text_config()
        hidden = getattr(text, "hidden_size", None)
        embed = next((n for n in self.names if module_kind(n) == "embed" and n.endswith(".weight")), None)
        if isinstance(hidden, int) and embed is not None and not self._pickled:
            shape = headers[self._weight_map[embed]].shape(embed)
            # a few families embed narrower and project up (OPT's word_embed_proj_dim, ALBERT's embedding_size)
            widths = {hidden} | {
                getattr(text, k)
                for k in ("word_embed_proj_dim", "embedding_size")
                if isinstance(getattr(text, k, None), int)
            }
            if len(shape) == 2 and shape[1] not in widths:
                raise EvomergeError(
                    f"model '{self.name}': config.json hidden_size {hidden} "
                    f"but tensor '{embed}' has shape {list(shape)}; "
                    "the config does not describe these weights"
                )
        layers = {layer_index(n) for n in self._weight_map} - {None}
        declared = getattr(text, "num_hidden_layers", None)
        if isinstance(declared, int) and layers and max(layers) + 1 < declared:
            raise EvomergeError(
                f"model '{self.name}': config.json num_hidden_layers {declared} but the tensors hold layers "
                f"0..{max(layers)} only; the config does not describe these weights"
            )

    def __contains__(self, tensor_name: object) -> bool:
        return tensor_name in self._weight_map

    def __repr__(self) -> str:
        return f"Checkpoint({self.name!r}, model_type={self.model_type!r}, tensors={len(self._weight_map)})"

    @property
    def model_type(self) -> str:
        return self.config.model_type

    @property
    def architectures(self) -> list[str]:
        return list(self.config.architectures or [])

    @property
    def names(self) -> list[str]:
        """Every tensor name in the checkpoint, sorted."""
        return sorted(self._weight_map)

    @property
    def num_layers(self) -> int:
        return int(self.config.get_text_config().num_hidden_layers)

    @property
    def vocab_size(self) -> int:
        return int(self.config.get_text_config().vocab_size)

    @property
    def tied_embeddings(self) -> bool:
        """True when the output head reuses the input embeddings (tie_word_embeddings and no lm_head.weight)."""
        tied = bool(getattr(self.config.get_text_config(), "tie_word_embeddings", False))
        return tied and not any(module_kind(n) == "head" for n in self._weight_map)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shard(name).shape(name)

    def dtype(self, name: str) -> torch.dtype:
        return self._shard(name).dtype(name)

    def tensor(self, name: str, device: str | torch.device = "cpu") -> torch.Tensor:
        """The tensor as stored (no dtype conversion), moved to `device`."""
        return self._shard(name).tensor(name).to(device)

    def _shard(self, name: str) -> _Shard:
        """The (lazily opened, then reused) file holding tensor `name`."""
        if name not in self._weight_map:
            raise EvomergeError(f"model '{self.name}': has no tensor '{name}'")
        file = self._weight_map[name]
        if file not in self._shards:
            shard_cls = _PickleShard if self._pickled else _SafetensorsShard
            self._shards[file] = shard_cls(self.path / file)
        return self._shards[file]


def _fetch_from_hub(hub_id: str, allow_pickle: bool, trust_remote_code: bool) -> Path:
    """Download (or find in the cache) the files a merge needs; pickled weights only when allowed and needed."""
    patterns = _HUB_PATTERNS + (["*.py"] if trust_remote_code else [])
    path = _snapshot(hub_id, patterns)
    if allow_pickle and not _has_safetensors(path):
        path = _snapshot(hub_id, patterns + _PICKLE_PATTERNS)
    return path


def _snapshot(hub_id: str, patterns: list[str]) -> Path:
    try:
        return Path(snapshot_download(hub_id, allow_patterns=patterns))
    except HFValidationError:
        reason = "not an existing directory and not a valid hub id"
    except GatedRepoError:
        reason = "gated repository; accept its terms and log in with `hf auth login`"
    except RepositoryNotFoundError:
        reason = "repository not found, or private and not logged in"
    except LocalEntryNotFoundError:
        reason = "offline and not in the local hub cache"
    except OSError as err:
        reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    raise EvomergeError(f"model '{hub_id}': not a local directory and could not be fetched from the hub ({reason})")


def _read_config(name: str, path: Path, trust_remote_code: bool) -> PretrainedConfig:
    """config.json through AutoConfig; remote code only when the user allowed it, never an interactive prompt."""
    config_file = path / "config.json"
    if not config_file.is_file():
        raise EvomergeError(f"model '{name}': no config.json in {path}")
    raw = _read_json(config_file, f"model '{name}'")
    model_type = raw.get("model_type")
    if not trust_remote_code and model_type not in CONFIG_MAPPING:
        if "auto_map" in raw:
            raise EvomergeError(
                f"model '{name}': model_type '{model_type}' needs the repository's own code; "
                "set `trust_remote_code: true` if you trust it"
            )
        raise EvomergeError(f"model '{name}': model_type '{model_type}' is not known to this transformers version")
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError, OSError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise EvomergeError(f"model '{name}': cannot read config.json ({first_line})") from err


def _has_safetensors(path: Path) -> bool:
    return (path / SAFETENSORS_INDEX).is_file() or (path / SAFETENSORS_SINGLE).is_file()


def _find_weights(name: str, path: Path, allow_pickle: bool) -> tuple[dict[str, str], bool]:
    """The tensor-name -> file map, and whether the files are pickled; pickles only when allowed."""
    if (path / SAFETENSORS_INDEX).is_file():
        return _index_weight_map(path / SAFETENSORS_INDEX), False
    if (path / SAFETENSORS_SINGLE).is_file():
        return dict.fromkeys(_SafetensorsShard(path / SAFETENSORS_SINGLE).keys(), SAFETENSORS_SINGLE), False
    pickle_file = next((f for f in (PICKLE_INDEX, PICKLE_SINGLE) if (path / f).is_file()), None)
    if pickle_file is None:
        raise EvomergeError(
            f"model '{name}': no {SAFETENSORS_SINGLE}, {SAFETENSORS_INDEX} or {PICKLE_SINGLE} in {path}"
        )
    if not allow_pickle:
        raise EvomergeError(
            f"model '{name}': weights are only in pickled '{pickle_file}', which can run code when loaded; "
            "convert it to safetensors, or set `allow_pickle: true` if you trust it"
        )
    if pickle_file == PICKLE_INDEX:
        return _index_weight_map(path / PICKLE_INDEX), True
    return dict.fromkeys(_PickleShard(path / PICKLE_SINGLE).keys(), PICKLE_SINGLE), True


def _index_weight_map(index_file: Path) -> dict[str, str]:
    weight_map = _read_json(index_file, str(index_file.parent)).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise EvomergeError(f"{index_file}: no 'weight_map' of tensor name -> file name")
    return dict(weight_map)


def _read_json(file: Path, who: str) -> dict:
    """A JSON object file, or a one-line error naming it (not JSON, not UTF-8, not an object)."""
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:  # JSONDecodeError is a ValueError
        raise EvomergeError(f"{who}: {file.name} is not valid JSON ({' '.join(str(err).split())[:150]})") from None
    except OSError as err:
        raise EvomergeError(f"{who}: cannot read {file.name} ({err.strerror or err})") from None
    if not isinstance(data, dict):
        raise EvomergeError(f"{who}: {file.name} must hold a JSON object, got {type(data).__name__}")
    return data


# --------------------------------------------------------------------------- compatibility


def validate_compatible(checkpoints: Mapping[str, Checkpoint], base: str | None) -> None:
    """Raise IncompatibleModelsError (one line) unless every checkpoint matches the base tensor for tensor."""
    if not checkpoints:
        raise EvomergeError("no models to merge")
    if base is not None and base not in checkpoints:
        raise EvomergeError(f"base model '{base}' is not among the models {sorted(checkpoints)}")
    ref_name = base if base is not None else next(iter(checkpoints))
    ref_label = f"base '{ref_name}'" if base is not None else f"model '{ref_name}'"
    ref = checkpoints[ref_name]
    for name, ckpt in checkpoints.items():
        if name != ref_name:
            _check_pair(name, ckpt, ref_label, ref)


def _check_pair(name: str, ckpt: Checkpoint, ref_label: str, ref: Checkpoint) -> None:
    """The checks in the order that gives the most specific message first."""
    if ckpt.model_type != ref.model_type:
        raise IncompatibleModelsError(
            f"model '{name}': architecture family '{ckpt.model_type}' differs from {ref_label} "
            f"'{ref.model_type}'; merge models of the same family"
        )
    if ckpt.tied_embeddings != ref.tied_embeddings:
        raise IncompatibleModelsError(
            f"model '{name}': {_tie_words(ckpt)} but {ref_label} {_tie_words(ref)}; "
            "merge models with the same tie_word_embeddings"
        )
    _check_vocab(name, ckpt, ref_label, ref)
    if ckpt.num_layers != ref.num_layers:
        raise IncompatibleModelsError(
            f"model '{name}': {ckpt.num_layers} layers but {ref_label} has {ref.num_layers}; "
            "parameter-space merges need the same depth"
        )
    _check_tensors(name, ckpt, ref_label, ref)


def _tie_words(ckpt: Checkpoint) -> str:
    return "ties lm_head to the input embeddings" if ckpt.tied_embeddings else "has a separate lm_head.weight"


def _check_vocab(name: str, ckpt: Checkpoint, ref_label: str, ref: Checkpoint) -> None:
    """Vocabulary size from the embedding tensors where present, else from config.vocab_size."""
    vocab_tensors = sorted((n for n in ref.names if module_kind(n) in ("embed", "head")), key=module_kind)
    for tensor in (n for n in vocab_tensors if n in ckpt):
        shape, ref_shape = ckpt.shape(tensor), ref.shape(tensor)
        if shape[0] != ref_shape[0]:
            raise IncompatibleModelsError(
                f"model '{name}': vocabulary size {shape[0]} differs from {ref_label} {ref_shape[0]} "
                f"({tensor} {list(shape)} vs {list(ref_shape)}); merge models that share a tokenizer"
            )
    if ckpt.vocab_size != ref.vocab_size:
        raise IncompatibleModelsError(
            f"model '{name}': vocabulary size {ckpt.vocab_size} differs from {ref_label} {ref.vocab_size} "
            "(config.vocab_size); merge models that share a tokenizer"
        )


def _check_tensors(name: str, ckpt: Checkpoint, ref_label: str, ref: Checkpoint) -> None:
    names, ref_names = set(ckpt.names), set(ref.names)
    missing, extra = sorted(ref_names - names), sorted(names - ref_names)
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise IncompatibleModelsError(f"model '{name}': tensor '{missing[0]}'{more} missing (present in {ref_label})")
    if extra:
        more = f" and {len(extra) - 1} more" if len(extra) > 1 else ""
        raise IncompatibleModelsError(f"model '{name}': has tensor '{extra[0]}'{more} that {ref_label} lacks")
    for tensor in ckpt.names:
        shape, ref_shape = ckpt.shape(tensor), ref.shape(tensor)
        if shape != ref_shape:
            raise IncompatibleModelsError(
                f"model '{name}': tensor '{tensor}' has shape {list(shape)} but {ref_label} has {list(ref_shape)}"
            )
