"""MLflow: where the store is, one run per pipeline execution shared by the stages, and what is logged to it.

The default store is SQLite `mlflow.db` at the root of the *main* repository, found by absolute path so that a
stage running in a `dvc exp run --queue/--temp` copy (under `<root>/.dvc/tmp/exps/`) still logs into it.
`MLFLOW_TRACKING_URI` overrides it. Train creates the run and records its id in a declared output; later stages
reopen that run by id. Runs of DVC experiments are named after them and tagged with their baseline commit and a
sweep id (`tracking.sweep`, else the baseline's short hash), so that one sweep's runs can be found together.
"""

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

from cvae_pipeline.config import Params
from cvae_pipeline.errors import UserInputError
from cvae_pipeline.fileio import write_json_atomic

log = logging.getLogger(__name__)

URI_ENV = "MLFLOW_TRACKING_URI"
EXPERIMENT_NAME_ENV = "DVC_EXP_NAME"
BASELINE_ENV = "DVC_EXP_BASELINE_REV"
DVC_ROOT_ENV = "DVC_ROOT"  # DVC sets it for every stage; for a queued experiment, to the main repository
_EXPERIMENT_COPY = (".dvc", "tmp", "exps")


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


def _sqlite_file(uri: str) -> Path | None:
    """The database file of a SQLite store URI; None for any other store."""
    return Path(uri.removeprefix("sqlite:///")).resolve() if uri.startswith("sqlite:///") else None


def _artifact_location(uri: str) -> str | None:
    """For a SQLite store, `mlruns/` beside the database file. MLflow's own default, `./mlruns` of whichever process
    creates the experiment, could be a DVC experiment copy that is deleted afterwards. A server decides for itself."""
    database = _sqlite_file(uri)
    return (database.parent / "mlruns").as_uri() if database else None


@contextlib.contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """Serialize the first touch of a SQLite store across processes: creating its tables and an experiment race
    when two `dvc queue` workers start at once. Servers need no lock."""
    database = _sqlite_file(uri)
    if database is None:
        yield
        return
    with open(database.with_name(database.name + ".lock"), "a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)  # released when the file closes
        yield


def flatten(params: Params) -> dict[str, str]:
    """`{"train.batch_size": "100", ...}`: every param, by its key path in params.yaml."""
    flat: dict[str, str] = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(f"{prefix}{key}.", inner)
        else:
            # As params.yaml spells them: null, false, [32, 64]; strings bare.
            flat[prefix.rstrip(".")] = value if isinstance(value, str) else json.dumps(value)

    walk("", dataclasses.asdict(params))
    return flat


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def source_tags(params: Params) -> dict[str, str]:
    """Git commit and dirtiness; for a DVC experiment its name, its baseline commit and its sweep."""
    tags = {}
    commit = _git("rev-parse", "HEAD")
    if commit:
        tags["mlflow.source.git.commit"] = commit
        tags["git_dirty"] = str(bool(_git("status", "--porcelain", "--untracked-files=no"))).lower()
    experiment = os.environ.get(EXPERIMENT_NAME_ENV)
    if experiment:
        tags["dvc_experiment"] = experiment
    baseline = os.environ.get(BASELINE_ENV)
    if baseline:
        tags["dvc_baseline"] = baseline
    # A sweep is what the user names it, else every experiment run from the same commit.
    sweep = params.tracking.sweep or (baseline[:7] if baseline else None)
    if sweep:
        tags["sweep"] = sweep
    return tags


def _mlflow():
    import mlflow  # deferred: importing MLflow costs seconds, and params are validated before it

    mlflow.set_tracking_uri(tracking_uri())
    return mlflow


def ensure_experiment(name: str) -> str:
    """The experiment's id, created if needed (tolerating a concurrent creation by another stage)."""
    mlflow = _mlflow()
    with _store_lock(tracking_uri()):  # the client's first use creates the store's tables
        return _get_or_create_experiment(mlflow, mlflow.MlflowClient(), name)


def _get_or_create_experiment(mlflow, client, name: str) -> str:
    try:
        existing = client.get_experiment_by_name(name)
        if existing is not None:
            return existing.experiment_id
        # Opens in the UI's model-training view rather than its GenAI view.
        return client.create_experiment(name, artifact_location=_artifact_location(tracking_uri()),
                                        tags={"mlflow.experimentKind": "custom_model_development"})
    except mlflow.exceptions.MlflowException as error:
        existing = client.get_experiment_by_name(name)
        if existing is None:
            raise UserInputError(f"MLflow at {tracking_uri()}: cannot create experiment {name!r} ({error})") from None
        return existing.experiment_id


@contextlib.contextmanager
def active_run(experiment: str, run_id: str | None = None, run_name: str | None = None,
               tags: dict[str, str] | None = None) -> Iterator:
    """Start (or reopen, by id) a run; it ends FINISHED, FAILED on an error, KILLED on Ctrl-C, never RUNNING."""
    if os.environ.pop("MLFLOW_RUN_ID", None):
        log.warning("ignoring MLFLOW_RUN_ID from the environment: the pipeline chooses its own run")
    experiment_id = ensure_experiment(experiment)
    mlflow = _mlflow()
    run = mlflow.start_run(run_id=run_id, experiment_id=None if run_id else experiment_id,
                           run_name=None if run_id else run_name, tags=tags)
    try:
        yield run
    except KeyboardInterrupt:
        mlflow.end_run("KILLED")
        raise
    except BaseException:
        mlflow.end_run("FAILED")
        raise
    mlflow.end_run("FINISHED")


def log_params(params: Params) -> None:
    _mlflow().log_params(flatten(params))


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    """All of them in one batched call."""
    _mlflow().log_metrics(metrics, step=step)


def log_artifacts(paths: list[Path], folder: str) -> None:
    mlflow = _mlflow()
    for path in paths:
        mlflow.log_artifact(str(path), artifact_path=folder)


def log_model(model, example_input, example_output) -> None:
    """The model as an MLflow Keras model with its signature (loading it needs `cvae_pipeline` importable)."""
    from importlib.metadata import version

    import mlflow.keras
    from mlflow.models import infer_signature

    _mlflow()
    signature = infer_signature(example_input, example_output)
    requirements = [f"{name}=={version(name)}" for name in ("tensorflow", "keras", "numpy")]
    mlflow.keras.log_model(model, name="model", signature=signature, pip_requirements=requirements)


def write_run_reference(path: str | Path, run) -> None:
    write_json_atomic(path, {"run_id": run.info.run_id, "experiment_id": run.info.experiment_id})


def read_run_id(path: str | Path) -> str:
    try:
        return json.loads(Path(path).read_text())["run_id"]
    except FileNotFoundError:
        raise UserInputError(f"{path}: no MLflow run reference; run `dvc repro train` first") from None
    except (ValueError, KeyError) as error:
        raise UserInputError(f"{path}: not an MLflow run reference ({error!r})") from None
