"""Benchmark on the real model (SmolLM2-135M-Instruct, zoo/real.py): merge and evaluator throughput.

    python bench/real_model.py [--part merge|eval|both] [--threads 2] [--write]

merge: for every method, the on-disk merge of the two perturbed experts over the base (wall, s), the Materializer's
build, its first `apply` (fills the rank / DARE caches of sparsifying methods) and a second `apply` of another
candidate (the steady per-candidate cost in a search), and for the sparsifying methods that candidate again from a
Materializer without those caches.
eval: the native generation evaluator against lm-eval's HF backend (HFLM, apply_chat_template) on
data/real_tasks/gsm_mini (test, 16 GSM8K-style items): chat template, greedy, left-padded batches, up to
`--new-tokens` tokens, stop strings, last-number exact match. Items/s and response tokens/s (tokens of the
stop-cut responses, re-tokenized: the same count for both backends).
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from bench.results import write_section
from evals.extract import answers_match
from evals.lm_eval_backend import LmEvalEvaluator, write_jsonl_task_group
from evals.native import GenerationEvaluator
from merge_core import methods
from merge_core.materialize import Materializer
from merge_core.merge import run_merge
from tests.real.test_merge_real import real_recipe
from zoo.real import build_real

ROOT = Path(__file__).resolve().parents[1]
TASK = ROOT / "data/real_tasks/gsm_mini"
OPTIONS = dict(stop=["<|im_end|>", "\n\n"], prompt_template="{prompt} Give the final answer as a number.")


def machine(threads: int) -> str:
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} ({threads} threads), "
        f"load average {load} (the CPU is shared with other jobs: figures are upper bounds on this machine's cost)"
    )


def bench_merge(models, work: Path, method_names: list[str]) -> str:
    header = "| method | on-disk merge (s) | Materializer build (s) | first apply (s) | next apply (s) "
    header += "| next, no cache (s) |"
    rows = [header, "|---" * 6 + "|"]
    for method in method_names:
        recipe = real_recipe(method, models)
        later = recipe.from_yaml(recipe.to_yaml().replace("0.7", "0.45").replace("0.9", "1.2"))
        t0 = time.perf_counter()
        run_merge(recipe, work / method)
        disk = time.perf_counter() - t0
        shutil.rmtree(work / method)
        t0 = time.perf_counter()
        materializer = Materializer(recipe, device="cpu")
        build = time.perf_counter() - t0
        live = materializer.new_model()
        t0 = time.perf_counter()
        materializer.apply(recipe, live)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        materializer.apply(later, live)
        steady = time.perf_counter() - t0
        uncached = "-"
        if materializer.precompute:  # the same candidate without the rank / DARE caches
            del materializer
            plain = Materializer(recipe, device="cpu", precompute=False)
            t0 = time.perf_counter()
            plain.apply(later, live)
            uncached = f"{time.perf_counter() - t0:.1f}"
            del plain
        else:
            del materializer
        rows.append(f"| {method} | {disk:.1f} | {build:.1f} | {first:.1f} | {steady:.1f} | {uncached} |")
        print(rows[-1], flush=True)
        del live
    return "\n".join(rows)


def bench_eval(models, batch_sizes: list[int], new_tokens: int, work: Path) -> str:
    from lm_eval.evaluator import evaluate

    model = AutoModelForCausalLM.from_pretrained(models.base, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(models.base)
    write_jsonl_task_group(
        "real", {"gsm_mini": TASK}, work, split="test", extract="last_number", max_new_tokens=new_tokens, **OPTIONS
    )
    t0 = time.perf_counter()
    backend = LmEvalEvaluator(["gsm_mini"], include_path=work, batch_size=batch_sizes[0])
    setup = time.perf_counter() - t0
    count = lambda texts: sum(len(tokenizer(t)["input_ids"]) for t in texts)  # noqa: E731
    rows = [
        "| batch | native items/s | native tokens/s | lm-eval items/s | lm-eval tokens/s | native acc | lm-eval acc "
        "| responses identical |",
        "|---:" * 8 + "|",
    ]
    for batch in batch_sizes:
        native = GenerationEvaluator(
            TASK, "test", batch_size=batch, max_new_tokens=new_tokens, chat_template=True, gold_prob=False, **OPTIONS
        )
        t0 = time.perf_counter()
        responses = native.generate(model, tokenizer)
        native_s = time.perf_counter() - t0
        acc = sum(answers_match(native.extract(r), i.answer) for r, i in zip(responses, native.items)) / len(responses)
        backend.batch_size, backend._lm = batch, None
        t0 = time.perf_counter()
        out = evaluate(
            backend.lm(model, tokenizer),
            backend.task_dict,
            cache_requests=False,
            bootstrap_iters=0,
            log_samples=True,
            apply_chat_template=True,
        )
        lm_s = time.perf_counter() - t0
        samples = sorted(out["samples"]["gsm_mini"], key=lambda s: s["doc_id"])
        lm_texts = [s["resps"][0][0] for s in samples]
        lm_acc = sum(float(s["exact_match"]) for s in samples) / len(samples)
        n = len(responses)
        same = sum(a == b for a, b in zip(responses, lm_texts))
        rows.append(
            f"| {batch} | {n / native_s:.2f} | {count(responses) / native_s:.1f} | {n / lm_s:.2f} | "
            f"{count(lm_texts) / lm_s:.1f} | {acc:.3f} | {lm_acc:.3f} | {same}/{n} |"
        )
        print(rows[-1], flush=True)
    return f"lm-eval one-time setup (task manager + task load): {setup:.2f} s.\n\n" + "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["merge", "eval", "both"], default="both")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--methods", nargs="+", choices=sorted(methods.METHODS), default=sorted(methods.METHODS))
    parser.add_argument("--write", action="store_true", help="replace the sections in bench/RESULTS.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    command = "`.venv/bin/python bench/real_model.py " + shlex.join(sys.argv[1:]) + "`"
    models = build_real(trained=())  # the base and its two perturbed stand-ins
    (ROOT / "bench" / "_work").mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=ROOT / "bench" / "_work") as tmp:
        if args.part in ("merge", "both"):
            before = machine(args.threads)
            table = bench_merge(models, Path(tmp), args.methods)
            body = (
                f"Measured with {command}. Models: SmolLM2-135M-Instruct (134.5M parameters, float32, tied embeddings) "
                "and two experts = base + rank-8 deltas (zoo/real.py); recipes as tests/real/test_merge_real.py "
                "(two experts over the base, gradient weights). Machine at start: "
                f"{before}; at end: {machine(args.threads)}.\n\n{table}"
            )
            if args.write:
                write_section("Real model (SmolLM2-135M): merge throughput", body)
        if args.part in ("eval", "both"):
            before = machine(args.threads)
            table = bench_eval(models, args.batch_sizes, args.new_tokens, Path(tmp) / "tasks")
            body = (
                f"Measured with {command}. Task data/real_tasks/gsm_mini (test, 16 items), chat template, greedy, "
                f"max {args.new_tokens} new tokens, stop ['<|im_end|>', '\\n\\n'], last-number exact match; one run "
                f"each. Machine at start: {before}; at end: {machine(args.threads)}.\n\n{table}"
            )
            if args.write:
                write_section("Real model (SmolLM2-135M): evaluator throughput", body)


if __name__ == "__main__":
    main()
