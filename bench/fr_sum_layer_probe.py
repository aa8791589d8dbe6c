"""Hand probe behind composition design 5 (issue 24): one data-flow path through `arith`'s layers 0..k-1, then
`fr_num`'s layers k..29, scored on 32 dev items of fr_sum (the seeded sample of configs/smollm2_fr_sum.yaml).

    .venv/bin/python bench/fr_sum_layer_probe.py      # needs `python -m zoo real`; about 3 min on 2 shared cores

k = 30 is `arith` alone, k = 0 `fr_num` alone (its layers with the base's embedding, norm and head, which neither
LoRA touched)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evolve.baselines import heldout_evaluators, score_recipes  # noqa: E402
from evolve.config import load_config  # noqa: E402
from merge_core.recipe import DataFlowRecipe, LayerPath  # noqa: E402


def main() -> int:
    cfg = load_config(ROOT / "configs" / "smollm2_fr_sum.yaml")
    evaluators = heldout_evaluators(cfg, split="dev", limit=32)
    a, b = (s.path for s in cfg.models.sources)
    recipes = {}
    for k in (30, 0, 26, 22, 18, 14):
        hops = tuple([(0, i) for i in range(k)] + [(1, i) for i in range(k, 30)])
        recipes[f"arith 0..{k - 1} + fr_num {k}..29"] = DataFlowRecipe(a, b, LayerPath(hops, (1.0,) * len(hops)))
    for label, (metrics, _) in score_recipes(cfg, recipes, evaluators).items():
        print(label, json.dumps({m: round(v, 3) for m, v in metrics.items()}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
