"""Build the tiny zoo: a base model, a J ("Japanese") expert and a math expert, plus evaluation task splits.

    python -m zoo build --out data/zoo --seed 0

Everything is a deterministic function of the seed (model init, training data, task splits) at a fixed thread count.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import platform
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import transformers
from transformers import GenerationConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

from evals.data import write_jsonl
from evals.lm_eval_backend import write_jsonl_task_group
from merge_core.errors import EvomergeError
from zoo.synthetic import word_tokenizer
from zoo.train import TrainSchedule, new_model, train
from zoo.world import (
    TASKS,
    TERMINATOR,
    Item,
    Mixture,
    TaskSpec,
    base_mixture,
    expert_ja_mixture,
    expert_math_mixture,
    sample_item,
    vocabulary,
)

log = logging.getLogger(__name__)

Size = Literal["full", "ci"]
SPLITS = ("train", "dev", "test")
MODELS = ("base", "expert_ja", "expert_math")
OWNED = (*MODELS, "tasks", "BUILD.md", "zoo.json")  # what a rebuild replaces in out_dir (MEASURED.md is kept)


@dataclass(frozen=True)
class ZooSize:
    """Training budgets and task split sizes of one build size."""

    base: TrainSchedule
    expert_ja: TrainSchedule
    expert_math: TrainSchedule
    split_sizes: tuple[int, int, int]  # train, dev, test items per task
    qa_split_sizes: tuple[int, int, int]  # for ja_qa, whose item space is small (1216 questions)

    def splits_of(self, task: str) -> tuple[int, int, int]:
        return self.qa_split_sizes if TASKS[task].kind == "recall" else self.split_sizes


SIZES: dict[str, ZooSize] = {
    "full": ZooSize(
        TrainSchedule(2500, 2e-3), TrainSchedule(300, 1e-3), TrainSchedule(600, 1e-3), (400, 200, 500), (100, 100, 300)
    ),
    "ci": ZooSize(
        TrainSchedule(30, 2e-3, 16), TrainSchedule(8, 1e-3, 16), TrainSchedule(8, 1e-3, 16), (20, 10, 10), (10, 10, 10)
    ),
}


def make_tokenizer() -> PreTrainedTokenizerFast:
    """The zoo's word-level tokenizer: special tokens, then the world's vocabulary."""
    return word_tokenizer(vocabulary())


def data_rng(seed: int, role: str) -> random.Random:
    """An independent random stream per (seed, role), stable across Python versions and processes."""
    return random.Random(f"evomerge-zoo:{seed}:{role}")


def task_splits(seed: int, plan: ZooSize) -> tuple[dict[str, dict[str, list[dict]]], frozenset[Item]]:
    """Rows {"id", "prompt", "answer"} per task and split, all items distinct; and the set of items used (reserved)."""
    used: set[Item] = set()
    splits: dict[str, dict[str, list[dict]]] = {}
    for spec in TASKS.values():
        rng = data_rng(seed, f"tasks:{spec.name}")
        sizes = plan.splits_of(spec.name)
        splits[spec.name] = {split: _rows(spec, split, n, rng, used) for split, n in zip(SPLITS, sizes)}
    return splits, frozenset(used)


def _rows(spec: TaskSpec, split: str, n: int, rng: random.Random, used: set[Item]) -> list[dict]:
    rows = []
    while len(rows) < n:
        item = sample_item(rng, spec.kind)
        if item in used:
            continue
        used.add(item)
        prompt, answer = spec.example(item, rng)
        rows.append({"id": f"{spec.name}-{split}-{len(rows):04d}", "prompt": prompt, "answer": answer})
    return rows


def tasks_manifest(plan: ZooSize) -> dict:
    """The tasks.json manifest: how to read, prompt and score every task."""
    numerals = {"e": "digits 0..18", "j": "J numeral words j0..j18"}
    return {
        "format": "JSONL rows {id, prompt, answer}; the prompt ends where the answer starts (after the cue word).",
        "scoring": "correct iff the first whitespace-separated word of the greedy continuation equals `answer` "
        "(for the word-level tokenizer: the greedy first token decodes to `answer`).",
        "stop": [TERMINATOR],
        "tasks": [
            {
                "name": t.name,
                "description": t.description,
                "kind": t.kind,
                "language": t.lang,
                "cue": "kotae" if t.lang == "j" else "answer",
                "answer_format": f"one word: {numerals[t.lang]}",
                "stop": [TERMINATOR],
                "splits": dict(zip(SPLITS, plan.splits_of(t.name))),
                "files": {s: f"{t.name}/{s}.jsonl" for s in SPLITS},
            }
            for t in TASKS.values()
        ],
    }


def write_tasks(out_dir: Path, seed: int, plan: ZooSize) -> frozenset[Item]:
    """Write tasks/<task>/{train,dev,test}.jsonl and tasks/tasks.json; returns the reserved items."""
    splits, reserved = task_splits(seed, plan)
    for name, by_split in splits.items():
        for split, rows in by_split.items():
            write_jsonl(out_dir / "tasks" / name / f"{split}.jsonl", rows)
    manifest = json.dumps(tasks_manifest(plan), indent=2, ensure_ascii=False)
    (out_dir / "tasks" / "tasks.json").write_text(manifest + "\n", encoding="utf-8")
    write_lm_eval_tasks(out_dir)
    return reserved


def write_lm_eval_tasks(out_dir: Path, yaml_dir: Path | None = None) -> list[Path]:
    """The tasks as the lm-eval task group `zoo` in `yaml_dir` (default out_dir/tasks/lm_eval): tasks `zoo_<task>`
    (test split), scored like the native evaluator (first word of a greedy continuation, exact match; the J tasks'
    gold answers are J numerals, so the native language check is implied). Data paths are written as ``out_dir``
    is given: `--out data/zoo` run from the repository root gives YAMLs that lm-eval loads from the repository
    root (`--include_path data/zoo/tasks/lm_eval`)."""
    data_dirs = {f"zoo_{name}": out_dir / "tasks" / name for name in TASKS}
    return write_jsonl_task_group(
        "zoo",
        data_dirs,
        yaml_dir or out_dir / "tasks" / "lm_eval",
        split="test",
        stop=[TERMINATOR],
        extract="first_word",
        max_new_tokens=2,
        absolute=False,
    )


def save_model(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, path: Path) -> None:
    """A loadable HF checkpoint: safetensors weights, config, tokenizer and a greedy generation config without a
    generation length (that is an evaluation setting, the run config's `max_new_tokens`: a length here would override
    every caller that passes `max_length`, as lm-eval does)."""
    model.generation_config = GenerationConfig(
        do_sample=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(path, safe_serialization=True)
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()
    tokenizer.save_pretrained(path)


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _prepare(out_dir: Path, overwrite: bool) -> None:
    clashes = [name for name in OWNED if (out_dir / name).exists()]
    if clashes and not overwrite:
        raise EvomergeError(f"{out_dir} already holds a zoo ({', '.join(clashes)}); pass overwrite=True / --overwrite")
    for name in clashes:
        target = out_dir / name
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)


def expert_plan(plan: ZooSize, reserved: frozenset[Item]) -> dict[str, tuple[Mixture, TrainSchedule]]:
    """Each expert's training mixture and schedule."""
    return {
        "expert_ja": (expert_ja_mixture(reserved), plan.expert_ja),
        "expert_math": (expert_math_mixture(reserved), plan.expert_math),
    }


