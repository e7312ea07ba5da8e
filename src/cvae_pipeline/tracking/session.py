"""MLflow: a stage's session with the store, the one place where the project talks to it.

`Session` holds where the store is, a client of it, and the run the stage opened, by id (never MLflow's global active
run). Every exchange goes through `Session.call`, which turns a failure of the store, on a read as on a write, into
the stage's one-line stop (`tracking.required: true`) or offline mode (`false`: writes do nothing, reads find nothing,
the DVC files keep every metric); any other error is a bug in the caller, raised as it is. A server that refuses the
credentials or the permission stops the stage in one line, whatever `tracking.required` says. A server that goes away
mid-stage does not stop it: its writes wait in an `Outbox` until it answers; one still away at the end stops the stage
in one line, and the next `dvc repro` logs what is missing without training again.

Which run a stage logs into is `runs`' decision; where the store is and whether it answers, `store`'s. A run whose
process died is marked KILLED by the next stage that opens the store on the same host. Every write is idempotent: a
metric is logged once per step, a model once per run.
"""

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from cvae_pipeline.config import Params, TrackingParams
from cvae_pipeline.errors import TrackingError
from cvae_pipeline.tracking.outbox import Outbox
from cvae_pipeline.tracking.store import (
    URI_ENV,
    ensure_experiment,
    logged_models_of,
    refusal,
    shorten_retries,
    shown,
    start_run,
    start_system_metrics,
    store_errors,
    store_lock,
    tracking_uri,
    unanswered,
)

log = logging.getLogger(__name__)

Result = TypeVar("Result")


