"""Search economy on the tiny zoo: held-out accuracy of the final pick against the items the search scored, for
every sampler x {full scoring, racing, racing + elite re-scoring}, over worlds and search seeds.

Each cell is a real `evolve` search (configs/tiny_jp_math.yaml over the world's checkpoints and ja_sub task, in
process, local executor): its pick (the best trial, or the best re-scored elite) is scored on the world's held-out
test split (500 items; accuracy with its 95% bootstrap interval). Items scored = every item any trial scored plus the
re-scoring's. Runs are kept under bench/_work/economy/ and reused when complete, so an interrupted benchmark
continues. Writes a markdown table and bench/economy.png (held-out accuracy of the pick against items scored).

    python bench/economy.py --worlds data/zoo bench/_work/worlds/s2 --seeds 0 1 2 3 4 \
        --samplers cmaes tpe random gp --modes full racing racing+rescore [--trials 150] [--racing 40:40 20:20]

`--racing CHUNK:MIN_ITEMS[:ALPHA]` (several allowed) runs the racing modes with that chunk, minimum and error rate
(default 0.05; test t); 40:40 is the first grid's rule and keeps its run names; other rules are runs of their own,
shown as e.g. "racing (c20/m20)" or "racing (c20/m20/a0.1)".
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import optuna  # noqa: E402
import yaml  # noqa: E402

from evolve.baselines import heldout_evaluators, score_recipes  # noqa: E402
from evolve.config import parse_config  # noqa: E402
from evolve.items import items_scored  # noqa: E402
from evolve.loop import run_search  # noqa: E402
from evolve.stats import mean_interval  # noqa: E402
from evolve.study import best_first, best_trial, counted, load_study, rescored, trial_recipe  # noqa: E402

WORK = ROOT / "bench" / "_work" / "economy"
RACING = {"chunk": 40, "alpha": 0.05, "min_items": 40}  # the first grid's rule (its runs keep their names)
RESCORE = {"top_k": 5, "split": "train", "limit": 200}


def racing_rule(spec: str) -> dict:
    """'CHUNK:MIN_ITEMS[:ALPHA]' -> the racing block (alpha 0.05 unless given, test t)."""
    chunk, min_items, *alpha = spec.split(":")
    return {"chunk": int(chunk), "alpha": float(alpha[0]) if alpha else 0.05, "min_items": int(min_items), "test": "t"}


def rule_tag(racing: dict) -> str:
    """'' for the first grid's rule, else 'c20/m20' ('c20/m20/a0.1' for another alpha; in run names as c20-m20)."""
    alpha = "" if racing["alpha"] == RACING["alpha"] else f"/a{racing['alpha']:g}"
    if racing["chunk"] == RACING["chunk"] and racing["min_items"] == RACING["min_items"] and not alpha:
        return ""
    return f"c{racing['chunk']}/m{racing['min_items']}{alpha}"


def label(r: dict) -> str:
    """A result's mode with its racing rule when not the first grid's."""
    return f"{r['mode']} ({r['racing']})" if r.get("racing") else r["mode"]


def cell_config(world: Path, seed: int, sampler: str, mode: str, trials: int, racing: dict = RACING) -> dict:
    data = yaml.safe_load((ROOT / "configs" / "tiny_jp_math.yaml").read_text())
    tag = rule_tag(racing) if mode != "full" else ""
    name = f"{world.name}-{sampler}-{mode.replace('+', '-')}{'-' + tag.replace('/', '-') if tag else ''}-s{seed}"
    data.update(name=name, seed=seed, output_dir=str(WORK / name))
    data["models"]["base"] = str(world / "base")
    for s in data["models"]["sources"]:
        s["path"] = str(world / Path(s["path"]).name)
    for t in data["evaluation"]["tasks"]:
        t["task_dir"] = str(world / "tasks" / "ja_sub")
    data["search"]["optimizer"]["sampler"] = sampler
    data["search"]["budget"]["max_trials"] = trials
    data["evaluation"].pop("racing", None)  # the demo config's own economy settings are not a cell's
    data["evaluation"].pop("rescore", None)
    if mode in ("racing", "racing+rescore"):
        data["evaluation"]["racing"] = dict(racing)
    if mode == "racing+rescore":
        data["evaluation"]["rescore"] = RESCORE
    return data


