"""Where the MLflow store is, whether it answers, how a server says no, and the store's housekeeping: the experiment,
starting a run, runs left RUNNING by processes that died, a run's logged models and its system metrics.

The default store is SQLite `mlflow.db` at the root of the *main* repository, found by absolute path so that a
stage running in a `dvc exp run --queue/--temp` copy (under `<root>/.dvc/tmp/exps/`) still logs into it.
`MLFLOW_TRACKING_URI` overrides it.
"""

import contextlib
import fcntl
import logging
import os
import re
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from cvae_pipeline.errors import TrackingError, UserInputError

log = logging.getLogger(__name__)

URI_ENV = "MLFLOW_TRACKING_URI"
HOST = socket.gethostname()  # runs are tagged with it: a dead process's runs are judged on their own host
DVC_ROOT_ENV = "DVC_ROOT"  # DVC sets it for every stage; for a queued experiment, to the main repository
_EXPERIMENT_COPY = (".dvc", "tmp", "exps")
PROBE_TIMEOUT = 5.0  # seconds per attempt to reach a tracking server ...
PROBE_ATTEMPTS = 3   # ... so a silent one is given up on in about 15 s


def repository_root(directory: str | Path | None = None) -> Path:
    """The main repository: `DVC_ROOT` when DVC runs the stage, else `directory` (default: the working directory)
    itself or the repository that a DVC experiment copy inside it belongs to."""
    if directory is None and os.environ.get(DVC_ROOT_ENV):
        return Path(os.environ[DVC_ROOT_ENV]).resolve()
    path = Path(directory or os.getcwd()).resolve()
    parts = path.parts
    for index in range(len(parts) - len(_EXPERIMENT_COPY) + 1):
        if parts[index:index + len(_EXPERIMENT_COPY)] == _EXPERIMENT_COPY:
            return Path(*parts[:index])
    return path


def tracking_uri() -> str:
    return os.environ.get(URI_ENV) or f"sqlite:///{repository_root() / 'mlflow.db'}"


def sqlite_file(uri: str) -> Path | None:
    """The database file of a SQLite store URI; None for any other store."""
    return Path(uri.removeprefix("sqlite:///")).resolve() if uri.startswith("sqlite:///") else None


def artifact_location(uri: str) -> str | None:
    """For a SQLite store, `mlruns/` beside the database file. MLflow's own default, `./mlruns` of whichever process
    creates the experiment, could be a DVC experiment copy that is deleted afterwards. A server decides for itself."""
    database = sqlite_file(uri)
    return (database.parent / "mlruns").as_uri() if database else None


@contextlib.contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """Serialize the first touch of a SQLite store across processes: creating its tables and an experiment race
    when two `dvc queue` workers start at once. Servers need no lock."""
    database = sqlite_file(uri)
    if database is None:
        yield
        return
    with open(database.with_name(database.name + ".lock"), "a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)  # released when the file closes
        yield


def store_errors() -> tuple[type[BaseException], ...]:
    """The exceptions by which a store (MLflow's client, its database, its artifact storage) says it failed, as
    opposed to a bug in the code that calls it."""
    from mlflow.exceptions import MlflowException  # deferred, as every import of MLflow

    errors: list[type[BaseException]] = [MlflowException, OSError]  # OSError: requests' errors and files
    with contextlib.suppress(ImportError):
        from sqlalchemy.exc import SQLAlchemyError

        errors.append(SQLAlchemyError)
    with contextlib.suppress(ImportError):  # S3 artifacts (the `team` extra); boto3 wraps some of botocore's
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import BotoCoreError, ClientError

        errors += [Boto3Error, BotoCoreError, ClientError]
    return tuple(errors)


def is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


# libpq reads a password from a URI's user info or its `password=` option; SQLAlchemy takes the first form too.
_PASSWORD_IN_URI = re.compile(r"://[^/@]*:[^/@]*@|[?&]password=")


def holds_password(uri: str) -> bool:
    """Whether a database URI holds a password, which `ps`, the shell's history and logs would show."""
    return bool(_PASSWORD_IN_URI.search(uri))


def shown(uri: str) -> str:
    """The URI as logs and messages show it: without a password that its user info may hold."""
    return re.sub(r"//[^/@]*@", "//***@", uri)


# MLflow's client retries a request to a server for about four minutes by default; a stage whose server went away
# keeps its writes for later instead (`outbox`), and should not stall training meanwhile.
HTTP_RETRIES = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}


def shorten_retries(uri: str) -> None:
    """Fewer and shorter retries of MLflow's client, for a server store, unless the user set their own."""
    if is_server(uri):
        for name, value in HTTP_RETRIES.items():
            os.environ.setdefault(name, value)


