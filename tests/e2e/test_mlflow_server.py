"""A team tracking server: `make mlflow-server` (SQL backend, served artifacts), and the pipeline logging to it."""

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest

from cvae_pipeline.model.loading import load_trained, reconstruct
from helpers import REPO, free_port, model_params, predict_in_fresh_process, run, subprocess_env
from repositories import QUICK_EVALUATION, make_repo_copy, setup_copy
from team_services import assert_serving_without_job_runner, server_process, wait_for_http

pytestmark = pytest.mark.slow


@pytest.fixture
def server(tmp_path):
    """`make mlflow-server` itself, with its store and artifacts in a temporary folder and on a free port."""
    port, store, artifacts = free_port(), tmp_path / "server.db", tmp_path / "served-artifacts"
    overrides = [f"SERVER_PORT={port}", f"SERVER_STORE=sqlite:///{store}", f"SERVER_ARTIFACTS={artifacts}",
                 "SERVER_WORKERS=1"]  # each worker loads MLflow: one is enough for one client
    base = f"http://127.0.0.1:{port}"
    with server_process(["make", "mlflow-server", *overrides], cwd=REPO, env=subprocess_env()) as (process, log):
        wait_for_http(f"{base}/health", process, "make mlflow-server", log)
        yield {"uri": base, "store": store, "artifacts": artifacts, "process": process}


def test_make_mlflow_server_passes_its_settings_and_listens_on_loopback_by_default():
    dry_run = subprocess.run(["make", "-n", "mlflow-server"], cwd=REPO, capture_output=True, text=True).stdout
    assert "--host '127.0.0.1'" in dry_run and "--auth 'auto'" in dry_run  # auto: no login on loopback
    assert "--workers '4'" in dry_run  # MLflow's default
    assert f"--store 'sqlite:///{REPO}/mlflow-server.db'" in dry_run
    named = subprocess.run(["make", "-n", "mlflow-server", "SERVER_ALLOWED_HOSTS=mlflow.internal,mlflow.internal:5000",
                            "SERVER_HOST=0.0.0.0", "SERVER_AUTH=basic", "SERVER_PERMISSION=NO_PERMISSIONS"],
                           cwd=REPO, capture_output=True, text=True).stdout
    assert "--allowed-hosts 'mlflow.internal,mlflow.internal:5000'" in named and "--host '0.0.0.0'" in named
    assert "--auth 'basic'" in named and "--default-permission 'NO_PERMISSIONS'" in named
    assert "--auth-cache-seconds '60'" in dry_run
    assert "--jobs 'false'" in dry_run and "--jobs 'true'" in subprocess.run(
        ["make", "-n", "mlflow-server", "MLFLOW_JOBS=true"], cwd=REPO, capture_output=True, text=True).stdout


@pytest.mark.parametrize("target", ["ui", "mlflow-server"])
def test_make_ui_and_mlflow_server_take_mlflow_jobs_as_true_or_false_only(target):
    refused = subprocess.run(["make", "-o", f"{sys.prefix}/.installed", f"VENV={sys.prefix}", "EXTRAS=", target,
                              "MLFLOW_JOBS=maybe", f"UI_PORT={free_port()}", f"SERVER_PORT={free_port()}"], cwd=REPO,
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2, refused.stderr
    assert refused.stderr.startswith(f"make {target}: MLFLOW_JOBS must be true or false, got 'maybe'\n")


def test_the_pipeline_logs_to_the_server_and_everything_reads_back_over_http(tmp_path, fake_mnist, server):
    repo = make_repo_copy(tmp_path / "repo")
    env = setup_copy(repo, fake_mnist, evaluate=QUICK_EVALUATION)
    result = run(["dvc", "repro"], repo, **env, MLFLOW_TRACKING_URI=server["uri"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (repo / "mlflow.db").exists() and not (repo / "mlruns").exists()  # all of it went to the server
    assert_serving_without_job_runner(server["process"])

    client = mlflow.MlflowClient(tracking_uri=server["uri"])
    experiment = client.get_experiment_by_name("cvae-mnist")
    (found,) = client.search_runs([experiment.experiment_id])
    assert found.info.status == "FINISHED"
    assert found.data.params["train.epochs"] == "2" and found.data.params["model.latent_dim"] == "2"
    assert [m.step for m in client.get_metric_history(found.info.run_id, "validation_elbo")] == [1, 2]
    assert found.data.metrics["eval_test_iwae"] >= found.data.metrics["eval_test_elbo"]

    figures = {artifact.path for artifact in client.list_artifacts(found.info.run_id, "figures")}
    assert "figures/reconstructions.png" in figures and "figures/training_progress.gif" in figures
    downloaded = client.download_artifacts(found.info.run_id, "figures/reconstructions.png", str(tmp_path))
    assert Path(downloaded).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any(server["artifacts"].rglob("reconstructions.png"))  # stored by the server, not by the client

    mlflow.set_tracking_uri(server["uri"])
    try:
        (logged,) = mlflow.search_logged_models(experiment_ids=[experiment.experiment_id], output_format="list")
    finally:
        mlflow.set_tracking_uri(None)
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    images = np.random.default_rng(0).integers(0, 2, (2, 28, 28, 1)).astype(np.float32)
    predicted = predict_in_fresh_process(server["uri"], logged.model_uri, images, tmp_path)
    # In float32, whatever dtype policy an earlier test left set in this process.
    model = load_trained(repo / "models/cvae.keras", model_params(2))
    np.testing.assert_allclose(predicted, reconstruct(model, images), rtol=1e-4, atol=1e-6)
