"""`make mlflow-server`: a team's MLflow tracking server, which lets in only the users it knows when it listens beyond
this machine.

`python -m cvae_pipeline.commands.tracking_server --host H --port P --store URI --artifacts URI [--auth MODE]` checks
what it is given and then becomes `mlflow server`. With `--auth basic` (the default for any address beyond loopback)
it runs MLflow's basic-auth app: every request but /health needs a user's name and password, and users hold
permissions per experiment and model. Its users and permissions live in their own database (`--auth-store`). The
admin's name and password come from MLflow's own environment variables, `MLFLOW_AUTH_ADMIN_USERNAME` (default
`admin`) and `MLFLOW_AUTH_ADMIN_PASSWORD`, needed on the first start only, or from a configuration file that only its
owner may read, named in `MLFLOW_AUTH_CONFIG_PATH`: never from the command line, which `ps` shows to every user. A
server beyond loopback without authentication is refused.
"""

import argparse
import importlib.util
import ipaddress
import os
import secrets
import stat
import sys
from pathlib import Path

from cvae_pipeline.cli import run_stage
from cvae_pipeline.errors import UserInputError
from cvae_pipeline.fileio import write_bytes_atomic
from cvae_pipeline.tracking.store import holds_password, shown

AUTH_MODES = ("auto", "basic", "none")
ADMIN_USERNAME_ENV = "MLFLOW_AUTH_ADMIN_USERNAME"
ADMIN_PASSWORD_ENV = "MLFLOW_AUTH_ADMIN_PASSWORD"
AUTH_CONFIG_ENV = "MLFLOW_AUTH_CONFIG_PATH"
SECRET_KEY_ENV = "MLFLOW_FLASK_SERVER_SECRET_KEY"
JOBS_ENV = "MLFLOW_SERVER_ENABLE_JOB_EXECUTION"


class ServerError(UserInputError):
    exit_code = 2