def run_cell(world: Path, seed: int, sampler: str, mode: str, trials: int, racing: dict = RACING) -> dict:
    """One search and its pick's held-out score. "racing" without re-scoring is the same search as "racing+rescore"
    (re-scoring comes after it), so it is read from that run when it exists: its pick is the search's best trial."""
    cfg = parse_config(cell_config(world, seed, sampler, mode, trials, racing))
    result_file = cfg.run_dir / "economy.json"
    if result_file.is_file():
        return json.loads(result_file.read_text())
    rescore_cfg = parse_config(cell_config(world, seed, sampler, "racing+rescore", trials, racing))
    t0 = time.perf_counter()
    if mode == "racing" and (rescore_cfg.run_dir / "economy.json").is_file():
        study = load_study(rescore_cfg)
        seconds = json.loads((rescore_cfg.run_dir / "economy.json").read_text())["search_seconds"]
        pick = best_first(study.get_trials(deepcopy=False))[0]
        rescore_items = 0
    else:
        study = run_search(cfg, progress=False).study
        seconds = time.perf_counter() - t0
        pick = best_trial(study)
        rescore_items = sum(r["items_scored"] for r in rescored(study).values())
    trials_ = study.get_trials(deepcopy=False)
    items = sum(items_scored(t.user_attrs.get("items")) for t in trials_) + rescore_items
    (metrics, scores) = score_recipes(cfg, {"pick": trial_recipe(pick)}, heldout_evaluators(cfg))["pick"]
    acc = scores["ja_sub"].values["acc"]
    curve = []  # (items so far, best dev fitness so far) in trial order
    spent, best = 0, -np.inf
    for t in sorted(trials_, key=lambda t: t.number):
        spent += items_scored(t.user_attrs.get("items"))
        if t.state.name == "COMPLETE":
            best = max(best, t.value)
        curve.append((spent, best))
    out = {
        "world": str(world),
        "seed": seed,
        "sampler": sampler,
        "mode": mode,
        "racing": rule_tag(racing) if mode != "full" else "",
        "trials": sum(counted(t) for t in trials_),
        "pruned": sum(t.state.name == "PRUNED" for t in trials_),
        "items": items,
        "pick": pick.number,
        "dev_fitness": pick.value,
        "heldout_acc": metrics["ja_sub/acc"],
        "heldout_ci": mean_interval(acc),
        "seconds": seconds,
        "search_seconds": seconds,
        "curve": curve,
    }
    result_file.parent.mkdir(parents=True, exist_ok=True)
    result_file.write_text(json.dumps(out))
    return out


POINTS = (10, 20, 30, 50, 75, 100, 150)  # trials at which the pick so far is scored held-out


def heldout_along(
    world: Path, seed: int, sampler: str, mode: str, trials: int, racing: dict = RACING
) -> list[tuple[int, int, float]]:
    """(trials, items scored so far, held-out accuracy of the pick so far) at each of POINTS: the pick so far is
    the best complete trial by search fitness among the first N (what the run would export had it stopped there;
    re-scoring is not replayed). Cached in the run's economy.json."""
    cfg = parse_config(
        cell_config(world, seed, sampler, mode if mode != "racing" else "racing+rescore", trials, racing)
    )
    result_file = cfg.run_dir / "economy.json"
    record = json.loads(result_file.read_text())
    if "heldout_along" in record:
        return record["heldout_along"]
    trials_ = sorted(load_study(cfg).get_trials(deepcopy=False), key=lambda t: t.number)
    picks, spent = {}, 0
    for n, t in enumerate(trials_, 1):
        spent += items_scored(t.user_attrs.get("items"))
        if n in POINTS:
            best = best_first(trials_[:n])
            if best:
                picks[n] = (spent, best[0])
    recipes = {str(n): trial_recipe(t) for n, (_, t) in picks.items()}
    scored = score_recipes(cfg, recipes, heldout_evaluators(cfg))
    along = [(n, spent, scored[str(n)][0]["ja_sub/acc"]) for n, (spent, _) in sorted(picks.items())]
    record["heldout_along"] = along
    result_file.write_text(json.dumps(record))
    return along


def plot_heldout_along(results: list[dict], path: Path) -> None:
    """Held-out accuracy of the pick so far against items scored, per world, sampler and mode (mean over seeds)."""
    styles = {"full": "-o", "racing": "--^"}

    def draw(ax, world: str, colors: dict[str, str]) -> None:
        groups: dict[tuple, list] = {}
        for r in results:
            if Path(r["world"]).name == world and r.get("heldout_along") and r["mode"] in styles:
                groups.setdefault((r["sampler"], r["mode"], label(r)), []).append(r["heldout_along"])
        for (sampler, mode, name), runs in sorted(groups.items()):
            n = min(len(a) for a in runs)
            xs = np.mean([[p[1] for p in a[:n]] for a in runs], axis=0)
            ys = np.mean([[p[2] for p in a[:n]] for a in runs], axis=0)
            color = colors.setdefault(sampler, f"C{len(colors)}")
            style = styles[mode] if name == mode else ":v"
            ax.plot(xs, ys, style, color=color, markersize=3, label=f"{sampler} {name} (n={len(runs)})")

    per_world_figure(results, path, "held-out accuracy of the pick so far (mean over seeds)", draw)


