"""The `evolve` command: one entry point, one subcommand per verb; user errors print one line and exit non-zero."""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable, Sequence

from merge_core.errors import EvomergeError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a Ctrl-C

Command = Callable[[argparse.Namespace], int]
COMMANDS: dict[str, tuple[Command, Callable[[argparse.ArgumentParser], None], str]] = {}


def command(name: str, help: str):
    """Register `evolve NAME`: the decorated function takes the parsed args; `args_fn` adds its arguments."""

    def wrap(args_fn: Callable[[argparse.ArgumentParser], None]):
        def deco(fn: Command) -> Command:
            COMMANDS[name] = (fn, args_fn, help)
            return fn

        return deco

    return wrap


# ---- evolve merge -----------------------------------------------------------------------------


def _merge_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="recipe YAML (evomerge's or a mergekit config)")
    p.add_argument("--out", required=True, help="output directory for the HF checkpoint (new or empty; see --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out (only once the new checkpoint is complete)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda when present)")
    p.add_argument("--shard-size", default="5GB", help="maximum shard size, e.g. 2GB or 500MB")
    p.add_argument("--allow-pickle", action="store_true", help="allow reading pickled .bin checkpoints (runs code from the file)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow models whose config needs remote code")


@command("merge", "apply one recipe (ours or mergekit's) and write an HF checkpoint")(_merge_args)
def cmd_merge(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from merge_core.merge import run_merge
    from merge_core.recipe import MergeRecipe

    recipe = MergeRecipe.load(args.recipe)
    out = run_merge(
        recipe,
        args.out,
        device=args.device,
        allow_pickle=args.allow_pickle,
        trust_remote_code=args.trust_remote_code,
        max_shard_bytes=parse_size(args.shard_size, "--shard-size"),
        progress=lambda names: tqdm(list(names), desc=f"merging ({recipe.merge_method})", unit="tensor"),
        overwrite=args.overwrite,
    )
    print(f"wrote {out}")
    return 0


def parse_size(text: str, what: str) -> int:
    """'5GB', '500MB', '1.5GiB' -> bytes; a positive size of at least one byte, or a one-line error."""
    import math

    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "B": 1}
    t = text.strip().upper()
    for unit in sorted(units, key=len, reverse=True):
        if t.endswith(unit):
            try:
                number = float(t[: -len(unit)])
            except ValueError:
                break
            if not math.isfinite(number) or number * units[unit] < 1:
                raise EvomergeError(f"{what}: '{text}' must be a positive size such as 5GB or 500MB")
            return int(number * units[unit])
    raise EvomergeError(f"{what}: '{text}' is not a size such as 5GB or 500MB")


# ---- entry point ------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="evolve", description="Evolutionary optimization of model-merge recipes.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (fn, args_fn, help) in COMMANDS.items():
        p = sub.add_parser(name, help=help, description=help)
        args_fn(p)
        p.set_defaults(func=fn)
    return parser


def _load_subcommands() -> None:
    """Import modules that register further subcommands (kept out of merge's import path)."""
    import importlib

    for module in ("evolve.commands",):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise


def main(argv: Sequence[str] | None = None) -> int:
    _load_subcommands()
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except EvomergeError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":  # `python -m evolve.cli`: run the imported module, where subcommands register
    from evolve.cli import main as _main

    sys.exit(_main())
