"""GPU check (issue 15): the in-memory merge and the native evaluator on three random 7B-shaped Mistrals.

    .venv/bin/python bench/gpu_check.py                 # on a GPU machine: ~10 minutes, no downloads
    .venv/bin/python bench/gpu_check.py --reduced       # tiny shapes on any device (the CI test runs this)

1. Builds three random Mistral checkpoints (a base and two "fine-tunes" = base + 0.002·N(0,1), bf16, 5 GB
   safetensors shards) under --work, generating each tensor on the device from a per-name seed.
2. Per method (ties, dare_ties): the memory plan (merge_core.memplan, one log line), the Materializer's build, its
   first apply (fills the cache the plan allows) and `--candidates` more applies, each synchronized; the peak
   device memory (CUDA: max_memory_allocated; CPU: anonymous RSS sampled every 2 ms) against the plan's prediction.
3. The native GenerationEvaluator on the live model: `--batch` prompts of `--prompt-tokens` words, greedy,
   `--new-tokens` new tokens each; generated tokens/s (an upper bound if a random model emits EOS early).
4. Writes the "GPU check" section of bench/RESULTS.md (the reduced mode writes nothing unless --write).
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import logging
import os
import shlex
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import AutoModelForCausalLM, MistralConfig  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from evals.data import GenerationItem  # noqa: E402
from evals.native import GenerationEvaluator  # noqa: E402
from merge_core import fused  # noqa: E402
from merge_core.materialize import Materializer  # noqa: E402
from merge_core.recipe import MergeRecipe  # noqa: E402
from zoo.synthetic import MISTRAL_7B, SPECIAL_TOKENS, word_tokenizer  # noqa: E402

SECTION = "GPU check (issue 15): 7B-shaped merge and evaluator"
SHAPES = {
    "full": MISTRAL_7B,
    "reduced": dict(
        hidden_size=64,
        num_hidden_layers=2,
        intermediate_size=224,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
    ),
}
CANDIDATES = [(0.6, 0.4, 0.5, 0.5), (0.3, 0.7, 0.4, 0.6), (0.5, 0.5, 0.7, 0.3), (0.8, 0.2, 0.5, 0.5)]
APPLY_TARGET_S = 2.0  # per candidate on an H100-class GPU (issue 15)
SHARD_BYTES = 5 * 10**9
GIB, MIB = 2**30, 2**20

log = logging.getLogger("bench.gpu_check")


# ---- checkpoints ------------------------------------------------------------------------------


def mistral_config(shape: dict[str, int]) -> MistralConfig:
    pad, unk, bos, eos = range(len(SPECIAL_TOKENS))
    return MistralConfig(
        **shape,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        pad_token_id=pad,
        bos_token_id=bos,
        eos_token_id=eos,
        dtype="bfloat16",
        architectures=["MistralForCausalLM"],
    )


def tensor_shapes(config: MistralConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter's shape, from a meta-device model (nothing allocated)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def _generator(seed: int, name: str, device: torch.device) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}\x00{name}".encode()).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def random_tensor(name: str, shape: tuple[int, ...], noise_seed: int | None, device: torch.device) -> torch.Tensor:
    """The base's tensor (0.02·N(0,1)), plus 0.002·N(0,1) from `noise_seed` for a fine-tune; bf16, on `device`."""
    t = torch.randn(shape, generator=_generator(0, name, device), device=device).mul_(0.02)
    if noise_seed is not None:
        t.add_(torch.randn(shape, generator=_generator(noise_seed, name, device), device=device), alpha=0.002)
    return t.to(torch.bfloat16)


