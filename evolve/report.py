"""Search report: figures (fitness, best recipe heatmap, parameter importances) and one self-contained HTML page.

Everything is read from the Optuna study the search loop writes (see the study and trial user attrs it sets),
so a report can be drawn for a running search, a finished one, or one copied from another machine.
"""

from __future__ import annotations

import base64
import html
import logging
import math
import threading
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)
import numpy as np  # noqa: E402
import optuna  # noqa: E402
from optuna.trial import FrozenTrial, TrialState  # noqa: E402

from evolve.front import BALANCED_RULE, front_rows, hypervolume_line  # noqa: E402
from evolve.items import items_scored, tokens_generated  # noqa: E402
from evolve.optuna_api import pruned_as_complete  # noqa: E402
from evolve.pareto import balanced, hypervolume_history, is_multi, objective_names, pareto_front, reference_point  # noqa: E402
from evolve.study import best_first, best_trial, candidates_per_hour, rescored  # noqa: E402
from evolve.urls import redact_url  # noqa: E402
from merge_core.errors import EvomergeError  # noqa: E402
from merge_core.recipe import MODEL_NAMES, DataFlowRecipe, Recipe, load_recipe  # noqa: E402
from search_spaces.ps import MODULE_KINDS, group_order, parse_param_name  # noqa: E402

log = logging.getLogger(__name__)

MIN_TRIALS_FOR_IMPORTANCE = 10
IMPORTANCE_TIMEOUT_S = 10.0
MAX_IMPORTANCE_BARS = 25
MAX_ANNOTATED_CELLS = 150
DPI = 100


# ---- entry point --------------------------------------------------------------------------------


def write_report(
    study: optuna.Study,
    out_dir: Path,
    *,
    title: str | None = None,
    reference: list[float] | None = None,
    heldout: dict[int, dict[str, float]] | None = None,
) -> list[Path]:
    """Write fitness.png, best_recipe.png, importances.png (when it can be computed) and report.html into out_dir.
    A multi-objective study gets pareto.png and hypervolume.png instead of fitness.png, and a front table (with
    `heldout`: trial -> held-out metrics of the front members; `reference`: the configured reference point)."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        raise EvomergeError(f"study '{study.study_name}' has no complete trial yet: nothing to report")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    trials = study.get_trials(deepcopy=False)
    best = best_trial(study)
    front_html: list[str] = []
    if is_multi(study.directions):
        figures, front_html = pareto_figures(study, trials, reference, heldout or {})
    else:
        figures = {"fitness.png": plot_fitness(trials)}
    recipe = _readable_recipe(best)
    if isinstance(recipe, DataFlowRecipe):  # a data-flow trial: draw its path
        figures["best_path.png"] = plot_layer_path(best.number, recipe)
    else:
        figures["best_recipe.png"] = plot_best_recipe(best, _param_order(study, best))
    importances, note = (
        compute_importances(study)
        if len(study.directions) == 1
        else (None, "a multi-objective study has no single value to attribute")
    )
    if importances is not None:
        figures["importances.png"] = plot_importances(importances)
    paths = [_save(fig, out_dir / name) for name, fig in figures.items()]
    page = render_html(
        study, trials, best, {p.name: p for p in paths}, title=title, importance_note=note, front=front_html
    )
    html_path = out_dir / "report.html"
    html_path.write_text(page, encoding="utf-8")
    log.info("wrote report for study '%s' to %s", study.study_name, html_path)
    return [*paths, html_path]


def _readable_recipe(trial: FrozenTrial) -> Recipe | None:
    """The trial's recipe; None when it has none this report can read (its parameters are still drawn)."""
    try:
        return load_recipe(trial.user_attrs["recipe"], where=f"trial {trial.number} recipe")
    except (KeyError, EvomergeError):
        return None


