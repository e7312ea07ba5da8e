"""A team's stack for real: `make mlflow-server` on PostgreSQL with its artifacts in S3-compatible storage (moto), a
DVC remote in the same storage, the pipeline and a parallel sweep against them; and no secret on a command line."""

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest

from cvae_pipeline.model.loading import load_trained, reconstruct
from helpers import (
    REPO,
    commit_all,
    make_repo_copy,
    model_params,
    predict_in_fresh_process,
    queue_states,
    run,
    setup_copy,
    subprocess_env,
    write_fake_mnist,
)
from team_services import connect, postgres_server, s3_server, tracking_server

TINY_EVALUATION = {"iwae_k": 5, "samples": 1}
SWEEP = "model.latent_dim=2,3 tracking.sweep=team"  # 2 experiments, both at once on 2 workers
SWEEP_TIMEOUT_S = 900
VENV = Path(sys.prefix)  # this test's environment, in place of a copy's own .venv/
MAKE_IN_COPY = ["make", "-o", f"{VENV}/.installed", f"VENV={VENV}", "EXTRAS="]


def test_make_mlflow_server_takes_the_passwords_from_the_environment_only():
    secret = "pg-secret-in-env"
    shown = subprocess.run(["make", "-n", "mlflow-server", "SERVER_STORE=postgresql://mlflow@db.internal:5432/mlflow",
                            "SERVER_ARTIFACTS=s3://team-bucket/mlflow-artifacts", "SERVER_HOST=0.0.0.0"], cwd=REPO,
                           capture_output=True, text=True,
                           env={**os.environ, "PGPASSWORD": secret, "AWS_SECRET_ACCESS_KEY": secret,
                                "MLFLOW_AUTH_ADMIN_PASSWORD": secret})
    assert shown.returncode == 0, shown.stderr
    assert "--store 'postgresql://mlflow@db.internal:5432/mlflow'" in shown.stdout
    assert secret not in shown.stdout + shown.stderr
    for store in (f"postgresql://mlflow:{secret}@db/mlflow", f"postgresql://mlflow@db/mlflow?password={secret}",
                  f"postgresql://mlflow@db/mlflow?sslmode=require&password={secret}"):  # libpq reads both forms
        refused = subprocess.run([*MAKE_IN_COPY, "mlflow-server", f"SERVER_STORE={store}"], cwd=REPO,
                                 capture_output=True, text=True)
        assert refused.returncode == 2, store
        assert refused.stderr.startswith("make mlflow-server: SERVER_STORE holds a password"), refused.stderr


def test_the_documented_team_setup_has_no_secret_in_a_command():
    readme = (REPO / "docs" / "team.md").read_text()
    section = readme.split("## Team setup", 1)[1].split("\n## ", 1)[0]
    commands = "\n".join(re.findall(r"```bash\n(.*?)```", section, re.S))
    assert "PGPASSWORD" in commands and "AWS_SECRET_ACCESS_KEY" in commands
    assert "MLFLOW_AUTH_ADMIN_PASSWORD" in commands and "read -rs MLFLOW_TRACKING_PASSWORD" in commands
    assert "postgresql://" in commands and not re.search(r"://[^/@\s]+:[^/@\s]+@", commands), "a password in a URI"
    code = "\n".join(line.split("#", 1)[0] for line in commands.splitlines())  # what runs, not the comments
    secrets = r"(PGPASSWORD|AWS_SECRET_ACCESS_KEY|MLFLOW_TRACKING_PASSWORD|MLFLOW_AUTH_ADMIN_PASSWORD)="
    assert not re.search(secrets + "|secret_access_key|access_key_id", code), code
    assert "dvc remote modify --local team credentialpath" in code  # DVC's keys: a file named in config.local


@pytest.fixture(scope="module")
def stack():
    """PostgreSQL, the S3 server and `make mlflow-server` on both, shared by this module's end-to-end tests; this
    process talks to it as its admin."""
    saved = {name: os.environ.get(name) for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}
    with postgres_server() as database, s3_server() as objects, tracking_server(database, objects) as server:
        os.environ.update(server.admin)
        try:
            yield {"database": database, "objects": objects, "uri": server.uri, "server": server,
                   "admin": server.admin}
        finally:
            for name, value in saved.items():
                os.environ.pop(name, None) if value is None else os.environ.update({name: value})


