"""`make mlflow-server`'s checks: authentication beyond loopback, and no secret on its command line."""

import argparse
import configparser
import os
from pathlib import Path

import pytest

from cvae_pipeline.commands import tracking_server
from cvae_pipeline.commands.tracking_server import ServerError, server_command

ADMIN_PASSWORD = "the-admins-password-42"


def arguments(tmp_path, **given) -> argparse.Namespace:
    values = {"host": "127.0.0.1", "port": 5001, "workers": "4", "store": f"sqlite:///{tmp_path}/s.db",
              "artifacts": str(tmp_path), "allowed_hosts": "", "auth": "auto", "auth_store": f"sqlite:///{tmp_path}/auth.db",
              "default_permission": "READ", "auth_cache_seconds": "60", "jobs": "false", "state": tmp_path / "state"}
    return argparse.Namespace(**{**values, **given})


@pytest.fixture(autouse=True)
def environment(monkeypatch):
    for name in ("MLFLOW_AUTH_CONFIG_PATH", "MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_AUTH_ADMIN_PASSWORD", ADMIN_PASSWORD)


def test_on_loopback_it_is_mlflows_server_with_a_sql_store_and_served_artifacts(tmp_path):
    command, env = server_command(arguments(tmp_path))
    assert command[1:] == ["-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{tmp_path}/s.db",
                           "--artifacts-destination", str(tmp_path), "--serve-artifacts", "--host", "127.0.0.1",
                           "--port", "5001", "--workers", "4"]
    assert "MLFLOW_AUTH_CONFIG_PATH" not in env
    named, _ = server_command(arguments(tmp_path, allowed_hosts="mlflow.internal,mlflow.internal:5000"))
    assert named[-2:] == ["--allowed-hosts", "mlflow.internal,mlflow.internal:5000"]


