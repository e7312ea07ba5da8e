"""The stage's MLflow session: how runs open and end, and a store that fails."""

import contextlib
import os
import socket
import subprocess

import mlflow
import pytest
from mlflow.protos import databricks_pb2

from cvae_pipeline.config import TrackingParams
from cvae_pipeline.evaluation.train_outputs import UpstreamOutputs
from cvae_pipeline.tracking import runs as records
from cvae_pipeline.tracking import session as tracking
from cvae_pipeline.tracking.store import HOST
from helpers import params_with

CFG = TrackingParams(experiment="e", sweep=None, required=True)


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    yield tmp_path
    mlflow.set_tracking_uri(None)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def status_of(run_id):
    return mlflow.MlflowClient().get_run(run_id).info.status


def test_experiment_is_created_once_for_model_training_with_artifacts_in_the_main_repository(store, monkeypatch):
    copy = store / ".dvc" / "tmp" / "exps" / "tmp1"  # as `dvc exp run --queue` runs a stage
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)
    first = tracking.Session(CFG.model_copy(update={"experiment": "sweep"})).experiment_id()
    assert tracking.Session(CFG.model_copy(update={"experiment": "sweep"})).experiment_id() == first
    experiment = mlflow.MlflowClient().get_experiment(first)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert experiment.artifact_location.removeprefix("file://").startswith(str(store / "mlruns"))
    assert (store / "mlflow.db").exists() and not (copy / "mlflow.db").exists()


@pytest.mark.reliability
@pytest.mark.parametrize(("raised", "status"), [(None, "FINISHED"), (RuntimeError, "FAILED"),
                                                 (KeyboardInterrupt, "KILLED")])
def test_a_run_never_stays_running(store, raised, status):
    expected = pytest.raises(raised) if raised else contextlib.nullcontext()
    with expected, tracking.Session(CFG).open_run(tags={"k": "v"}) as run:
        run_id = run.info.run_id
        if raised:
            raise raised
    assert status_of(run_id) == status
    assert mlflow.MlflowClient().get_run(run_id).data.tags["k"] == "v"


def test_a_run_reopened_by_id_continues_and_ends_finished(store):
    session = tracking.Session(CFG)
    with pytest.raises(KeyboardInterrupt), session.open_run() as run:
        session.log_metrics({"loss": 2.0}, step=1)
        raise KeyboardInterrupt
    with session.open_run(run_id=run.info.run_id) as again:
        session.log_metrics({"loss": 1.0}, step=2)
    assert again.info.run_id == run.info.run_id
    assert status_of(run.info.run_id) == "FINISHED"
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(1, 2.0), (2, 1.0)]


def test_mlflow_run_id_from_the_environment_is_ignored(store, monkeypatch):
    monkeypatch.setenv("MLFLOW_RUN_ID", "0123456789abcdef")
    with tracking.Session(CFG).open_run() as run:
        assert run.info.run_id != "0123456789abcdef"


def dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


@pytest.mark.reliability
def test_runs_left_running_by_a_dead_process_are_marked_killed(store):
    client = mlflow.MlflowClient()
    experiment_id = tracking.Session(CFG).experiment_id()
    orphan = client.create_run(experiment_id, tags={"host": HOST, "pid": str(dead_pid())})
    alive = client.create_run(experiment_id, tags={"host": HOST, "pid": str(os.getpid())})
    elsewhere = client.create_run(experiment_id, tags={"host": "another-machine", "pid": str(dead_pid())})
    with tracking.Session(CFG).open_run() as run:
        assert run.data.tags["pid"] == str(os.getpid()) and run.data.tags["host"] == HOST
    assert status_of(orphan.info.run_id) == "KILLED"
    assert status_of(alive.info.run_id) == "RUNNING"  # a live process, e.g. another sweep worker
    assert status_of(elsewhere.info.run_id) == "RUNNING"  # its host's own stages will judge it


def closed_port() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{probe.getsockname()[1]}"