def _succeeds(command: list[str], cwd: Path, timeout: float | None = None, **env: str) -> str:
    done = subprocess.run(command, cwd=cwd, env=subprocess_env(**env), capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, f"{' '.join(command)}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout + done.stderr


def _s3_remote(repo: Path, objects) -> None:
    """The copy's default DVC remote in the bucket: its address in Git; its keys in a file beside the copy, named in
    .dvc/config.local only."""
    _succeeds(["dvc", "remote", "add", "-d", "team", f"s3://{objects.bucket}/dvc-storage"], repo)
    _succeeds(["dvc", "remote", "modify", "team", "endpointurl", objects.endpoint], repo)
    credentials = repo.parent / "team-bucket-credentials"
    credentials.write_text(f"[default]\naws_access_key_id = {objects.env['AWS_ACCESS_KEY_ID']}\n"
                           f"aws_secret_access_key = {objects.env['AWS_SECRET_ACCESS_KEY']}\n")
    _succeeds(["dvc", "remote", "modify", "--local", "team", "credentialpath", str(credentials)], repo)


def _runs_in_postgres(database) -> list[tuple[str, str]]:
    """(name, status) of every run, read from the database itself: the server stored them there."""
    with connect(database) as connection:
        return connection.execute("SELECT name, status FROM runs ORDER BY start_time").fetchall()


def _logged_models(uri: str, experiment: str) -> list:
    """The experiment's logged models, asked of the server (the fluent API is the one that searches them)."""
    mlflow.set_tracking_uri(uri)
    try:
        return mlflow.search_logged_models(experiment_ids=[experiment], output_format="list")
    finally:
        mlflow.set_tracking_uri(None)
        os.environ.pop("MLFLOW_TRACKING_URI", None)  # set_tracking_uri exports it


@pytest.mark.slow
def test_repro_push_clone_pull_on_postgres_and_s3(tmp_path, stack):
    objects, uri = stack["objects"], stack["uri"]
    repo = make_repo_copy(tmp_path / "repo")
    env = setup_copy(repo, write_fake_mnist(tmp_path), evaluate=TINY_EVALUATION)
    _s3_remote(repo, objects)
    output = _succeeds([*MAKE_IN_COPY, "repro"], repo, **env, **stack["admin"], MLFLOW_TRACKING_URI=uri)
    commit_all(repo, "trained, with an S3 remote")
    committed = subprocess.run(["git", "grep", "-I", "-l", objects.env["AWS_SECRET_ACCESS_KEY"]], cwd=repo,
                               capture_output=True, text=True)
    assert committed.stdout == "" and not (repo / "mlflow.db").exists()

    client = mlflow.MlflowClient(tracking_uri=uri)  # all of it over HTTP
    experiment = client.get_experiment_by_name("cvae-mnist").experiment_id
    (found,) = client.search_runs([experiment])
    assert (found.info.run_name, found.info.status) in _runs_in_postgres(stack["database"])
    assert found.data.params["train.epochs"] == "2" and found.data.params["model.latent_dim"] == "2"
    assert [m.step for m in client.get_metric_history(found.info.run_id, "validation_elbo")] == [1, 2]
    assert found.data.metrics["eval_test_iwae"] >= found.data.metrics["eval_test_elbo"]
    figure = client.download_artifacts(found.info.run_id, "figures/reconstructions.png", str(tmp_path))
    assert Path(figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    password = stack["admin"]["MLFLOW_TRACKING_PASSWORD"]
    recorded = [{**run.data.tags, **run.data.params} for run in client.search_runs([experiment])]
    assert all(password not in value for values in recorded for value in values.values())
    assert password not in output + stack["server"].log.read_text(errors="replace")
    stored = objects.keys("mlflow-artifacts/")
    assert any(key.endswith("figures/reconstructions.png") for key in stored)  # in the bucket, by the server
    assert any(key.endswith("MLmodel") for key in stored)

    _succeeds(["dvc", "push"], repo)
    assert objects.keys("dvc-storage/")
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(repo), str(clone)], check=True)
    assert not (clone / ".dvc/config.local").exists()  # a teammate brings their own keys: here, in the environment
    _succeeds(["dvc", "pull"], clone, **objects.env)
    assert "Data and pipelines are up to date" in _succeeds(["dvc", "status"], clone)
    for output in ("models/cvae.keras", "data/prepared/mnist.npz", "reports/metrics.json"):
        assert (clone / output).read_bytes() == (repo / output).read_bytes(), output

    (logged,) = _logged_models(uri, experiment)
    images = np.random.default_rng(0).integers(0, 2, (2, 28, 28, 1)).astype(np.float32)
    served = predict_in_fresh_process(uri, logged.model_uri, images, tmp_path, **stack["admin"])
    pulled = load_trained(clone / "models/cvae.keras", model_params(2))
    np.testing.assert_allclose(served, reconstruct(pulled, images), rtol=1e-4, atol=1e-6)


