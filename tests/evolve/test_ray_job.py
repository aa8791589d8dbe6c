"""The README's Ray job command, as written, against a real Ray head started with token authentication (Ray 2.60's
default once ~/.ray/auth_token exists): without `RAY_AUTH_MODE=token` in the submitting shell the submission is
refused; with it the job runs `evolve run` on the cluster and its study holds every trial. Slow (a head and a job,
about a minute) and needs `ray[default]` (the `cluster` extra: `ray job submit` talks to the head's dashboard)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml

from tests.evolve.harness import zoo_config_data

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("ray.dashboard") is None, reason="needs ray[default] (cluster extra)"),
]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def head(tmp_path):
    """A Ray head on this machine with token authentication; its dashboard address."""
    token_home = tmp_path / "home"
    (token_home / ".ray").mkdir(parents=True)
    (token_home / ".ray" / "auth_token").write_text("evomerge-test-token-" + "x" * 24)
    env = os.environ | {
        "HOME": str(token_home),
        "RAY_AUTH_MODE": "token",
        "PATH": f"{BIN}:{os.environ['PATH']}",
        "OMP_NUM_THREADS": "1",
    }
    port, dashboard = free_port(), free_port()
    temp = Path("/tmp") / f"rayt{os.getpid()}"
    start = [str(BIN / "ray"), "start", "--head", f"--port={port}", f"--dashboard-port={dashboard}"]
    start += ["--include-dashboard=true", "--num-cpus=2", "--disable-usage-stats", f"--temp-dir={temp}"]
    subprocess.run(start, env=env, check=True, capture_output=True, timeout=180)
    try:
        yield f"http://127.0.0.1:{dashboard}", env
    finally:
        subprocess.run([str(BIN / "ray"), "stop", "--force"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(temp, ignore_errors=True)


def test_the_readmes_job_command_on_a_head_with_token_auth(head, tmp_path):
    address, env = head
    work = tmp_path / "job"
    work.mkdir()
    data = zoo_config_data("ray_job", tmp_path / "run", "random", 6)
    data["execution"] = {"backend": "ray", "workers": 2, "cpus_per_worker": 0.5, "threads": 1}
    data["storage"] = f"sqlite:///{tmp_path / 'study.db'}"  # absolute: the job runs in a copy of `work`
    (work / "ray_job.yaml").write_text(yaml.safe_dump(data))
    submit = [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", "."]
    submit += ["--", "evolve", "run", "ray_job.yaml", "--no-progress", "--no-final-table"]
    without = {k: v for k, v in env.items() if k != "RAY_AUTH_MODE"}
    refused = subprocess.run(submit, cwd=work, env=without, capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0
    assert "authentication" in (refused.stdout + refused.stderr).lower()
    done = subprocess.run(submit, cwd=work, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert "stopped: budget: max_trials reached" in done.stdout
    study = optuna.load_study(study_name="ray_job", storage=data["storage"])
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 6
    assert len({t.user_attrs["worker"] for t in complete}) == 2  # both actors scored candidates