def plot_layer_path(number: int, recipe: DataFlowRecipe) -> plt.Figure:
    """The best data-flow path: one box per hop, coloured by model, labelled with its layer and input scale."""
    hops = list(zip(recipe.path.hops, recipe.path.scales))
    fig, ax = plt.subplots(figsize=(min(max(4.0, 0.55 * len(hops) + 1), 24), 1.9))
    colors = ("#4C72B0", "#DD8452")  # A, B
    for i, ((model, layer), scale) in enumerate(hops):
        ax.add_patch(plt.Rectangle((i + 0.05, 0.1), 0.9, 0.8, color=colors[model]))
        ax.text(
            i + 0.5,
            0.62,
            f"{MODEL_NAMES[model]}{layer}",
            ha="center",
            va="center",
            color="white",
            fontsize=9,
            weight="bold",
        )
        ax.text(i + 0.5, 0.3, f"x{scale:.2f}", ha="center", va="center", color="white", fontsize=7)
    ax.set_xlim(0, len(hops))
    ax.set_ylim(0, 1)
    ax.axis("off")
    ax.set_title(
        f"trial {number}: {len(hops)} hops (A blue, B orange; scale multiplies the previous MLP output)", fontsize=9
    )
    return fig


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


# ---- parameter names ----------------------------------------------------------------------------


def _column_key(col: tuple[str, str | None]) -> tuple:
    group, module = col
    return (*group_order(group), -1 if module is None else MODULE_KINDS.index(module))


def _param_order(study: optuna.Study, best: FrozenTrial) -> list[str]:
    """The best trial's parameter names in genome order (study attr ``space_names``) when known."""
    names = study.user_attrs.get("space_names") or []
    return [n for n in names if n in best.params] + [n for n in best.params if n not in names]


# ---- figures ------------------------------------------------------------------------------------


def plot_fitness(trials: list[FrozenTrial]) -> plt.Figure:
    """Fitness per trial number (cached duplicates hollow), failed trials as crosses on the floor, best so far."""
    done = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
    failed = [t.number for t in trials if t.state == TrialState.FAIL]
    fresh = [t for t in done if "cached_from" not in t.user_attrs]
    cached = [t for t in done if "cached_from" in t.user_attrs]
    pruned = [t for t in trials if t.state == TrialState.PRUNED and t.value is not None]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    if pruned:  # racing stopped them: their partial estimate
        ax.scatter(
            [t.number for t in pruned],
            [t.value for t in pruned],
            s=10,
            color="tab:gray",
            alpha=0.6,
            label=f"stopped by racing ({len(pruned)}; partial estimate)",
        )
    ax.scatter([t.number for t in fresh], [t.value for t in fresh], s=18, color="tab:blue", label="trial")
    if cached:
        ax.scatter(
            [t.number for t in cached],
            [t.value for t in cached],
            s=18,
            facecolors="none",
            edgecolors="tab:blue",
            label="cached duplicate",
        )
    ax.step(
        [t.number for t in done],
        np.maximum.accumulate([t.value for t in done]),
        where="post",
        color="tab:orange",
        label="best so far",
    )
    if failed:
        low, high = min(t.value for t in done), max(t.value for t in done)
        floor = low - 0.05 * ((high - low) or 1.0)
        ax.scatter(failed, [floor] * len(failed), marker="x", color="tab:red", label=f"failed ({len(failed)})")
    ax.set_xlabel("trial")
    ax.set_ylabel("fitness")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")
    return fig


def recipe_grid(params: dict[str, float], order: list[str]) -> tuple[np.ndarray, list[str], list[str]]:
    """Best-recipe table: rows (source, param) in genome order, columns (group, module) in layer order; NaN = unset."""
    cells = {}
    for name in order:
        try:
            group, module, source, param = parse_param_name(name)
        except EvomergeError:  # a space with other naming (e.g. data-flow): one column per parameter
            group, module, source, param = name, None, None, "value"
        cells[(source, param), (group, module)] = params[name]
    rows = list(dict.fromkeys(r for r, _ in cells))
    cols = sorted(dict.fromkeys(c for _, c in cells), key=_column_key)
    grid = np.full((len(rows), len(cols)), np.nan)
    for (r, c), v in cells.items():
        grid[rows.index(r), cols.index(c)] = v
    row_labels = [param if source is None else f"{source} · {param}" for source, param in rows]
    col_labels = [group if module is None else f"{group}\n{module}" for group, module in cols]
    return grid, row_labels, col_labels