@pytest.mark.slow
@pytest.mark.reliability
def test_a_parallel_sweep_against_the_postgres_server_loses_nothing(tmp_path, stack):
    uri = stack["uri"]
    repo = make_repo_copy(tmp_path / "repo")
    env = setup_copy(repo, write_fake_mnist(tmp_path), evaluate=TINY_EVALUATION)
    commit_all(repo, "tiny")
    _succeeds([*MAKE_IN_COPY, "sweep", f"S={SWEEP}", "J=2"], repo, timeout=SWEEP_TIMEOUT_S, **env,
              **stack["admin"], MLFLOW_TRACKING_URI=uri)
    assert queue_states(repo) == ["Success"] * 2, run(["dvc", "queue", "status"], repo).stdout
    names = set(run(["dvc", "exp", "list", "--name-only"], repo).stdout.split())

    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("cvae-mnist").experiment_id
    swept = client.search_runs([experiment], "tags.sweep = 'team'")
    assert {r.info.run_name for r in swept} == names and len(swept) == 2
    assert {(name, "FINISHED") for name in names} <= set(_runs_in_postgres(stack["database"]))
    models = _logged_models(uri, experiment)
    for found in swept:
        epochs = int(found.data.params["train.epochs"])
        history = client.get_metric_history(found.info.run_id, "validation_elbo")
        assert [m.step for m in history] == list(range(1, epochs + 1)), found.info.run_name  # each point once
        assert {"eval_test_elbo", "eval_test_iwae", "final_validation_elbo"} <= set(found.data.metrics)
        assert len([m for m in models if m.source_run_id == found.info.run_id]) == 1  # one model per training
        assert len(client.list_artifacts(found.info.run_id, "figures")) >= 5


def _user(stack, name: str, permission: str | None) -> dict[str, str]:
    """A user of the server (created by its admin) holding `permission` on the pipeline's experiment; their
    credentials as a client's environment."""
    from mlflow.server import get_app_client

    password = f"{name}-password-{os.getpid()}"
    admin = get_app_client("basic-auth", tracking_uri=stack["uri"])
    admin.create_user(name, password)
    if permission:
        client = mlflow.MlflowClient(tracking_uri=stack["uri"])
        experiment = (client.get_experiment_by_name("cvae-mnist")
                      or client.get_experiment(client.create_experiment("cvae-mnist")))
        admin.grant_user_permission(name, "experiment", experiment.experiment_id, permission)
    return {"MLFLOW_TRACKING_USERNAME": name, "MLFLOW_TRACKING_PASSWORD": password}


@pytest.mark.slow
@pytest.mark.reliability
def test_the_server_lets_in_only_its_users_and_each_only_as_far_as_their_permission(tmp_path, stack):
    uri = stack["uri"]
    anonymous = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                                f"{uri}/api/2.0/mlflow/experiments/search?max_results=1"],
                               capture_output=True, text=True)
    assert anonymous.stdout == "401"
    reader = _user(stack, "reader", "READ")
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
    env = setup_copy(repo, write_fake_mnist(tmp_path), evaluate=TINY_EVALUATION)
    wrong = {**stack["admin"], "MLFLOW_TRACKING_PASSWORD": "not-the-password"}
    for credentials, says in ((wrong, "refused the credentials (HTTP 401): set MLFLOW_TRACKING_USERNAME and "
                                      "MLFLOW_TRACKING_PASSWORD"),
                              (reader, "refused reader the permission (HTTP 403) to write to experiment 'cvae-mnist'"),
                              ({}, "refused the credentials (HTTP 401)")):
        done = subprocess.run(["dvc", "repro", "train"], cwd=repo, env=subprocess_env(**env, **credentials,
                                                                                      MLFLOW_TRACKING_URI=uri),
                              capture_output=True, text=True)
        assert done.returncode != 0 and f"MLflow server {uri} {says}" in done.stderr, done.stderr[-3000:]
        assert "Traceback" not in done.stdout + done.stderr
        assert "epoch 1/" not in done.stderr  # stopped before any training
        if credentials:
            assert credentials["MLFLOW_TRACKING_PASSWORD"] not in done.stdout + done.stderr


