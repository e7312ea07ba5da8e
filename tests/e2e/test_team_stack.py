"""A team's stack for real: `make mlflow-server` on PostgreSQL with its artifacts in S3-compatible storage (moto), a
DVC remote in the same storage, the pipeline and a parallel sweep against them; and no secret on a command line."""

import os
import re
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import optuna
import pytest
import yaml
from optuna.trial import TrialState

from cvae_pipeline.model.loading import load_trained, reconstruct
from helpers import REPO, model_params, predict_in_fresh_process, run, subprocess_env, write_fake_mnist
from repositories import QUICK_EVALUATION, commit_all, make_repo_copy, queue_states, setup_copy
from team_services import connect, logged_models, postgres_server, s3_server, tracking_server

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
        assert secret not in refused.stdout + refused.stderr  # refused, not echoed


@pytest.mark.parametrize("title", ["## Team setup", "## One search on several machines"])
def test_the_documented_team_setup_has_no_secret_in_a_command(title):
    readme = (REPO / "docs" / "team.md").read_text()
    section = readme.split(title, 1)[1].split("\n## ", 1)[0]
    commands = "\n".join(re.findall(r"```bash\n(.*?)```", section, re.S))
    if title != "## Team setup":  # the search's machines: a database password and an MLflow user, read, never written
        code = "\n".join(line.split("#", 1)[0] for line in commands.splitlines())
        assert "read -rs PGPASSWORD" in code and "read -rs MLFLOW_TRACKING_PASSWORD" in code
        assert "OPTUNA_STORAGE=postgresql://" in code and not re.search(r"://[^/@\s]+:[^/@\s]+@", code)
        assert not re.search(r"(PGPASSWORD|MLFLOW_TRACKING_PASSWORD)=", code), code
        return
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


@pytest.mark.slow
def test_repro_push_clone_pull_on_postgres_and_s3(tmp_path, stack):
    objects, uri = stack["objects"], stack["uri"]
    repo = make_repo_copy(tmp_path / "repo")
    env = setup_copy(repo, write_fake_mnist(tmp_path), evaluate=QUICK_EVALUATION)
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
    promoted = _succeeds([*MAKE_IN_COPY, "promote"], repo, **stack["admin"], MLFLOW_TRACKING_URI=uri)
    assert client.get_model_version_by_alias("cvae-mnist", "champion").run_id == found.info.run_id
    assert password not in promoted

    _succeeds(["dvc", "push"], repo)
    assert objects.keys("dvc-storage/")
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(repo), str(clone)], check=True)
    assert not (clone / ".dvc/config.local").exists()  # a teammate brings their own keys: here, in the environment
    _succeeds(["dvc", "pull"], clone, **objects.env)
    assert "Data and pipelines are up to date" in _succeeds(["dvc", "status"], clone)
    for output in ("models/cvae.keras", "data/prepared/mnist.npz", "reports/metrics.json"):
        assert (clone / output).read_bytes() == (repo / output).read_bytes(), output

    (logged,) = logged_models(uri, experiment)
    images = np.random.default_rng(0).integers(0, 2, (2, 28, 28, 1)).astype(np.float32)
    served = predict_in_fresh_process(uri, logged.model_uri, images, tmp_path, **stack["admin"])
    pulled = load_trained(clone / "models/cvae.keras", model_params(2))
    np.testing.assert_allclose(served, reconstruct(pulled, images), rtol=1e-4, atol=1e-6)


@pytest.mark.slow
@pytest.mark.reliability
def test_a_parallel_sweep_against_the_postgres_server_loses_nothing(tmp_path, stack):
    uri = stack["uri"]
    repo = make_repo_copy(tmp_path / "repo")
    env = setup_copy(repo, write_fake_mnist(tmp_path), evaluate=QUICK_EVALUATION)
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
    models = logged_models(uri, experiment)
    for found in swept:
        epochs = int(found.data.params["train.epochs"])
        history = client.get_metric_history(found.info.run_id, "validation_elbo")
        assert [m.step for m in history] == list(range(1, epochs + 1)), found.info.run_name  # each point once
        assert {"eval_test_elbo", "eval_test_iwae", "final_validation_elbo"} <= set(found.data.metrics)
        assert len([m for m in models if m.source_run_id == found.info.run_id]) == 1  # one model per training
        assert len(client.list_artifacts(found.info.run_id, "figures")) >= 5


