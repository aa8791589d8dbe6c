"""`python -m zoo build --out DIR --seed N [--size full|ci] [--overwrite] [--threads N]`, from the repository root;
`python -m zoo real [--out DIR] [--overwrite]` converts SmolLM2-135M-Instruct for the real-model tests (zoo/real.py)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from merge_core.errors import EvomergeError
from zoo.build import SIZES, build_zoo
from zoo.real import DEFAULT_ROOT, build_real

EXIT_USER_ERROR = 2


def main(argv: Sequence[str] | None = None) -> int:
    """Build the zoo; a user error prints one line and exits 2, as `evolve` does."""
    parser = argparse.ArgumentParser(prog="python -m zoo", description="Build the tiny model zoo (models and tasks).")
    parser.add_argument("action", choices=["build", "real"])
    parser.add_argument("--out", help="output folder (default: data/zoo; data/real for real)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", choices=sorted(SIZES), default="full")
    parser.add_argument("--overwrite", action="store_true", help="replace a zoo already in --out")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (the hashes depend on it)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
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
    print(f"real models in {models.root}: {models.base.name}, {models.expert_a.name}, {models.expert_b.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
