"""The generation engine of a worker (`execution.engine`): the native path (transformers, on the live model itself)
or a vLLM engine started beside the live model, which every candidate is written into after it is applied.

The vLLM engine serves the generation and choice tasks (greedy generation, gold-answer and choice log-likelihoods);
perplexity and lm_eval tasks stay on the live model. A data-flow worker has no engine: vLLM holds one ordinary
model, not a layer path over two, so data-flow candidates are scored by the native path (logged once per worker).
Its KV cache is sized here and counted in the worker's memory plan with the engine's own copy of the weights."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from evals.base import Evaluator
from evolve.config import RunConfig, VllmOptions
from merge_core.memplan import GIB, PROMPT_TOKENS, kv_bytes_per_token

log = logging.getLogger("evomerge")

DEFAULT_MAX_MODEL_LEN = 4096  # when no task is known yet: capped by the model's own max_position_embeddings


def engine_options(cfg: RunConfig) -> VllmOptions | None:
    """The vLLM options of a config that asks for the engine (defaults where it gives none), else None."""
    if cfg.execution.engine != "vllm":
        return None
    return cfg.execution.vllm or VllmOptions()


def cache_dir(options: VllmOptions) -> Path:
    """Where vLLM may write: the configured folder, else $XDG_CACHE_HOME (or ~/.cache)/evomerge/vllm."""
    if options.cache_dir:
        return Path(options.cache_dir).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "evomerge" / "vllm"


def max_position(config: Any) -> int:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(getattr(text, "max_position_embeddings", None) or DEFAULT_MAX_MODEL_LEN)


def kv_cache_bytes(cfg: RunConfig, options: VllmOptions, config: Any, itemsize: int, max_model_len: int) -> int:
    """The engine's KV cache: `kv_cache_gib`, else `max_num_seqs` sequences of an assumed prompt plus the largest
    `max_new_tokens` of the tasks, and at least one `max_model_len` sequence."""
    if options.kv_cache_gib is not None:
        return int(options.kv_cache_gib * GIB)
    new_tokens = max((getattr(t, "max_new_tokens", 0) for t in cfg.evaluation.tasks), default=0)
    tokens = max(options.max_num_seqs * (PROMPT_TOKENS + new_tokens), max_model_len)
    return tokens * kv_bytes_per_token(config, itemsize)


def engine_reserve(cfg: RunConfig, config: Any, params: int, itemsize: int) -> int:
    """Bytes the engine takes beside the live model (its copy of the weights and its KV cache), for the memory plan;
    0 without an engine, or when this process already runs one (the scorers share it)."""
    options = engine_options(cfg)
    if options is None or _ENGINES:  # an engine running in this process is shared: its memory is already taken
        return 0
    max_len = options.max_model_len or min(max_position(config), DEFAULT_MAX_MODEL_LEN)
    return params * itemsize + kv_cache_bytes(cfg, options, config, itemsize, max_len)


def engine_users(evaluators: Sequence[tuple[str, Evaluator]]) -> list[Any]:
    """The evaluators an engine serves (generation and choice tasks)."""
    from evals.native import TaskItemsEvaluator

    return [ev for _, ev in evaluators if isinstance(ev, TaskItemsEvaluator)]


_ENGINES: dict[str, Any] = {}  # one engine per architecture, tokenizer and settings, shared by a process's scorers
# the files vLLM's own tokenizer reads (it detokenizes for stop strings; prompts arrive as our token ids)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt", "tokenizer_config.json")
CONFIG_NAMES = ("_name_or_path", "name_or_path", "transformers_version", "_commit_hash")  # not the architecture


def engine_key(config: Any, model_dir: str, settings: Any) -> str:
    """What an engine is for: the model config (all but its names), the tokenizer files, the settings. Scorers of
    checkpoints with the same key (the sources, the base, the merges of one run) share one engine and load their
    weights into it in turn."""
    arch = {k: v for k, v in config.to_dict().items() if k not in CONFIG_NAMES}
    digest = hashlib.sha256(json.dumps(arch, sort_keys=True, default=str).encode())
    for name in TOKENIZER_FILES:
        path = Path(model_dir) / name
        if path.is_file():
            digest.update(name.encode() + path.read_bytes())
    digest.update(repr(settings).encode())
    return digest.hexdigest()


def start_engine(
    cfg: RunConfig, model: Any, model_dir: str, tokenizer: Any, evaluators: Sequence[tuple[str, Evaluator]]
) -> Any:
    """A vLLM engine for `model` (its architecture and tokenizer in `model_dir`), attached to the evaluators it
    serves, or None for the native engine or when no evaluator needs it. The process's engine for the same
    architecture, tokenizer and settings is reused (the caller loads its weights: `Scorer` does, and loads them
    again whenever another scorer has loaded since)."""
    options = engine_options(cfg)
    users = engine_users(evaluators)
    if options is None or not users:
        if options is not None:
            log.info("execution.engine: vllm: no generation or choice task; the live model scores them all")
        return None
    from evals.vllm_engine import EngineSettings, VllmEngine
    from merge_core.merge import resolve_device

    config = model.config
    itemsize = next(model.parameters()).element_size()
    max_len = options.max_model_len or min(max_position(config), DEFAULT_MAX_MODEL_LEN)
    needed = max(ev.longest_sequence(tokenizer) for ev in users)
    if needed > max_len:
        raise_long(needed, max_len)
    settings = EngineSettings(
        kv_cache_bytes=kv_cache_bytes(cfg, options, config, itemsize, max_len),
        max_model_len=max_len,
        max_num_seqs=options.max_num_seqs,
        device=resolve_device(cfg.execution.device).type,
        dtype=cfg.execution.dtype,
        cache_dir=cache_dir(options),
        threads=cfg.execution.threads,
        compile=options.compile,
        log_level=options.log_level,
        seed=cfg.seed,
    )
    key = engine_key(config, model_dir, settings)
    engine = _ENGINES.get(key)
    if engine is None:
        engine = VllmEngine(model_dir, settings, tied=bool(getattr(config, "tie_word_embeddings", False)))
        _ENGINES[key] = engine
        log.info(
            "vLLM engine started in %.1f s: max_model_len %d, %d sequences at once, KV cache %.2f GiB",
            engine.start_seconds, max_len, options.max_num_seqs, settings.kv_cache_bytes / GIB,
        )  # fmt: skip
    for ev in users:
        ev.engine = engine
    return engine


def close_engines() -> None:
    """Shut down this process's engines (their weights and KV caches are freed; a later scorer starts a new one)."""
    while _ENGINES:
        _, engine = _ENGINES.popitem()
        engine.close()


