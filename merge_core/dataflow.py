"""Data-flow merges (Sakana's DFS): a path of (model, layer) hops with per-hop scales through two decoders.

The forward pass over hops t = 1..H, each running layer l_t of model A (0) or B (1):

    u_1 = s_1 * E_A(x)
    u_t = r_{t-1} + s_t * m_{t-1}                  (t > 1: the scale multiplies the previous MLP output only)
    r_t = u_t + Attn_{l_t}(Norm(u_t))
    m_t = MLP_{l_t}(Norm(r_t))
    logits = head_A(norm_A(r_H + m_H))

`DataFlowModel` runs a path in memory over two live models without copying their weights; `export_dataflow`
writes the same function as an ordinary checkpoint of A's architecture with H layers (s_1 folded into the
embeddings, s_t into a copy of hop t-1's `mlp.down_proj`, which m_{t-1} is linear in).
"""

from __future__ import annotations

import copy
import dataclasses
import re
from pathlib import Path
from typing import Any

import torch
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_outputs import CausalLMOutputWithPast

from merge_core.checkpoint import Checkpoint, layer_index, module_kind
from merge_core.errors import EvomergeError
from merge_core.recipe import LayerPath
from merge_core.writer import ShardedWriter, copy_model_files

FULL, SLIDING = "full_attention", "sliding_attention"
_MASK_FUNCTIONS = {FULL: create_causal_mask, SLIDING: create_sliding_window_causal_mask}
# Config fields that decide what one decoder layer computes; A and B must agree on them, since the path runs
# under A's config (masks, rotary embedding) and exports as one config.
_LAYER_FIELDS = (
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "rms_norm_eps",
    "attention_bias",
    "mlp_bias",
    "rope_parameters",
    "rope_theta",
    "rope_scaling",
    "partial_rotary_factor",
    "sliding_window",
    "use_sliding_window",
    "_attn_implementation",
)
_LAYER_PREFIX_RE = re.compile(r"(^|\.)layers\.\d+\.")
_DOWN_PROJ = ("mlp.down_proj.weight", "mlp.down_proj.bias")
# The name the installed transformers gives the KV cache: `cache` from 5.24 on (generate passes `cache=` to forward and
# reads `outputs.cache`; masks and attention take `cache=`, the old name only with a FutureWarning), `past_key_values`
# up to 5.23. Read off the output class, so forward and its outputs follow the installed release.
CACHE_NAME = "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} else "past_key_values"


# --------------------------------------------------------------------------- configs


def check_compatible_configs(config_a: PretrainedConfig, config_b: PretrainedConfig) -> None:
    """Raise unless B's decoder layers compute under A's config exactly as under their own."""
    for field in _LAYER_FIELDS:
        value_a, value_b = getattr(config_a, field, None), getattr(config_b, field, None)
        if value_a != value_b:
            raise EvomergeError(
                f"data-flow models: '{field}' differs between A ({value_a!r}) and B ({value_b!r}); "
                "both models must share one architecture apart from their depth"
            )


def layer_types(config: PretrainedConfig) -> list[str]:
    """Each layer's attention type, as transformers' cache and masks read it (`layer_types`, else `sliding_window`)."""
    types = getattr(config, "layer_types", None)
    if types is None:
        sliding = getattr(config, "sliding_window", None) is not None
        types = [SLIDING if sliding else FULL] * int(config.num_hidden_layers)
    return list(types)


def path_config(config_a: PretrainedConfig, config_b: PretrainedConfig | None, path: LayerPath) -> PretrainedConfig:
    """A's config for a model whose layers are the path's hops: depth H and each hop's source attention type."""
    configs = (config_a,) if config_b is None else (config_a, config_b)
    path.check_layers([int(c.num_hidden_layers) for c in configs])
    types = [layer_types(configs[model])[layer] for model, layer in path.hops]
    unsupported = sorted(set(types) - set(_MASK_FUNCTIONS))
    if unsupported:
        raise EvomergeError(
            f"data-flow models: layer types {unsupported} are not supported (only {sorted(_MASK_FUNCTIONS)})"
        )
    config = copy.deepcopy(config_a)
    config.num_hidden_layers = len(path)
    if getattr(config_a, "layer_types", None) is not None:
        config.layer_types = types
    elif len(set(types)) > 1:
        raise EvomergeError(
            f"data-flow models: model type '{config_a.model_type}' cannot mix attention types {sorted(set(types))}"
        )
    if getattr(config_a, "max_window_layers", None) is not None:  # Qwen2: layers from this index on slide
        config.max_window_layers = types.index(SLIDING) if SLIDING in types else len(types)
    return config


# --------------------------------------------------------------------------- the in-memory model


