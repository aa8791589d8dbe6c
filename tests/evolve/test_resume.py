"""Resume means the same search: a run killed anywhere (during an ask, an evaluation, the held-out table, by Ctrl-C,
by a failing storage) and resumed ends with the same trials, values and best as the uninterrupted run.

In-process and fast: a fake executor (fitness = a deterministic function of the recipe) replaces the worker, and
a "kill" is a BaseException raised at the chosen point, which leaves the study exactly as SIGKILL would (the trial
RUNNING, nothing rolled back that was committed). The resumed run is a new `run_search` call: new sampler, new
study object, new storage connection. The real-process SIGKILL tests are in test_search.py and
test_dataflow_search.py."""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from evolve.cli import main
from evolve.config import RunConfig, parse_config
from evolve.loop import run_search
from evolve.spaces import build_ps_space
from evolve.worker import Outcome
from tests.evolve.harness import ROOT, zoo_config_data

TRIALS, POPSIZE = 12, 4  # x0, then 11 asked: CMA generations of 4; TPE's 10 random start-up trials, then TPE
SAMPLERS = ["cmaes", "pycma", "tpe", "random", "nsga2", "gp"]
TARGET = [1.7, 0.4, 1.1, 2.2]


class Killed(BaseException):
    """The process dies here (not an Exception: nothing in the loop may catch it, as nothing can catch SIGKILL)."""


@pytest.fixture
def fast_dir():
    """Run directories on tmpfs when there is one: the search commits every attribute, and fsync dominates."""
    base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    path = Path(tempfile.mkdtemp(prefix="evomerge-resume-", dir=base))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def config_data(out: Path, sampler: str, trials: int = TRIALS) -> dict:
    return zoo_config_data("resume", out, sampler, trials, POPSIZE)


def config(out: Path, sampler: str, trials: int = TRIALS) -> RunConfig:
    return parse_config(config_data(out, sampler, trials))


class FakeExecutor:
    """One slot; fitness is a smooth function of the candidate's coordinates, so CMA and TPE have something to
    climb. `kill_at` (trial number -> exception) makes `wait` raise while that trial is being evaluated, once."""

    slots = 1
    kill_at: dict[int, BaseException] = {}
    evaluated: list[int] = []

    def __init__(self, cfg: RunConfig, template) -> None:
        self.space = build_ps_space(cfg)
        self.pending: list = []

    def submit(self, key, recipe) -> None:
        self.pending.append((key, recipe))

    def wait(self):
        key, recipe = self.pending.pop(0)
        if key in FakeExecutor.kill_at:
            raise FakeExecutor.kill_at.pop(key)
        FakeExecutor.evaluated.append(key)
        x = self.space.encode(recipe)
        fitness = 1.0 - sum((v - t) ** 2 for v, t in zip(x, TARGET)) / 10
        return key, Outcome(worker="fake", metrics={"ja_sub/acc": fitness}, fitness=fitness)

    def close(self) -> None:
        self.pending.clear()


@pytest.fixture(autouse=True)
def fake_executor(monkeypatch):
    FakeExecutor.kill_at, FakeExecutor.evaluated = {}, []
    monkeypatch.setitem(run_search.__kwdefaults__, "executor_factory", FakeExecutor)  # also for the CLI's run_search
    return FakeExecutor


def record(cfg: RunConfig) -> tuple[list[tuple], int]:
    """(number, state, params, value) of every trial in order, and the best trial's number."""
    study = optuna.load_study(study_name=cfg.name, storage=cfg.storage_url)
    trials = study.get_trials()
    return [(t.number, t.state, t.params, t.value) for t in trials], study.best_trial.number


_uninterrupted: dict[str, tuple[list[tuple], int]] = {}


def uninterrupted(out: Path, sampler: str) -> tuple[list[tuple], int]:
    if sampler not in _uninterrupted:
        cfg = config(out / f"whole-{sampler}", sampler)
        run_search(cfg, progress=False)
        _uninterrupted[sampler] = record(cfg)
    return _uninterrupted[sampler]


def killing_asks(monkeypatch, points: dict[int, int]) -> None:
    """Die while trial n is being asked, once points[n] of its parameters are stored (each point once)."""
    storage_cls = optuna.storages.RDBStorage
    original = storage_cls._set_trial_param  # where the cached storage commits each parameter
    pending = dict(points)

    def set_trial_param(self, trial_id, *args):
        original(self, trial_id, *args)
        number = self.get_trial_number_from_id(trial_id)
        if pending.get(number) == len(self.get_trial(trial_id).params):
            del pending[number]
            raise Killed(f"killed while asking trial {number}")

    monkeypatch.setattr(storage_cls, "_set_trial_param", set_trial_param)


def run_killed(cfg: RunConfig, killed: list[int]) -> None:
    """Run, die at each point in turn (checking the study is left as SIGKILL leaves it), resume, until done."""
    for number in killed:
        with pytest.raises(Killed):
            run_search(cfg, progress=False)  # each resume is a new sampler, study object and connection
        running = [t.number for t in load(cfg).trials if t.state == TrialState.RUNNING]
        assert running == [number]
    run_search(cfg, progress=False)


