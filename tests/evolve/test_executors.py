"""Executors' guards: no SQLite study in a Ray job's temporary working directory; a one-line fix for Ray's token."""

import json
from pathlib import Path

import pytest
import yaml

from evolve.cli import main
from evolve.config import parse_config
from evolve.executors import RayExecutor, check_ray_job_storage, ray_auth_hint
from merge_core.errors import EvomergeError
from merge_core.recipe import MergeRecipe

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "configs" / "tiny_jp_math.yaml"
# What Ray 2.60's job supervisor gives a submitted entrypoint (job_supervisor.py: RAY_JOB_ID stripped, this set).
JOB_WITH_WORKING_DIR = {
    "RAY_JOB_CONFIG_JSON_ENV_VAR": json.dumps(
        {
            "runtime_env": {"working_dir": "gcs://_ray_pkg_0123abcd.zip"},
            "metadata": {"job_submission_id": "raysubmit_1"},
        }
    )
}
RAY_WORKER = {"RAY_JOB_ID": "01000000"}


def demo_config(**changes):
    data = yaml.safe_load(DEMO.read_text())
    for key in ("models", "evaluation"):  # absolute paths, so the config does not depend on the working directory
        data[key] = json.loads(json.dumps(data[key]).replace('"data/', f'"{ROOT}/data/'))
    data.update(changes)
    return parse_config(data, where="cfg")


def refusal(cfg, environ, cwd) -> str:
    with pytest.raises(EvomergeError) as e:
        check_ray_job_storage(cfg, environ, cwd)
    assert "\n" not in str(e.value)
    return str(e.value)


@pytest.mark.parametrize("environ", [JOB_WITH_WORKING_DIR, RAY_WORKER], ids=["ray-job-submit", "ray-worker"])
def test_relative_sqlite_is_refused_inside_a_ray_job(environ, tmp_path):
    pkg = tmp_path / "session_x" / "runtime_resources" / "working_dir_files" / "_ray_pkg_0123abcd"
    msg = refusal(demo_config(), environ, pkg)  # default: runs/NAME/study.db, relative
    assert msg.startswith(
        "output_dir: inside a Ray job the SQLite study 'runs/tiny_jp_math/study.db' is relative "
        f"to the job's working directory {pkg}"
    )
    assert "postgresql://" in msg and "absolute path on a disk the cluster shares" in msg
    assert refusal(demo_config(output_dir="out/run"), environ, pkg).startswith("output_dir: ")
    assert refusal(demo_config(storage="sqlite:///study.db"), environ, pkg).startswith(
        "storage: inside a Ray job the SQLite study 'study.db' is relative"
    )
    assert "is in memory" in refusal(demo_config(storage="sqlite://"), environ, pkg)
    # an absolute path that is Ray's unpacked package (e.g. made absolute before it got here) is refused too
    assert "inside Ray's session directory" in refusal(demo_config(output_dir=str(pkg / "runs" / "x")), environ, pkg)


def test_absolute_paths_inside_the_jobs_working_dir_are_refused_only_for_an_uploaded_working_dir(tmp_path):
    cwd = tmp_path / "job"
    cfg = demo_config(output_dir=str(cwd / "runs" / "x"))
    assert f"is inside the job's working directory {cwd}" in refusal(cfg, JOB_WITH_WORKING_DIR, cwd)
    check_ray_job_storage(cfg, RAY_WORKER, cwd)  # no uploaded working dir: the path is the user's own disk


def test_what_a_ray_job_may_use(tmp_path):
    cwd = tmp_path / "job"
    for cfg in (
        demo_config(output_dir=str(tmp_path / "shared" / "run")),
        demo_config(storage=f"sqlite:///{tmp_path}/shared/study.db"),
        demo_config(storage="postgresql://evo@db.example/evo"),
    ):
        check_ray_job_storage(cfg, JOB_WITH_WORKING_DIR, cwd)
    # outside a Ray job nothing is refused (the empty variables Ray's supervisor strips count as absent)
    check_ray_job_storage(demo_config(), {"RAY_JOB_ID": "", "RAY_ADDRESS": "127.0.0.1:6379"}, cwd)