def free_for_scoring(backend: Any, model: Any) -> int:
    """Bytes the live model's scoring may use: what the worker's memory plan leaves beside its other parts (its
    evaluator reserve included), else (a checkpoint or data-flow scorer, its models loaded) 90% of what the
    device has free now."""
    from merge_core.memplan import HEADROOM, available_bytes

    plan = getattr(getattr(backend, "materializer", None), "plan", None)
    if plan is not None:
        return plan.budget - plan.total + plan.part("evaluator reserve")
    return int(HEADROOM * available_bytes(next(model.parameters()).device))


def fit_batches(backend: Any, model: Any, tokenizer: Any, evaluators: Sequence[tuple[str, Evaluator]]) -> None:
    """Each generation or choice task with `batch_size: auto` gets the most sequences of its longest prompt +
    answer (at most AUTO_BATCH_CAP) that the memory left for scoring holds (logged), or a one-line error when not
    even one does."""
    from evals.spec import AUTO_BATCH, AUTO_BATCH_CAP
    from merge_core.errors import EvomergeError
    from merge_core.memplan import fit_batch

    auto = [(name, ev) for name, ev in evaluators if getattr(ev, "batch_size", None) == AUTO_BATCH]
    if not auto:
        return
    free = free_for_scoring(backend, model)
    dtype = next(model.parameters()).dtype
    for name, ev in auto:
        tokens = ev.longest_sequence(tokenizer)
        batch = fit_batch(model.config, tokens, dtype, free, AUTO_BATCH_CAP)
        if not batch:
            raise EvomergeError(
                f"task {name}: batch_size auto: one sequence of {tokens} tokens needs more than the "
                f"{max(free, 0) / GIB:.2f} GiB the memory plan leaves for scoring; shorten the prompts or free memory"
            )
        ev.batch_size = batch
        log.info(
            "task %s: batch_size auto = %d (sequences of up to %d tokens, %.2f GiB free)",
            name,
            batch,
            tokens,
            free / GIB,
        )


def raise_long(needed: int, max_len: int) -> None:
    from merge_core.errors import EvomergeError

    raise EvomergeError(
        f"execution.vllm.max_model_len: a task needs {needed} tokens (its longest prompt and answer), more than "
        f"{max_len}; raise max_model_len (at most the model's max_position_embeddings) or shorten the prompts"
    )
