"""Real servers for the team tests, each on a free loopback port in a temporary folder: PostgreSQL, an S3-compatible
store (moto in server mode), and `make mlflow-server` on top of both.

PostgreSQL is Debian's, which `.ci/install-test-servers` installs (a test that finds it missing skips, which fails
CI); it refuses to run as root, so it then runs as the unprivileged `postgres` user (else `nobody`).
"""

import contextlib
import glob
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers import REPO, free_port, subprocess_env

START_TIMEOUT_S = 120


def _postgres_bin() -> Path | None:
    found = [shutil.which("pg_ctl"), *sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), reverse=True)]
    return next((Path(path).parent for path in found if path and Path(path).with_name("initdb").exists()), None)


def postgres_bin() -> Path:
    """The folder of initdb and pg_ctl (`.ci/install-test-servers` installs them); skips, which fails CI, when
    missing."""
    found = _postgres_bin()
    if found is None:
        pytest.skip("PostgreSQL's initdb and pg_ctl are not installed: run .ci/install-test-servers (as root), or "
                    "apt-get install postgresql")
    return found


@dataclass(frozen=True)
class Postgres:
    host: str
    port: int
    user: str
    password: str
    database: str

    @property
    def url(self) -> str:
        """The store URI as `make mlflow-server` takes it: no password (libpq reads PGPASSWORD)."""
        return f"postgresql://{self.user}@{self.host}:{self.port}/{self.database}"


def _unprivileged() -> dict:
    """subprocess arguments that run a server program as an ordinary user when we are root."""
    if os.geteuid() != 0:
        return {}
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            entry = pwd.getpwnam(name)
            return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
    pytest.skip("running as root, and neither a `postgres` nor a `nobody` user exists to run PostgreSQL as")


def connect(server: Postgres, database: str | None = None):
    """A psycopg connection to `database` (by default the server's own), as its password-protected user."""
    import psycopg

    return psycopg.connect(host=server.host, port=server.port, user=server.user, password=server.password,
                           dbname=database or server.database, autocommit=True)