def test_evolve_run_in_a_ray_job_stops_before_writing(tmp_path, monkeypatch, capsys):
    """Through the CLI, in-process: exit 2, one line, no run directory created in the job's working directory."""
    for key, value in JOB_WITH_WORKING_DIR.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("evolve.loop.run_stage", lambda *a, **k: pytest.fail("the search started"))
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(demo_config().model_dump(mode="json", exclude_none=True)))
    assert main(["run", str(cfg_path), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: output_dir: inside a Ray job the SQLite study 'runs/tiny_jp_math/study.db'")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cfg.yaml"]


# ---- joining an explicit ray_address with a token set up here (Ray 2.60) -------------------------------------


def test_auth_hint_names_the_token_and_the_fix(tmp_path):
    home = tmp_path / "home"
    assert ray_auth_hint("10.0.0.5:6379", {}, home) is None  # no token: the failure is something else
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("t" * 32)
    hint = ray_auth_hint("10.0.0.5:6379", {}, home)
    assert hint == (
        "execution.ray_address '10.0.0.5:6379': the cluster refused to connect; a Ray auth token is set "
        "up here (~/.ray/auth_token) but RAY_AUTH_MODE is unset, and Ray sends the token to an explicit "
        "address only with RAY_AUTH_MODE=token: run with RAY_AUTH_MODE=token (the cluster's token), or "
        "use ray_address: auto for a cluster started on this machine"
    )
    assert ray_auth_hint("10.0.0.5:6379", {"RAY_AUTH_MODE": "token"}, home) is None  # Ray sends it already
    assert ray_auth_hint("10.0.0.5:6379", {"RAY_AUTH_MODE": "disabled"}, home) is None  # the user chose
    assert ray_auth_hint("auto", {}, home) is None  # Ray enables the token itself for a local cluster
    assert "(RAY_AUTH_TOKEN)" in ray_auth_hint("h:1", {"RAY_AUTH_TOKEN": "x"}, tmp_path / "nohome")
    token = tmp_path / "tok"
    token.write_text("x")
    assert f"({token})" in ray_auth_hint("h:1", {"RAY_AUTH_TOKEN_PATH": str(token)}, tmp_path / "nohome")


def test_ray_executor_turns_a_failed_join_into_the_one_line_fix(tmp_path, monkeypatch):
    ray = pytest.importorskip("ray")
    monkeypatch.setattr(Path, "home", staticmethod(lambda: tmp_path))
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("t" * 32)
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    joined = []

    def refused(**kwargs):  # what ray.init raises after InvalidAuthToken retries (reproduced with ray start --head)
        joined.append(kwargs["address"])
        raise ConnectionError(f"Failed to connect to Ray cluster at {kwargs['address']}")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", refused)
    cfg = demo_config(execution={"backend": "ray", "workers": 2, "device": "cpu", "ray_address": "127.0.0.1:1"})
    template = MergeRecipe.from_yaml("merge_method: linear\nmodels: [{model: a, parameters: {weight: 1.0}}]\n")
    with pytest.raises(
        EvomergeError,
        match=r"^execution.ray_address '127.0.0.1:1': the cluster refused to connect; "
        r"a Ray auth token is set up here \(~/.ray/auth_token\)",
    ):
        RayExecutor(cfg, template)
    (tmp_path / ".ray" / "auth_token").unlink()  # no token: the cause is reported in one line, not a traceback
    with pytest.raises(
        EvomergeError,
        match=r"^execution.ray_address '127.0.0.1:1': cannot join the Ray cluster "
        r"\(Failed to connect to Ray cluster at 127.0.0.1:1\)$",
    ):
        RayExecutor(cfg, template)
    assert joined == ["127.0.0.1:1", "127.0.0.1:1"]