def _repro_pausing(repo: Path, env: dict[str, str], actions: dict) -> tuple[int, str]:
    """`dvc repro` in `repo`; at the first line of its output that holds one of `actions`' keys, the whole pipeline
    is paused (SIGSTOP) while that action runs, then goes on. Its exit status and output."""
    process = subprocess.Popen(["dvc", "repro"], cwd=repo, env=subprocess_env(**env), stdout=subprocess.PIPE,
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


def _complete_run(uri: str, epochs: int) -> None:
    """The one run of the server's experiment holds every epoch once, one model, its evaluation and its figures."""
    client = mlflow.MlflowClient(tracking_uri=uri)
    (found,) = client.search_runs([client.get_experiment_by_name("cvae-mnist").experiment_id])
    assert found.info.status == "FINISHED"
    for metric in ("train_loss", "validation_elbo"):
        assert [m.step for m in client.get_metric_history(found.info.run_id, metric)] == list(range(1, epochs + 1))
    assert len([m for m in _logged_models(uri, found.info.experiment_id)
                if m.source_run_id == found.info.run_id]) == 1
    assert {"final_validation_elbo", "eval_test_elbo", "eval_validation_iwae"} <= set(found.data.metrics)
    assert len(client.list_artifacts(found.info.run_id, "figures")) >= 5


@pytest.fixture
def own_server(stack):
    """A tracking server of this test's own, on the shared database and bucket, which the test stops and starts."""
    with postgres_server() as database, tracking_server(database, stack["objects"]) as server:
        saved = {name: os.environ.get(name) for name in server.admin}
        os.environ.update(server.admin)
        yield server
        os.environ.update({name: value for name, value in saved.items() if value})


@pytest.mark.slow
@pytest.mark.reliability
def test_training_goes_on_while_the_server_restarts_and_the_run_misses_nothing(tmp_path, own_server):
    repo = make_repo_copy(tmp_path / "repo")
    env = setup_copy(repo, write_fake_mnist(tmp_path), evaluate=TINY_EVALUATION, train={"epochs": 6})
    # No retries: a write meets the stopped server at once, whatever the speed of this machine.
    env |= {**own_server.admin, "MLFLOW_TRACKING_URI": own_server.uri, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
    status, output = _repro_pausing(repo, env, {"epoch 2/6": own_server.stop, "epoch 4/6": own_server.start})
    assert status == 0, output[-3000:]
    assert "went away while logging epoch" in output and "answers again" in output
    _complete_run(own_server.uri, 6)


@pytest.mark.slow
@pytest.mark.reliability
def test_a_server_still_away_when_training_ends_gets_what_it_missed_from_the_next_repro(tmp_path, own_server):
    repo = make_repo_copy(tmp_path / "repo")
    env = setup_copy(repo, write_fake_mnist(tmp_path), evaluate=TINY_EVALUATION, train={"epochs": 4})
    env |= {**own_server.admin, "MLFLOW_TRACKING_URI": own_server.uri, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
    status, output = _repro_pausing(repo, env, {"epoch 2/4": own_server.stop})
    assert status != 0 and "Traceback" not in output
    (said,) = [line for line in output.splitlines() if "has not come back" in line]
    assert re.search(r"lacks epoch(s)? .*final metrics, model\. .*`dvc repro` logs it", said), said
    own_server.start()
    status, output = _repro_pausing(repo, env, {})
    assert status == 0, output[-3000:]
    assert "resuming after epoch 4" in output and "epoch 1/4" not in output  # nothing trained again
    _complete_run(own_server.uri, 4)