def plot_best_recipe(best: FrozenTrial, order: list[str]) -> plt.Figure:
    """Heatmap of the best trial's genome; values written in the cells when the grid is small."""
    grid, row_labels, col_labels = recipe_grid(best.params, order)
    n_rows, n_cols = grid.shape
    fig, ax = plt.subplots(figsize=(min(24, 2.5 + 0.75 * n_cols), min(16, 1.5 + 0.45 * n_rows)))
    cmap = plt.get_cmap("viridis").with_extremes(bad="#eeeeee")  # grey: not in the genome
    image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, aspect="auto")
    fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02)
    small = n_cols <= 30
    ax.set_xticks(range(n_cols), col_labels, fontsize=9 if small else 7, rotation=0 if small else 90)
    ax.set_yticks(range(n_rows), row_labels, fontsize=9)
    what = f"fitness {best.value:.4g}" if len(best.values) == 1 else "the front's balanced member"
    ax.set_title(f"best recipe (trial {best.number}, {what})")
    if grid.size <= MAX_ANNOTATED_CELLS:
        _annotate(ax, grid, image)
    return fig


def _annotate(ax: plt.Axes, grid: np.ndarray, image: Any) -> None:
    for (i, j), v in np.ndenumerate(grid):
        if not math.isnan(v):
            dark = sum(image.cmap(image.norm(v))[:3]) < 1.5
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8, color="white" if dark else "black")


def importance_trials(study: optuna.Study) -> tuple[list[FrozenTrial], int]:
    """The trials importances are fitted on: the complete ones and, under racing, the ones stopped early, each at
    its partial estimate (the last value it reported, what the sampler was told); and how many of them are those."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    raced = study.get_trials(deepcopy=False, states=(TrialState.PRUNED,))
    pruned = [pruned_as_complete(t) for t in raced if t.intermediate_values]
    return complete + pruned, len(pruned)


def compute_importances(study: optuna.Study) -> tuple[dict[str, float] | None, str]:
    """Optuna's default importance evaluator over `importance_trials`, given IMPORTANCE_TIMEOUT_S; returns
    (importances, which trials they are from) or (None, why not)."""
    trials, n_pruned = importance_trials(study)
    n_complete = len(trials) - n_pruned
    raced = f" and {n_pruned} stopped early by racing, each at its partial estimate (the last value it reported)"
    if len(trials) < MIN_TRIALS_FOR_IMPORTANCE:
        counting = " (counting those stopped early by racing)" if n_pruned else ""
        return None, (
            f"needs at least {MIN_TRIALS_FOR_IMPORTANCE} complete trials{counting}, the study has {n_complete}"
            + (raced if n_pruned else "")
        )
    used = f"{n_complete} complete trials" + (raced if n_pruned else "")
    fitted = optuna.create_study(directions=study.directions)  # in memory: the record is not touched
    fitted.add_trials(trials)
    result: dict[str, Any] = {}

    def work() -> None:
        try:
            result["value"] = optuna.importance.get_param_importances(fitted)
        except Exception as err:  # noqa: BLE001  (a report must not fail because importances could not be fit)
            result["error"] = err

    worker = threading.Thread(target=work, name="param-importances", daemon=True)  # not cancellable: left to finish
    worker.start()
    worker.join(IMPORTANCE_TIMEOUT_S)
    if worker.is_alive():
        why = f"took longer than {IMPORTANCE_TIMEOUT_S:.0f} s"
    elif "error" in result:
        why = f"could not be computed: {result['error']}"
    else:
        return result["value"], f"From {used}."
    log.warning("parameter importances skipped: %s", why)
    return None, why


def plot_importances(importances: dict[str, float]) -> plt.Figure:
    """Horizontal bars, most important on top; the tail past MAX_IMPORTANCE_BARS is left out."""
    top = sorted(importances.items(), key=lambda kv: kv[1], reverse=True)[:MAX_IMPORTANCE_BARS]
    names, values = [k for k, _ in top][::-1], [v for _, v in top][::-1]
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.3 * len(top)))
    ax.barh(names, values, color="tab:blue")
    ax.set_xlabel("importance (normalized)")
    shown = "" if len(importances) <= MAX_IMPORTANCE_BARS else f" (top {MAX_IMPORTANCE_BARS} of {len(importances)})"
    ax.set_title(f"parameter importances{shown}")
    ax.grid(axis="x", alpha=0.3)
    return fig


# ---- several objectives -------------------------------------------------------------------------

_PARETO_FIGURES = (("pareto.png", "Pareto front"), ("hypervolume.png", "hypervolume per trial"))


def pareto_figures(
    study: optuna.Study, trials: list[FrozenTrial], reference: list[float] | None, heldout: dict[int, dict]
) -> tuple[dict[str, plt.Figure], list[str]]:
    """pareto.png, hypervolume.png and the front's HTML section (members, objectives, held-out scores)."""

    names = objective_names(study)
    front = pareto_front(trials, study.directions)
    pick = balanced(front, study.directions)
    figures = {"pareto.png": plot_pareto(trials, front, pick, names, study.directions)}
    ref = reference_point(study, reference, store=False)
    if ref is not None:
        figures["hypervolume.png"] = plot_hypervolume(hypervolume_history(trials, study.directions, ref))
    rows = front_rows(study)
    held = sorted({k for m in heldout.values() for k in m})
    head = ["trial", *names, "balanced", *[f"held-out {k}" for k in held], "recipe (mean per source)"]
    cells = []
    for r in rows:
        h = heldout.get(r["trial"], {})
        vals = [r["trial"], *[_fmt(r[n]) for n in names], r["balanced"], *[_fmt(h.get(k, "")) for k in held]]
        cells.append([*vals, r["recipe (mean per source)"]])
    esc = html.escape
    table = "<table>\n<tr>" + "".join(f"<th>{esc(str(c))}</th>" for c in head) + "</tr>\n"
    table += "\n".join("<tr>" + "".join(f"<td>{esc(str(c))}</td>" for c in row) + "</tr>" for row in cells)
    section = [
        "<h2>Pareto front</h2>",
        f"<p>{esc(hypervolume_line(study, reference))}. {len(rows)} members; {esc(BALANCED_RULE)} "
        "(ties: the higher scaled sum, then the lower trial number). "
        + ("Held-out scores on the run's held-out split." if held else "Held-out scores not computed.")
        + "</p>",
        table + "\n</table>",
    ]
    return figures, section