class _HopCache:
    """The cache as seen from one hop: an attention module's update lands in the hop's slot, not its own layer's."""

    def __init__(self, cache: Cache, hop: int) -> None:
        self._cache = cache
        self._hop = hop

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any):
        return self._cache.update(key_states, value_states, self._hop, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cache, name)


class DataFlowModel(PreTrainedModel, GenerationMixin):
    """A `LayerPath` run through two live decoders (Llama/Mistral/Qwen2 family), holding references, not copies.

    A supplies embeddings, rotary embedding, final norm, head and generation config; `config` is A's with
    `num_hidden_layers` = H. The KV cache has one slot per hop (a layer used twice keeps two entries), so
    `generate` with the cache gives what recomputing without it gives. `set_path` swaps paths in place.
    """

    base_model_prefix = ""
    main_input_name = "input_ids"
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def __init__(self, model_a: PreTrainedModel, model_b: PreTrainedModel | None, path: LayerPath) -> None:
        if model_b is not None:
            check_compatible_configs(model_a.config, model_b.config)
        super().__init__(path_config(model_a.config, None if model_b is None else model_b.config, path))
        self.post_init()
        self.config._attn_implementation_internal = model_a.config._attn_implementation
        self.generation_config = copy.deepcopy(model_a.generation_config)
        # Registered after post_init, which would otherwise (re)initialize their weights.
        self.model_a = model_a
        self.model_b = model_b
        self.path = path

    def set_path(self, path: LayerPath) -> None:
        """Run `path` from now on; `config` follows (depth and per-hop attention types)."""
        new = path_config(self.model_a.config, None if self.model_b is None else self.model_b.config, path)
        for field in ("num_hidden_layers", "layer_types", "max_window_layers"):
            if hasattr(new, field):
                setattr(self.config, field, getattr(new, field))
        self.path = path

    def save_pretrained(self, *args: Any, **kwargs: Any) -> None:
        raise EvomergeError("a DataFlowModel holds its sources' weights by reference; write it with export_dataflow")

    def get_input_embeddings(self) -> torch.nn.Module:
        return _decoder(self.model_a).embed_tokens

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.model_a.get_output_embeddings()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        *,
        past_key_values: Cache | None = None,
        return_dict: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
    ) -> CausalLMOutputWithPast | tuple:
        """Logits over the path, with the same defaults as the transformers decoders (positions, cache, masks).

        The KV cache comes as `cache` (transformers >= 5.24) or `past_key_values` (<= 5.23), and the output carries it
        under the installed release's name (`CACHE_NAME`). No `**kwargs`: an argument this forward does not know (a
        future rename of what `generate` passes) is a TypeError naming it, never silently dropped. `generate` passes
        input_ids, attention_mask, position_ids, the cache, use_cache, logits_to_keep and return_dict (5.23, 5.24),
        and output_attentions / output_hidden_states when asked for, which this model cannot return.
        """
        if cache is not None and past_key_values is not None:
            raise TypeError("DataFlowModel.forward: got both cache and past_key_values; pass the KV cache once")
        cache = past_key_values if cache is None else cache
        for name, wanted in (("output_attentions", output_attentions), ("output_hidden_states", output_hidden_states)):
            if wanted:
                raise TypeError(
                    f"DataFlowModel.forward: {name}=True is not supported (it returns logits and the cache)"
                )
        if (input_ids is None) == (inputs_embeds is None):
            raise EvomergeError("DataFlowModel: pass exactly one of input_ids or inputs_embeds")
        decoder_a = _decoder(self.model_a)
        if inputs_embeds is None:
            inputs_embeds = decoder_a.embed_tokens(input_ids)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if position_ids is None:
            past_seen = cache.get_seq_length() if cache is not None else 0
            position_ids = (torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen).unsqueeze(0)
        mask_args = {
            "config": self.model_a.config,
            "inputs_embeds": inputs_embeds,
            "attention_mask": attention_mask,
            CACHE_NAME: cache,
            "position_ids": position_ids,
        }
        hop_types = layer_types(self.config)
        masks = {kind: _MASK_FUNCTIONS[kind](**mask_args) for kind in set(hop_types)}
        position_embeddings = decoder_a.rotary_emb(inputs_embeds, position_ids=position_ids)

        layers = [_decoder(m).layers for m in (self.model_a, self.model_b) if m is not None]
        residual = mlp_out = None
        for t, ((model, layer_idx), hop_scale) in enumerate(zip(self.path.hops, self.path.scales)):
            layer = layers[model][layer_idx]
            if t == 0:
                hidden = inputs_embeds if hop_scale == 1.0 else hop_scale * inputs_embeds
            else:
                hidden = residual + (mlp_out if hop_scale == 1.0 else hop_scale * mlp_out)
            attn_out, _ = layer.self_attn(
                hidden_states=layer.input_layernorm(hidden),
                position_embeddings=position_embeddings,
                attention_mask=masks[hop_types[t]],
                position_ids=position_ids,
                use_cache=use_cache,
                **{CACHE_NAME: None if cache is None else _HopCache(cache, t)},
            )
            residual = hidden + attn_out
            mlp_out = layer.mlp(layer.post_attention_layernorm(residual))
        hidden = decoder_a.norm(residual + mlp_out)

        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.model_a.get_output_embeddings()(hidden[:, keep, :])
        out = CausalLMOutputWithPast(logits=logits, **{CACHE_NAME: cache if use_cache else None})
        return out if return_dict is None or return_dict else out.to_tuple()


