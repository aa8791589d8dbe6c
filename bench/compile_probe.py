"""Probe (not used by evomerge): would torch.compile (inductor, CPU) fuse the TIES consensus into one bit-identical
pass? The re-merge's remaining gap to the bandwidth bound is eager PyTorch's pass count (bench/RESULTS.md,
In-memory re-merge); this measures what one fused kernel for the step after the masks would give.

    .venv/bin/python bench/compile_probe.py [--threads 1] [--repeats 5]

On one task-vector pair of bench/merge_speed.py's checkpoints (ft_a - base, ft_b - base; an MLP up_proj and the
embedding), the masked weighted task vectors come from merge_core.sparsify (magnitude keys); then the TIES step
(sign election, agreement, masked sum, divisor with zero -> 1, division, + bf16 base, cast to bf16) runs
(a) in methods.generalized_task_arithmetic as evomerge runs it (masks included, through a Workspace, then the
bf16 cast), and (b) as one torch.compile'd function of the weighted vectors, weights passed as 0-dim tensors.
Reports the compile time, whether (b)'s bf16 output equals (a)'s bit for bit for several weight and density sets
(and whether new weights recompiled), and the best time of each.
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

from mask_cost import task_vector  # noqa: E402  (bench/ is on sys.path: scripts run from it)
from merge_speed import ensure_checkpoints  # noqa: E402
from safetensors import safe_open  # noqa: E402

from merge_core import methods, sparsify  # noqa: E402

TENSORS = {"MLP up_proj": "model.layers.0.mlp.up_proj.weight", "embedding": "model.embed_tokens.weight"}
CASES = [((0.6, 0.4), (0.5, 0.5)), ((0.3, 0.7), (0.4, 0.6)), ((1.0, -1.0), (0.7, 0.3))]


def ties_tail(wd0, wd1, w0, w1, base):
    """The TIES step after the masks, as methods._consensus_sum and generalized_task_arithmetic compute it."""
    total = wd0 + wd1
    sign = torch.copysign(torch.ones((), dtype=torch.float32), total)
    a0 = (wd0 * sign > 0).to(torch.float32)
    a1 = (wd1 * sign > 0).to(torch.float32)
    mixed = (0.0 + wd0 * a0) + wd1 * a1
    divisor = a0 * w0 + a1 * w1
    divisor = divisor + (divisor == 0).to(torch.float32)
    return (mixed / divisor + base.to(torch.float32)).to(torch.bfloat16)


def best_ms(fn: Callable[[], object], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    models = ensure_checkpoints(REPO / "bench" / "_work" / "merge_speed")
    print(f"torch {torch.__version__}, {args.threads} thread(s), load average {os.getloadavg()[0]:.2f}")
    compiled = torch.compile(ties_tail, dynamic=True)
    for what, name in TENSORS.items():
        with safe_open(str(models["base"] / "model.safetensors"), framework="pt") as f:
            base = f.get_tensor(name)
        deltas = [task_vector({"base": models["base"], "ft_a": models[m]}, name) for m in ("ft_a", "ft_b")]
        for weights, densities in CASES:
            probe(f"{what} {tuple(base.shape)}", base, deltas, weights, densities, compiled, args.repeats)


def probe(label, base, deltas, weights, densities, compiled, repeats: int) -> None:
    """One weight/density set on one tensor: eager GTA vs the compiled step after the masks (printed)."""
    pre = [sparsify.Precomputed(keys=sparsify.magnitude_keys(d)) for d in deltas]
    workspace = methods.Workspace()

    def eager():
        merged = methods.generalized_task_arithmetic(
            base, deltas, list(weights), list(densities), sparsification="magnitude", consensus="sum",
            normalize=True, rescale=False, precomputed=pre, workspace=workspace,
        )  # fmt: skip
        return merged.to(torch.bfloat16)

    expected = eager().clone()
    wd = [
        methods._weighted_sparse(
            d,
            w,
            p,
            "magnitude",
            rescale=False,
            gamma=0.01,
            epsilon=0.15,
            generator=None,
            precomputed=c,
            out=torch.empty(d.shape),
            scratch=torch.empty(d.shape),
        )  # fmt: skip
        for d, w, p, c in zip(deltas, weights, densities, pre)
    ]
    w0, w1 = (torch.tensor(w, dtype=torch.float32) for w in weights)
    t0 = time.perf_counter()
    out = compiled(wd[0], wd[1], w0, w1, base)
    first = time.perf_counter() - t0
    same = torch.equal(out.view(torch.int16), expected.view(torch.int16))
    fused = best_ms(lambda: compiled(wd[0], wd[1], w0, w1, base), repeats)
    print(
        f"{label} weights {weights} densities {densities}: first call {first:.2f} s, bit-identical {same}; "
        f"eager GTA (masks included) {best_ms(eager, repeats):.1f} ms, compiled step after the masks {fused:.1f} ms",
        flush=True,
    )


if __name__ == "__main__":
    main()
