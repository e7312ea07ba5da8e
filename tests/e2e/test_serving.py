"""Using a trained model, end to end in a repository copy: two trainings, `make promote` registers the better one as
`champion`, which loads in a process that cannot import the project and is served over HTTP by `mlflow models
serve`; `make sample` draws from any model URI; the runs record their dataset, the model its test metrics, and the
training its system metrics."""

import contextlib
import json
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import pytest
import yaml

from cvae_pipeline.data import load_prepared
from cvae_pipeline.model.loading import load_trained, reconstruct
from cvae_pipeline.tracking.lineage import images_digest
from helpers import HIDE_THE_PROJECT, NO_PICKLE, free_port, model_params, predict_in_fresh_process, run, subprocess_env
from repositories import copy_repository, runs_in
from team_services import server_process, wait_for_http

pytestmark = pytest.mark.slow



@pytest.fixture(scope="module")
def trained(tmp_path_factory, pipeline_template):
    """A copy with two finished trainings (learning rates 1e-3, then an experiment at 1e-5), each evaluated."""
    source, env = pipeline_template[0], dict(pipeline_template[1])  # its training sampled system metrics each second
    repo = copy_repository(source, tmp_path_factory.mktemp("serving") / "repo")
    done = run(["dvc", "exp", "run", "-S", "train.learning_rate=1e-5"], repo, **env)
    assert done.returncode == 0, done.stderr[-3000:]
    store = f"sqlite:///{repo / 'mlflow.db'}"
    yield {"repo": repo, "env": {**env, "MLFLOW_TRACKING_URI": store}, "store": store, "runs": runs_in(repo)}
    mlflow.set_tracking_uri(None)


def make(trained, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "-o", f"{sys.prefix}/.installed", f"VENV={sys.prefix}", "EXTRAS=", *args],
                          cwd=trained["repo"], env=subprocess_env(**trained["env"]), capture_output=True, text=True)


@pytest.fixture(scope="module")
def promoted(trained):
    made = make(trained, "promote")
    assert made.returncode == 0, made.stderr[-3000:]
    return made.stdout


def test_promote_registers_the_best_evaluated_run_as_champion_once(trained, promoted):
    runs = trained["runs"]
    evaluated = runs[runs["metrics.eval_validation_elbo"].notna()]
    assert len(evaluated) == 2
    best = evaluated.loc[evaluated["metrics.eval_validation_elbo"].idxmax()]  # the test set chooses nothing
    assert f"registered cvae-mnist version 1 from run {best['tags.mlflow.runName']} ({best['run_id']})" in promoted
    assert "the best of 2 finished run(s)" in promoted and "cvae-mnist@champion -> version 1" in promoted
    client = mlflow.MlflowClient()
    champion = client.get_model_version_by_alias("cvae-mnist", "champion")
    (model,) = mlflow.search_logged_models(filter_string=f"source_run_id = '{best['run_id']}'", output_format="list",
                                           experiment_ids=[best["experiment_id"]])
    assert champion.source == model.model_uri and str(champion.version) == "1"

    again = make(trained, "promote")
    assert again.returncode == 0 and "cvae-mnist@champion is already version 1" in again.stdout
    assert len(client.search_model_versions("name = 'cvae-mnist'")) == 1


def test_promote_refuses_clearly_when_no_run_qualifies(trained):
    made = make(trained, "promote", "SWEEP=no-such-sweep")
    assert made.returncode != 0
    assert ("no finished run in experiment cvae-mnist, sweep no-such-sweep has evaluate's eval_validation_elbo and a "
            "logged model") in made.stderr
    assert "Traceback" not in made.stderr


def test_the_champion_loads_where_the_project_cannot_be_imported(trained, promoted, tmp_path):
    images = load_prepared(trained["repo"] / "data/prepared/mnist.npz").test.images[:3, ..., None].astype(np.float32)
    predicted = predict_in_fresh_process(trained["store"], "models:/cvae-mnist@champion", images, tmp_path)
    assert predicted.shape == (3, 28, 28, 1) and predicted.dtype == np.float32
    assert ((predicted > 0) & (predicted < 1)).all()  # probabilities, not logits