def refusal(error: BaseException, uri: str, experiment: str) -> TrackingError | None:
    """The one-line stop for a server that refused the credentials (401) or the permission (403) in `error`; None
    for any other error."""
    code = getattr(error, "error_code", None)
    if code == "UNAUTHENTICATED":
        return TrackingError(f"MLflow server {shown(uri)} refused the credentials (HTTP 401): set "
                             "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to a user of it and that user's "
                             "password (docs/team.md)")
    if code == "PERMISSION_DENIED":
        user = os.environ.get("MLFLOW_TRACKING_USERNAME", "this user")
        return TrackingError(f"MLflow server {shown(uri)} refused {user} the permission (HTTP 403) it needs on "
                             f"experiment {experiment!r}: ask its admin to grant EDIT on it, or set "
                             "tracking.experiment to one of your own (docs/team.md)")
    return None


def unanswered(uri: str, attempts: int = PROBE_ATTEMPTS) -> str | None:
    """Why an HTTP(S) tracking server does not answer, or None when it does (or the store is not a server)."""
    if not is_server(uri):
        return None
    problem = ""
    for _ in range(attempts):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=PROBE_TIMEOUT):
                return None
        except urllib.error.HTTPError as error:
            if error.code < 500:
                return None  # it answered, if not with 200: a server that has no /health
            problem = f"HTTP {error.code} {error.reason}"  # a proxy in front of a server that is down
        except (OSError, ValueError) as error:
            problem = str(getattr(error, "reason", None) or error)
    return problem


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def reap_dead_runs(client, experiment_id: str) -> list[str]:
    """Mark KILLED the runs still RUNNING whose process on this host is gone (a kill -9, a crash). Their ids."""
    runs = client.search_runs([experiment_id], f"attributes.status = 'RUNNING' and tags.host = '{HOST}'")
    dead = [run.info.run_id for run in runs
            if run.data.tags.get("pid", "").isdigit() and not _process_alive(int(run.data.tags["pid"]))]
    for run_id in dead:
        client.set_terminated(run_id, "KILLED")
        log.warning("MLflow run %s was left RUNNING by a process that died: marked KILLED", run_id)
    return dead


def start_run(client, experiment_id: str, run_id: str | None, run_name: str | None, tags: dict[str, str]):
    """A new run with `tags` (plus this process's host and pid, and the source tags MLflow's `start_run` adds), or the
    run `run_id` set RUNNING again: claimed by this process before any dead process's runs are reaped, so no other
    stage takes it for one."""
    from mlflow.entities import RunTag
    from mlflow.tracking.context.registry import resolve_tags

    tags = {**tags, "host": HOST, "pid": str(os.getpid())}
    if run_id:
        client.log_batch(run_id, tags=[RunTag(key, value) for key, value in tags.items()])
    reap_dead_runs(client, experiment_id)
    if run_id:
        client.update_run(run_id, status="RUNNING")
        return client.get_run(run_id)
    return client.create_run(experiment_id, run_name=run_name, tags=resolve_tags(tags))


def ensure_experiment(client, name: str, uri: str) -> str:
    """The experiment's id, created if needed, tolerating a concurrent creation by another stage."""
    from mlflow.exceptions import MlflowException  # deferred: importing MLflow costs seconds

    with store_lock(uri):
        existing = client.get_experiment_by_name(name)
        if existing is not None:
            return existing.experiment_id
        try:
            # Opens in the UI's model-training view rather than its GenAI view.
            return client.create_experiment(name, artifact_location=artifact_location(uri),
                                            tags={"mlflow.experimentKind": "custom_model_development"})
        except MlflowException as error:
            existing = client.get_experiment_by_name(name)
            if existing is None:
                raise UserInputError(f"MLflow at {shown(uri)}: cannot create experiment {name!r} ({error})") from None
            return existing.experiment_id


def logged_models_of(client, run_id: str, ready: bool = True) -> list:
    """The models that a run logged, newest first: the complete (READY) ones, or (`ready=False`) the others."""
    found = client.search_logged_models([client.get_run(run_id).info.experiment_id],
                                        filter_string=f"source_run_id = '{run_id}'",
                                        order_by=[{"field_name": "creation_timestamp", "ascending": False}])
    return [model for model in found if str(model.status).endswith("READY") == ready]


def start_system_metrics(run_id: str, uri: str, resumed: bool):
    """MLflow's sampler of system metrics, logging into the run; None (and a warning) if it cannot start."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    try:
        monitor = SystemMetricsMonitor(run_id, resume_logging=resumed, tracking_uri=uri)
        monitor.start()
    except Exception as error:  # as MLflow's start_run: the run goes on without them
        log.warning("MLflow's system metrics could not start (%s: %s)", type(error).__name__, error)
        return None
    return monitor
