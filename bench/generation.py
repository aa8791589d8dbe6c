"""Generation throughput on the real-model tasks: HF `generate` on whole prompts against the native path
(`evals.lm.generate_greedy`, which computes the prompts' shared prefix once), in one run, same model, same prompts.

    .venv/bin/python bench/generation.py [--threads 1] [--repeats 2] [--model data/real/smollm2-135m]

Tasks: the multi-skill dev set (192 short-answer prompts with the chat template, 12 new tokens at most) and the
GSM-style chain-of-thought dev set (`data/real_tasks/gsm_mini`, 64 new tokens at most). Each mode runs `--repeats`
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

import evals.lm as lm_calls  # noqa: E402
from evals.lm import chat_prompts, format_prompt, generate_greedy  # noqa: E402

TASKS = {  # name: (prompt files, prompt template, new tokens, stop strings)
    "skills (192 short answers)": (
        [ROOT / "data/real_tasks/skills" / s / "dev.jsonl" for s in ("arith", "units", "rev")],
        None,
        12,
        ["<|im_end|>", "\n"],
    ),
    "gsm_mini (8 chain-of-thought)": (
        [ROOT / "data/real_tasks/gsm_mini/dev.jsonl"],
        "{prompt} Give the final answer as a number.",
        64,
        ["<|im_end|>", "\n\n"],
    ),
}
MODES = {"HF generate, whole prompts": 10**9, "native, shared prefix once": lm_calls.MIN_SHARED_PREFIX}


def run(
    model, tokenizer, prompts: list[str], new_tokens: int, stop: list[str], minimum: int
) -> tuple[float, int, list]:
    lm_calls.MIN_SHARED_PREFIX = minimum
    counts: list[int] = []
    t0 = time.perf_counter()
    out = generate_greedy(
        model, tokenizer, prompts, batch_size=32, max_new_tokens=new_tokens, stop=stop, token_counts=counts
    )
    return time.perf_counter() - t0, sum(counts), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(ROOT / "data/real/smollm2-135m"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    print(f"model {args.model}, {args.threads} thread(s), torch {torch.__version__}, best of {args.repeats}")
    print("| task | mode | seconds | items/s | generated tokens/s | same responses |")
    print("|---|---|---|---|---|---|")
    for name, (files, template, new_tokens, stop) in TASKS.items():
        rows = [json.loads(line) for f in files for line in f.read_text().splitlines() if line.strip()]
        prompts = chat_prompts(tokenizer, [format_prompt(template, r["prompt"]) for r in rows])
        seconds: dict[str, list[float]] = {m: [] for m in MODES}
        tokens, outputs = {}, {}
        for _ in range(args.repeats):
            for mode, minimum in MODES.items():
                s, n, out = run(model, tokenizer, prompts, new_tokens, stop, minimum)
                seconds[mode].append(s)
                tokens[mode], outputs[mode] = n, out
        reference = outputs[next(iter(MODES))]
        for mode in MODES:
            best = min(seconds[mode])
            same = sum(a == b for a, b in zip(outputs[mode], reference))
            print(
                f"| {name} | {mode} | {best:.1f} (median {statistics.median(seconds[mode]):.1f}) | "
                f"{len(prompts) / best:.2f} | {tokens[mode] / best:.1f} | {same}/{len(prompts)} |"
            )


if __name__ == "__main__":
    main()
