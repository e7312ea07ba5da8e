"""End to end: `dvc repro train` in a temporary copy, read back from the files and from MLflow."""

import json
import shutil
import time

import keras
import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml

from cvae_pipeline.model.loading import load_trained, reconstruct
from cvae_pipeline.model.network import CVAE
from helpers import model_params, predict_in_fresh_process, run, timeless
from repositories import TINY, kill_training_once_checkpointed, runs_in, setup_copy

pytestmark = pytest.mark.slow

def test_dvc_repro_train_writes_outputs_and_one_mlflow_run(repo_copy, fake_mnist, tmp_path):
    env = setup_copy(repo_copy, fake_mnist)
    result = run(["dvc", "repro", "train"], repo_copy, **env)
    assert result.returncode == 0, result.stderr[-3000:]
    precision = yaml.safe_load((repo_copy / "params.yaml").read_text())["train"]["precision"]
    assert "train: training on CPU (" in result.stderr
    assert f"with {precision} precision (set in params), XLA off, 1 replica(s)" in result.stderr

    history = pd.read_csv(repo_copy / "reports/train_history.csv")
    assert history["epoch"].tolist() == [1, 2]
    metrics = json.loads((repo_copy / "reports/train_metrics.json").read_text())
    assert metrics["epochs"] == 2 and metrics["validation_elbo"] == pytest.approx(history["validation_elbo"].iloc[-1])
    terms = metrics["validation_reconstruction"] + metrics["validation_kl"]
    assert metrics["validation_elbo"] == pytest.approx(-terms)
    grids = np.load(repo_copy / "models/progress_grids.npz")["grids"]
    assert grids.shape == (3, 16, 28, 28) and grids.dtype == np.uint8
    model = keras.models.load_model(repo_copy / "models/cvae.keras", safe_mode=True)
    assert isinstance(model, CVAE) and model.count_params() == 69_989

    runs = runs_in(repo_copy)
    assert len(runs) == 1
    found = runs.iloc[0]
    assert found["run_id"] == json.loads((repo_copy / "models/mlflow_run.json").read_text())["run_id"]
    assert found["status"] == "FINISHED"
    assert found["params.train.batch_size"] == "50" and found["params.model.latent_dim"] == "2"
    assert found["params.data.train_limit"] == "null" and found["params.model.encoder_filters"] == "[32, 64]"
    assert found["artifact_uri"].startswith((repo_copy / "mlruns").as_uri())
    assert found["tags.device"].startswith("CPU (") and found["tags.tensorflow_version"]
    assert (found["tags.precision"], found["tags.precision_reason"]) == (precision, "set in params")
    assert (found["tags.jit_compile"], found["tags.global_batch_size"]) == ("false", "50")
    assert len(found["tags.mlflow.source.git.commit"]) == 40 and found["tags.git_dirty"] == "true"
    client = mlflow.MlflowClient()
    elbo = client.get_metric_history(found["run_id"], "validation_elbo")
    assert [m.step for m in elbo] == [1, 2]
    assert [m.value for m in elbo] == pytest.approx(history["validation_elbo"].tolist())
    logged = mlflow.search_logged_models(experiment_ids=[found["experiment_id"]], output_format="list")
    assert [m.source_run_id for m in logged] == [found["run_id"]]
    signature = mlflow.models.get_model_info(logged[0].model_uri).signature
    assert tuple(signature.inputs.to_dict()[0]["tensor-spec"]["shape"]) == (-1, 28, 28, 1)
    images = np.random.default_rng(0).integers(0, 2, (3, 28, 28, 1)).astype(np.float32)
    predicted = predict_in_fresh_process(f"sqlite:///{repo_copy / 'mlflow.db'}", logged[0].model_uri, images, tmp_path)
    # In float32, whatever dtype policy an earlier test left set in this process.
    reference = load_trained(repo_copy / "models/cvae.keras", model_params(2))
    np.testing.assert_allclose(predicted, reconstruct(reference, images), rtol=1e-4, atol=1e-6)

    again = run(["dvc", "repro", "train"], repo_copy, **env)
    assert "didn't change, skipping" in again.stdout
    assert len(runs_in(repo_copy)) == 1


@pytest.mark.reliability
def test_kill_9_then_dvc_repro_resumes_and_matches_an_uninterrupted_run(repo_copy, fake_mnist, tmp_path):
    four_epochs = {"train": {**TINY["train"], "epochs": 4}}
    env = {**setup_copy(repo_copy, fake_mnist, **four_epochs), "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1"}
    uninterrupted = tmp_path / "uninterrupted"
    shutil.copytree(repo_copy, uninterrupted)
    assert run(["dvc", "repro", "prepare"], repo_copy, **env).returncode == 0

    kill_training_once_checkpointed(repo_copy, **env)
    killed_epoch = int(np.load(repo_copy / "models/checkpoint.npz")["epoch"])
    assert 1 <= killed_epoch < 4
    assert runs_in(repo_copy).iloc[0]["status"] == "RUNNING"  # what kill -9 leaves behind, until the resume

    resuming = time.time() * 1000
    resumed = run(["dvc", "repro", "train"], repo_copy, **env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming after epoch {killed_epoch}" in resumed.stderr
    whole = run(["dvc", "repro", "train"], uninterrupted, **env)
    assert whole.returncode == 0, whole.stderr[-3000:]

    pd.testing.assert_frame_equal(timeless(pd.read_csv(repo_copy / "reports/train_history.csv")),
                                  timeless(pd.read_csv(uninterrupted / "reports/train_history.csv")))
    runs = runs_in(repo_copy)
    assert len(runs) == 1 and runs.iloc[0]["status"] == "FINISHED"  # the same run, continued
    steps = [m.step for m in mlflow.MlflowClient().get_metric_history(runs.iloc[0]["run_id"], "validation_elbo")]
    assert sorted(steps) == [1, 2, 3, 4]  # each epoch once
    # System metrics: sampled by the resumed training too, continuing the series of the killed one (each step once).
    samples = mlflow.MlflowClient().get_metric_history(runs.iloc[0]["run_id"], "system/cpu_utilization_percentage")
    assert any(sample.timestamp < resuming for sample in samples)  # else "each step once" would hold trivially
    assert any(sample.timestamp >= resuming for sample in samples)
    assert len({sample.step for sample in samples}) == len(samples)


@pytest.mark.reliability
def test_diverging_training_fails_clearly_and_marks_the_run_failed(repo_copy, fake_mnist):
    # Constant: the default warm-up starts from a step size of 0, which puts off the divergence to a later step.
    env = setup_copy(repo_copy, fake_mnist, train={"learning_rate": 1e30, "schedule": "constant"})
    result = run(["dvc", "repro", "train"], repo_copy, **env)
    assert result.returncode != 0
    assert "training diverged: loss is" in result.stderr and "at epoch 1, step" in result.stderr
    runs = runs_in(repo_copy)
    assert runs.iloc[0]["status"] == "FAILED"
    assert not (repo_copy / "models/cvae.keras").exists()
