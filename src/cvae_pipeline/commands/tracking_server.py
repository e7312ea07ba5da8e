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
import re
import secrets
import shutil
import stat
import sys
from pathlib import Path

from cvae_pipeline.cli import run_stage
from cvae_pipeline.errors import UserInputError
from cvae_pipeline.fileio import write_bytes_atomic

AUTH_MODES = ("auto", "basic", "none")
ADMIN_PASSWORD_ENV = "MLFLOW_AUTH_ADMIN_PASSWORD"
AUTH_CONFIG_ENV = "MLFLOW_AUTH_CONFIG_PATH"
SECRET_KEY_ENV = "MLFLOW_FLASK_SERVER_SECRET_KEY"
# libpq reads a password from a URI's user info or its `password=` option; SQLAlchemy takes the first form too.
_PASSWORD_IN_URI = re.compile(r"://[^/@]*:[^/@]*@|[?&]password=")


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
    if _PASSWORD_IN_URI.search(uri):
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


def auth_config(store: str, default_permission: str, folder: Path) -> Path:
    """The basic-auth app's configuration: the user's own file (`MLFLOW_AUTH_CONFIG_PATH`, checked), else one written
    into `folder` that holds no secret (the admin's password stays in the environment)."""
    given = os.environ.get(AUTH_CONFIG_ENV)
    if given:
        owner_only(Path(given))
        return Path(given)
    check_no_password("SERVER_AUTH_STORE", store)
    if not os.environ.get(ADMIN_PASSWORD_ENV):
        print(f"make mlflow-server: {ADMIN_PASSWORD_ENV} is not set; that is fine only when {store} already holds "
              "the admin user (MLflow refuses to start otherwise)", file=sys.stderr)
    path = folder / "basic_auth.ini"
    write_bytes_atomic(path, (f"[mlflow]\ndefault_permission = {default_permission}\ndatabase_uri = {store}\n"
                              f"admin_username = {os.environ.get('MLFLOW_AUTH_ADMIN_USERNAME') or 'admin'}\n"
                              "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n").encode())
    return path


def server_command(args: argparse.Namespace) -> tuple[list[str], dict[str, str]]:
    """The `mlflow server` command line and the environment it runs in; ServerError for a setup that must not run."""
    check_no_password("SERVER_STORE", args.store)
    auth = args.auth if args.auth != "auto" else ("none" if is_loopback(args.host) else "basic")
    if auth == "none" and not is_loopback(args.host):
        raise ServerError(f"make mlflow-server: SERVER_HOST={args.host} lets other machines reach the server, and "
                          "SERVER_AUTH=none would let anyone who reaches it read, change or delete every run and "
                          f"model: use SERVER_AUTH=basic (set {ADMIN_PASSWORD_ENV}; see docs/team.md), or listen "
                          "on 127.0.0.1 behind a reverse proxy that authenticates")
    command = [shutil.which("mlflow") or "mlflow", "server", "--backend-store-uri", args.store,
               "--artifacts-destination", args.artifacts, "--serve-artifacts", "--host", args.host,
               "--port", str(args.port)]
    if args.allowed_hosts:
        command += ["--allowed-hosts", args.allowed_hosts]
    env = dict(os.environ)
    if auth == "basic":
        if importlib.util.find_spec("flask_wtf") is None:
            raise ServerError("make mlflow-server: SERVER_AUTH=basic needs MLflow's auth extra (Flask-WTF), which "
                              "`make` installs with the lock file; elsewhere: pip install 'cvae-pipeline[team]'")
        command += ["--app-name", "basic-auth"]
        env[AUTH_CONFIG_ENV] = str(auth_config(args.auth_store, args.default_permission, args.state))
        # MLflow's CSRF protection of its login forms needs a key; one per start unless the operator keeps one.
        env.setdefault(SECRET_KEY_ENV, secrets.token_hex(32))
    return command, env


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--store", required=True, help="the backend store URI (runs, params, metrics)")
    parser.add_argument("--artifacts", required=True, help="where the server stores artifacts")
    parser.add_argument("--allowed-hosts", default="", help="host names clients may use, beyond MLflow's default")
    parser.add_argument("--auth", choices=AUTH_MODES, default="auto",
                        help="basic: MLflow's basic-auth app; auto: basic beyond loopback (default)")
    parser.add_argument("--auth-store", default="", help="the database of users and permissions (--auth basic)")
    parser.add_argument("--default-permission", default="READ", choices=("READ", "EDIT", "MANAGE", "NO_PERMISSIONS"),
                        help="what a user may do with an experiment nobody granted them (default: %(default)s)")
    parser.add_argument("--state", type=Path, default=Path(".mlflow-server"),
                        help="a folder for the generated auth configuration (default: %(default)s)")
    args = parser.parse_args(argv)
    if not args.auth_store:
        args.auth_store = f"sqlite:///{(args.state / 'basic_auth.db').resolve()}"
    command, env = server_command(args)
    sys.stdout.flush()
    os.execve(command[0], command, env)


if __name__ == "__main__":
    run_stage("make mlflow-server", main)
