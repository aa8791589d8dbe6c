"""The base's and the sources' held-out scores are computed once per run: the end-of-run table keeps them in the
study and `evolve export` reuses them (at 7B each is a full held-out evaluation), while a change of what they were
scored on scores them again."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

import evolve.baselines as baselines
import evolve.export
from evolve.baselines import MODEL_SCORES_KEY, heldout_table
from evolve.config import parse_config
from evolve.export import export_trial
from evolve.loop import run_search
from evolve.study import load_study
from tests.evolve.test_dashboard import study_detail

ROOT = Path(__file__).resolve().parents[2]


def zoo_config(tmp_path: Path, heldout_limit: int) -> dict:
    cfg = yaml.safe_load((ROOT / "configs" / "tiny_jp_math.yaml").read_text())
    cfg["models"]["base"] = str(ROOT / cfg["models"]["base"])
    cfg["models"]["sources"] = [{**s, "path": str(ROOT / s["path"])} for s in cfg["models"]["sources"]]
    cfg["evaluation"]["tasks"][0].update(task_dir=str(ROOT / cfg["evaluation"]["tasks"][0]["task_dir"]), limit=10)
    cfg["evaluation"]["heldout_limit"] = heldout_limit
    cfg["search"]["budget"]["max_trials"] = 2
    cfg["output_dir"] = str(tmp_path / "run")
    return cfg


def test_sources_are_scored_once_per_run_and_again_when_the_held_out_set_changes(tmp_path, monkeypatch):
    cfg = parse_config(zoo_config(tmp_path, 30))
    run_search(cfg, progress=False)
    scored: list[str] = []
    real = baselines.score_checkpoint

    def counting(cfg_, path, **kwargs):
        scored.append(Path(path).name)
        return real(cfg_, path, **kwargs)

    monkeypatch.setattr(baselines, "score_checkpoint", counting)
    monkeypatch.setattr(evolve.export, "score_checkpoint", counting)  # export scores its merge with it
    table = heldout_table(cfg)
    assert sorted(scored) == ["base", "expert_ja", "expert_math"]
    kept = load_study(cfg).user_attrs[f"{MODEL_SCORES_KEY}source ja"]
    assert kept["metrics"]["ja_sub/acc"] == next(r for r in table if r["model"] == "source ja")["ja_sub/acc"]
    # optuna-dashboard lays the study's user attrs out on its page: none holds a run of text that cannot wrap (the
    # per-item records are system attrs; as user attrs, each was 11-22 KB of unbroken base64 that widened the page)
    shown = study_detail(load_study(cfg))["user_attrs"]
    assert {a["key"] for a in shown} >= {f"{MODEL_SCORES_KEY}{m}" for m in ("base", "source ja", "source math")}
    assert max(len(word) for a in shown for word in a["value"].split()) < 200
    scored.clear()
    again = heldout_table(cfg)
    assert scored == []  # all three from the study
    assert [(r["model"], r["ja_sub/acc"], r["_ci"]) for r in again if r["_kind"] in ("base", "source")] == [
        (r["model"], r["ja_sub/acc"], r["_ci"]) for r in table if r["_kind"] in ("base", "source")
    ]
    export_trial(cfg, load_study(cfg), tmp_path / "export", device="cpu")
    assert scored == [f".export.tmp-{os.getpid()}"]  # the merge itself only (scored before it is moved in place)
    assert (tmp_path / "export" / "README.md").is_file()
    scored.clear()
    fewer = parse_config(zoo_config(tmp_path, 20)).in_run_dir(cfg.run_dir)
    rows = heldout_table(fewer)
    assert sorted(scored) == ["base", "expert_ja", "expert_math"]  # another held-out set: scored again
    assert all(r["_items"]["ja_sub"].n == 20 for r in rows)
    assert load_study(cfg).user_attrs[f"{MODEL_SCORES_KEY}base"]["key"]["limit"] == 20


@pytest.fixture(autouse=True)
def _quiet_hub(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
