"""The team's tracking server for real (`make mlflow-server` on PostgreSQL, artifacts in S3-compatible storage): who it
lets in, and a training that outlives the server's restart.

The tests share one server, each in an experiment of its own (a server for each test would start MLflow's processes
and migrate a fresh database three times over); a test may stop and start it. The pipeline is paused (SIGSTOP) while
it does, so the server is away for the same epochs on any machine.
"""

import os
import re
import signal
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import pytest

from helpers import subprocess_env, write_fake_mnist
from repositories import QUICK_EVALUATION, make_repo_copy, setup_copy
from team_services import TrackingServer, logged_models, postgres_server, s3_server, tracking_server

pytestmark = [pytest.mark.slow, pytest.mark.reliability]


@pytest.fixture(scope="module")
def shared_server():
    """`make mlflow-server` on PostgreSQL and the S3 server, shared by this module's tests."""
    with postgres_server() as database, s3_server() as objects, tracking_server(database, objects) as started:
        yield started


@pytest.fixture
def server(shared_server):
    """The shared server, running (a test that failed while it was stopped leaves it stopped); this process talks to
    it as its admin."""
    if shared_server.process is None:
        shared_server.start()
    saved = dict(os.environ)
    os.environ.update(shared_server.admin)
    try:
        yield shared_server
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _user(server: TrackingServer, name: str, permission: str | None) -> dict[str, str]:
    """A user of the server (created by its admin) holding `permission` on the pipeline's experiment; their
    credentials as a client's environment."""
    from mlflow.server import get_app_client

    password = f"{name}-password-{os.getpid()}"
    admin = get_app_client("basic-auth", tracking_uri=server.uri)
    admin.create_user(name, password)
    if permission:
        client = mlflow.MlflowClient(tracking_uri=server.uri)
        experiment = (client.get_experiment_by_name("cvae-mnist")
                      or client.get_experiment(client.create_experiment("cvae-mnist")))
        admin.grant_user_permission(name, "experiment", experiment.experiment_id, permission)
    return {"MLFLOW_TRACKING_USERNAME": name, "MLFLOW_TRACKING_PASSWORD": password}


def test_the_server_lets_in_only_its_users_and_each_only_as_far_as_their_permission(tmp_path, server):
    uri = server.uri
    with pytest.raises(urllib.error.HTTPError) as anonymous:  # a request without credentials
        urllib.request.urlopen(f"{uri}/api/2.0/mlflow/experiments/search?max_results=1", timeout=30)
    assert anonymous.value.code == 401
    reader = _user(server, "reader", "READ")
    experiment = mlflow.MlflowClient(tracking_uri=uri).get_experiment_by_name("cvae-mnist").experiment_id
    saved = dict(os.environ)
    os.environ.update(reader)
    try:
        client = mlflow.MlflowClient(tracking_uri=uri)
        assert client.get_experiment(experiment).name == "cvae-mnist"  # reading is allowed
        with pytest.raises(mlflow.exceptions.MlflowException) as refused:
            client.create_run(experiment)
        assert refused.value.error_code == "PERMISSION_DENIED"
    finally:
        os.environ.clear()
        os.environ.update(saved)

    repo = make_repo_copy(tmp_path / "repo")
    env = setup_copy(repo, write_fake_mnist(tmp_path), evaluate=QUICK_EVALUATION)
    wrong = {**server.admin, "MLFLOW_TRACKING_PASSWORD": "not-the-password"}
    for credentials, says in ((wrong, "refused the credentials (HTTP 401): set MLFLOW_TRACKING_USERNAME and "
                                      "MLFLOW_TRACKING_PASSWORD"),
                              (reader, "refused reader the permission (HTTP 403) it needs on experiment 'cvae-mnist'"),
                              ({}, "refused the credentials (HTTP 401)")):
        done = subprocess.run(["dvc", "repro", "train"], cwd=repo, env=subprocess_env(**env, **credentials,
                                                                                      MLFLOW_TRACKING_URI=uri),
                              capture_output=True, text=True)
        assert done.returncode != 0 and f"MLflow server {uri} {says}" in done.stderr, done.stderr[-3000:]
        assert "Traceback" not in done.stdout + done.stderr
        assert "epoch 1/" not in done.stderr  # stopped before any training
        if credentials:
            assert credentials["MLFLOW_TRACKING_PASSWORD"] not in done.stdout + done.stderr