def per_world_figure(results: list[dict], path: Path, ylabel: str, draw) -> None:
    """One panel per world (`draw(ax, world, colors)` plots it; a sampler keeps its color across panels), x =
    items scored, saved to `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    worlds = sorted({Path(r["world"]).name for r in results})
    fig, axes = plt.subplots(1, len(worlds), figsize=(6.5 * len(worlds), 4.5), squeeze=False)
    colors: dict[str, str] = {}
    for ax, world in zip(axes[0], worlds):
        draw(ax, world, colors)
        ax.set_title(f"world {world}")
        ax.set_xlabel("items scored by the search")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def along_table(results: list[dict]) -> str:
    """Mean held-out accuracy of the pick so far at each of POINTS, per world, sampler and mode."""
    lines = [
        "| world | sampler | mode | seeds | " + " | ".join(f"{n} trials" for n in POINTS) + " |",
        "|---" * (4 + len(POINTS)) + "|",
    ]
    groups: dict[tuple, list] = {}
    for r in results:
        if r.get("heldout_along"):
            groups.setdefault((Path(r["world"]).name, r["sampler"], label(r)), []).append(r["heldout_along"])
    for (world, sampler, mode), runs in sorted(groups.items()):
        cells = []
        for n in POINTS:
            at = [p for a in runs for p in a if p[0] == n]
            cells.append(f"{np.mean([p[2] for p in at]):.3f} ({np.mean([p[1] for p in at]):.0f} items)" if at else "-")
        lines.append(f"| {world} | {sampler} | {mode} | {len(runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table(results: list[dict]) -> str:
    lines = [
        "| world | sampler | mode | seeds | held-out acc of the pick (mean [min, max]) | items scored (mean) | "
        "items vs full | trials stopped by racing (mean) | search s (mean) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((Path(r["world"]).name, r["sampler"], label(r)), []).append(r)
    for (world, sampler, mode), rs in sorted(groups.items()):
        accs = [r["heldout_acc"] for r in rs]
        full = groups.get((world, sampler, "full"))
        ratio = np.mean([r["items"] for r in rs]) / np.mean([r["items"] for r in full]) if full else float("nan")
        lines.append(
            f"| {world} | {sampler} | {mode} | {len(rs)} | {np.mean(accs):.3f} [{min(accs):.3f}, {max(accs):.3f}] | "
            f"{np.mean([r['items'] for r in rs]):.0f} | {ratio:.2f} | {np.mean([r['pruned'] for r in rs]):.1f} | "
            f"{np.mean([r['seconds'] for r in rs]):.0f} |"
        )
    return "\n".join(lines)


def trials_to(curve: list, target: float) -> int | None:
    """The first trial count at which the best dev fitness so far reaches `target` (None: never)."""
    return next((i + 1 for i, (_, best) in enumerate(curve) if best >= target), None)


def efficiency(results: list[dict]) -> str:
    """Sample efficiency of full-scoring searches, per world and sampler (median over seeds): dev fitness at the last
    trial, and trials to reach random search's and CMA-ES's median final dev fitness (the issue's targets: <= 1/3
    of random's trials to random's final, <= 75 trials to CMA-ES's)."""
    full = [r for r in results if r["mode"] == "full"]
    lines = [
        "| world | sampler | seeds | dev fitness at the last trial (median; per seed) | trials to random's median "
        "final (median; per seed) | trials to cmaes's median final (median; per seed) |",
        "|---|---|---|---|---|---|",
    ]
    for world in sorted({Path(r["world"]).name for r in full}):
        rows = [r for r in full if Path(r["world"]).name == world]
        finals = {s: [r["curve"][-1][1] for r in rows if r["sampler"] == s] for s in {r["sampler"] for r in rows}}
        targets = {s: float(np.median(finals[s])) for s in ("random", "cmaes") if finals.get(s)}
        for sampler in sorted(finals):
            rs = sorted((r for r in rows if r["sampler"] == sampler), key=lambda r: r["seed"])
            cells = []
            for s in ("random", "cmaes"):
                if s not in targets:
                    cells.append("-")
                    continue
                hits = [trials_to(r["curve"], targets[s]) for r in rs]
                got = sorted(h if h is not None else 10**9 for h in hits)
                med = got[len(got) // 2]
                cells.append(
                    f"{med if med < 10**9 else 'not reached'} ({', '.join(str(h) if h else '-' for h in hits)})"
                    + (f" [target {targets[s]:.3f}]" if sampler == s else "")
                )
            final = [r["curve"][-1][1] for r in rs]
            lines.append(
                f"| {world} | {sampler} | {len(rs)} | {np.median(final):.3f} ({', '.join(f'{f:.2f}' for f in final)})"
                f" | {cells[0]} | {cells[1]} |"
            )
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    marks = {"full": "o", "racing": "^", "racing+rescore": "s"}  # another racing rule: hollow
    colors = {}
    for r in results:
        c = colors.setdefault(r["sampler"], f"C{len(colors)}")
        lo, hi = r["heldout_ci"]
        ax.errorbar(
            r["items"],
            r["heldout_acc"],
            yerr=[[r["heldout_acc"] - lo], [hi - r["heldout_acc"]]],
            fmt=marks[r["mode"]],
            color=c,
            mfc="none" if r.get("racing") else c,
            alpha=0.7,
            capsize=2,
        )
    for s, c in colors.items():
        ax.plot([], [], "o", color=c, label=s)
    for m, k in marks.items():
        ax.plot([], [], k, color="gray", label=m)
    ax.set_xlabel("items scored by the search (incl. re-scoring)")
    ax.set_ylabel("held-out accuracy of the pick (95% CI)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_curves(results: list[dict], path: Path) -> None:
    """Best dev fitness so far against items scored, per world, sampler and mode: the median over seeds."""
    styles = {"full": "-", "racing": "--", "racing+rescore": ":"}

    def draw(ax, world: str, colors: dict[str, str]) -> None:
        groups: dict[tuple, list] = {}
        for r in results:
            if Path(r["world"]).name == world and r["mode"] != "racing+rescore":  # its curve is racing's
                groups.setdefault((r["sampler"], r["mode"], label(r)), []).append(r["curve"])
        for (sampler, mode, name), curves in sorted(groups.items()):
            grid = np.linspace(0, max(c[-1][0] for c in curves), 200)
            ys = [np.interp(grid, [x for x, _ in c], [max(y, -1.0) for _, y in c]) for c in curves]
            color = colors.setdefault(sampler, f"C{len(colors)}")
            style = styles[mode] if name == mode else "-."
            ax.plot(grid, np.median(ys, axis=0), style, color=color, label=f"{sampler} {name} (n={len(ys)})")

    per_world_figure(results, path, "best dev fitness so far (median over seeds)", draw)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worlds", nargs="+", default=["data/zoo"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    p.add_argument("--samplers", nargs="+", default=["cmaes", "tpe", "random", "gp"])
    p.add_argument("--modes", nargs="+", default=["full", "racing+rescore", "racing"])
    p.add_argument("--trials", type=int, default=150)
    p.add_argument(
        "--racing",
        nargs="+",
        default=["40:40"],
        metavar="CHUNK:MIN_ITEMS[:ALPHA]",
        help="racing rules (test t; alpha 0.05 unless given)",
    )
    p.add_argument("--report-only", action="store_true", help="tables and plots of the finished cells; run nothing")
    args = p.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    results = []
    for world in args.worlds:
        for sampler in args.samplers:
            cells = [(m, RACING) for m in args.modes if m == "full"]
            cells += [(m, racing_rule(spec)) for spec in args.racing for m in args.modes if m != "full"]
            for mode, racing in cells:
                for seed in args.seeds:
                    w = (ROOT / world).resolve()
                    done = parse_config(cell_config(w, seed, sampler, mode, args.trials, racing)).run_dir
                    if args.report_only and not (done / "economy.json").is_file():
                        continue
                    r = run_cell(w, seed, sampler, mode, args.trials, racing)
                    print(
                        f"{Path(world).name} {sampler} {label(r)} seed {seed}: held-out {r['heldout_acc']:.3f}, "
                        f"{r['items']} items, {r['pruned']} stopped, {r['seconds']:.0f} s",
                        flush=True,
                    )
                    if mode != "racing+rescore":  # its search is racing's
                        r["heldout_along"] = heldout_along(w, seed, sampler, mode, args.trials, racing)
                    results.append(r)
    print(table(results))
    print()
    print(efficiency(results))
    print()
    print(along_table(results))
    plot(results, ROOT / "bench" / "economy.png")
    plot_curves(results, ROOT / "bench" / "economy_curves.png")
    plot_heldout_along(results, ROOT / "bench" / "economy_heldout.png")
    print("wrote bench/economy.png, bench/economy_curves.png, bench/economy_heldout.png")


if __name__ == "__main__":
    main()
