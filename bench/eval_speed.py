"""Benchmark: items/s of the native generation evaluator vs the lm-eval backend on one JSONL task.

Both score the same live model on the same items (first-word exact match, greedy, same stop strings)
at each batch size; each is warmed up once, then timed `--repeats` times (median reported). lm-eval's
one-time setup (TaskManager + task load) is reported apart, since a worker pays it once.

    python bench/eval_speed.py [--task-dir data/zoo/tasks/ja_sub] [--model data/zoo/base]

Without a task directory (and no zoo), a tiny task and a random tiny Llama are generated in a temp dir.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from evals.data import load_generation_items, write_jsonl  # noqa: E402
from evals.lm_eval_backend import LmEvalEvaluator, jsonl_task_config, write_task_yaml  # noqa: E402
from evals.native import GenerationEvaluator  # noqa: E402
from zoo.synthetic import tiny_model, word_tokenizer  # noqa: E402

log = logging.getLogger("bench.eval_speed")
ROOT = Path(__file__).resolve().parents[1]
ZOO_TASK = ROOT / "data/zoo/tasks/ja_sub"
ZOO_MODEL = ROOT / "data/zoo/base"


def generated_task(out: Path, n: int = 128, seed: int = 0) -> Path:
    """A tiny word task: random prompts ending in "kotae", one-word J-numeral answers."""
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(40)]
    rows = []
    for i in range(n):
        prompt = " ".join(rng.choice(words) for _ in range(rng.randint(4, 24))) + " kotae"
        rows.append({"id": str(i), "prompt": prompt, "answer": f"j{rng.randint(0, 18)}"})
    return write_jsonl(out / "tiny_task" / "test.jsonl", rows).parent


def random_model(task_dir: Path, split: str) -> tuple[Any, Any]:
    """A random 2-layer Llama over the words of the task (word-level tokenizer)."""
    items = load_generation_items(task_dir, split)
    vocab = sorted({w for item in items for w in (item.prompt + " " + item.answer).split()})
    tokenizer = word_tokenizer(vocab)
    model = tiny_model(
        tokenizer,
        seed=0,
        hidden_size=128,
        intermediate_size=512,
        num_layers=4,
        num_heads=4,
        num_kv_heads=4,
        max_position_embeddings=256,
    )
    return model, tokenizer


def median_seconds(run: Callable[[], dict[str, float]], repeats: int) -> tuple[float, dict[str, float]]:
    """Warm up once, then the median wall time of `repeats` runs (and the last metrics)."""
    metrics = run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        metrics = run()
        times.append(time.perf_counter() - start)
    return statistics.median(times), metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task-dir", type=Path, default=ZOO_TASK if ZOO_TASK.is_dir() else None)
    parser.add_argument("--model", type=Path, default=ZOO_MODEL if ZOO_MODEL.is_dir() else None)
    parser.add_argument("--split", default="test")
    parser.add_argument("--limit", type=int, default=128, help="items per evaluation (a fixed subsample)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--max-new-tokens", type=int, default=4)
    parser.add_argument("--stop", nargs="*", default=None, help="stop strings (default: </s>, the zoo's terminator)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--write", action="store_true", help="write the table to bench/RESULTS.md")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)

    workdir = Path(tempfile.mkdtemp(prefix="eval_speed_"))
    task_dir = args.task_dir or generated_task(workdir)
    split = args.split if args.task_dir else "test"
    if args.model:
        model = AutoModelForCausalLM.from_pretrained(args.model).eval()
        tokenizer = AutoTokenizer.from_pretrained(args.model)
    else:
        model, tokenizer = random_model(task_dir, split)
    stop = ["</s>"] if args.stop is None else args.stop
    yaml_dir = workdir / "yaml"
    config = jsonl_task_config("bench_task", task_dir, split=split, stop=stop, max_new_tokens=args.max_new_tokens)
    write_task_yaml(yaml_dir / "bench_task.yaml", config)

    start = time.perf_counter()
    LmEvalEvaluator(["bench_task"], include_path=yaml_dir)
    setup = time.perf_counter() - start
    rows = []
    for batch_size in args.batch_sizes:
        native = GenerationEvaluator(
            task_dir,
            split,
            limit=args.limit,
            batch_size=batch_size,
            max_new_tokens=args.max_new_tokens,
            stop=stop,
            extract="first_word",
            gold_prob=False,
        )
        backend = LmEvalEvaluator(
            ["bench_task"],
            include_path=yaml_dir,
            limit=args.limit,
            batch_size=batch_size,
            metrics={"bench_task": "exact_match,first_word"},
        )
        n = len(native.items)
        native_s, native_metrics = median_seconds(partial(native.evaluate, model, tokenizer), args.repeats)
        lm_s, lm_metrics = median_seconds(partial(backend.evaluate, model, tokenizer), args.repeats)
        rows.append(
            (batch_size, n / native_s, n / lm_s, lm_s / native_s, native_metrics["acc"], lm_metrics["bench_task"])
        )

    params = sum(p.numel() for p in model.parameters())
    lines = [
        f"Measured with `{shlex.join(['.venv/bin/python', 'bench/eval_speed.py', *sys.argv[1:]])}` "
        f"({os.cpu_count()} CPUs, torch {torch.__version__}): task `{_shown(task_dir)}` ({split}, {n} items), "
        f"model `{_shown(args.model) if args.model else 'random tiny Llama'}` ({params / 1e6:.2f}M params), "
        f"{args.threads} thread(s), max_new_tokens {args.max_new_tokens}, stop {stop}; "
        f"median of {args.repeats} after a warm-up; "
        f"lm-eval one-time setup (task manager + task load, paid once per worker) {setup:.2f} s.",
        "",
        "| batch size | native items/s | lm-eval items/s | native speedup | native acc | lm-eval acc |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for batch_size, native_rate, lm_rate, speedup, native_acc, lm_acc in rows:
        lines.append(
            f"| {batch_size} | {native_rate:.1f} | {lm_rate:.1f} | {speedup:.2f}x | {native_acc:.3f} | {lm_acc:.3f} |"
        )
    print("\n".join(lines))
    if args.write:
        from results import write_section  # bench/ is on sys.path: scripts run from it

        write_section("Evaluator speed (native vs lm-eval backend)", "\n".join(lines))


def _shown(path: Path) -> str:
    """A path as the RESULTS.md line shows it: relative to the repository root when under it."""
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


if __name__ == "__main__":
    main()