def is_loopback(host: str) -> bool:
    """Whether only this machine reaches a server that listens on `host`."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name other than localhost: whatever it resolves to, others may reach it


def check_no_password(option: str, uri: str) -> None:
    if holds_password(uri):
        raise ServerError(f"make mlflow-server: {option} holds a password, which ps and the shell's history would "
                          "show; leave it out of the URI and export PGPASSWORD (or use ~/.pgpass)")


def owner_only(path: Path) -> None:
    """Refuse a file of secrets that anyone but its owner may read or write."""
    try:
        mode = path.stat().st_mode
    except OSError as error:
        raise ServerError(f"make mlflow-server: {AUTH_CONFIG_ENV}={path}: cannot read it ({error.strerror})") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ServerError(f"make mlflow-server: {AUTH_CONFIG_ENV}={path} may hold the admin's password, and others "
                          f"can read it (mode {stat.S_IMODE(mode):o}): chmod 600 {path}")


def auth_config(store: str, default_permission: str, cache_seconds: int, path: Path) -> Path:
    """The basic-auth app's configuration: the user's own file (`MLFLOW_AUTH_CONFIG_PATH`, checked), else one written
    to `path` that holds no secret (the admin's password stays in the environment). `cache_seconds`: how long a server
    process trusts a password it verified (0: it verifies every request)."""
    given = os.environ.get(AUTH_CONFIG_ENV)
    if given:
        owner_only(Path(given))
        return Path(given)
    check_no_password("SERVER_AUTH_STORE", store)
    admin = os.environ.get(ADMIN_USERNAME_ENV) or "admin"
    if not os.environ.get(ADMIN_PASSWORD_ENV) and not has_user(store, admin):
        raise ServerError(f"make mlflow-server: {ADMIN_PASSWORD_ENV} is not set, and the users' database "
                          f"(SERVER_AUTH_STORE={store}) holds no admin {admin!r} yet: export it (from a file only "
                          "you read) for the server's first start, which creates the admin")
    write_bytes_atomic(path, (f"[mlflow]\ndefault_permission = {default_permission}\ndatabase_uri = {store}\n"
                              f"admin_username = {admin}\nauth_cache_ttl_seconds = {cache_seconds}\n"
                              "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n").encode())
    return path


def has_user(store: str, username: str) -> bool:
    """Whether the users' database at `store` holds `username`; False also when it does not exist or cannot be read
    (a SQLite file that is not there is not created)."""
    import sqlalchemy

    if store.startswith("sqlite:///") and not Path(store.removeprefix("sqlite:///")).is_file():
        return False
    engine = sqlalchemy.create_engine(store)
    try:
        with engine.connect() as connection:
            found = connection.execute(sqlalchemy.text("SELECT 1 FROM users WHERE username = :name"),
                                       {"name": username}).first()
    except sqlalchemy.exc.SQLAlchemyError:
        return False
    finally:
        engine.dispose()
    return found is not None


def server_command(args: argparse.Namespace) -> tuple[list[str], dict[str, str]]:
    """The `mlflow server` command line and the environment it runs in; ServerError for a setup that must not run."""
    check_no_password("SERVER_STORE", args.store)
    if not args.workers.isdigit() or int(args.workers) < 1:
        raise ServerError(f"make mlflow-server: SERVER_WORKERS must be a positive integer, got {args.workers!r}")
    if not args.auth_cache_seconds.isdigit():
        raise ServerError("make mlflow-server: SERVER_AUTH_CACHE_S must be a whole number of seconds (0: no cache), "
                          f"got {args.auth_cache_seconds!r}")
    auth = args.auth if args.auth != "auto" else ("none" if is_loopback(args.host) else "basic")
    if auth == "none" and not is_loopback(args.host):
        raise ServerError(f"make mlflow-server: SERVER_HOST={args.host} lets other machines reach the server, and "
                          "SERVER_AUTH=none would let anyone who reaches it read, change or delete every run and "
                          f"model: use SERVER_AUTH=basic (set {ADMIN_PASSWORD_ENV}; see docs/team.md), or listen "
                          "on 127.0.0.1 behind a reverse proxy that authenticates")
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", args.store,
               "--artifacts-destination", args.artifacts, "--serve-artifacts", "--host", args.host,
               "--port", str(args.port), "--workers", str(int(args.workers))]
    if args.allowed_hosts:
        command += ["--allowed-hosts", args.allowed_hosts]
    env = dict(os.environ)
    # MLflow's GenAI job runner: off unless asked for, since this project submits no jobs (the Makefile's MLFLOW_JOBS).
    env[JOBS_ENV] = args.jobs
    if auth == "basic":
        if importlib.util.find_spec("flask_wtf") is None:
            raise ServerError("make mlflow-server: SERVER_AUTH=basic needs MLflow's auth extra (Flask-WTF), which "
                              "`make` installs with the lock file; elsewhere: pip install 'cvae-pipeline[team]'")
        command += ["--app-name", "basic-auth"]
        # One file per port: two servers started from one checkout must not read each other's.
        config = args.state / f"basic_auth-{args.port}.ini"
        cache_seconds = int(args.auth_cache_seconds)
        env[AUTH_CONFIG_ENV] = str(auth_config(args.auth_store, args.default_permission, cache_seconds, config))
        # MLflow's CSRF protection of its login forms needs a key; one per start unless the operator keeps one.
        env.setdefault(SECRET_KEY_ENV, secrets.token_hex(32))
    return command, env


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", required=True, help="server processes, each of which loads MLflow")
    parser.add_argument("--store", required=True, help="the backend store URI (runs, params, metrics)")
    parser.add_argument("--artifacts", required=True, help="where the server stores artifacts")
    parser.add_argument("--allowed-hosts", default="", help="host names clients may use, beyond MLflow's default")
    parser.add_argument("--auth", choices=AUTH_MODES, default="auto",
                        help="basic: MLflow's basic-auth app; auto: basic beyond loopback (default)")
    parser.add_argument("--auth-store", required=True, help="the database of users and permissions (--auth basic)")
    parser.add_argument("--default-permission", default="READ", choices=("READ", "EDIT", "MANAGE", "NO_PERMISSIONS"),
                        help="what a user may do with an experiment nobody granted them (default: %(default)s)")
    parser.add_argument("--auth-cache-seconds", default="60",
                        help="how long a server process trusts a password it verified, 0 for never (default: 60)")
    parser.add_argument("--jobs", choices=("true", "false"), default="false",
                        help="run MLflow's job runner for GenAI jobs beside the server (default: %(default)s)")
    parser.add_argument("--state", type=Path, default=Path(".mlflow-server"),
                        help="a folder for the generated auth configuration (default: %(default)s)")
    args = parser.parse_args(argv)
    command, env = server_command(args)
    print(f"make mlflow-server: http://{args.host}:{args.port}, runs in {shown(args.store)}, artifacts in "
          f"{shown(args.artifacts)}, " + ("users and passwords required" if "--app-name" in command
                                          else "no login (loopback only)"), flush=True)
    os.execve(command[0], command, env)


if __name__ == "__main__":
    run_stage("make mlflow-server", main)