def test_mlflows_job_runner_is_off_unless_asked_for(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "true")  # MLflow's default, set or not
    assert server_command(arguments(tmp_path))[1]["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    assert server_command(arguments(tmp_path, jobs="true"))[1]["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "true"


def test_the_password_cache_holds_for_the_seconds_given_and_0_turns_it_off(tmp_path):
    for seconds in ("0", "300"):
        _, env = server_command(arguments(tmp_path, host="0.0.0.0", auth_cache_seconds=seconds))
        config = configparser.ConfigParser()
        config.read(env["MLFLOW_AUTH_CONFIG_PATH"])
        assert config["mlflow"]["auth_cache_ttl_seconds"] == seconds
    for bad in ("-1", "1.5", "a minute", ""):
        with pytest.raises(ServerError, match=f"SERVER_AUTH_CACHE_S must be a whole number of seconds .*got '{bad}'"):
            server_command(arguments(tmp_path, auth_cache_seconds=bad))


@pytest.mark.parametrize("workers", ["0", "-1", "two", ""])
def test_a_number_of_workers_that_is_not_a_positive_integer_is_refused(tmp_path, workers):
    with pytest.raises(ServerError, match=f"SERVER_WORKERS must be a positive integer, got '{workers}'"):
        server_command(arguments(tmp_path, workers=workers))


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3", "mlflow.internal", "::"])
def test_beyond_loopback_it_runs_mlflows_basic_auth_app_with_the_password_in_the_environment_only(tmp_path, host):
    command, env = server_command(arguments(tmp_path, host=host))
    assert command[-2:] == ["--app-name", "basic-auth"]
    config = configparser.ConfigParser()
    config.read(env["MLFLOW_AUTH_CONFIG_PATH"])
    assert config["mlflow"]["database_uri"] == f"sqlite:///{tmp_path}/auth.db"
    assert config["mlflow"]["default_permission"] == "READ" and config["mlflow"]["admin_username"] == "admin"
    assert config["mlflow"]["auth_cache_ttl_seconds"] == "60"  # a verified password is trusted this long
    assert ADMIN_PASSWORD not in " ".join(command) + Path(env["MLFLOW_AUTH_CONFIG_PATH"]).read_text()
    assert env["MLFLOW_AUTH_ADMIN_PASSWORD"] == ADMIN_PASSWORD  # MLflow reads it from there
    assert len(env["MLFLOW_FLASK_SERVER_SECRET_KEY"]) >= 32


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.0.7", "mlflow.internal"])
def test_beyond_loopback_without_authentication_it_refuses_saying_why(tmp_path, host):
    with pytest.raises(ServerError, match=rf"SERVER_HOST={host} lets other machines reach the server, and "
                                          "SERVER_AUTH=none would let anyone"):
        server_command(arguments(tmp_path, host=host, auth="none"))
    for loopback in ("127.0.0.1", "localhost", "::1"):
        command, _ = server_command(arguments(tmp_path, host=loopback, auth="none"))
        assert "--app-name" not in command


@pytest.mark.parametrize("option", ["store", "auth_store"])
@pytest.mark.parametrize("uri", ["postgresql://mlflow:secret@db/mlflow", "postgresql://mlflow@db/mlflow?password=x",
                                 "postgresql://mlflow@db/mlflow?sslmode=require&password=x"])
def test_a_password_in_a_store_uri_is_refused(tmp_path, option, uri):
    with pytest.raises(ServerError, match=f"{option.upper()} holds a password"):
        server_command(arguments(tmp_path, host="0.0.0.0", **{option: uri}))


def test_a_configuration_file_of_the_users_own_is_used_only_when_no_one_else_can_read_it(tmp_path, monkeypatch):
    own = tmp_path / "basic_auth.ini"
    own.write_text(f"[mlflow]\ndefault_permission = READ\ndatabase_uri = sqlite:///a.db\nadmin_password = "
                   f"{ADMIN_PASSWORD}\n")
    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", str(own))
    os.chmod(own, 0o644)
    with pytest.raises(ServerError, match=r"others can read it \(mode 644\): chmod 600"):
        server_command(arguments(tmp_path, host="0.0.0.0"))
    os.chmod(own, 0o600)
    _, env = server_command(arguments(tmp_path, host="0.0.0.0"))
    assert env["MLFLOW_AUTH_CONFIG_PATH"] == str(own)


def test_without_mlflows_auth_extra_it_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(tracking_server.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ServerError, match=r"needs MLflow's auth extra"):
        server_command(arguments(tmp_path, host="0.0.0.0"))


def test_without_an_admin_password_it_refuses_unless_the_users_database_holds_the_admin(tmp_path, monkeypatch):
    import sqlite3

    monkeypatch.delenv("MLFLOW_AUTH_ADMIN_PASSWORD")
    with pytest.raises(ServerError, match=r"MLFLOW_AUTH_ADMIN_PASSWORD is not set, and the users' database .* holds "
                                          "no admin 'admin' yet"):
        server_command(arguments(tmp_path, host="0.0.0.0"))
    assert not (tmp_path / "auth.db").exists()  # looked for, not created
    with sqlite3.connect(tmp_path / "auth.db") as database:  # as MLflow's first start leaves it
        database.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, username TEXT, password_hash TEXT)")
        database.execute("INSERT INTO users (username, password_hash) VALUES ('admin', 'x')")
    command, _ = server_command(arguments(tmp_path, host="0.0.0.0"))
    assert command[-2:] == ["--app-name", "basic-auth"]


def test_two_servers_from_one_checkout_each_read_their_own_configuration(tmp_path):
    _, first = server_command(arguments(tmp_path, host="0.0.0.0", port=5001, auth_store="sqlite:///one.db"))
    _, second = server_command(arguments(tmp_path, host="0.0.0.0", port=5002, auth_store="sqlite:///two.db"))
    assert first["MLFLOW_AUTH_CONFIG_PATH"] != second["MLFLOW_AUTH_CONFIG_PATH"]
    assert "one.db" in Path(first["MLFLOW_AUTH_CONFIG_PATH"]).read_text()
