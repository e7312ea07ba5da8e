"""MLflow: a stage's session with the store (`Session`), opening and ending its run, and what is logged to it.

Which run a stage logs into, and what a run is named and tagged, is `runs`' decision; where the store is and
whether it answers, `store`'s.

Faults: a store that does not answer stops a stage within seconds, before any work (`tracking.required: true`), or
lets it go on without MLflow (`false`; the DVC files keep every metric). A run whose process died (kill -9, power
loss) is marked KILLED by the next stage that opens the store on the same host, so none stays RUNNING forever.
Logging is idempotent where a killed stage may repeat it: a metric is logged once per step, a model once per run.
"""

import contextlib
import dataclasses
import json
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from cvae_pipeline.config import Params, TrackingParams
from cvae_pipeline.errors import TrackingError, UserInputError
from cvae_pipeline.tracking.store import (
    URI_ENV,
    artifact_location,
    store_errors,
    store_lock,
    tracking_uri,
    unanswered,
)

log = logging.getLogger(__name__)

HOST = socket.gethostname()


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


def _mlflow(uri: str):
    import mlflow  # deferred: importing MLflow costs seconds, and params are validated before it

    mlflow.set_tracking_uri(uri)
    return mlflow


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


def ensure_experiment(name: str, uri: str | None = None) -> str:
    """The experiment's id in the store at `uri` (default: `tracking_uri()`), created if needed (tolerating a
    concurrent creation by another stage)."""
    uri = uri or tracking_uri()
    mlflow = _mlflow(uri)
    with store_lock(uri):  # making a client opens the store, which creates its tables the first time
        client = mlflow.MlflowClient()
        try:
            existing = client.get_experiment_by_name(name)
            if existing is not None:
                return existing.experiment_id
            # Opens in the UI's model-training view rather than its GenAI view.
            return client.create_experiment(name, artifact_location=artifact_location(uri),
                                            tags={"mlflow.experimentKind": "custom_model_development"})
        except mlflow.exceptions.MlflowException as error:
            existing = client.get_experiment_by_name(name)
            if existing is None:
                raise UserInputError(f"MLflow at {uri}: cannot create experiment {name!r} ({error})") from None
            return existing.experiment_id