def load(cfg: RunConfig) -> optuna.Study:
    return optuna.load_study(study_name=cfg.name, storage=cfg.storage_url)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_killed_during_asks_and_an_evaluation_resumes_into_the_uninterrupted_run(
    sampler, fast_dir, monkeypatch, fake_executor
):
    expected = uninterrupted(fast_dir, sampler)
    assert len(expected[0]) == TRIALS and len({tuple(p.values()) for _, _, p, _ in expected[0]}) >= TRIALS - 2
    assert all(state == TrialState.COMPLETE for _, state, *_ in expected[0])
    # killed while asking x0 (enqueued) after 1 of its 4 parameters; trial 5, the first of CMA's second generation,
    # whose ask tells the first, after 2; trial 10, TPE's first model-based one, after 3; and while evaluating 7
    cfg = config(fast_dir / f"killed-{sampler}", sampler)
    killing_asks(monkeypatch, {0: 1, 5: 2, 10: 3})
    fake_executor.kill_at, fake_executor.evaluated = {7: Killed("killed while evaluating trial 7")}, []
    run_killed(cfg, [0, 5, 7, 10])
    assert record(cfg) == expected
    trials = load(cfg).trials
    assert trials[0].user_attrs["x0"] is True and set(trials[0].params.values()) == {1.0}
    premise = {
        "cmaes": (5, "cma:generation", 1),
        "pycma": (5, "pycma:generation", 1),
        "tpe": (10, "tpe:relative_params:0", None),
    }
    if (
        sampler in premise
    ):  # the killed asks are the ones that matter: CMA's tell (trial 5 opens generation 1), TPE's model
        number, key, value = premise[sampler]
        assert key in trials[number].system_attrs and value in (None, trials[number].system_attrs[key])
        assert trials[number - 1].system_attrs.get(key, 0) != value or value is None
    # every trial evaluated once (the killed ones after a resume), except NSGA-II's repeated candidates, told the cache
    assert fake_executor.evaluated == [t.number for t in trials if "cached_from" not in t.user_attrs]
    assert len(fake_executor.evaluated) >= TRIALS - 2 and 7 in fake_executor.evaluated
    assert not any({"interrupted", "rerun_of"} & set(t.user_attrs) for t in trials)


def write_config(out: Path, sampler: str, trials: int = TRIALS) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "config.src.yaml"
    path.write_text(yaml.safe_dump(config_data(out / "run", sampler, trials)))
    return path


def test_killed_during_the_heldout_table_resumes_to_the_same_record(fast_dir, monkeypatch, capsys):
    import evolve.baselines

    expected = uninterrupted(fast_dir, "cmaes")
    path = write_config(fast_dir / "heldout", "cmaes")

    def dies(cfg):
        raise Killed("killed during the held-out table")

    monkeypatch.setattr(evolve.baselines, "heldout_table", dies)
    with pytest.raises(Killed):
        main(["run", str(path), "--no-progress"])
    cfg = parse_config(config_data(fast_dir / "heldout" / "run", "cmaes"))
    assert record(cfg) == expected
    tables = []
    monkeypatch.setattr(evolve.baselines, "heldout_table", lambda cfg: tables.append(cfg) or [{"model": "m", "x": 1.0}])
    assert main(["resume", str(fast_dir / "heldout" / "run"), "--no-progress"]) == 0
    assert record(cfg) == expected and len(tables) == 1  # nothing re-run; the table is computed now
    assert "budget: max_trials reached (already)" in capsys.readouterr().out


def test_ctrl_c_records_finished_trials_skips_the_table_and_says_how_to_resume(
    fast_dir, monkeypatch, capsys, fake_executor
):
    import evolve.baselines

    expected = uninterrupted(fast_dir, "tpe")
    tables = []
    monkeypatch.setattr(evolve.baselines, "heldout_table", lambda cfg: tables.append(cfg) or [{"model": "m"}])
    path = write_config(fast_dir / "ctrlc", "tpe")
    run_dir = fast_dir / "ctrlc" / "run"
    fake_executor.kill_at = {6: KeyboardInterrupt()}  # what the SIGINT handler raises in the middle of trial 6
    capsys.readouterr()
    assert main(["run", str(path), "--no-progress"]) == 130
    out, err = capsys.readouterr()
    assert tables == [] and "held-out" not in out
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines == [f"interrupted: finished trials are recorded; `evolve resume {run_dir}` continues"]
    assert "Traceback" not in err
    cfg = parse_config(config_data(run_dir, "tpe"))
    partial = [(t.number, t.state, t.params, t.value) for t in load(cfg).trials]
    assert [(n, s) for n, s, *_ in partial] == [(n, TrialState.COMPLETE) for n in range(6)] + [(6, TrialState.RUNNING)]
    assert partial[:6] == expected[0][:6]
    assert main(["resume", str(run_dir), "--no-progress", "--no-final-table"]) == 0
    assert record(cfg) == expected


