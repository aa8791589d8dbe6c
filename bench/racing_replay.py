"""Replay racing rules on a finished full-scoring run: how many items each rule would have spent, and how often it
would have stopped a candidate that beats the incumbent on the full item set.

Every trial of the run (in trial order) is raced, with the rule's chunks, against the incumbent of that moment (the
best trial before it), using the per-item records the run stored; nothing is re-evaluated. This measures the rule on
real candidates; it does not model how the sampler would have moved had it seen the stopped trials differently
(bench/economy.py runs real searches for that).

    python bench/racing_replay.py runs/RUN [--chunk 40 --min-items 40 --alpha 0.05]

RUN must have scored every candidate on every item: the demo config races, so replay a copy of it without
`evaluation.racing` (a raced run is refused: its stopped trials have no full record to replay).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from optuna.trial import TrialState  # noqa: E402

from evolve.cli import resolve_run  # noqa: E402
from evolve.items import decode_items, item_fitness  # noqa: E402
from evolve.racing import Race, paired_differences, schedule, stop_looks, stop_reason  # noqa: E402
from evolve.study import load_study  # noqa: E402


def replay(run: str, chunk: int, min_items: int, alpha: float, test: str) -> dict:
    cfg = resolve_run(run)
    study = load_study(cfg)
    raced = len(study.get_trials(deepcopy=False, states=(TrialState.PRUNED,)))
    if raced:
        raise SystemExit(
            f"error: {run}: {raced} trials were stopped by racing, so they have no full per-item record to replay; "
            "replay a run without evaluation.racing"
        )
    trials = [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if "items" in t.user_attrs and "cached_from" not in t.user_attrs
    ]
    terms = cfg.evaluation.fitness
    per_item = {}
    for t in trials:
        items = t.user_attrs["items"]
        totals = {k: int(r["of"]) for k, r in items.items()}
        per_item[t.number] = item_fitness(terms, decode_items(items), totals)
    grand = sum(totals.values())
    looks = schedule(totals, chunk)
    may_stop = stop_looks(looks, min_items)
    spent, stopped, wrong, best = grand, 0, [], trials[0]
    for t in trials[1:]:
        incumbent = {k: v.tolist() for k, v in per_item[best.number].items()}
        race = Race(incumbent, best.number, chunk, alpha, min_items, test)
        used = grand
        for upto in looks:
            f = {k: v[: upto[k]] for k, v in per_item[t.number].items()}
            if stop_reason(race, paired_differences(f, race.incumbent), grand, may_stop):
                used = sum(upto.values())
                break
        spent += used
        if used < grand:
            stopped += 1
            if t.value > best.value:
                wrong.append(t.number)
        if t.value > best.value:
            best = t
    full = grand * len(trials)
    return {
        "trials": len(trials),
        "stopped": stopped,
        "items": spent,
        "share": spent / full,
        "stopped_winners": wrong,
        "final_best": best.number,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run")
    p.add_argument("--chunk", type=int, default=40)
    p.add_argument("--min-items", type=int, default=40)
    p.add_argument("--alpha", type=float, default=0.05)
    args = p.parse_args()
    print("| rule | alpha | chunk | trials | stopped | items spent (share) | stopped winners |")
    print("|---|---|---|---|---|---|---|")
    for test in ("t", "wilcoxon"):
        for alpha in (args.alpha, 0.01, 0.1):
            r = replay(args.run, args.chunk, args.min_items, alpha, test)
            print(
                f"| {test} | {alpha:g} | {args.chunk} | {r['trials']} | {r['stopped']} | "
                f"{r['items']} ({r['share']:.2f}) | {len(r['stopped_winners'])} {r['stopped_winners'] or ''} |"
            )


if __name__ == "__main__":
    main()