class Session:
    """A stage's session with the MLflow store, made once by the stage and passed down to whatever records its work:
    where the store is, whether it answers (checked once, before any work), and the run the stage opened, which
    every logging call writes to (from any thread). Offline, every call does nothing: when the store does not answer
    or fails during the stage and `tracking.required` is false, or when the stage has nothing to log to."""

    def __init__(self, cfg: TrackingParams):
        self.cfg = cfg
        self.uri = tracking_uri()
        self.checked = False
        self.offline = False
        self.run = None  # while `open_run` holds it open

    def connect(self) -> bool:
        """Check the store, once. One that does not answer raises TrackingError when `tracking.required`, else the
        session goes offline. True when online."""
        if not self.checked:
            problem = unanswered(self.uri)
            message = f"MLflow tracking server {self.uri} does not answer ({problem})"
            if problem is not None and self.cfg.required:  # not remembered: the next check tries again
                raise TrackingError(f"{message}: start it or correct {URI_ENV}, or set tracking.required: false "
                                    "in params.yaml to run without MLflow")
            self.checked, self.offline = True, problem is not None
            if problem is not None:
                log.warning("%s; going on without MLflow (tracking.required is false): metrics stay in the DVC "
                            "files", message)
        return not self.offline

    def disable(self, reason: str) -> None:
        """Log nothing from now on: every logging call does nothing, and a run is not even opened."""
        log.info("not logging to MLflow: %s", reason)
        self.checked, self.offline = True, True

    def store_failed(self, error: Exception) -> None:
        """An exception from a call to the store, in an `except` block. A failure of the store stops the stage in
        one line when tracking is required, else the session goes offline; any other error is a bug, re-raised."""
        if not isinstance(error, store_errors()):
            raise error
        what = " ".join(f"{type(error).__name__}: {error}".split())
        what = what if len(what) <= 300 else what[:300] + " ..."
        if self.cfg.required:
            raise TrackingError(f"MLflow store {self.uri} failed during the stage ({what}): start it again or "
                                f"correct {URI_ENV}, then rerun; or set tracking.required: false to run without "
                                "MLflow") from error
        log.warning("MLflow failed (%s); going on without it (tracking.required is false)", what)
        self.offline = True

    @contextlib.contextmanager
    def open_run(self, run_id: str | None = None, run_name: str | None = None, tags: dict[str, str] | None = None,
                 system_metrics: bool = False) -> Iterator:
        """Start (or reopen, by id) the stage's run; it ends FINISHED, FAILED on an error, KILLED on Ctrl-C, never
        RUNNING. Yields None, and logs nothing, when offline. `system_metrics`: MLflow samples CPU, memory (and GPU)
        use while the run is open (a reopened run continues its steps)."""
        if os.environ.pop("MLFLOW_RUN_ID", None):
            log.warning("ignoring MLFLOW_RUN_ID from the environment: the pipeline chooses its own run")
        if not self.connect():
            yield None
            return
        mlflow = _mlflow(self.uri)
        owner = {"host": HOST, "pid": str(os.getpid())}
        try:
            experiment_id = ensure_experiment(self.cfg.experiment, self.uri)
            client = mlflow.MlflowClient()
            if run_id:  # claimed before it is RUNNING again, so no other stage takes it for a dead process's run
                for key, value in owner.items():
                    client.set_tag(run_id, key, value)
            reap_dead_runs(client, experiment_id)
            self.run = mlflow.start_run(run_id=run_id, experiment_id=None if run_id else experiment_id,
                                        run_name=None if run_id else run_name, tags={**(tags or {}), **owner},
                                        log_system_metrics=system_metrics)
        except UserInputError:
            raise
        except Exception as error:  # the store failed while opening the run: fatal only when tracking is required
            self.store_failed(error)
            yield None
            return
        try:
            yield self.run
        except KeyboardInterrupt:
            self._end_run("KILLED")
            raise
        except BaseException:
            self._end_run("FAILED")
            raise
        self._end_run("FINISHED")

    def _end_run(self, status: str) -> None:
        self.run = None
        if self.offline:
            return  # the store failed during the stage; there is nothing to end
        self.log_with(lambda mlflow: mlflow.end_run(status))

    def log_with(self, action: Callable) -> None:
        """One call to the store (`action(mlflow)`), unless offline; a failure is fatal only when tracking is
        required."""
        if self.offline:
            return
        try:
            action(_mlflow(self.uri))
        except Exception as error:  # any store failure (MLflow's, a connection's): fatal only when required
            self.store_failed(error)

    def get_run(self, run_id: str):
        """The run with this id, or None when the store does not know it (or it was deleted)."""
        mlflow = _mlflow(self.uri)
        try:
            found = mlflow.MlflowClient().get_run(run_id)
        except mlflow.exceptions.MlflowException as error:
            if error.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                return None
            raise
        return None if found.info.lifecycle_stage == "deleted" else found

    def search_runs(self, filter_string: str) -> list:
        """The runs of the session's experiment matching an MLflow search filter, newest first."""
        mlflow = _mlflow(self.uri)
        return mlflow.MlflowClient().search_runs([ensure_experiment(self.cfg.experiment, self.uri)], filter_string,
                                                 order_by=["attributes.start_time DESC"])

    def log_params(self, params: Params) -> None:
        self.log_with(lambda mlflow: mlflow.log_params(flatten(params)))

    def log_missing_epochs(self, history: list[dict]) -> None:
        """The epochs of `history` (rows with an "epoch") that the run does not hold yet, each at its epoch as
        step, in one batched call: the epochs trained while MLflow was away, or between a checkpoint and a kill."""
        def log(mlflow) -> None:
            from mlflow.entities import Metric

            client, run_id = mlflow.MlflowClient(), self.run.info.run_id
            logged = {metric.step for metric in client.get_metric_history(run_id, "train_loss")}
            now = int(time.time() * 1000)
            metrics = [Metric(key, float(value), now, int(row["epoch"])) for row in history
                       if int(row["epoch"]) not in logged for key, value in row.items() if key != "epoch"]
            if metrics:
                client.log_batch(run_id, metrics=metrics)

        if history:
            self.log_with(log)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None, tags: dict[str, str] | None = None,
                    once: bool = False, model_id: str | None = None, dataset: tuple[str, str] | None = None) -> None:
        """All of them, and `tags`, in one batched call (one transaction): a kill leaves all or none of them.
        `once`: leave out the metrics that the run already holds (a repeated stage logs no second point).
        `model_id`: they score that logged model, and show on its page; `dataset`: (name, digest) of the data."""
        def log(mlflow) -> None:
            from mlflow.entities import Metric, RunTag

            client, run_id = mlflow.MlflowClient(), self.run.info.run_id
            held = client.get_run(run_id).data.metrics if once else {}
            now = int(time.time() * 1000)
            name, digest = dataset or (None, None)
            client.log_batch(run_id, metrics=[Metric(key, float(value), now, step or 0, model_id=model_id,
                                                     dataset_name=name, dataset_digest=digest)
                                              for key, value in metrics.items() if key not in held],
                             tags=[RunTag(key, value) for key, value in (tags or {}).items()])

        self.log_with(log)

    def set_tags(self, tags: dict[str, str]) -> None:
        self.log_with(lambda mlflow: mlflow.set_tags(tags))

    def log_artifacts(self, paths: list[Path], folder: str) -> None:
        def log(mlflow) -> None:
            for path in paths:
                mlflow.log_artifact(str(path), artifact_path=folder)

        self.log_with(log)

    def logged_models(self, run_id: str, ready: bool = True) -> list:
        """The models that a run logged, newest first: the complete (READY) ones, or (`ready=False`) the others,
        which a process killed while logging left behind."""
        mlflow = _mlflow(self.uri)
        experiment_id = mlflow.MlflowClient().get_run(run_id).info.experiment_id
        found = mlflow.search_logged_models(experiment_ids=[experiment_id], output_format="list",
                                            filter_string=f"source_run_id = '{run_id}'",
                                            order_by=[{"field_name": "creation_timestamp", "ascending": False}])
        return [model for model in found if str(model.status).endswith("READY") == ready]

    def training_model(self, run_id: str):
        """The model that a training run logged (`.model_id`, `.model_uri`), or None."""
        found = self.logged_models(run_id)
        return found[0] if found else None

    def log_model_once(self, log_model: Callable[[], None]) -> None:
        """Call `log_model` to log the run's model, unless the run holds one already (a training resumed after its
        model was logged): one model per training. An unfinished one, left by a kill mid-upload, is deleted first."""
        def log(mlflow) -> None:
            run_id = self.run.info.run_id
            if self.logged_models(run_id):
                return
            for unfinished in self.logged_models(run_id, ready=False):
                mlflow.MlflowClient().delete_logged_model(unfinished.model_id)
            log_model()

        self.log_with(log)
