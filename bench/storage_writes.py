"""What a trial's record costs on SQLite: ask + 13 user attrs + tell, with the attrs written one by one (one commit
each) and in one transaction (`evolve.study.set_user_attrs`, what the loop does). The storage's cost only.

    python bench/storage_writes.py [--trials 30]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import optuna  # noqa: E402

from evolve.study import set_user_attrs  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=30)
    args = p.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        study = optuna.create_study(storage=f"sqlite:///{tmp}/s.db")
        attrs = {f"k{i}": i * 0.5 for i in range(13)}
        for batched in (False, True, False, True):
            t0 = time.perf_counter()
            for _ in range(args.trials):
                trial = study.ask()
                if batched:
                    set_user_attrs(trial, attrs)
                else:
                    for k, v in attrs.items():
                        trial.set_user_attr(k, v)
                study.tell(trial, 0.0)
            ms = (time.perf_counter() - t0) / args.trials * 1e3
            how = "one transaction" if batched else "one by one"
            print(f"{how:>15}: {ms:.1f} ms per trial (ask + 13 attrs + tell)")


if __name__ == "__main__":
    main()