SECOND_CTRL_C = """
import sys, time
from pathlib import Path
sys.path.insert(0, {root!r})
from evolve.cli import main
from evolve.loop import run_search
from tests.evolve.test_resume import FakeExecutor

class SlowExecutor(FakeExecutor):
    def wait(self):
        Path({marker!r}).write_text("evaluating")
        time.sleep(60)  # a long evaluation: the first Ctrl-C interrupts it

    def close(self):
        Path({marker!r}).write_text("closing")
        time.sleep(60)  # a slow shutdown (Ray actors, a GPU): the second Ctrl-C must not wait for it

run_search.__kwdefaults__["executor_factory"] = SlowExecutor
sys.exit(main(["run", {config!r}, "--no-progress"]))
"""


def test_a_second_ctrl_c_stops_at_once(fast_dir):
    path = write_config(fast_dir / "twice", "random")
    marker = fast_dir / "twice" / "marker"
    script = fast_dir / "twice" / "script.py"
    script.write_text(SECOND_CTRL_C.format(root=str(ROOT), marker=str(marker), config=str(path)))
    proc = subprocess.Popen(
        [sys.executable, str(script)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )

    def wait_for(text: str) -> None:
        deadline = time.monotonic() + 120
        while not (marker.is_file() and marker.read_text() == text):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)

    wait_for("evaluating")
    proc.send_signal(signal.SIGINT)
    wait_for("closing")
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert time.monotonic() - t0 < 10  # not the 60 s the shutdown would take
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "interrupted again: stopped at once"
    with sqlite3.connect(fast_dir / "twice" / "run" / "study.db") as con:  # x0 evaluating, left for resume
        assert con.execute("select number, state from trials").fetchall() == [(0, "RUNNING")]


# ---- the storage failing mid-run ----------------------------------------------------------------


def damage_at(monkeypatch, number: int, damage) -> None:
    """The storage is damaged while trial `number` is evaluated (the evaluation then finishes normally)."""
    original = FakeExecutor.wait

    def wait(self):
        if self.pending[0][0] == number:
            damage()
        return original(self)

    monkeypatch.setattr(FakeExecutor, "wait", wait)


def delete(db: Path):
    return lambda: db.unlink()


def corrupt(db: Path):
    def damage():
        size = db.stat().st_size
        with open(db, "r+b") as f:  # keep the header, garble every page after the first two
            f.seek(8192)
            f.write(bytes(range(256)) * ((size - 8192) // 256 + 1))

    return damage


@pytest.mark.parametrize(
    "kind, cause",
    [
        (
            "deleted",
            "sqlite3.OperationalError: attempt to write a readonly database (the database file was deleted or moved)",
        ),
        ("corrupted", "sqlite3.DatabaseError: database disk image is malformed"),
    ],
)
def test_a_damaged_storage_mid_run_ends_in_one_line_naming_it_and_the_cause(kind, cause, fast_dir, monkeypatch, capsys):
    path = write_config(fast_dir / kind, "cmaes")
    db = fast_dir / kind / "run" / "study.db"
    damage_at(monkeypatch, 5, (delete if kind == "deleted" else corrupt)(db))
    capsys.readouterr()
    assert main(["run", str(path), "--no-progress", "--no-final-table"]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"error: storage sqlite:///{db} failed during the search: {cause}"), lines[0]
    assert "exceeding max length" not in err and "Traceback" not in err


def test_a_transient_storage_failure_stops_cleanly_and_resume_continues_the_trial_in_place(
    fast_dir, monkeypatch, capsys
):
    """A full disk (the double: the real sqlite3 error a full disk raises, at one commit) and then space again."""
    expected = uninterrupted(fast_dir, "cmaes")
    path = write_config(fast_dir / "full", "cmaes")
    storage_cls = optuna.storages.RDBStorage
    original = storage_cls._set_trial_attr_without_commit  # under every user attr write, one by one or batched
    armed = [True]

    def set_trial_attr(self, session, model_cls, trial_id, key, value):
        if armed[0] and key == "metrics" and self.get_trial_number_from_id(trial_id) == 9:
            armed[0] = False
            try:
                raise sqlite3.OperationalError("database or disk is full")
            except sqlite3.OperationalError as e:
                raise optuna.exceptions.StorageInternalError(
                    "An exception is raised during the commit. e.g. exceeding max length."
                ) from e
        return original(self, session, model_cls, trial_id, key, value)

    monkeypatch.setattr(storage_cls, "_set_trial_attr_without_commit", set_trial_attr)
    capsys.readouterr()
    assert main(["run", str(path), "--no-progress", "--no-final-table"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: storage sqlite:///") and "sqlite3.OperationalError: database or disk is full" in err
    assert "\n" not in err and "(the database file" not in err
    assert f"`evolve resume {fast_dir / 'full' / 'run'}` continues" in err
    assert main(["resume", str(fast_dir / "full" / "run"), "--no-progress", "--no-final-table"]) == 0
    assert record(parse_config(config_data(fast_dir / "full" / "run", "cmaes"))) == expected