def _decoder(model: PreTrainedModel) -> torch.nn.Module:
    """The decoder stack (`model.model` for *ForCausalLM): embed_tokens, layers, norm, rotary_emb."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    if decoder is None or not all(hasattr(decoder, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb")):
        raise EvomergeError(
            f"data-flow models: {type(model).__name__} is not a Llama/Mistral/Qwen2-style decoder "
            "(needs model.embed_tokens, model.layers, model.norm, model.rotary_emb)"
        )
    return decoder


# --------------------------------------------------------------------------- export


def export_dataflow(
    path: LayerPath,
    model_a_dir: str | Path,
    model_b_dir: str | Path | None,
    out_dir: str | Path,
    dtype: torch.dtype | None = None,
    *,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
) -> Path:
    """Write `path` as a plain checkpoint of A's architecture with H layers; returns `out_dir`.

    Layer t is a copy of hop t's source layer; s_1 scales a copy of the embeddings (a tied head is untied
    first); s_t (t > 1) scales hop t-1's `mlp.down_proj` weight and bias. Tokenizer and generation config from A.
    """
    options = {"allow_pickle": allow_pickle, "trust_remote_code": trust_remote_code}
    ckpt_a = Checkpoint.open(str(model_a_dir), **options)
    ckpt_b = None if model_b_dir is None else Checkpoint.open(str(model_b_dir), **options)
    if ckpt_b is not None:
        check_compatible_configs(ckpt_a.config, ckpt_b.config)
    config = path_config(ckpt_a.config, None if ckpt_b is None else ckpt_b.config, path)
    sources = (ckpt_a,) if ckpt_b is None else (ckpt_a, ckpt_b)
    by_layer = [_names_by_layer(ckpt) for ckpt in sources]
    embed_names = [n for n in ckpt_a.names if module_kind(n) == "embed"]
    if not embed_names:
        raise EvomergeError(f"model '{ckpt_a.name}': no embedding tensor (embed_tokens) to scale")
    out_dtype = dtype or ckpt_a.dtype(embed_names[0])

    def convert(tensor: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        return tensor.to(out_dtype) if scale == 1.0 else (tensor.float() * scale).to(out_dtype)

    writer = ShardedWriter(out_dir)
    untie = ckpt_a.tied_embeddings and path.scales[0] != 1.0
    for name in ckpt_a.names:
        if layer_index(name) is not None:
            continue
        if module_kind(name) == "embed":
            writer.add(name, convert(ckpt_a.tensor(name), path.scales[0]))
            if untie:
                writer.add("lm_head.weight", convert(ckpt_a.tensor(name)))
        else:
            writer.add(name, convert(ckpt_a.tensor(name)))
    for t, (model, layer) in enumerate(path.hops):
        next_scale = path.scales[t + 1] if t + 1 < len(path) else 1.0
        names = by_layer[model][layer]
        if next_scale != 1.0 and _DOWN_PROJ[0] not in {_suffix(n) for n in names}:
            raise EvomergeError(
                f"model '{sources[model].name}': layer {layer} has no {_DOWN_PROJ[0]} to fold hop {t + 1}'s scale into"
            )
        for name in names:
            scale = next_scale if _suffix(name) in _DOWN_PROJ else 1.0
            out_name = _LAYER_PREFIX_RE.sub(rf"\g<1>layers.{t}.", name, count=1)
            writer.add(out_name, convert(sources[model].tensor(name), scale))
    writer.finalize()

    if untie:
        config.tie_word_embeddings = False
    view = copy.copy(ckpt_a)
    view.config = config
    copy_model_files(view, out_dir, out_dtype)
    return Path(out_dir)


def _names_by_layer(ckpt: Checkpoint) -> list[list[str]]:
    """Each decoder layer's tensor names."""
    names: list[list[str]] = [[] for _ in range(ckpt.num_layers)]
    for name in ckpt.names:
        index = layer_index(name)
        if index is not None and index < ckpt.num_layers:
            names[index].append(name)
    return names


def _suffix(name: str) -> str:
    """`model.layers.3.mlp.down_proj.weight` -> `mlp.down_proj.weight`."""
    return _LAYER_PREFIX_RE.split(name, maxsplit=1)[-1]
