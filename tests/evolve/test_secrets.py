"""No storage password is written or printed, in any URL form; ${ENV} references are expanded only when used."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import optuna
import pytest
from sqlalchemy.engine import make_url

from evolve.cli import main
from evolve.config import dump_config, load_config, parse_config
from evolve.loop import run_search
from evolve.report import write_report
from evolve.urls import expand_env, has_secret, persisted_url, redact_text, redact_url, secrets_of
from merge_core.errors import EvomergeError
from tests.evolve.fake_run import HashScoreExecutor, config_dict, write_config

# (url, printed form, persisted form, the literal secret it carries or None)
FORMS = [
    (
        "postgresql://evo:s3cret@db.example:5432/evo",
        "postgresql://evo:***@db.example:5432/evo",
        "postgresql://evo@db.example:5432/evo",
        "s3cret",
    ),
    ("postgresql://evo:p@ss@db/evo", "postgresql://evo:***@db/evo", "postgresql://evo@db/evo", "p@ss"),
    ("postgresql://evo:pa:ss@db/evo", "postgresql://evo:***@db/evo", "postgresql://evo@db/evo", "pa:ss"),
    (
        "postgresql://evo:p%40ss%3Aw@db:5432/evo?sslmode=require",
        "postgresql://evo:***@db:5432/evo?sslmode=require",
        "postgresql://evo@db:5432/evo?sslmode=require",
        "p@ss:w",
    ),
    (
        "postgresql+psycopg://evo@db/evo?password=q2w3&application_name=x",
        "postgresql+psycopg://evo@db/evo?password=***&application_name=x",
        "postgresql+psycopg://evo@db/evo?application_name=x",
        "q2w3",
    ),
    (
        "mysql+pymysql://u:a/b@h/d?ssl_key=k&sslpassword=zz9",
        "mysql+pymysql://u:***@h/d?ssl_key=k&sslpassword=***",
        "mysql+pymysql://u@h/d?ssl_key=k",
        "zz9",
    ),
    (
        "sqlite:///runs/x/study.db?password=hunter2",
        "sqlite:///runs/x/study.db?password=***",
        "sqlite:///runs/x/study.db",
        "hunter2",
    ),
    ("postgresql://evo:${EVOMERGE_DB_PASSWORD}@db/evo",) * 3 + (None,),
    ("postgresql://evo@db/evo",) * 3 + (None,),
    ("sqlite:////abs/path/study.db",) * 3 + (None,),
    ("postgresql://db/evo?application_name=a@b",) * 3 + (None,),
]


@pytest.mark.parametrize("url, printed, persisted, secret", FORMS, ids=[f[0][:40] for f in FORMS])
def test_redaction_of_every_url_form(url, printed, persisted, secret):
    assert redact_url(url) == printed
    assert persisted_url(url) == persisted
    assert has_secret(url) == (secret is not None)
    if secret is not None:
        assert secret in secrets_of(url)
        for shown in (redact_url(url), persisted_url(url), redact_url(f"error: cannot open {url} (refused)")):
            assert secret not in shown and (secret.split("@")[-1] not in shown or "@" not in secret)


def test_redaction_in_free_text_and_of_known_secrets():
    text = "OperationalError: connect to postgresql://evo:p@ss@db/evo failed; dsn host=db password=xyz123 port=5432"
    assert redact_url(text) == (
        "OperationalError: connect to postgresql://evo:***@db/evo failed; dsn host=db password=*** port=5432"
    )
    assert (
        redact_text('FATAL: role "evo" rejected s3cretpw', "postgresql://evo:s3cretpw@h/d")
        == 'FATAL: role "evo" rejected ***'
    )


def test_env_references_expand_at_use_and_stay_unexpanded_when_persisted(monkeypatch, tmp_path):
    monkeypatch.setenv("EVOMERGE_DB_PASSWORD", "p@ss:w/rd")
    url = "postgresql://evo:${EVOMERGE_DB_PASSWORD}@db/evo"
    assert make_url(expand_env(url)).password == "p@ss:w/rd"  # escaped, so the driver gets it back whole
    cfg = parse_config({**config_dict(("b", "x", "y"), tmp_path / "run"), "storage": url})
    assert make_url(cfg.storage_url).password == "p@ss:w/rd"
    assert "${EVOMERGE_DB_PASSWORD}" in dump_config(cfg) and "p@ss" not in dump_config(cfg)
    assert "p@ss" not in redact_url(cfg.storage_url)
    monkeypatch.delenv("EVOMERGE_DB_PASSWORD")
    with pytest.raises(EvomergeError, match="environment variable EVOMERGE_DB_PASSWORD is not set"):
        _ = cfg.storage_url


@pytest.mark.filterwarnings("ignore:Query string argument")  # pysqlite ignores ?password=, which suits this test
def test_password_is_nowhere_in_the_run_dir_the_report_the_study_or_the_output(
    tmp_path, tiny_llama_trio, capsys, caplog
):
    secret = "Hunter2-dummy-PW"
    run_dir = tmp_path / "run"
    url = f"sqlite:///{tmp_path / 'study.db'}?password={secret}"
    cfg_path = write_config(tmp_path / "config.yaml", config_dict(tiny_llama_trio, run_dir, storage=url))
    cfg = load_config(cfg_path)
    with caplog.at_level(logging.WARNING):
        run_search(cfg, progress=False, executor_factory=HashScoreExecutor)
    warned = [r.getMessage() for r in caplog.records if "password" in r.getMessage()]
    assert len(warned) == 1 and "not written to" in warned[0] and "PGPASSWORD" in warned[0]
    assert main(["status", str(cfg_path)]) == 0
    assert main(["status", str(run_dir)]) == 0  # the run dir's config (no password) still opens this sqlite study
    study = optuna.load_study(study_name="t", storage=cfg.storage_url)
    write_report(study, run_dir / "report")
    assert (run_dir / "report" / "report.html").is_file()

    printed = capsys.readouterr()
    assert "password=***" in printed.out
    assert secret not in printed.out + printed.err + caplog.text
    for path in run_dir.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path
    assert secret.encode() not in (tmp_path / "study.db").read_bytes()  # every table, every attribute
    attrs = [study.user_attrs, study._storage.get_study_system_attrs(study._study_id)]
    for t in study.get_trials():
        attrs += [t.user_attrs, t.system_attrs]
    assert len(attrs) > 2 and "config" in study.user_attrs
    assert secret not in json.dumps(attrs, default=str)
    assert load_config(run_dir / "config.yaml").storage == f"sqlite:///{tmp_path / 'study.db'}"


@pytest.mark.filterwarnings("ignore:Attempting to set identical")  # a study without parameters: an empty heatmap
def test_report_redacts_a_password_an_older_study_kept(tmp_path):
    study = optuna.create_study(direction="maximize")
    study.set_user_attr("config", "name: old\nstorage: postgresql://evo:OldSecret99@db/evo\n")
    study.add_trial(optuna.trial.create_trial(value=1.0, params={}, distributions={}))
    write_report(study, tmp_path)
    html = (tmp_path / "report.html").read_text()
    assert "OldSecret99" not in html and "postgresql://evo:***@db/evo" in html


def test_a_raw_at_in_a_password_is_refused_before_any_driver_reads_it():
    """SQLAlchemy ends a password at its first raw '@', the redaction at the last: such a URL is refused at config
    load (the message masks the password), and a driver's message quoting a piece of the password is redacted."""
    from evolve.urls import ambiguity

    url = "postgresql://alice:p@ss:SECRET99@127.0.0.1:9/evo"
    assert "percent-encode" in ambiguity(url)
    assert "percent-encode" in ambiguity("postgresql://evo:p@ss@db/evo")
    for fine in (
        "postgresql://evo:p%40ss%3Aw@db:5432/evo",
        "postgresql://evo:pa:ss@db/evo",
        "postgresql://evo:${EVOMERGE_DB_PASSWORD}@db/evo",
        "postgresql://db/evo?application_name=a@b",
        "sqlite:////abs/path/study.db",
    ):
        assert ambiguity(fine) is None, fine
    with pytest.raises(EvomergeError) as err:
        parse_config(config_dict((Path("b"), Path("a"), Path("m")), Path("/tmp/run"), storage=url))
    assert "storage" in str(err.value) and "percent-encode" in str(err.value) and "SECRET99" not in str(err.value)
    quoted = "ValueError: invalid literal for int() with base 10: 'SECRET99@127.0.0.1:9'"
    assert "SECRET99" not in redact_text(quoted, url)