def train_experts(
    base: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, seed: int, plan: ZooSize, reserved: frozenset[Item]
) -> dict[str, tuple[LlamaForCausalLM, float]]:
    """The experts, each fine-tuned from a copy of `base`: name -> (model, final loss)."""
    experts = {}
    for name, (mixture, schedule) in expert_plan(plan, reserved).items():
        expert = copy.deepcopy(base)
        loss = train(expert, tokenizer, mixture, schedule, data_rng(seed, name))
        experts[name] = (expert, loss)
    return experts


def _train_models(out_dir: Path, seed: int, plan: ZooSize, reserved: frozenset[Item]) -> dict[str, float]:
    tokenizer = make_tokenizer()
    base = new_model(tokenizer, seed)
    losses = {"base": train(base, tokenizer, base_mixture(reserved), plan.base, data_rng(seed, "base"))}
    save_model(base, tokenizer, out_dir / "base")
    for name, (expert, loss) in train_experts(base, tokenizer, seed, plan, reserved).items():
        losses[name] = loss
        save_model(expert, tokenizer, out_dir / name)
    return losses


def build_zoo(
    out_dir: str | Path,
    seed: int = 0,
    size: Size = "full",
    *,
    overwrite: bool = False,
    threads: int = 1,
    command: str | None = None,
) -> Path:
    """Build the zoo into out_dir/{base,expert_ja,expert_math}/ and out_dir/tasks/, with BUILD.md and zoo.json.

    Deterministic in `seed` for a given `threads` (torch's CPU kernels may round differently across thread counts).
    `command` is recorded in BUILD.md (the CLI passes its command line; defaults to this call).
    """
    if size not in SIZES:
        raise EvomergeError(f"unknown zoo size {size!r}; choose one of {', '.join(SIZES)}")
    out_dir = Path(out_dir)
    plan = SIZES[size]
    _prepare(out_dir, overwrite)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    started, cpu_started = time.perf_counter(), time.process_time()
    try:
        reserved = write_tasks(out_dir, seed, plan)
        losses = _train_models(out_dir, seed, plan, reserved)
    finally:
        torch.set_num_threads(previous_threads)
    seconds = (time.perf_counter() - started, time.process_time() - cpu_started)
    command = command or f"build_zoo({str(out_dir)!r}, seed={seed}, size={size!r}, threads={threads})"
    _write_records(out_dir, seed, size, threads, command, seconds, losses)
    log.info("zoo built in %.0f s (%.0f s CPU) at %s", *seconds, out_dir)
    return out_dir