@contextlib.contextmanager
def served(trained, model_uri: str) -> Iterator[str]:
    """`mlflow models serve --env-manager local` on a free loopback port, in processes that cannot import the project
    (the model brings its own copy of the code), once it answers /ping: its URL."""
    port = free_port()
    command = ["mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local", "-h", "127.0.0.1", "-p",
               str(port)]
    with tempfile.TemporaryDirectory(prefix="cvae-hidden-") as hidden:
        (Path(hidden) / "sitecustomize.py").write_text(HIDE_THE_PROJECT)  # loaded by each of its Python processes
        env = subprocess_env(**trained["env"], **NO_PICKLE, PYTHONPATH=hidden)
        with server_process(command, cwd=trained["repo"], env=env) as (server, log):
            wait_for_http(f"http://127.0.0.1:{port}/ping", server, "the scoring server", log)
            yield f"http://127.0.0.1:{port}"


def post(url: str, payload: dict) -> tuple[int, dict]:
    request = urllib.request.Request(f"{url}/invocations", json.dumps(payload).encode(),
                                     {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_mlflow_models_serve_answers_test_images_with_their_reconstructions(trained, promoted):
    repo = trained["repo"]
    images = load_prepared(repo / "data/prepared/mnist.npz").test.images[:4, ..., None].astype(np.float32)
    with served(trained, "models:/cvae-mnist@champion") as url:
        status, answer = post(url, {"inputs": images.tolist()})
        bad_status, bad_answer = post(url, {"inputs": images[:, :14].tolist()})
    assert status == 200, answer
    predicted = np.asarray(answer["predictions"], dtype=np.float32)
    expected = reconstruct(champion_model(trained), images)
    assert predicted.shape == (4, 28, 28, 1)
    np.testing.assert_allclose(predicted, expected, rtol=1e-4, atol=1e-6)
    assert bad_status == 400 and "shape" in json.dumps(bad_answer)


def champion_model(trained):
    """The champion's Keras file, loaded in this process."""
    mlflow.set_tracking_uri(trained["store"])
    folder = mlflow.artifacts.download_artifacts("models:/cvae-mnist@champion")
    (keras_file,) = list(Path(folder).rglob("*.keras"))
    return load_trained(keras_file, model_params(2))


@pytest.mark.parametrize("damage", ["truncated", "other format"])
def test_a_damaged_or_foreign_model_fails_to_load_or_serve_in_one_clear_line(trained, promoted, damage, tmp_path):
    mlflow.set_tracking_uri(trained["store"])
    copy = tmp_path / "model"
    shutil.copytree(mlflow.artifacts.download_artifacts("models:/cvae-mnist@champion"), copy)
    if damage == "truncated":
        (keras_file,) = list(copy.rglob("*.keras"))
        keras_file.write_bytes(keras_file.read_bytes()[:1000])
        expected = "not a model this version of cvae_pipeline can load"
    else:
        spec = yaml.safe_load((copy / "MLmodel").read_text())
        spec["flavors"]["python_function"]["config"]["cvae_pipeline_format"] = 2
        (copy / "MLmodel").write_text(yaml.safe_dump(spec))
        expected = "this model is of cvae_pipeline format 2, this code reads format 1"
    script = "import sys, mlflow\nmlflow.pyfunc.load_model(sys.argv[1])\n"
    loaded = subprocess.run([sys.executable, "-c", script, str(copy)], env=subprocess_env(**NO_PICKLE),
                            capture_output=True, text=True)
    assert loaded.returncode != 0
    assert expected in loaded.stderr.strip().splitlines()[-1]
    # The scoring server stops at start-up with the same line (MLflow prints its own traceback around it), and
    # nothing from inside Keras.
    serve = subprocess.run(["mlflow", "models", "serve", "-m", str(copy), "--env-manager", "local", "-h", "127.0.0.1",
                            "-p", str(free_port())], env=subprocess_env(**NO_PICKLE), stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, timeout=300)
    assert serve.returncode != 0
    (line,) = [line for line in serve.stdout.splitlines() if line.startswith("mlflow.exceptions.MlflowException: ")]
    assert expected in line and "keras/src" not in serve.stdout
    assert damage != "truncated" or line.endswith("download the model again, or log a new one with the project "
                                                  "(`dvc repro train`)")


def sample(trained, model: str, out, seed: int = 0, *extra: str) -> subprocess.CompletedProcess:
    return make(trained, "sample", f"MODEL={model}", "N=10", f"SEED={seed}", f"OUT={out}", *extra)


def test_sample_draws_the_same_grid_from_every_kind_of_model_reference(trained, promoted, tmp_path):
    from PIL import Image

    best = trained["runs"].sort_values("metrics.eval_validation_elbo", ascending=False).iloc[0]
    references = {"champion": "models:/cvae-mnist@champion", "run": f"runs:/{best['run_id']}/model"}
    for name, model in references.items():
        done = sample(trained, model, tmp_path / f"{name}.png", 3)
        assert done.returncode == 0, done.stderr[-3000:]
        assert f"10 samples from the prior of {model} (seed 3)" in done.stdout
    assert (tmp_path / "champion.png").read_bytes() == (tmp_path / "run.png").read_bytes()
    with Image.open(tmp_path / "champion.png") as grid:
        assert grid.size == (4 * 28 * 2, 3 * 28 * 2)  # 10 samples, 4 to a row, twice the size
    other = sample(trained, "models:/cvae-mnist@champion", tmp_path / "other.png", 4, "MANIFOLD=5")
    assert other.returncode == 0, other.stderr[-3000:]
    assert (tmp_path / "other.png").read_bytes() != (tmp_path / "champion.png").read_bytes()
    with Image.open(tmp_path / "other_manifold.png") as manifold:
        assert manifold.format == "PNG"

    local = sample(trained, "models/cvae.keras", tmp_path / "local.png", 3)  # the workspace's own training
    assert local.returncode == 0, local.stderr[-3000:]
    missing = sample(trained, "models:/no-such-model@champion", tmp_path / "none.png")
    assert missing.returncode != 0 and "models:/no-such-model@champion: cannot load it" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_runs_record_the_dataset_dvc_prepared_and_the_model_shows_its_test_metrics(trained):
    repo = trained["repo"]
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    (prepared,) = [out for out in lock["stages"]["prepare"]["outs"] if out["path"] == "data/prepared/mnist.npz"]
    baseline = trained["runs"][trained["runs"]["tags.dvc_experiment"].isna()].iloc[0]
    run_inputs = mlflow.get_run(baseline["run_id"]).inputs.dataset_inputs
    data = load_prepared(repo / "data/prepared/mnist.npz")
    digests = {split: images_digest(getattr(data, split).images) for split in ("train", "validation", "test")}
    assert len(set(digests.values())) == 3  # each split its own dataset in MLflow
    contexts = {}
    for found in run_inputs:
        tags = {tag.key: tag.value for tag in found.tags}
        assert found.dataset.digest == digests[found.dataset.name.removeprefix("mnist_binarized/")]
        assert tags["dvc_md5"] == prepared["md5"]
        assert tags["dvc_path"] == "data/prepared/mnist.npz" and len(tags["git_commit"]) == 40
        assert tags["data.threshold"] == "0.5"
        contexts[tags["mlflow.data.context"]] = found.dataset.name
    assert contexts == {"training": "mnist_binarized/train", "validation": "mnist_binarized/validation",
                        "testing": "mnist_binarized/test"}

    (model,) = mlflow.search_logged_models(filter_string=f"source_run_id = '{baseline['run_id']}'",
                                           experiment_ids=[baseline["experiment_id"]], output_format="list")
    on_model = {metric.key: metric for metric in mlflow.get_logged_model(model.model_id).metrics}
    assert on_model["eval_test_elbo"].value == pytest.approx(baseline["metrics.eval_test_elbo"])
    assert on_model["eval_test_iwae"].value == pytest.approx(baseline["metrics.eval_test_iwae"])
    for split in ("test", "validation"):
        metric = on_model[f"eval_{split}_elbo"]
        assert (metric.dataset_name, metric.dataset_digest) == (f"mnist_binarized/{split}", digests[split])


def test_training_records_system_metrics_once_and_evaluate_adds_no_second_monitor(trained):
    client = mlflow.MlflowClient()
    baseline = trained["runs"][trained["runs"]["tags.dvc_experiment"].isna()].iloc[0]
    system = [key for key in client.get_run(baseline["run_id"]).data.metrics if key.startswith("system/")]
    assert "system/cpu_utilization_percentage" in system and "system/system_memory_usage_megabytes" in system
    samples = client.get_metric_history(baseline["run_id"], "system/cpu_utilization_percentage")
    steps = [metric.step for metric in samples]
    assert steps and len(steps) == len(set(steps))  # one monitor: each step once
    (model,) = mlflow.search_logged_models(filter_string=f"source_run_id = '{baseline['run_id']}'",
                                           experiment_ids=[baseline["experiment_id"]], output_format="list")
    # Sampled while training, until its run closed; evaluate, which reopens the run seconds later, samples nothing.
    assert max(metric.timestamp for metric in samples) <= model.last_updated_timestamp + 3000
