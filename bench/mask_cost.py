"""Benchmark: what one TIES magnitude mask costs per candidate, from the cache a Materializer keeps per task vector.

    .venv/bin/python bench/mask_cost.py [--threads 1] [--repeats 5] [--write]

On task vectors of bench/merge_speed.py's checkpoints (ft_a - base, both bf16, upcast: the embedding, 32000x1024,
and an MLP matrix, 2816x1024), k = int(density n), three ways to the float32 0/1 mask that the merge multiplies by:

- int32 rank (the cache before magnitude keys): rank < k, one pass over 4 bytes per element; the cache is a
  stable descending sort of |delta| (its one-time cost), 4 bytes per element;
- magnitude keys, bool then float32 (the previous commit's per-candidate path): key > b, key == b and its indices,
  a selection among those, then the bool mask converted for the product;
- magnitude keys into float32 (now): the same, written straight into the float32 buffer the product reads.

The keys' one-time cost is sparsify.magnitude_keys (one pass and an int16 histogram), 2 bytes per element. Every
mask is checked equal to the rank mask. Best of --repeats, one process, so the ratios are measured under one load.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from merge_speed import ensure_checkpoints  # noqa: E402
from results import write_section  # noqa: E402  (bench/ is on sys.path: scripts run from it)
from safetensors import safe_open  # noqa: E402

from merge_core import sparsify  # noqa: E402

SECTION = "TIES mask cost per candidate (magnitude keys vs int32 ranks)"
TENSORS = {"embedding": "model.embed_tokens.weight", "MLP up_proj": "model.layers.0.mlp.up_proj.weight"}


def best_ms(fn: Callable[[], object], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def task_vector(models: dict[str, Path], name: str) -> torch.Tensor:
    """ft_a - base for one tensor, float32 (as the Materializer keeps it)."""
    tensors = {}
    for model in ("base", "ft_a"):
        with safe_open(str(models[model] / "model.safetensors"), framework="pt") as f:
            tensors[model] = f.get_tensor(name).float()
    return tensors["ft_a"] - tensors["base"]


def measure(what: str, delta: torch.Tensor, density: float, repeats: int) -> tuple:
    """(label, n, rank build s, keys build ms, rank mask ms, keys bool+float ms, keys float ms, boundary size)."""
    n = delta.numel()
    k = max(1, int(density * n))
    t0 = time.perf_counter()
    order = torch.sort(delta.abs().reshape(-1), descending=True, stable=True).indices
    rank = torch.empty(n, dtype=torch.int32)
    rank[order] = torch.arange(n, dtype=torch.int32)
    rank_build = time.perf_counter() - t0
    del order
    keys_build = best_ms(lambda: sparsify.magnitude_keys(delta), repeats)
    keys = sparsify.magnitude_keys(delta)
    out = torch.empty(delta.shape, dtype=torch.float32)
    expected = (rank < k).reshape(delta.shape)
    assert torch.equal(sparsify.magnitude_mask(delta, density, keys), expected)
    assert torch.equal(sparsify.magnitude_mask(delta, density, keys, out=out), expected.float())
    ranked = best_ms(lambda: torch.lt(rank, k, out=out.view(-1)), repeats)
    keyed_bool = best_ms(lambda: sparsify.magnitude_mask(delta, density, keys).float(), repeats)
    keyed_f32 = best_ms(lambda: sparsify.magnitude_mask(delta, density, keys, out=out), repeats)
    threshold_key = keys.keys.reshape(-1)[expected.reshape(-1)].min()
    boundary = int(torch.count_nonzero(keys.keys == threshold_key))
    label = f"{what} {'x'.join(map(str, delta.shape))}"
    return label, n, rank_build, keys_build, ranked, keyed_bool, keyed_f32, boundary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--density", type=float, default=0.5)
    parser.add_argument("--write", action="store_true", help="write the section of bench/RESULTS.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    models = ensure_checkpoints(REPO / "bench" / "_work" / "merge_speed")
    rows = []
    for what, name in TENSORS.items():
        rows.append(measure(what, task_vector(models, name), args.density, args.repeats))
        print(rows[-1], flush=True)
    lines = [
        f"Command (from the repository root): `.venv/bin/python bench/mask_cost.py --threads {args.threads} "
        f"--repeats {args.repeats}{' --write' if args.write else ''}`",
        "",
        f"- torch {torch.__version__}, {args.threads} thread(s), {os.cpu_count()} logical cores; load average at "
        f"start {' '.join(f'{x:.2f}' for x in load_start)}, at end {' '.join(f'{x:.2f}' for x in os.getloadavg())} "
        "(the CPU is shared: compare ratios within a row, not seconds across runs)",
        f"- density {args.density}; task vectors of bench/merge_speed.py's checkpoints (ft_a - base); best of "
        f"{args.repeats}",
        "",
        "| tensor | elements | rank cache build (stable sort, s) | keys cache build (ms) | mask from rank (ms) "
        "| keys, bool then float32 (ms) | keys into float32 (ms) | keys now / rank "
        "| elements sharing the threshold key |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label, n, rank_build, keys_build, ranked, keyed_bool, keyed_f32, boundary in rows:
        lines.append(
            f"| {label} | {n:,} | {rank_build:.2f} | {keys_build:.1f} | {ranked:.1f} | {keyed_bool:.1f} | "
            f"{keyed_f32:.1f} | {keyed_f32 / ranked:.2f}× | {boundary:,} ({boundary / n:.2%}) |"
        )
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    if args.write:
        write_section(SECTION, text)


if __name__ == "__main__":
    main()
