"""PostgreSQL storage for real: a server from Debian's `postgresql` package, started here in a temp dir on a free port
with a password-protected role; a tiny-zoo search through the CLI is SIGKILLed and resumed with nothing lost, and the
password appears nowhere (run directory, report, output, any study or trial attribute, the whole database dump).
Skipped when the server binaries are absent, except under CI (env CI set), where that is a failure.
Also without a server: a missing driver module is named with its fix."""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from evolve.cli import main
from tests.evolve.harness import evolve_cli, resume, run_killed, zoo_config_data

TRIALS, KILL_AT = 5, 3


def unavailable(why: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(
            f"{why}; CI must run the PostgreSQL test (.ci/run installs Debian's postgresql and evomerge[postgres])"
        )
    pytest.skip(why)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres():
    """(url with the password, the password, pg_dump command): a throwaway server, stopped and deleted afterwards."""
    bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(p.split("/")[-3]))
    if not bins:
        unavailable("PostgreSQL server binaries not found (apt-get install postgresql)")
    try:
        import psycopg
    except ImportError:
        unavailable('psycopg is not installed (pip install "evomerge[postgres]")')
    bindir = Path(bins[-1]).parent
    as_user: list[str] = []
    if os.geteuid() == 0:  # the server refuses to run as root
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            unavailable("running as root and there is no 'postgres' user to run the server as")
        as_user = ["runuser", "-u", "postgres", "--"]
    home = Path(tempfile.mkdtemp(prefix="evomerge-pg-"))  # under /tmp: the server's user must reach it
    data, port = home / "data", free_port()
    if as_user:
        shutil.chown(home, "postgres", "postgres")

    def run(*cmd: str) -> subprocess.CompletedProcess:
        proc = subprocess.run([*as_user, *cmd], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, f"{cmd[0]}: {proc.stdout[-1000:]}{proc.stderr[-1000:]}"
        return proc

    # local socket: trust (setup, pg_dump); TCP: a password (the search's URL)
    run(
        str(bindir / "initdb"),
        "-D",
        str(data),
        "-U",
        "postgres",
        "--auth-local=trust",
        "--auth-host=scram-sha-256",
        "--no-sync",
    )
    run(
        str(bindir / "pg_ctl"),
        "-D",
        str(data),
        "-l",
        str(home / "log"),
        "-w",
        "-t",
        "30",
        "-o",
        f"-p {port} -k {home} -c listen_addresses=127.0.0.1 -c fsync=off",
        "start",
    )
    try:
        password = "evo-" + secrets.token_hex(8)
        with psycopg.connect(host=str(home), port=port, user="postgres", dbname="postgres", autocommit=True) as con:
            con.execute(f"CREATE ROLE evo LOGIN PASSWORD '{password}'")
            con.execute("CREATE DATABASE evo OWNER evo")
        dump = [*as_user, str(bindir / "pg_dump"), "-h", str(home), "-p", str(port), "-U", "postgres", "evo"]
        yield f"postgresql://evo:{password}@127.0.0.1:{port}/evo", password, dump
    finally:
        subprocess.run(
            [*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
            capture_output=True,
            timeout=60,
        )
        shutil.rmtree(home, ignore_errors=True)


def zoo_config(tmp_path: Path, storage: str) -> Path:
    data = zoo_config_data("pg", tmp_path / "run", "cmaes", TRIALS)
    data["storage"] = storage
    for t in data["evaluation"]["tasks"]:
        t.update(limit=20, batch_size=20)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_postgres_search_killed_and_resumed_loses_nothing_and_never_writes_the_password(postgres, tmp_path):
    url, password, dump = postgres
    config = zoo_config(tmp_path, url)
    run_dir = tmp_path / "run"
    killed = run_killed(config, "pg", KILL_AT)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    study = optuna.load_study(study_name="pg", storage=url)
    assert [t.state for t in study.get_trials()] == [TrialState.COMPLETE] * KILL_AT + [TrialState.RUNNING]

    # from the run directory, whose config holds no password: the driver reads it from PGPASSWORD
    resumed = resume(run_dir, env={"PGPASSWORD": password})
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    trials = optuna.load_study(study_name="pg", storage=url).get_trials()
    assert [t.number for t in trials] == list(range(TRIALS))  # nothing lost, nothing added, numbers unchanged
    assert all(t.state == TrialState.COMPLETE for t in trials)  # none left RUNNING, none FAILed
    assert all("rerun_of" not in t.user_attrs for t in trials)

    report = evolve_cli("report", str(run_dir), env={"PGPASSWORD": password})
    assert report.returncode == 0, report.stderr[-2000:]
    assert (run_dir / "report" / "report.html").is_file()

    leaks = [p for p in run_dir.rglob("*") if p.is_file() and password.encode() in p.read_bytes()]
    assert leaks == []
    for proc in (killed, resumed, report):
        assert password not in proc.stdout + proc.stderr
    study = optuna.load_study(study_name="pg", storage=url)
    attrs = [study.user_attrs, study._storage.get_study_system_attrs(study._study_id)]
    attrs += [a for t in trials for a in (t.user_attrs, t.system_attrs)]
    assert password not in repr(attrs)
    everything = subprocess.run(dump, capture_output=True, text=True, timeout=60)
    assert everything.returncode == 0 and "CREATE TABLE public.trials" in everything.stdout
    assert password not in everything.stdout


def test_a_missing_postgres_driver_is_named_with_its_fix(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "psycopg", None)  # `import psycopg` fails as if it were not installed
    config = zoo_config(tmp_path, "postgresql://evo:hunter2-secret@127.0.0.1:1/evo")
    assert main(["run", str(config), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "hunter2-secret" not in err
    assert err.startswith("error: storage postgresql://evo:")
    assert err.endswith(
        """cannot open (the database driver module 'psycopg' is not installed; """
        """pip install "evomerge[postgres]")"""
    ), err