def _write_records(
    out_dir: Path,
    seed: int,
    size: str,
    threads: int,
    command: str,
    seconds: tuple[float, float],
    losses: dict[str, float],
) -> None:
    wall, cpu = seconds
    hashes = {m: file_sha256(out_dir / m / "model.safetensors") for m in MODELS}
    record = {
        "seed": seed,
        "size": size,
        "threads": threads,
        "command": command,
        "build_seconds": round(wall, 1),
        "build_cpu_seconds": round(cpu, 1),
        "final_loss": {m: round(v, 4) for m, v in losses.items()},
        "model_sha256": hashes,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }
    (out_dir / "zoo.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    plan = SIZES[size]
    lines = [
        "# Tiny zoo build",
        "",
        f"Built with `{command}` (seed {seed}, size `{size}`, {threads} torch thread(s)) in {wall:.0f} s "
        f"({cpu:.0f} s of CPU time; the wall time grows when other work shares the cores) on {platform.machine()} "
        f"with torch {torch.__version__}, transformers {transformers.__version__}.",
        "",
        "| model | training | final loss | model.safetensors sha256 |",
        "|---|---|---|---|",
    ]
    for name, schedule in zip(MODELS, (plan.base, plan.expert_ja, plan.expert_math)):
        start = "from scratch" if name == "base" else "from base"
        lines.append(
            f"| {name} | {start}, {schedule.steps} steps, lr {schedule.lr:g}, batch {schedule.batch_size} "
            f"| {losses[name]:.4f} | `{hashes[name][:16]}…` |"
        )
    sizes = ", ".join(f"{t} {'/'.join(map(str, plan.splits_of(t)))}" for t in TASKS)
    lines += [
        "",
        f"Tasks (train/dev/test items): {sizes}; see tasks/tasks.json.",
        "",
        "The same command (same seed, size and thread count) rebuilds these files bit for bit with the same torch "
        "version on CPU; zoo.json lists the full hashes.",
        "",
    ]
    (out_dir / "BUILD.md").write_text("\n".join(lines), encoding="utf-8")
