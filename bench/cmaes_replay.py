"""The cost of asking Optuna's CMA-ES (evomerge's `cmaes`, rebuilt by replay, never unpickled) late in a long search:
seconds per ask around trial N with the replay cache (one tell per generation per process) and without it (every
generation re-told on every ask, as before). A synthetic objective; the sampler's cost only.

    python bench/cmaes_replay.py --dim 200 --popsize 16 --trials 400
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import optuna  # noqa: E402

from evolve import samplers  # noqa: E402


def run(dim: int, popsize: int, trials: int, cached: bool) -> tuple[float, float]:
    """(mean seconds per ask over the first popsize asks, over the last popsize asks)."""
    names = [f"x{i}" for i in range(dim)]
    sampler = samplers.ReseededCmaEsSampler(x0=dict.fromkeys(names, 0.5), sigma0=0.2, seed=0, popsize=popsize)
    if not cached:
        type(sampler)._replayed = property(lambda self: {})  # a replay from scratch on every ask
    study = optuna.create_study(direction="maximize", sampler=sampler)
    dists = {n: optuna.distributions.FloatDistribution(0.0, 1.0) for n in names}
    times = []
    for _ in range(trials):
        t0 = time.perf_counter()
        trial = study.ask(dists)
        times.append(time.perf_counter() - t0)
        study.tell(trial, -sum((trial.params[n] - 0.3) ** 2 for n in names))
    return sum(times[:popsize]) / popsize, sum(times[-popsize:]) / popsize


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dim", type=int, default=200)
    p.add_argument("--popsize", type=int, default=16)
    p.add_argument("--trials", type=int, default=400)
    args = p.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    first, last = run(args.dim, args.popsize, args.trials, cached=True)
    print(f"replay cache on:  {first * 1e3:.1f} ms per ask at the start, {last * 1e3:.1f} ms at trial {args.trials}")
    first, last = run(args.dim, args.popsize, args.trials, cached=False)
    print(f"replay cache off: {first * 1e3:.1f} ms per ask at the start, {last * 1e3:.1f} ms at trial {args.trials}")


if __name__ == "__main__":
    main()