def _repro_pausing(repo: Path, env: dict[str, str], actions: dict, *stages: str) -> tuple[int, str]:
    """`dvc repro [stages]` in `repo`; at the first line of its output that holds one of `actions`' keys, the whole
    pipeline is paused (SIGSTOP) while that action runs, then goes on. Its exit status and output."""
    process = subprocess.Popen(["dvc", "repro", *stages], cwd=repo, env=subprocess_env(**env), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines = []
    for line in process.stdout:
        lines.append(line)
        for key in [key for key in actions if key in line]:
            os.killpg(process.pid, signal.SIGSTOP)
            try:
                actions.pop(key)()
            finally:
                os.killpg(process.pid, signal.SIGCONT)
    return process.wait(timeout=600), "".join(lines)


def _complete_run(uri: str, experiment: str, epochs: int, evaluated: bool = True) -> None:
    """The one run of the experiment holds every epoch once, one model, and (`evaluated`) its evaluation and its
    figures."""
    client = mlflow.MlflowClient(tracking_uri=uri)
    (found,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert found.info.status == "FINISHED"
    for metric in ("train_loss", "validation_elbo"):
        assert [m.step for m in client.get_metric_history(found.info.run_id, metric)] == list(range(1, epochs + 1))
    assert len([m for m in logged_models(uri, found.info.experiment_id)
                if m.source_run_id == found.info.run_id]) == 1
    assert "final_validation_elbo" in found.data.metrics
    if evaluated:
        assert {"eval_test_elbo", "eval_validation_iwae"} <= set(found.data.metrics)
        assert len(client.list_artifacts(found.info.run_id, "figures")) >= 5


def test_training_goes_on_while_the_server_restarts_and_the_run_misses_nothing(tmp_path, server):
    repo = make_repo_copy(tmp_path / "repo")
    env = setup_copy(repo, write_fake_mnist(tmp_path), evaluate=QUICK_EVALUATION, train={"epochs": 6},
                     tracking={"experiment": "server-restart"})
    # No retries: a write meets the stopped server at once, whatever the speed of this machine.
    env |= {**server.admin, "MLFLOW_TRACKING_URI": server.uri, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
    status, output = _repro_pausing(repo, env, {"epoch 2/6": server.stop, "epoch 4/6": server.start})
    assert status == 0, output[-3000:]
    assert "went away while logging epoch" in output and "answers again" in output
    _complete_run(server.uri, "server-restart", 6)


def test_a_server_still_away_when_training_ends_gets_what_it_missed_from_the_next_repro(tmp_path, server):
    repo = make_repo_copy(tmp_path / "repo")
    env = setup_copy(repo, write_fake_mnist(tmp_path), train={"epochs": 4}, tracking={"experiment": "server-away"})
    env |= {**server.admin, "MLFLOW_TRACKING_URI": server.uri, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
    status, output = _repro_pausing(repo, env, {"epoch 2/4": server.stop}, "train")
    assert status != 0 and "Traceback" not in output
    (said,) = [line for line in output.splitlines() if "has not come back" in line]
    assert re.search(r"lacks epoch(s)? .*final metrics, model\. .*`dvc repro` logs it", said), said
    server.start()
    status, output = _repro_pausing(repo, env, {}, "train")
    assert status == 0, output[-3000:]
    assert "resuming after epoch 4" in output and "epoch 1/4" not in output  # nothing trained again
    _complete_run(server.uri, "server-away", 4, evaluated=False)
