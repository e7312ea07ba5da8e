"""End to end: the whole pipeline with `dvc repro` in a temporary copy, and the DVC commands users compare runs with."""

import json

import mlflow
import pytest
import yaml
from PIL import Image

from cvae_pipeline.training import hardware
from helpers import run
from repositories import TINY, runs_in, setup_copy, stage_commands

pytestmark = pytest.mark.slow

METRIC_TYPES = {"elbo": float, "reconstruction_nll": float, "kl": float, "iwae": float, "iwae_k": int,
                "samples": int, "images": int, "pixel_accuracy": float, "bce_per_pixel": float, "active_units": int}
QUICK = {"evaluate": {"iwae_k": 20, "samples": 2}}


@pytest.mark.smoke
def test_dvc_repro_runs_every_stage_into_one_mlflow_run_then_does_nothing(repo_copy, fake_mnist):
    # The shipped precision and XLA settings (auto): what this machine does natively, recorded in the run.
    shipped = {"precision": "auto", "jit_compile": "auto"}
    env = setup_copy(repo_copy, fake_mnist, **QUICK, train={**TINY["train"], **shipped})
    result = run(["dvc", "repro"], repo_copy, **env)
    assert result.returncode == 0, result.stderr[-3000:]
    for stage in ("prepare", "train", "evaluate", "visualize"):
        assert f"Running stage '{stage}'" in result.stdout
    # The stages print their own lines, not TensorFlow's start-up log (tensorflow_runtime) nor MLflow's progress (cli).
    for chatter in ("absl::InitializeLog", "oneDNN custom operations", "cpu_feature_guard", "cudart_stub",
                    "Creating initial MLflow database tables", "Started monitoring system metrics",
                    "Downloading artifacts"):
        assert chatter not in result.stderr + result.stdout

    report = json.loads((repo_copy / "reports/metrics.json").read_text())
    assert set(report) == {"test", "validation"}  # both splits, so the generalization gap shows
    for split, images in (("test", 100), ("validation", 100)):
        metrics = report[split]
        assert {key: type(value) for key, value in metrics.items()} == METRIC_TYPES
        assert metrics["iwae"] >= metrics["elbo"] - 1.0 and metrics["iwae_k"] == 20 and metrics["images"] == images
        assert 0 <= metrics["pixel_accuracy"] <= 1 and 0 <= metrics["active_units"] <= 2

    figures = repo_copy / "reports/figures"
    expected = {"reconstructions.png", "prior_samples.png", "latent_scatter.png", "training_curves.png",
                "training_progress.gif", "latent_manifold.png"}  # latent_dim 2: the manifold too
    assert {p.name for p in figures.iterdir()} == expected
    with Image.open(figures / "training_progress.gif") as gif:
        assert gif.n_frames == 3  # epoch 0 and the 2 epochs

    runs = runs_in(repo_copy)
    assert len(runs) == 1 and runs.iloc[0]["status"] == "FINISHED"
    found = runs.iloc[0]
    assert found["metrics.eval_test_iwae"] == pytest.approx(report["test"]["iwae"])
    assert found["metrics.eval_validation_elbo"] == pytest.approx(report["validation"]["elbo"])
    machine = hardware.detect()
    assert found["tags.precision"] == hardware.choose_precision("auto", machine).value
    assert found["tags.precision_reason"].startswith("auto: ") and found["tags.device"] == machine.describe()
    assert found["tags.jit_compile"] == str(machine.on_gpu).lower()
    settings = json.loads((repo_copy / "reports/train_settings.json").read_text())  # what the README states
    assert {key: found[f"tags.{key}"] for key in settings} == settings
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(found["run_id"], "figures")}
    assert artifacts == {f"figures/{name}" for name in expected}

    again = run(["dvc", "repro"], repo_copy, **env)
    assert again.returncode == 0 and "Data and pipelines are up to date." in again.stdout
    assert "Running stage" not in again.stdout

    shown = run(["dvc", "metrics", "show", "--json"], repo_copy)
    assert shown.returncode == 0, shown.stderr
    assert "reports/metrics.json" in shown.stdout and "reports/train_metrics.json" in shown.stdout
    plots = run(["dvc", "plots", "show", "--json"], repo_copy)
    assert plots.returncode == 0, plots.stderr
    assert "training_progress.gif" in plots.stdout and "validation_elbo" in plots.stdout

    raw = yaml.safe_load((repo_copy / "params.yaml").read_text())
    raw["evaluate"]["iwae_k"] = 30
    (repo_copy / "params.yaml").write_text(yaml.safe_dump(raw))
    diff = run(["dvc", "params", "diff", "--json"], repo_copy)
    assert diff.returncode == 0 and json.loads(diff.stdout)["params.yaml"]["evaluate.iwae_k"]["new"] == 30
    status = run(["dvc", "status", "--json"], repo_copy)
    assert set(json.loads(status.stdout)) == {"evaluate"}  # only evaluate depends on evaluate.*


def test_the_committed_lock_matches_the_code_and_params_of_a_fresh_clone(repo_copy):
    """Else `dvc pull` then `make repro` would retrain: every dependency in Git hashes as dvc.lock says."""
    status = run(["dvc", "status", "--json"], repo_copy)
    assert status.returncode == 0, status.stderr
    stale = {}
    for stage, changes in json.loads(status.stdout).items():
        for change in changes:
            if not isinstance(change, dict):  # "changed checksum", "always changed" and the like
                stale.setdefault(stage, []).append(change)
                continue
            for kind, paths in change.items():
                if kind == "changed outs":
                    continue  # a fresh clone has none of them
                for path, state in paths.items() if isinstance(paths, dict) else [(None, paths)]:
                    if state != "deleted":  # upstream outputs, as dependencies, are absent in a fresh clone
                        stale.setdefault(stage, []).append({kind: {path: state}})
    assert not stale, f"dvc.lock is out of date (run `make repro` and commit it): {stale}"


def test_evaluate_and_visualize_fail_clearly_without_a_model(repo_copy, fake_mnist):
    env = setup_copy(repo_copy, fake_mnist)
    assert run(["dvc", "repro", "prepare"], repo_copy, **env).returncode == 0
    (repo_copy / "models").mkdir(exist_ok=True)
    (repo_copy / "models/mlflow_run.json").write_text(json.dumps({"run_id": "0" * 32, "experiment_id": "1"}))
    metrics = repo_copy / "reports/metrics.json"
    metrics_before = metrics.read_bytes() if metrics.exists() else None
    commands = stage_commands(repo_copy)
    for stage in ("evaluate", "visualize"):
        result = run(commands[stage], repo_copy)
        assert result.returncode == 1, (stage, result.stderr[-2000:])
        assert result.stderr.strip().splitlines()[-1] == (
            "models/cvae.keras: no trained model; run `dvc repro train` first")
    assert (metrics.read_bytes() if metrics.exists() else None) == metrics_before