@contextlib.contextmanager
def postgres_server() -> Iterator[Postgres]:
    """A fresh PostgreSQL cluster with a password-protected user `mlflow` and an empty database `mlflow`."""
    binaries, as_user = postgres_bin(), _unprivileged()
    folder = Path(tempfile.mkdtemp(prefix="cvae-postgres-"))  # not under pytest's root-only tmp_path
    if as_user:
        os.chown(folder, as_user["user"], as_user["group"])
    server = Postgres("127.0.0.1", free_port(), "mlflow", secrets.token_urlsafe(16), "mlflow")
    password_file = folder / "password"
    password_file.write_text(server.password)
    if as_user:
        os.chown(password_file, as_user["user"], as_user["group"])
    data, log = folder / "data", folder / "server.log"
    options = f"-c listen_addresses={server.host} -c port={server.port} -c unix_socket_directories={folder}"
    env = {**os.environ, "PGPASSWORD": server.password, "LC_ALL": "C"}

    def call(*command: str) -> None:
        done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=folder, timeout=START_TIMEOUT_S,
                              **as_user)
        if done.returncode != 0:
            log_text = log.read_text()[-2000:] if log.exists() else ""
            raise RuntimeError(f"{' '.join(command)} failed:\n{done.stdout}\n{done.stderr}\n{log_text}")

    try:
        call(str(binaries / "initdb"), "-D", str(data), "-U", server.user, "--auth=scram-sha-256",
             f"--pwfile={password_file}", "-E", "UTF8")
        call(str(binaries / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", options, "-w", "start")
        with connect(server, "postgres") as connection:
            connection.execute(f"CREATE DATABASE {server.database}")
        yield server
    finally:
        if (data / "postmaster.pid").exists():
            subprocess.run([str(binaries / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"], capture_output=True,
                           cwd=folder, timeout=START_TIMEOUT_S, **as_user)
        shutil.rmtree(folder, ignore_errors=True)


@dataclass(frozen=True)
class ObjectStore:
    endpoint: str
    bucket: str
    env: dict  # the credentials and endpoint a client of it reads from its environment

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1")

    def keys(self, prefix: str) -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return [item["Key"] for page in pages for item in page.get("Contents", [])]


def wait_for_http(url: str, process: subprocess.Popen, what: str, log: Path) -> None:
    """Until `url` answers (any HTTP status); else an error quoting the server's log (`server_process` stops it)."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline and process.poll() is None:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return  # it answers
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"{what} did not answer on {url} within {START_TIMEOUT_S} s (exit code {process.poll()}):\n"
                       f"{log.read_text(errors='replace')[-3000:]}")


@contextlib.contextmanager
def server_process(command: list[str], **popen) -> Iterator[tuple[subprocess.Popen, Path]]:
    """A server in its own process group, its output in a log file (quoted when it fails to start); stopped after."""
    handle, name = tempfile.mkstemp(prefix="cvae-server-", suffix=".log")
    log = Path(name)
    with os.fdopen(handle, "wb") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, start_new_session=True, **popen)
    try:
        yield process, log
    finally:
        stop(process)
        log.unlink(missing_ok=True)


def group_commands(process: subprocess.Popen) -> list[str]:
    """The command line of every process in the process group that `process` leads (`server_process` starts one)."""
    listed = subprocess.run(["pgrep", "-a", "-g", str(process.pid)], capture_output=True, text=True)
    return [line.split(" ", 1)[1] for line in listed.stdout.splitlines() if " " in line]


def assert_serving_without_job_runner(process: subprocess.Popen) -> None:
    """The server `process` leads runs uvicorn and none of MLflow's job runner (`make ui`, `make mlflow-server`)."""
    serving = group_commands(process)
    assert any("uvicorn" in command for command in serving), serving
    assert not [command for command in serving if "mlflow.server.jobs" in command], serving


def stop(process: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@contextlib.contextmanager
def s3_server() -> Iterator[ObjectStore]:
    """moto's S3-compatible server, with one empty bucket and throwaway credentials."""
    port = free_port()
    store = ObjectStore(f"http://127.0.0.1:{port}", "team-bucket",
                        {"AWS_ACCESS_KEY_ID": "test-key-id", "AWS_SECRET_ACCESS_KEY": secrets.token_urlsafe(16),
                         "AWS_DEFAULT_REGION": "us-east-1"})
    with server_process([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]) as (process, log):
        wait_for_http(store.endpoint, process, "moto's S3 server", log)
        store.client().create_bucket(Bucket=store.bucket)
        yield store


class TrackingServer:
    """`make mlflow-server` on the PostgreSQL store, its artifacts in the bucket, its users in a database of their own
    (MLflow's basic-auth app, its admin's password in the environment); secrets only in its environment. It can be
    stopped and started again on the same port, as an upgrade or a crash would."""

    def __init__(self, database: Postgres, objects: ObjectStore, auth_database: str):
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.admin = {"MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": secrets.token_urlsafe(16)}
        auth_store = f"postgresql://{database.user}@{database.host}:{database.port}/{auth_database}"
        self.command = ["make", "mlflow-server", f"SERVER_PORT={self.port}", f"SERVER_STORE={database.url}",
                        f"SERVER_ARTIFACTS=s3://{objects.bucket}/mlflow-artifacts", "SERVER_AUTH=basic",
                        f"SERVER_AUTH_STORE={auth_store}", "SERVER_WORKERS=2"]  # two, not MLflow's four: 2 cores
        self.env = subprocess_env(PGPASSWORD=database.password, MLFLOW_S3_ENDPOINT_URL=objects.endpoint,
                                  MLFLOW_AUTH_ADMIN_PASSWORD=self.admin["MLFLOW_TRACKING_PASSWORD"], **objects.env)
        self.log = Path(tempfile.mkstemp(prefix="cvae-server-", suffix=".log")[1])
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log, "ab") as output:
            self.process = subprocess.Popen(self.command, cwd=REPO, env=self.env, stdout=output,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        wait_for_http(f"{self.uri}/health", self.process, "make mlflow-server", self.log)

    def stop(self) -> None:
        if self.process is not None:
            stop(self.process)
            self.process = None


@contextlib.contextmanager
def tracking_server(database: Postgres, objects: ObjectStore) -> Iterator[TrackingServer]:
    """A running `TrackingServer`, stopped after."""
    auth_database = f"mlflow_auth_{secrets.token_hex(4)}"
    with connect(database) as connection:
        connection.execute(f"CREATE DATABASE {auth_database}")
    server = TrackingServer(database, objects, auth_database)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        server.log.unlink(missing_ok=True)


def logged_models(uri: str, experiment: str) -> list:
    """The experiment's logged models, asked of the server (the fluent API is the one that searches them)."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    try:
        return mlflow.search_logged_models(experiment_ids=[experiment], output_format="list")
    finally:
        mlflow.set_tracking_uri(None)
        os.environ.pop("MLFLOW_TRACKING_URI", None)  # set_tracking_uri exports it

