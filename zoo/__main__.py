"""`python -m zoo build --out DIR --seed N [--size full|ci] [--overwrite] [--threads N]`, from the repository root;
`python -m zoo real [--out DIR] [--overwrite]` converts SmolLM2-135M-Instruct for the real-model tests and builds
its experts (zoo/real.py); `python -m zoo train-experts [--experts NAME ...] [--steps N] [--overwrite]` trains the
experts' LoRA adapters on this CPU (zoo/real_experts.py; the committed adapters make this unnecessary)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from merge_core.errors import EvomergeError
from zoo.build import SIZES, build_zoo
from zoo.real import DEFAULT_ROOT, TRAINED, base_checkpoint, build_real

EXIT_USER_ERROR = 2


def main(argv: Sequence[str] | None = None) -> int:
    """Build the zoo; a user error prints one line and exits 2, as `evolve` does."""
    parser = argparse.ArgumentParser(prog="python -m zoo", description="Build the tiny model zoo (models and tasks).")
    parser.add_argument("action", choices=["build", "real", "train-experts"])
    parser.add_argument("--out", help="output folder (default: data/zoo; data/real for real)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", choices=sorted(SIZES), default="full")
    parser.add_argument("--overwrite", action="store_true", help="replace a zoo already in --out")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (the hashes depend on it)")
    parser.add_argument("--experts", nargs="+", help="train-experts: which (default: all)")
    parser.add_argument("--steps", type=int, help="train-experts: optimizer steps per expert (default: each spec's)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.action == "train-experts":
        return _train(args)
    if args.action == "real":
        return _real(args.out or DEFAULT_ROOT, args.overwrite)
    args.out = args.out or "data/zoo"
    command = f"python -m zoo build --out {args.out} --seed {args.seed} --size {args.size}"
    if args.threads != 1:
        command += f" --threads {args.threads}"
    try:
        out = build_zoo(args.out, args.seed, args.size, overwrite=args.overwrite, threads=args.threads, command=command)
    except EvomergeError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    print(f"wrote {out}")
    return 0


def _real(out: str | Path, overwrite: bool) -> int:
    try:
        models = build_real(out, overwrite=overwrite)
    except EvomergeError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    names = (models.base, models.expert_a, models.expert_b, *(getattr(models, name) for name in TRAINED))
    print(f"real models in {models.root}: {', '.join(p.name for p in names)}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from zoo.real_experts import ADAPTERS, EXPERT_SPECS, check_targets, train_experts

    out = Path(args.out) if args.out else ADAPTERS
    names = args.experts or list(EXPERT_SPECS)
    try:
        check_targets(out, names, overwrite=args.overwrite)
        with base_checkpoint(DEFAULT_ROOT) as base:
            records = train_experts(base, out, names=names, steps=args.steps, overwrite=args.overwrite)
    except EvomergeError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    for name, r in records.items():
        print(f"{name}: {r['steps']} steps, {r['seconds']} s, loss {r['loss_first']} -> {r['loss_last10']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