class Session:
    """A stage's session with the MLflow store, made once by the stage and passed down to whatever records its work:
    where the store is, whether it answers (checked once, before any work), and the run the stage opened, which every
    write goes to (from any thread)."""

    def __init__(self, cfg: TrackingParams, uri: str | None = None):
        self.cfg = cfg
        self.uri = uri or tracking_uri()
        self.shown_uri = shown(self.uri)
        self.outbox = Outbox(self.uri)
        self.checked = False
        self.offline = False
        self.run_id: str | None = None  # while `open_run` holds it open
        self._client = None
        self._experiment_id: str | None = None

    def connect(self) -> bool:
        """Check the store, once: that it answers and takes the credentials. One that does not answer raises
        TrackingError when `tracking.required`, else the session goes offline. True when online."""
        if not self.checked:
            shorten_retries(self.uri)
            problem = unanswered(self.uri)
            message = f"MLflow tracking server {self.shown_uri} does not answer ({problem})"
            if problem is not None and self.cfg.required:  # not remembered: the next check tries again
                raise TrackingError(f"{message}: start it or correct {URI_ENV}, or set tracking.required: false "
                                    "in params.yaml to run without MLflow")
            self.checked, self.offline = True, problem is not None
            if problem is not None:
                log.warning("%s; going on without MLflow (tracking.required is false): metrics stay in the DVC "
                            "files", message)
            else:
                self.experiment_id()  # a wrong password or a missing permission stops the stage here, before any work
        return not self.offline

    def disable(self, reason: str) -> None:
        """Log nothing from now on: every call does nothing, and a run is not even opened."""
        log.info("not logging to MLflow: %s", reason)
        self.checked, self.offline = True, True

    @property
    def client(self):
        """An `MlflowClient` of the store, made at first use."""
        if self._client is None:
            import mlflow

            # MLflow's model logging takes no store of its own: it reads the process's, which is this one.
            mlflow.set_tracking_uri(self.uri)
            with store_lock(self.uri):  # the first client of a SQLite store creates its tables
                self._client = mlflow.MlflowClient(self.uri)
        return self._client

    def call(self, action: Callable[[Any], Result], default: Result = None) -> Result:
        """`action(client)`: one exchange with the store. Offline, `default` without calling it. A failure of the store
        stops the stage in one line when tracking is required, else the session goes offline and this returns
        `default`; any other error is a bug in `action`, raised as it is."""
        if not self.connect():
            return default
        try:
            return action(self.client)
        except Exception as error:
            self._failed(error)
            return default

    def _failed(self, error: Exception) -> None:
        if not isinstance(error, store_errors()):
            raise error
        stop = refusal(error, self.uri, self.cfg.experiment)
        if stop is not None:  # credentials are not fixed by going on without MLflow
            raise stop from None
        what = " ".join(f"{type(error).__name__}: {error}".split())
        what = what if len(what) <= 300 else what[:300] + " ..."
        if self.cfg.required:
            raise TrackingError(f"MLflow store {self.shown_uri} failed during the stage ({what}): start it again or "
                                f"correct {URI_ENV}, then rerun; or set tracking.required: false to run without "
                                "MLflow") from error
        log.warning("MLflow failed (%s); going on without it (tracking.required is false)", what)
        self.offline = True

    # --- reads: nothing (None, []) when the store does not know it or the session is offline --------------------

    def experiment_id(self) -> str | None:
        """The id of `tracking.experiment`, created if needed."""
        if self._experiment_id is None:
            self._experiment_id = self.call(lambda client: ensure_experiment(client, self.cfg.experiment, self.uri))
        return self._experiment_id

    def get_run(self, run_id: str):
        """The run with this id, or None: the store does not know it (or it was deleted), or is offline."""
        def get(client):
            from mlflow.exceptions import MlflowException

            try:
                found = client.get_run(run_id)
            except MlflowException as error:
                if error.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                    return None
                raise
            return None if found.info.lifecycle_stage == "deleted" else found

        return self.call(get)

    def search_runs(self, filter_string: str) -> list:
        """The runs of the session's experiment matching an MLflow search filter, newest first."""
        experiment_id = self.experiment_id()
        if experiment_id is None:
            return []
        return self.call(lambda client: list(client.search_runs([experiment_id], filter_string,
                                                                order_by=["attributes.start_time DESC"])), [])

    def logged_models(self, run_id: str, ready: bool = True) -> list:
        """The models that a run logged, newest first: the complete (READY) ones, or (`ready=False`) the others,
        which a process killed while logging left behind."""
        return self.call(lambda client: logged_models_of(client, run_id, ready), [])

    def training_model(self, run_id: str):
        """The model that a training run logged (`.model_id`, `.model_uri`), or None."""
        found = self.logged_models(run_id)
        return found[0] if found else None

    # --- the stage's run -----------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def open_run(self, run_id: str | None = None, run_name: str | None = None, tags: dict[str, str] | None = None,
                 system_metrics: bool = False) -> Iterator:
        """Start (or reopen, by id) the stage's run, which every write of the session goes to until it ends: FINISHED,
        FAILED on an error, KILLED on Ctrl-C, never RUNNING. Yields the run, or None, logging nothing, when offline.
        `system_metrics`: MLflow samples CPU, memory (and GPU) use while it is open (a reopened run continues its
        steps)."""
        if os.environ.pop("MLFLOW_RUN_ID", None):
            log.warning("ignoring MLFLOW_RUN_ID from the environment: the pipeline chooses its own run")
        experiment_id = self.experiment_id()
        run = self.call(lambda client: start_run(client, experiment_id, run_id, run_name, tags or {}))
        if run is None:
            yield None
            return
        self.run_id = run.info.run_id
        monitor = start_system_metrics(self.run_id, self.uri, resumed=run_id is not None) if system_metrics else None
        try:
            yield run
        except KeyboardInterrupt:
            self._end("KILLED", monitor)
            raise
        except BaseException:
            self._end("FAILED", monitor)
            raise
        try:
            self._deliver_or_say(run)
        except BaseException:
            self._end("FAILED", monitor)
            raise
        self._end("FINISHED", monitor)

    def _deliver_or_say(self, run) -> None:
        """The writes that a server away kept, sent if it answers now; else a one-line stop (or, when tracking is not
        required, a warning) saying what the run lacks and how to deliver it."""
        try:
            self.outbox.flush()
        except Exception as error:
            self._failed(error)
        message = self.outbox.lacking(run.info.run_id)
        if message is None:
            return
        if not self.cfg.required:
            log.warning("%s; they stay in the DVC files (tracking.required is false)", message)
            return
        raise TrackingError(f"{message}. The stage's work is done and kept: once the server answers, `dvc repro` "
                            "logs it (train resumes from its checkpoint, without training again)")

    def _end(self, status: str, monitor) -> None:
        run_id, self.run_id = self.run_id, None
        if monitor is not None:
            monitor.finish()
        if not (self.offline or self.outbox.away):  # else the store is gone: the next stage marks the run KILLED
            self.call(lambda client: client.set_terminated(run_id, status))

    def _write(self, what: str, action: Callable[[Any, str], None]) -> None:
        """`action(client, run_id)` on the open run, through the outbox (it must be idempotent: it may be sent again
        after a server came back); nothing when there is no run (offline, or nothing to log to)."""
        run_id = self.run_id
        if run_id is not None and not self.offline:
            try:
                self.outbox.send(what, lambda: action(self.client, run_id))
            except Exception as error:
                self._failed(error)

    # --- writes to the open run ----------------------------------------------------------------------------------

    def log_params(self, params: Params) -> None:
        from mlflow.entities import Param

        self._write("params", lambda client, run_id: client.log_batch(
            run_id, params=[Param(key, value) for key, value in params.flat().items()]))

    def log_missing_epochs(self, history: list[dict]) -> None:
        """The epochs of `history` (rows with an "epoch") that the run does not hold yet, each at its epoch as
        step, in one batched call: the epochs trained while MLflow was away, or between a checkpoint and a kill."""
        def log_missing(client, run_id) -> None:
            from mlflow.entities import Metric

            logged = {metric.step for metric in client.get_metric_history(run_id, "train_loss")}
            metrics = [Metric(key, float(value), now, int(row["epoch"])) for row in history
                       if int(row["epoch"]) not in logged for key, value in row.items() if key != "epoch"]
            if metrics:
                client.log_batch(run_id, metrics=metrics)

        if history:
            now = int(time.time() * 1000)
            epochs = [int(row["epoch"]) for row in history]
            self._write(f"epoch {epochs[0]}" if len(epochs) == 1 else f"epochs {epochs[0]}-{epochs[-1]}", log_missing)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None, tags: dict[str, str] | None = None,
                    once: bool = False, model_id: str | None = None, dataset: tuple[str, str] | None = None,
                    what: str = "metrics") -> None:
        """All of them, and `tags`, in one batched call (one transaction): a kill leaves all or none of them.
        `once`: leave out the metrics that the run already holds (a repeated stage logs no second point).
        `model_id`: they score that logged model, and show on its page; `dataset`: (name, digest) of the data.
        `what`: what they are, for a message that says what a run lacks."""
        now = int(time.time() * 1000)  # the same when sent again: MLflow keeps an identical point once

        def log(client, run_id) -> None:
            from mlflow.entities import Metric, RunTag

            held = client.get_run(run_id).data.metrics if once else {}
            name, digest = dataset or (None, None)
            client.log_batch(run_id, metrics=[Metric(key, float(value), now, step or 0, model_id=model_id,
                                                     dataset_name=name, dataset_digest=digest)
                                              for key, value in metrics.items() if key not in held],
                             tags=[RunTag(key, value) for key, value in (tags or {}).items()])

        self._write(what, log)

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self._write("tags", lambda client, run_id: client.log_batch(
            run_id, tags=[RunTag(key, value) for key, value in tags.items()]))

    def log_artifacts(self, paths: list[Path], folder: str) -> None:
        def log(client, run_id) -> None:
            for path in paths:
                client.log_artifact(run_id, str(path), artifact_path=folder)

        self._write(folder, log)

    def log_inputs(self, inputs: list[tuple[Any, dict[str, str]]], model_id: str | None = None) -> None:
        """Each (dataset, tags) of `inputs` (an `mlflow.entities.Dataset` and its tags) as an input of the run, in one
        write, and of the logged model `model_id` when given."""
        def log(client, run_id) -> None:
            from mlflow.entities import DatasetInput, InputTag, LoggedModelInput

            # MLflow creates a dataset the store has not seen; two sweep workers logging it at once race on a SQLite
            # store (UNIQUE constraint failed: datasets...), so the same lock as the store's first use serializes it.
            with store_lock(self.uri):
                client.log_inputs(run_id, datasets=[DatasetInput(dataset, [InputTag(key, value)
                                                                           for key, value in tags.items()])
                                                    for dataset, tags in inputs],
                                  models=[LoggedModelInput(model_id)] if model_id else None)

        self._write(f"datasets {', '.join(dataset.name for dataset, _ in inputs)}", log)

    def log_model_once(self, log_model: Callable[[Any, str], None]) -> None:
        """Call `log_model(client, run_id)` to log the run's model, unless the run holds one already (a training
        resumed after its model was logged): one model per training. An unfinished one, left by a kill mid-upload, is
        deleted first."""
        def log(client, run_id) -> None:
            if logged_models_of(client, run_id):
                return
            for unfinished in logged_models_of(client, run_id, ready=False):
                client.delete_logged_model(unfinished.model_id)
            log_model(client, run_id)

        self._write("model", log)
