"""The held-out table of a search over the real experts (issue 13): SmolLM2-135M-Instruct, its two LoRA fine-tunes
(`math_en`, `chat_fr`), the untuned merges, the best one-coefficient-per-expert grid and the evolved merges.

    .venv/bin/python -m zoo real                                   # base + experts (from the committed adapters)
    .venv/bin/evolve run configs/smollm2_fr_math.yaml --no-final-table         # the PS search
    .venv/bin/evolve run configs/smollm2_fr_math_hybrid.yaml --no-final-table  # + DFS (continues the PS study)
    .venv/bin/python bench/real_experts.py --config configs/smollm2_fr_math_hybrid.yaml --write

Rows: base; each expert; the end-of-run table's untuned merges; the best global task-arithmetic grid point and the
best `base + a*tau_i` per expert, both chosen on the search's own fitness (dev split, like the search's pick); the
evolved pick of every stage whose study holds a complete trial. Every row is scored on the held-out split with 95%
bootstrap intervals; each evolved row is compared with the best other row by McNemar's exact test on the same items.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from demo_bar import grid_search  # noqa: E402
from results import write_section  # noqa: E402

from evolve.baselines import correct_per_item, heldout_evaluators, heldout_table, score_recipes  # noqa: E402
from evolve.config import load_config  # noqa: E402
from evolve.items import items_scored  # noqa: E402
from evolve.stats import mcnemar_exact, metric_intervals  # noqa: E402
from evolve.study import best_trial, load_study  # noqa: E402

SECTION = "On a real model: two LoRA experts of SmolLM2-135M-Instruct, French arithmetic (issue 13)"
COLUMNS = ["fr_math/acc", "fr_math/acc_value", "fr_math/lang_ok"]


def cell(row: dict[str, Any], column: str) -> str:
    value = row.get(column)
    if value is None:
        return ""
    ci = (row.get("_ci") or {}).get(column)
    return f"{value:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci and column.endswith("/acc") else "")


def stage_summary(cfg) -> list[str]:
    lines = []
    for stage in cfg.search.stages:
        try:
            study = load_study(cfg, stage)
        except Exception:  # a stage not run yet
            continue
        trials = study.get_trials(deepcopy=False)
        done = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED")]
        items = sum(items_scored(t.user_attrs.get("items")) for t in done)
        seconds = sum((t.datetime_complete - t.datetime_start).total_seconds() for t in done if t.datetime_complete)
        best = best_trial(study)
        lines.append(
            f"- {stage}: {len(done)} trials ({sum(t.state.name == 'PRUNED' for t in done)} stopped by racing), "
            f"{items} dev items scored, {seconds / 60:.0f} min of trials; pick: trial {best.number}, dev fitness "
            f"{best.value:.3f}"
        )
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/smollm2_fr_math_hybrid.yaml")
    p.add_argument("--grid", nargs="+", type=float, default=[0.0, 0.5, 1.0, 1.5])
    p.add_argument("--write", action="store_true", help="write the section of bench/RESULTS.md")
    args = p.parse_args()
    cfg = load_config(args.config)
    t0 = time.perf_counter()
    grid_rows, n_points = grid_search(cfg, args.grid)
    grid_s = time.perf_counter() - t0
    print(f"grid of {n_points} points: {grid_s:.0f} s", flush=True)
    t1 = time.perf_counter()
    rows = heldout_table(cfg)
    for label, (metrics, items) in score_recipes(cfg, grid_rows, heldout_evaluators(cfg)).items():
        ci = metric_intervals(items)
        rows.append({"model": label, **metrics, "_kind": "grid", "_ci": ci, "_items": items})
    table_s = time.perf_counter() - t1
    lines = ["| model | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    lines += [f"| {r['model']} | " + " | ".join(cell(r, c) for c in COLUMNS) + " |" for r in rows]
    target = COLUMNS[0]
    comparisons = []
    for evolved in (r for r in rows if r["_kind"] == "evolved"):
        others = [r for r in rows if r["_kind"] != "evolved" and r.get(target) is not None]
        best = max(others, key=lambda r: r[target])
        only_e, only_o, pval = mcnemar_exact(
            correct_per_item(evolved["_items"], target), correct_per_item(best["_items"], target)
        )
        comparisons.append(
            f"- {evolved['model']} vs the best other row ({best['model']}): {target} {evolved[target]:.3f} vs "
            f"{best[target]:.3f}, {only_e} items right only for the evolved merge, {only_o} only for the other; "
            f"McNemar exact p = {pval:.3g}"
        )
    n_items = {k: s.n for k, s in rows[0]["_items"].items()}
    body = "\n".join(
        [
            f"Measured with `{' '.join(['.venv/bin/python', *sys.argv])}` after the searches in its docstring, on "
            "this 2-core CPU (shared with other jobs: the seconds are upper bounds). Held-out: "
            + ", ".join(f"{k} {v} items" for k, v in n_items.items())
            + f" (test split); 95% bootstrap intervals over items. Grid: {n_points} points of "
            f"{args.grid}, chosen on the dev fitness ({grid_s / 60:.0f} min); the table took {table_s / 60:.0f} min.",
            "",
            *stage_summary(cfg),
            "",
            *lines,
            "",
            *comparisons,
        ]
    )
    print(body)
    if args.write:
        write_section(SECTION, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