def plot_pareto(
    trials: list[FrozenTrial], front: list[FrozenTrial], pick: FrozenTrial, names: list[str], directions: list
) -> plt.Figure:
    """Two objectives: every complete trial, the front drawn as a staircase and its members numbered; three or
    more: one panel per pair of objectives (the front's members highlighted and numbered in each)."""
    done = [t for t in trials if t.state == TrialState.COMPLETE and t.values]
    n = len(names)
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    cols = min(3, len(pairs))
    rows = math.ceil(len(pairs) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 4.4 * rows), squeeze=False)
    on_front = {t.number for t in front}
    for ax, (i, j) in zip(axes.flat, pairs):
        rest = [t for t in done if t.number not in on_front]
        ax.scatter(
            [t.values[i] for t in rest],
            [t.values[j] for t in rest],
            s=14,
            color="tab:gray",
            alpha=0.5,
            label=f"trial ({len(done)} complete)",
        )
        ax.scatter(
            [t.values[i] for t in front],
            [t.values[j] for t in front],
            s=30,
            color="tab:blue",
            label=f"Pareto front ({len(front)})",
            zorder=3,
        )
        if n == 2:  # the staircase bounding what the front dominates: through each pair's inner corner
            worse = [min if d.name == "MAXIMIZE" else max for d in directions]
            pts = sorted((t.values[i], t.values[j]) for t in front)
            line = [pts[0]]
            for a, b in zip(pts, pts[1:]):
                line += [(worse[0](a[0], b[0]), worse[1](a[1], b[1])), b]
            ax.plot([p[0] for p in line], [p[1] for p in line], color="tab:blue", alpha=0.6)
        ax.scatter(
            [pick.values[i]],
            [pick.values[j]],
            marker="*",
            s=220,
            color="tab:orange",
            zorder=4,
            label=f"balanced (trial {pick.number})",
        )
        for t in front:
            ax.annotate(
                str(t.number), (t.values[i], t.values[j]), textcoords="offset points", xytext=(4, 4), fontsize=8
            )
        ax.set_xlabel(f"{names[i]} ({directions[i].name.lower()})")
        ax.set_ylabel(f"{names[j]} ({directions[j].name.lower()})")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(pairs) :]:
        ax.axis("off")
    axes.flat[0].legend(loc="best", fontsize="small")
    fig.tight_layout()
    return fig


def plot_hypervolume(history: list[tuple[int, float]]) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.step([n for n, _ in history], [h for _, h in history], where="post", color="tab:green")
    ax.set_xlabel("trial")
    ax.set_ylabel("hypervolume")
    ax.grid(alpha=0.3)
    return fig


# ---- HTML ---------------------------------------------------------------------------------------