def write_checkpoint(
    out: Path, config: MistralConfig, shapes: dict[str, tuple[int, ...]], noise_seed: int | None, device
) -> None:
    """config.json, a word tokenizer over the whole vocabulary and bf16 safetensors shards with an index."""
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    words = [f"w{i}" for i in range(config.vocab_size - len(SPECIAL_TOKENS))]
    word_tokenizer(words).save_pretrained(out)
    groups: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = 2 * torch.Size(shape).numel()
        if groups[-1] and size + nbytes > SHARD_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    weight_map = {}
    for i, names in enumerate(groups):
        file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {n: random_tensor(n, shapes[n], noise_seed, device).cpu() for n in names}
        save_file(tensors, str(out / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in names})
        del tensors
    total = sum(2 * torch.Size(s).numel() for s in shapes.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    (out / "built.json").write_text(json.dumps(config.to_dict(), sort_keys=True, default=str))


def ensure_checkpoints(work: Path, config: MistralConfig, device: torch.device) -> tuple[dict[str, Path], float]:
    """base, ft_a, ft_b under work (reused when built with the same config); seconds spent building."""
    t0 = time.perf_counter()
    shapes = tensor_shapes(config)
    stamp = json.dumps(config.to_dict(), sort_keys=True, default=str)
    paths = {"base": work / "base", "ft_a": work / "ft_a", "ft_b": work / "ft_b"}
    for path, seed in zip(paths.values(), (None, 1, 2)):
        built = path / "built.json"
        if not (built.is_file() and built.read_text() == stamp):
            write_checkpoint(path, config, shapes, seed, device)
    return paths, time.perf_counter() - t0


def recipe(method: str, models: dict[str, Path], wa=0.6, wb=0.4, da=0.5, db=0.5) -> MergeRecipe:
    return MergeRecipe.from_dict(
        {
            "merge_method": method,
            "base_model": str(models["base"]),
            "models": [
                {"model": str(models["ft_a"]), "parameters": {"weight": wa, "density": da}},
                {"model": str(models["ft_b"]), "parameters": {"weight": wb, "density": db}},
            ],
            "dtype": "bfloat16",
            "seed": 0,
        }
    )


# ---- memory ------------------------------------------------------------------------------------


def _rss_anon() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


class PeakMemory:
    """Peak device memory above where it stood at the start: CUDA max_memory_allocated, or the anonymous RSS
    sampled every 2 ms on CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.running = True
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            self.start = torch.cuda.memory_allocated(device)
        else:
            self.start = self.peak = _rss_anon()
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()

    def _sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, _rss_anon())
            time.sleep(0.002)

    def stop(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - self.start
        self.running = False
        self.thread.join()
        return max(self.peak, _rss_anon()) - self.start


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- measurements -------------------------------------------------------------------------------


def merge_check(method: str, models: dict[str, Path], device: torch.device, args) -> tuple[dict[str, Any], Any]:
    """Plan, build, first apply and later applies of one method; returns the figures and the live model."""
    evaluator_batch = (args.batch, args.prompt_tokens + args.new_tokens)
    peak = PeakMemory(device)
    t0 = time.perf_counter()
    mat = Materializer(recipe(method, models), device=str(device), evaluator_batch=evaluator_batch, fuse=True)
    model = mat.new_model()
    sync(device)
    build_s = time.perf_counter() - t0
    applies = []
    for wa, wb, da, db in CANDIDATES[: args.candidates + 1]:
        candidate = recipe(method, models, wa, wb, da, db)
        t0 = time.perf_counter()
        mat.apply(candidate, model)
        sync(device)
        applies.append(time.perf_counter() - t0)
    measured = peak.stop()
    plan = mat.plan
    merge_plan = plan.total - plan.part("evaluator reserve")
    figures = dict(
        method=method,
        plan_line=plan.line(),
        layout=plan.resident.replace("_", " ") + (" + cache" if plan.cache else ""),
        plan_mib=merge_plan / MIB,
        measured_mib=measured / MIB,
        build_s=build_s,
        first_apply_s=applies[0],
        apply_s=applies[1:],
        reserve_mib=plan.part("evaluator reserve") / MIB,
        kernels=fused.describe(mat.fused),
    )
    del mat
    return figures, model


def evaluator_check(model, tokenizer_dir: Path, device: torch.device, args) -> dict[str, Any]:
    """Generated tokens/s of the native GenerationEvaluator (greedy, no stop strings) on the live model."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    vocab = [w for w in tokenizer.get_vocab() if w not in SPECIAL_TOKENS]
    gen = torch.Generator().manual_seed(0)
    n_items = args.batch * args.eval_batches
    items = [
        GenerationItem(
            id=str(i),
            prompt=" ".join(vocab[j] for j in torch.randint(len(vocab), (args.prompt_tokens,), generator=gen)),
            answer="w1",
        )
        for i in range(n_items)
    ]
    evaluator = GenerationEvaluator(
        items, batch_size=args.batch, max_new_tokens=args.new_tokens, gold_prob=False, extract="first_word"
    )
    warm = GenerationEvaluator(items[: args.batch], batch_size=args.batch, max_new_tokens=2, gold_prob=False)
    warm.evaluate(model, tokenizer)
    peak = PeakMemory(device)
    sync(device)
    t0 = time.perf_counter()
    evaluator.evaluate(model, tokenizer)
    sync(device)
    seconds = time.perf_counter() - t0
    return dict(
        items=n_items, seconds=seconds, tokens_per_s=n_items * args.new_tokens / seconds, peak_mib=peak.stop() / MIB
    )


def device_facts(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        free, total = torch.cuda.mem_get_info(device)
        return (
            f"{props.name}, {total / GIB:.1f} GiB ({free / GIB:.1f} GiB free at start); torch {torch.__version__}, "
            f"CUDA {torch.version.cuda}"
        )
    return f"CPU ({os.cpu_count()} logical cores), torch {torch.__version__} ({torch.get_num_threads()} threads)"


def report(args, device, config, build_s: float, merges: list[dict], evaluation: dict, command: str) -> str:
    params = sum(torch.Size(s).numel() for s in tensor_shapes(config).values())
    lines = [f"Command (from the repository root): `{command}`", ""]
    if args.reduced:
        lines += [
            "Reduced mode (tiny shapes): shows the check runs end to end; its figures say nothing about a GPU or a 7B "
            "model. Run `.venv/bin/python bench/gpu_check.py` on a GPU machine to replace this section.",
            "",
        ]
    lines += [
        f"- device: {device_facts(device)}",
        f"- checkpoints: 3 random Mistrals ({'reduced shapes' if args.reduced else '7B shape'}: "
        + ", ".join(f"{k} {v}" for k, v in SHAPES["reduced" if args.reduced else "full"].items())
        + f"; {params:,} parameters each, bf16), built on the machine in {build_s:.0f} s",
        f"- recipe: weights 0.6/0.4, density 0.5, dtype bfloat16; {len(CANDIDATES[: args.candidates + 1])} "
        "candidates per method (varying weights and densities), each apply synchronized",
        f"- evaluator reserve in the plan: batch {args.batch} × ({args.prompt_tokens} prompt + {args.new_tokens} new) "
        "tokens",
        "",
        "| method | kernels | layout chosen | plan without evaluator (MiB) | measured peak (MiB) | measured / plan "
        "| build (s) | first apply (s, compiles) | apply min / median (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for m in merges:
        target = "" if args.reduced else f" ({'met' if min(m['apply_s']) < APPLY_TARGET_S else 'MISSED'}, < 2 s)"
        lines.append(
            f"| {m['method']} | {m['kernels']} | {m['layout']} | {m['plan_mib']:.0f} | {m['measured_mib']:.0f} | "
            f"{m['measured_mib'] / m['plan_mib']:.2f} | {m['build_s']:.1f} | {m['first_apply_s']:.2f} | "
            f"{min(m['apply_s']):.2f} / {statistics.median(m['apply_s']):.2f}{target} |"
        )
    lines += [
        "",
        f"Native GenerationEvaluator on the live {'reduced' if args.reduced else '7B'} model: {evaluation['items']} "
        f"prompts of {args.prompt_tokens} tokens, batch {args.batch}, {args.new_tokens} new tokens each (greedy): "
        f"{evaluation['seconds']:.1f} s, {evaluation['tokens_per_s']:.0f} generated tokens/s (an upper bound if "
        f"the random model ends a sequence early); peak memory beside the weights {evaluation['peak_mib']:.0f} MiB "
        f"(plan reserve {merges[-1]['reserve_mib']:.0f} MiB).",
        "",
        "Plan log lines:",
        "",
    ]
    lines += [f"- {m['method']}: `{m['plan_line']}`" for m in merges]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reduced", action="store_true", help="tiny shapes (any device); writes nothing by default")
    parser.add_argument("--work", type=Path, default=REPO / "bench" / "_work" / "gpu_check")
    parser.add_argument("--device", default="auto", help="cuda, cpu or auto (default)")
    parser.add_argument("--methods", nargs="+", default=["ties", "dare_ties"])
    parser.add_argument("--candidates", type=int, default=3, help="applies timed after the first")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--eval-batches", type=int, default=2)
    parser.add_argument("--write", action="store_true", help="write bench/RESULTS.md even in reduced mode")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from merge_core.merge import resolve_device

    device = resolve_device(args.device)
    if not args.reduced and device.type != "cuda":
        parser.error("the full 7B check needs a CUDA device; use --reduced on a CPU")
    command = shlex.join([".venv/bin/python", "bench/gpu_check.py", *(argv if argv is not None else sys.argv[1:])])
    config = mistral_config(SHAPES["reduced" if args.reduced else "full"])
    work = args.work.resolve() / ("reduced" if args.reduced else "7b")
    models, build_s = ensure_checkpoints(work, config, device)
    print(f"checkpoints ready under {work} ({build_s:.0f} s)", flush=True)
    merges, model = [], None
    for method in args.methods:
        model = None
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        figures, model = merge_check(method, models, device, args)
        merges.append(figures)
        print(json.dumps(figures), flush=True)
    evaluation = evaluator_check(model, models["base"], device, args)
    print(json.dumps(evaluation), flush=True)
    text = report(args, device, config, build_s, merges, evaluation, command)
    print("\n" + text)
    if (args.write or not args.reduced) and not args.no_write:
        from results import write_section

        write_section(SECTION, text)
        print(f"wrote the '{SECTION}' section of bench/RESULTS.md")
    return text


if __name__ == "__main__":
    main()