@pytest.mark.reliability
def test_a_tracking_server_that_does_not_answer_is_an_error_when_required(store, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", closed_port())
    session = tracking.Session(CFG)
    for _ in range(2):  # and again: a failed check is not remembered as "offline"
        with pytest.raises(tracking.TrackingError, match=r"does not answer .*tracking\.required: false"):
            session.connect()


@pytest.mark.reliability
def test_without_a_required_server_nothing_is_logged_and_nothing_fails(store, monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", closed_port())
    optional = CFG.model_copy(update={"required": False})
    session = tracking.Session(optional)
    with session.open_run() as run:
        assert run is None
        session.log_params(params_with())
        session.log_metrics({"loss": 1.0}, step=1)
        session.log_artifacts([tmp_path / "absent.png"], "figures")
    records.write_run_reference(tmp_path / "run.json", run)
    monkeypatch.delenv("MLFLOW_TRACKING_URI")  # a store that works, but training ran without it
    (tmp_path / "history.csv").write_text("epoch,train_loss,test_elbo,test_reconstruction,test_kl\n1,100,-99,90,9\n")
    (tmp_path / "train.json").write_text('{"epochs": 1}')
    upstream = UpstreamOutputs(tmp_path / "run.json", tmp_path / "history.csv", tmp_path / "train.json")
    session = tracking.Session(CFG)
    with records.stage_run(session, params_with(), "evaluate", upstream) as reopened:
        session.log_metrics({"eval_test_elbo": -80.0})
    assert reopened is None and not list(tmp_path.glob("mlflow.db"))


@pytest.mark.reliability
def test_a_store_that_fails_while_the_run_opens_stops_the_stage_only_when_required(store, monkeypatch):
    def broken(client, name, uri):
        raise ConnectionResetError("the store\nwent away")

    monkeypatch.setattr(tracking, "ensure_experiment", broken)
    with pytest.raises(tracking.TrackingError) as stopped, tracking.Session(CFG).open_run():
        pass
    assert str(stopped.value).startswith(f"MLflow store {tracking.tracking_uri()} failed during the stage "
                                         "(ConnectionResetError: the store went away): ")
    assert "tracking.required: false" in str(stopped.value) and "\n" not in str(stopped.value)
    session = tracking.Session(CFG.model_copy(update={"required": False}))
    with session.open_run() as run:
        assert run is None
        session.log_metrics({"loss": 1.0}, step=1)  # and nothing after it tries the store again


@pytest.mark.parametrize("required", [True, False])
def test_a_bug_in_what_is_logged_is_raised_as_it_is_not_taken_for_a_failed_store(store, monkeypatch, required):
    def buggy(client):
        raise TypeError("a bug in what is logged")

    session = tracking.Session(CFG.model_copy(update={"required": required}))
    with session.open_run() as run:
        with pytest.raises(TypeError, match="a bug"):
            session.call(buggy)
        session.log_metrics({"loss": 1.0}, step=1)  # still online: a bug is not the store's failure
    assert mlflow.MlflowClient().get_run(run.info.run_id).data.metrics == {"loss": 1.0}


@pytest.mark.reliability
def test_a_run_being_reopened_is_claimed_before_it_is_running_so_no_stage_takes_it_for_a_dead_one(store, monkeypatch):
    client = mlflow.MlflowClient()
    previous = client.create_run(tracking.Session(CFG).experiment_id(),
                                 tags={"host": HOST, "pid": str(dead_pid())})
    client.set_terminated(previous.info.run_id, "KILLED")
    owners_at_reopening = []
    update_run = mlflow.MlflowClient.update_run

    def watched_update_run(self, run_id, status=None, **kwargs):  # the moment the run turns RUNNING again
        if status == "RUNNING":
            owners_at_reopening.append(client.get_run(run_id).data.tags["pid"])
        return update_run(self, run_id, status, **kwargs)

    monkeypatch.setattr(mlflow.MlflowClient, "update_run", watched_update_run)
    with tracking.Session(CFG).open_run(run_id=previous.info.run_id):
        pass
    assert owners_at_reopening == [str(os.getpid())]
    assert status_of(previous.info.run_id) == "FINISHED"


def test_the_session_writes_to_its_own_run_and_store_without_mlflows_active_run(store, tmp_path):
    session = tracking.Session(CFG)
    with session.open_run() as run:
        assert mlflow.active_run() is None  # the run is the session's, by id
        mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'elsewhere.db'}")  # someone else's global store
        session.log_metrics({"loss": 1.0}, step=1)
        session.set_tags({"k": "v"})
    mine = mlflow.MlflowClient(session.uri).get_run(run.info.run_id)
    assert mine.data.metrics == {"loss": 1.0} and mine.data.tags["k"] == "v" and mine.info.status == "FINISHED"


@pytest.mark.reliability
@pytest.mark.parametrize("read", ["get_run", "search_runs", "logged_models"])
def test_a_store_that_fails_on_a_read_stops_in_one_line_or_goes_offline(store, monkeypatch, read):
    session = tracking.Session(CFG)
    with session.open_run() as run:
        run_id = run.info.run_id

    def broken(*args, **kwargs):
        raise ConnectionResetError("the store went away")

    for method in ("get_run", "search_runs", "search_logged_models"):
        monkeypatch.setattr(mlflow.MlflowClient, method, broken)
    reads = {"get_run": lambda s: s.get_run(run_id), "search_runs": lambda s: s.search_runs("tags.k = 'v'"),
             "logged_models": lambda s: s.logged_models(run_id)}
    with pytest.raises(tracking.TrackingError, match=r"failed during the stage \(ConnectionResetError: the store went"):
        reads[read](session)
    optional = tracking.Session(CFG.model_copy(update={"required": False}))
    assert reads[read](optional) in (None, []) and optional.offline


REFUSALS = [(databricks_pb2.UNAUTHENTICATED,
             "refused the credentials (HTTP 401): set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"),
            (databricks_pb2.PERMISSION_DENIED,
             "refused reader the permission (HTTP 403) it needs on experiment 'e': ask its admin to grant EDIT")]


@pytest.mark.reliability
@pytest.mark.parametrize("required", [True, False])
@pytest.mark.parametrize(("code", "says"), REFUSALS)
def test_a_server_that_refuses_the_user_stops_in_one_line_whatever_tracking_required_says(store, monkeypatch, code,
                                                                                          says, required):
    from mlflow.exceptions import MlflowException

    def refused(client, name, uri):
        raise MlflowException("API request to endpoint /api/2.0/mlflow/experiments/get-by-name failed with error "
                              "code 401 != 200. Response body: 'You are not authenticated.'", error_code=code)

    monkeypatch.setattr(tracking, "ensure_experiment", refused)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "reader")
    session = tracking.Session(CFG.model_copy(update={"required": required}))
    with pytest.raises(tracking.TrackingError) as stopped:
        session.connect()  # before any work: the stage checks the credentials first
    assert says in str(stopped.value) and "\n" not in str(stopped.value)