def render_html(
    study: optuna.Study,
    trials: list[FrozenTrial],
    best: FrozenTrial,
    images: dict[str, Path],
    *,
    title: str | None = None,
    importance_note: str | None = None,
    front: list[str] = (),
) -> str:
    """One page with no external references: summary table, best recipe YAML, figures inlined as base64."""
    title = title or f"evomerge report: {study.study_name}"
    esc = html.escape
    body = [f"<h1>{esc(title)}</h1>", "<h2>Summary</h2>", _summary_table(study, trials, best)]
    body += _rescore_section(study)
    body += list(front)
    body += [_img(images[n], alt) for n, alt in _PARETO_FIGURES if n in images]
    body += ["<h2>Best recipe</h2>", f"<pre>{esc(str(best.user_attrs.get('recipe', '(not recorded)')))}</pre>"]
    body += [
        _img(images[name], alt)
        for name, alt in (
            ("fitness.png", "fitness per trial"),
            ("best_recipe.png", "best recipe parameters"),
            ("best_path.png", "best data-flow layer path"),
        )
        if name in images
    ]
    body.append("<h2>Parameter importances</h2>")
    body.append(
        _img(images["importances.png"], "parameter importances") + f"<p>{esc(importance_note or '')}</p>"
        if "importances.png" in images
        else f"<p>Skipped: {esc(importance_note or 'not computed')}.</p>"
    )
    if "config" in study.user_attrs:
        config = redact_url(str(study.user_attrs["config"]))  # a study written before passwords were dropped
        body.append(f"<details><summary>Run config</summary><pre>{esc(config)}</pre></details>")
    return _PAGE.format(title=esc(title), body="\n".join(body))


def _summary_table(study: optuna.Study, trials: list[FrozenTrial], best: FrozenTrial) -> str:
    counts = {s: sum(t.state == s for t in trials) for s in TrialState}
    rows: list[tuple[str, Any]] = [
        ("study", study.study_name),
        ("stage", study.user_attrs.get("stage", "-")),
        ("trials complete", counts[TrialState.COMPLETE]),
        ("trials failed", counts[TrialState.FAIL]),
    ]
    rows += [
        (f"trials {s.name.lower()}", n)
        for s, n in counts.items()
        if n and s not in (TrialState.COMPLETE, TrialState.FAIL)
    ]
    rows += [
        ("items scored", sum(items_scored(t.user_attrs.get("items")) for t in trials)),
        ("tokens generated", sum(tokens_generated(t.user_attrs.get("items")) for t in trials)),
        ("candidates/hour", _fmt(candidates_per_hour(trials))),
    ]
    if len(best.values) == 1:
        rows += [("best fitness", f"{best.value:.6g}"), ("best trial", best.number)]
    else:
        rows += [("balanced member of the front", best.number)]
    rows += [(f"best {k}", _fmt(v)) for k, v in (best.user_attrs.get("metrics") or {}).items()]
    rows += [
        (k.replace("_", " "), _fmt(best.user_attrs[k]))
        for k in ("merge_seconds", "eval_seconds")
        if k in best.user_attrs
    ]
    cells = "\n".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows)
    return f"<table>\n{cells}\n</table>"


def _rescore_section(study: optuna.Study) -> list[str]:
    """The elites' search fitness against their re-scored fitness (on more items), the pick marked."""
    scores = rescored(study)
    if not scores:
        return []
    pick = best_trial(study).number
    ranked = [t for t in best_first(study.get_trials(deepcopy=False)) if t.number in scores]
    rows = "\n".join(
        f"<tr><td>{t.number}{' (pick)' if t.number == pick else ''}</td><td>{t.value:.4f}</td>"
        f"<td>{scores[t.number]['fitness']:.4f}</td><td>{scores[t.number]['items_scored']}</td></tr>"
        for t in ranked
    )
    return [
        "<h2>Elites re-scored</h2>",
        "<p>The best trials by search fitness, scored again on more items; the pick is the best re-score.</p>",
        "<table>\n<tr><th>trial</th><th>search fitness</th><th>re-scored fitness</th><th>items</th></tr>\n"
        f"{rows}\n</table>",
    ]


def _fmt(v: Any) -> str:
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<p><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"></p>'


_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; max-width: 1400px; }}
table {{ border-collapse: collapse; }}
th, td {{ border: 1px solid #ccc; padding: 0.25em 0.75em; text-align: left; }}
pre {{ background: #f6f6f6; padding: 1em; overflow-x: auto; }}
img {{ max-width: 100%; }}
</style>
</head>
<body>
{body}
</body>
</html>
"""
