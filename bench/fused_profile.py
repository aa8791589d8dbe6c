"""Where a fused re-merge's time goes: the threshold search of the magnitude masks against the compiled kernels.

    .venv/bin/python bench/fused_profile.py [--method ties] [--threads 1]

On bench/merge_speed.py's checkpoints (built there on first use), a Materializer of `--method` (fused) applies two
candidates (filling the cache and compiling), then the four candidates of merge_speed.py are timed with
`merge_core.fused.magnitude_threshold`, the rescale norms and the main compiled kernel wrapped in timers.
Prints the wall time per apply and, per apply, the thread-seconds of each part (the Materializer merges two tensors
at once on a CPU of two or more cores, so the parts can add up to more than the wall time).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from merge_speed import CANDIDATES, ensure_checkpoints, recipe_dict  # noqa: E402  (bench/ is on sys.path)

from merge_core import fused  # noqa: E402
from merge_core.materialize import Materializer  # noqa: E402
from merge_core.recipe import MergeRecipe  # noqa: E402


def timed(fn: Callable, totals: dict[str, float], key: str) -> Callable:
    def call(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            totals[key] = totals.get(key, 0.0) + time.perf_counter() - t0

    return call


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="ties", choices=["task_arithmetic", "ties", "dare_ties"])
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    models = ensure_checkpoints(REPO / "bench" / "_work" / "merge_speed")

    def candidate(c: tuple[float, float, float, float]) -> MergeRecipe:
        return MergeRecipe.from_dict(recipe_dict(args.method, models, c[:2], c[2:]))

    mat = Materializer(candidate(CANDIDATES[0]), device="cpu", fuse=True)
    model = mat.new_model()
    for c in CANDIDATES[:2]:
        mat.apply(candidate(c), model)
    assert mat.fused is not None
    totals: dict[str, float] = {}
    fused.magnitude_threshold = timed(fused.magnitude_threshold, totals, "threshold search")
    fused._rescale_factors = timed(fused._rescale_factors, totals, "rescale norms (kernel + sum)")
    for variant, (main_kernel, norms) in list(mat.fused._kernels.items()):
        mat.fused._kernels[variant] = (timed(main_kernel, totals, "main kernel"), norms)
    t0 = time.perf_counter()
    for c in CANDIDATES:
        mat.apply(candidate(c), model)
    per_apply = (time.perf_counter() - t0) / len(CANDIDATES)
    parts = ", ".join(f"{k} {v / len(CANDIDATES):.2f}" for k, v in totals.items())
    print(f"{args.method}: {per_apply:.2f} s per apply ({fused.describe(mat.fused)}); per apply, thread-s: {parts}")


if __name__ == "__main__":
    main()