# Tiny trials without pruning: what is tested here is that two machines share one budget.
TEAM_SEARCH = {"study": "team", "trials": 6, "pruner": {"name": "none"},
               "space": {"train.learning_rate": {"low": 1.0e-3, "high": 1.0e-2, "log": True}}}


@pytest.mark.slow
@pytest.mark.reliability
def test_two_machines_share_one_study_in_its_own_postgres_database_and_the_team_server(tmp_path, stack, monkeypatch):
    database, uri = stack["database"], stack["uri"]
    with connect(database) as connection:
        connection.execute("CREATE DATABASE optuna")  # its own: Optuna and MLflow each keep an alembic_version table
    storage = f"postgresql://{database.user}@{database.host}:{database.port}/optuna"
    first = make_repo_copy(tmp_path / "first")
    env = setup_copy(first, write_fake_mnist(tmp_path), evaluate=QUICK_EVALUATION)
    (first / "tune.yaml").write_text(yaml.safe_dump(TEAM_SEARCH))
    commit_all(first, "a tiny search")
    second = tmp_path / "second"
    subprocess.run(["git", "clone", "-q", str(first), str(second)], check=True)
    machine = {**env, **stack["admin"], "MLFLOW_TRACKING_URI": uri, "OPTUNA_STORAGE": storage,
               "PGPASSWORD": database.password}
    workers = [subprocess.Popen([*MAKE_IN_COPY, "tune", "J=1"], cwd=clone, env=subprocess_env(**machine), text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE) for clone in (first, second)]
    outputs = [worker.communicate(timeout=SWEEP_TIMEOUT_S) for worker in workers]
    for worker, (stdout, stderr) in zip(workers, outputs, strict=True):
        assert worker.returncode == 0, (stdout[-3000:], stderr[-3000:])
        assert database.password not in stdout + stderr, (stdout[-2000:], stderr[-2000:])
        assert f"in postgresql://***@{database.host}:{database.port}/optuna" in stderr  # where, but not as whom

    monkeypatch.setenv("PGPASSWORD", database.password)
    study = optuna.load_study(study_name="team", storage=storage)
    trials = study.get_trials(deepcopy=False)
    ran = [trial for trial in trials if not trial.user_attrs.get("over_budget")]
    assert [trial.state for trial in ran] == [TrialState.COMPLETE] * 6  # the budget, across both machines
    assert len({trial.user_attrs["worker_pid"] for trial in ran}) == 2  # both took trials
    assert all(list((clone / ".tune" / "trials" / "team").iterdir()) for clone in (first, second))

    client = mlflow.MlflowClient(tracking_uri=uri)  # every run on the team's server
    experiment = client.get_experiment_by_name("cvae-mnist").experiment_id
    (parent,) = client.search_runs([experiment], "tags.kind = 'study' and tags.study = 'team'")
    children = client.search_runs([experiment], f"tags.study_run_id = '{parent.info.run_id}'")
    assert sorted(int(run.data.tags["trial"]) for run in children) == sorted(trial.number for trial in ran)  # once each
    assert {run.info.status for run in children} == {"FINISHED"} and parent.info.status == "FINISHED"
    assert all(run.data.tags["mlflow.parentRunId"] == parent.info.run_id for run in children)
    with connect(database, "optuna") as connection:
        assert connection.execute("SELECT count(*) FROM trials").fetchone()[0] == len(trials)
    with connect(database) as connection:  # MLflow's database holds no Optuna table
        assert connection.execute("SELECT to_regclass('public.trials')").fetchone()[0] is None
