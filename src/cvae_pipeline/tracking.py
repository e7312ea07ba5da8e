"""MLflow: one run per pipeline execution shared by the stages, and what is logged to it (the store: `mlflow_store`).

Train creates the run and records its id in a declared output; later stages
reopen that run by id. Runs of DVC experiments are named after them and tagged with their baseline commit and a
sweep id (`tracking.sweep`, else the baseline's short hash), so that one sweep's runs can be found together.

Faults: a store that does not answer stops a stage within seconds, before any work (`tracking.required: true`), or
lets it go on without MLflow (`false`; the DVC files keep every metric). A run whose process died (kill -9, power
loss) is marked KILLED by the next stage that opens the store on the same host, so none stays RUNNING forever.
"""

import contextlib
import dataclasses
import json
import logging
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from cvae_pipeline.config import Params, TrackingParams
from cvae_pipeline.errors import TrackingError, UserInputError
from cvae_pipeline.fileio import write_json_atomic
from cvae_pipeline.mlflow_store import URI_ENV, artifact_location, store_lock, tracking_uri, unanswered

log = logging.getLogger(__name__)

EXPERIMENT_NAME_ENV = "DVC_EXP_NAME"
BASELINE_ENV = "DVC_EXP_BASELINE_REV"
HOST = socket.gethostname()


@dataclasses.dataclass
class _Session:
    """This process's view of the store: checked once, and offline when it does not answer and is not required."""

    checked: str | None = None  # the URI that was checked
    offline: bool = False
    required: bool = True


_session = _Session()


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


def connect(cfg: TrackingParams) -> bool:
    """Check the store once per process, before any work. A store that does not answer raises TrackingError when
    `cfg.required`, else the stage goes on offline (every logging call does nothing). True when online."""
    uri = tracking_uri()
    _session.required = cfg.required
    if _session.checked != uri:
        problem = unanswered(uri)
        message = f"MLflow tracking server {uri} does not answer ({problem})"
        if problem is not None and cfg.required:
            raise TrackingError(f"{message}: start it or correct {URI_ENV}, or set tracking.required: false "
                                "in params.yaml to run without MLflow")
        _session.checked, _session.offline = uri, problem is not None
        if problem is not None:
            log.warning("%s; going on without MLflow (tracking.required is false): metrics stay in the DVC files",
                        message)
    return not _session.offline


def disable(reason: str) -> None:
    """Log nothing to MLflow from this process: every logging call does nothing, and a run is not even opened."""
    log.info("not logging to MLflow: %s", reason)
    _session.checked, _session.offline = tracking_uri(), True


def _go_offline(error: Exception) -> None:
    """A store that failed during a stage: fatal when required, else the rest of the stage runs without it."""
    if _session.required:
        raise error
    log.warning("MLflow failed (%s); going on without it (tracking.required is false)", error)
    _session.offline = True


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


def ensure_experiment(name: str) -> str:
    """The experiment's id, created if needed (tolerating a concurrent creation by another stage)."""
    mlflow = _mlflow()
    with store_lock(tracking_uri()):  # the client's first use creates the store's tables
        return _get_or_create_experiment(mlflow, mlflow.MlflowClient(), name)


def _get_or_create_experiment(mlflow, client, name: str) -> str:
    try:
        existing = client.get_experiment_by_name(name)
        if existing is not None:
            return existing.experiment_id
        # Opens in the UI's model-training view rather than its GenAI view.
        return client.create_experiment(name, artifact_location=artifact_location(tracking_uri()),
                                        tags={"mlflow.experimentKind": "custom_model_development"})
    except mlflow.exceptions.MlflowException as error:
        existing = client.get_experiment_by_name(name)
        if existing is None:
            raise UserInputError(f"MLflow at {tracking_uri()}: cannot create experiment {name!r} ({error})") from None
        return existing.experiment_id


