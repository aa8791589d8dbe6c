"""Anatomy of a tiny-zoo world: why its experts compose (or not) under a per-layer merge.

    .venv/bin/python bench/world_anatomy.py bench/_work/worlds/s1 [data/zoo ...] [--search-seeds 0 1 2]

For each world folder (built with `python -m zoo build --out DIR --seed N`), in process and fast (a greedy first
token is the whole answer in this world, so accuracy is one forward pass per task):
  skill profile   each model's test accuracy on every task, and on ja_sub by value (the right number in either
                  numeral: did it subtract?) and by form (any J numeral: did it answer in J?);
  task vectors    per group (embed, L0..L3, head) each expert's relative change ||tau|| / ||W_base|| and the cosine
                  between the two experts' task vectors;
  merges          task arithmetic 1/1, the best global grid (one coefficient per expert, 0..2.5 step 0.125, chosen on
                  dev), and a per-layer CMA-ES search (pycma, 150 evaluations, x0 1.0, sigma 1.0 -- the demo's space,
                  budget and fitness: dev ja_sub acc + gold_prob), all scored on test.
This is a research probe of the world, not the product's search: `bench/demo_bar.py --zoo DIR` measures the bar
with `evolve` itself.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import cma
import numpy as np
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from zoo.skills import read_rows, skill_scores  # noqa: E402

GROUPS = ("embed", "L0", "L1", "L2", "L3", "head")
EXPERTS = ("expert_ja", "expert_math")
TASKS = ("ja_sub", "ja_add", "en_sub", "en_add", "ja_qa")
BOUNDS = (0.0, 2.5)


def group_of(name: str, modules: bool = False) -> str:
    """embed, L0..L3, head; with `modules`, each layer split into .attn, .mlp and .norm (norms)."""
    if "embed_tokens" in name:
        return "embed"
    if name.startswith("lm_head") or name.startswith("model.norm."):
        return "head"
    layer = f"L{int(name.split('.')[2])}"
    if not modules:
        return layer
    return f"{layer}.{'attn' if 'self_attn' in name else 'mlp' if 'mlp' in name else 'norm'}"


class World:
    def __init__(self, root: Path, modules: bool = False) -> None:
        self.root = root
        self.tok = AutoTokenizer.from_pretrained(str(root / "base"))
        self.model = LlamaForCausalLM.from_pretrained(str(root / "base")).eval()
        self.sd = {m: load_file(str(root / m / "model.safetensors")) for m in ("base", *EXPERTS)}
        self.base = self.sd["base"]
        self.tau = {e: {k: self.sd[e][k] - v for k, v in self.base.items()} for e in EXPERTS}
        self.groups = {k: group_of(k) for k in self.base}
        self.sgroup = {k: group_of(k, modules) for k in self.base}  # the search's groups
        self.search_groups = list(dict.fromkeys(self.sgroup.values()))
        self.rows: dict[tuple[str, str], list[dict]] = {}

    def items(self, task: str, split: str) -> list[dict]:
        if (task, split) not in self.rows:
            self.rows[task, split] = read_rows(self.root / "tasks", task, split)
        return self.rows[task, split]

    def load(self, weights: dict[str, dict[str, float]] | str) -> None:
        """Load a source by name, or base + sum_e w[e][group] * tau_e."""
        if isinstance(weights, str):
            self.model.load_state_dict(self.sd[weights])
            return
        sd = {}
        for k, v in self.base.items():
            g = self.sgroup[k]
            sd[k] = v + sum(weights[e].get(g, weights[e].get(self.groups[k], 0.0)) * self.tau[e][k] for e in weights)
        self.model.load_state_dict(sd)

    def score(self, task: str, split: str) -> dict[str, float]:
        return skill_scores(self.model, self.tok, self.items(task, split))

    def fitness(self, weights) -> float:
        self.load(weights)
        s = self.score("ja_sub", "dev")
        return s["acc"] + s["gold_prob"]


def per_group(x: np.ndarray, groups: list[str]) -> dict[str, dict[str, float]]:
    n = len(groups)
    return {e: dict(zip(groups, map(float, x[i * n : (i + 1) * n]))) for i, e in enumerate(EXPERTS)}


def uniform(a: float, b: float, groups: list[str]) -> dict[str, dict[str, float]]:
    return {EXPERTS[0]: dict.fromkeys(groups, a), EXPERTS[1]: dict.fromkeys(groups, b)}


def anatomy(
    root: Path, search_seeds: list[int], budget: int, merges: bool = True, modules: bool = False, grid: bool = True
) -> dict:
    torch.set_num_threads(1)
    w = World(root, modules)
    sg = w.search_groups
    out: dict = {"world": str(root), "profile": {}, "tau": {}, "merges": {}}
    for m in ("base", *EXPERTS):
        w.load(m)
        out["profile"][m] = {t: w.score(t, "test") for t in TASKS}
    for g in GROUPS:
        keys = [k for k in w.base if w.groups[k] == g]
        base_norm = torch.sqrt(sum((w.base[k].float() ** 2).sum() for k in keys))
        rel = {e: float(torch.sqrt(sum((w.tau[e][k] ** 2).sum() for k in keys)) / base_norm) for e in EXPERTS}
        a = torch.cat([w.tau[EXPERTS[0]][k].flatten() for k in keys])
        b = torch.cat([w.tau[EXPERTS[1]][k].flatten() for k in keys])
        rel["cos"] = float(torch.nn.functional.cosine_similarity(a, b, dim=0))
        out["tau"][g] = rel
    # where each skill lives: the expert with one group's task vector removed (weight 0 there, 1 elsewhere)
    out["ablation"] = {}
    for e in EXPERTS:
        for g in GROUPS:
            weights = {e: {h: float(h != g) for h in GROUPS}}
            w.load({k: v for k, v in weights.items()})
            sub, add = w.score("ja_sub", "test"), w.score("ja_add", "test")
            out["ablation"][f"{e} without {g}"] = {
                "ja_sub_value": sub["value"],
                "ja_sub_j_form": sub["j_form"],
                "ja_add": add["acc"],
            }
    if not merges:
        return out

    def test_of(weights) -> dict[str, float]:
        w.load(weights)
        return {t: w.score(t, "test")["acc"] for t in ("ja_sub", "ja_add", "en_sub")} | {
            "ja_sub_value": w.score("ja_sub", "test")["value"]
        }

    out["merges"]["task arithmetic 1/1"] = test_of(uniform(1.0, 1.0, sg))
    if grid:
        points = [0.125 * i for i in range(21)]
        best = max(itertools.product(points, points), key=lambda p: w.fitness(uniform(*p, sg)))
        out["merges"][f"best global grid {best}"] = test_of(uniform(*best, sg))
    for seed in search_seeds:
        es = cma.CMAEvolutionStrategy(
            [1.0] * (2 * len(sg)), 1.0, {"bounds": list(BOUNDS), "seed": seed + 1, "verbose": -9, "maxfevals": budget}
        )
        best_x, best_f = None, -1.0
        while not es.stop():
            xs = es.ask()
            fs = [w.fitness(per_group(np.asarray(x), sg)) for x in xs]
            es.tell(xs, [-f for f in fs])
            for x, f in zip(xs, fs):
                if f > best_f:
                    best_x, best_f = np.asarray(x), f
        res = test_of(per_group(best_x, sg))
        res["x"] = {f"{e[7:]}.{g}": round(v, 2) for e, d in per_group(best_x, sg).items() for g, v in d.items()}
        out["merges"][f"per-layer cma seed {seed}"] = res
    return out


def show(r: dict) -> None:
    print(f"\n=== {r['world']}")
    print("profile (test acc; ja_sub value/j_form):")
    for m, p in r["profile"].items():
        cells = " ".join(f"{t}={p[t]['acc']:.2f}" for t in TASKS)
        print(f"  {m:12s} {cells}  ja_sub value={p['ja_sub']['value']:.2f} j_form={p['ja_sub']['j_form']:.2f}")
    print("task vectors ||tau||/||W|| (ja, math) cos:")
    print(
        "  "
        + "  ".join(f"{g}: {v['expert_ja']:.2f}/{v['expert_math']:.2f} {v['cos']:+.2f}" for g, v in r["tau"].items())
    )
    print("ablation (expert minus one group's task vector): ja_sub value / J form, ja_add:")
    for k, v in r.get("ablation", {}).items():
        print(f"  {k:28s} {v['ja_sub_value']:.2f} / {v['ja_sub_j_form']:.2f}  {v['ja_add']:.2f}")
    for k, v in r.get("merges", {}).items():
        x = v.get("x")
        cells = " ".join(f"{t}={a:.3f}" for t, a in v.items() if t != "x")
        print(f"  {k:32s} {cells}" + (f"\n      {x}" if x else ""))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("worlds", nargs="+", type=Path)
    p.add_argument("--search-seeds", type=int, nargs="*", default=[0, 1, 2])
    p.add_argument("--budget", type=int, default=150)
    p.add_argument("--modules", action="store_true", help="search attn/mlp/norm of each layer separately")
    p.add_argument("--no-grid", action="store_true", help="skip the 21 x 21 global grid")
    p.add_argument("--no-merges", action="store_true", help="only the skill profile and the task vectors")
    p.add_argument("--json", type=Path, help="also write the results as JSON")
    args = p.parse_args()
    results = [
        anatomy(root, args.search_seeds, args.budget, not args.no_merges, args.modules, not args.no_grid)
        for root in args.worlds
    ]
    for r in results:
        show(r)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    sys.exit(main())