@contextlib.contextmanager
def active_run(cfg: TrackingParams, run_id: str | None = None, run_name: str | None = None,
               tags: dict[str, str] | None = None) -> Iterator:
    """Start (or reopen, by id) a run; it ends FINISHED, FAILED on an error, KILLED on Ctrl-C, never RUNNING.
    Yields None, and logs nothing, when the store does not answer and `cfg.required` is false."""
    if os.environ.pop("MLFLOW_RUN_ID", None):
        log.warning("ignoring MLFLOW_RUN_ID from the environment: the pipeline chooses its own run")
    if not connect(cfg):
        yield None
        return
    mlflow = _mlflow()
    owner = {"host": HOST, "pid": str(os.getpid())}
    try:
        experiment_id = ensure_experiment(cfg.experiment)
        client = mlflow.MlflowClient()
        if run_id:  # claimed before it is RUNNING again, so no other stage takes it for a dead process's run
            for key, value in owner.items():
                client.set_tag(run_id, key, value)
        reap_dead_runs(client, experiment_id)
        run = mlflow.start_run(run_id=run_id, experiment_id=None if run_id else experiment_id,
                               run_name=None if run_id else run_name, tags={**(tags or {}), **owner})
    except UserInputError:
        raise
    except Exception as error:  # the store failed while opening the run: fatal only when tracking is required
        _go_offline(error)
        yield None
        return
    try:
        yield run
    except KeyboardInterrupt:
        _end_run(mlflow, "KILLED")
        raise
    except BaseException:
        _end_run(mlflow, "FAILED")
        raise
    _end_run(mlflow, "FINISHED")


def _end_run(mlflow, status: str) -> None:
    if _session.offline:
        return  # the store failed during the stage; there is nothing to end
    try:
        mlflow.end_run(status)
    except Exception as error:  # any store failure (MLflow's, a connection's): fatal only when tracking is required
        _go_offline(error)


@contextlib.contextmanager
def training_run(cfg: TrackingParams, run_reference: str | Path) -> Iterator:
    """Reopen the run that train recorded in `run_reference`; offline when training ran without MLflow."""
    run_id = read_run_id(run_reference)
    if run_id is None:
        disable(f"{run_reference}: training ran without MLflow; these results stay in the DVC files")
        yield None
        return
    with active_run(cfg, run_id) as run:
        yield run


def _log(action) -> None:
    """One logging call to the active run, unless offline; a failure is fatal only when tracking is required."""
    if _session.offline:
        return
    try:
        action(_mlflow())
    except Exception as error:  # any store failure (MLflow's, a connection's): fatal only when tracking is required
        _go_offline(error)


def log_params(params: Params) -> None:
    _log(lambda mlflow: mlflow.log_params(flatten(params)))


def log_history(history: list[dict]) -> None:
    """Earlier epochs' metrics (rows with an "epoch"), each at its epoch as step, in batched calls."""
    def log(mlflow) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(key, float(value), now, int(row["epoch"]))
                   for row in history for key, value in row.items() if key != "epoch"]
        mlflow.MlflowClient().log_batch(mlflow.active_run().info.run_id, metrics=metrics)

    if history:
        _log(log)


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    """All of them in one batched call."""
    _log(lambda mlflow: mlflow.log_metrics(metrics, step=step))


def log_artifacts(paths: list[Path], folder: str) -> None:
    def log(mlflow) -> None:
        for path in paths:
            mlflow.log_artifact(str(path), artifact_path=folder)

    _log(log)


def log_model(model, example_input, example_output) -> None:
    """The model as an MLflow Keras model with its signature (loading it needs `cvae_pipeline` importable)."""
    from importlib.metadata import version

    import mlflow.keras
    from mlflow.models import infer_signature

    signature = infer_signature(example_input, example_output)
    requirements = [f"{name}=={version(name)}" for name in ("tensorflow", "keras", "numpy")]
    _log(lambda _: mlflow.keras.log_model(model, name="model", signature=signature, pip_requirements=requirements))


def write_run_reference(path: str | Path, run) -> None:
    """The run's ids; nulls when the stage ran without MLflow."""
    write_json_atomic(path, {"run_id": run.info.run_id if run else None,
                             "experiment_id": run.info.experiment_id if run else None})


def read_run_id(path: str | Path) -> str | None:
    try:
        return json.loads(Path(path).read_text())["run_id"]
    except FileNotFoundError:
        raise UserInputError(f"{path}: no MLflow run reference; run `dvc repro train` first") from None
    except (ValueError, KeyError) as error:
        raise UserInputError(f"{path}: not an MLflow run reference ({error!r})") from None
