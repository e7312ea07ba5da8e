"""The trained model as an MLflow pyfunc model: what its `predict` answers, what its loading refuses, and what logging
it records. Loading it where the project cannot be imported, and serving it, are test_serving.py's."""

import logging
import sys
from importlib.metadata import version
from pathlib import Path

import keras
import mlflow
import numpy as np
import pytest
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import PythonModelContext

from cvae_pipeline.model.network import build_cvae
from cvae_pipeline.tracking.logged_model import ARTIFACT, FORMAT, FORMAT_KEY, ReconstructionModel, log_model
from helpers import NO_PICKLE, model_params

IMAGES = np.random.default_rng(0).integers(0, 2, (5, 28, 28, 1)).astype(np.float32)


@pytest.fixture
def model_file(tmp_path):
    """A small untrained CVAE (latent_dim 2) and its `.keras` file, as the train stage writes it."""
    model = build_cvae(model_params(2, (4, 8), (8, 4)), "float32")
    path = tmp_path / "cvae.keras"
    model.save(path)
    return model, path


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A SQLite store in tmp_path, made the process's (where MLflow's Model.log writes, as the train stage's session
    sets it), and a client of it."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    yield mlflow.MlflowClient(uri)
    mlflow.set_tracking_uri(None)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def loaded(path, config=None) -> ReconstructionModel:
    """The pyfunc model as MLflow builds it from its artifact and its model_config."""
    served = ReconstructionModel()
    served.load_context(PythonModelContext({ARTIFACT: str(path)}, {FORMAT_KEY: FORMAT} if config is None else config))
    return served


def mean_reconstructions(model, images) -> np.ndarray:
    mean, _ = model.encode(images)
    return keras.ops.convert_to_numpy(keras.ops.sigmoid(model.decode(mean)))


def test_predict_answers_images_with_the_pixel_probabilities_of_their_mean_reconstructions(model_file):
    model, path = model_file
    served = loaded(path)
    probabilities = served.predict(None, IMAGES)
    assert probabilities.shape == IMAGES.shape and probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities, mean_reconstructions(model, IMAGES), rtol=1e-5, atol=1e-7)
    # (n, 28, 28) of any number type, as a JSON request's lists arrive: the same answer.
    np.testing.assert_array_equal(served.predict(None, IMAGES[..., 0].astype(np.uint8)), probabilities)
    with pytest.raises(MlflowException, match=r"expected images of shape \(n, 28, 28, 1\) or \(n, 28, 28\), got "
                                              r"\(5, 784\)") as refused:
        served.predict(None, IMAGES.reshape(5, -1))
    assert refused.value.error_code == "INVALID_PARAMETER_VALUE"  # the scoring server's HTTP 400


def test_a_model_of_another_format_or_without_its_file_is_refused_in_one_line_saying_what_to_do(model_file, tmp_path):
    _, path = model_file
    for config, found in (({}, None), ({FORMAT_KEY: FORMAT + 1}, FORMAT + 1)):
        with pytest.raises(MlflowException, match=rf"^this model is of cvae_pipeline format {found}, this code reads "
                                                  rf"format {FORMAT}: load it with the version of the project"):
            loaded(path, config)
    with pytest.raises(MlflowException) as missing:
        loaded(tmp_path / "absent.keras")
    assert str(missing.value) == (f"{tmp_path / 'absent.keras'}: no trained model; download the model again, or log a "
                                  "new one with the project (`dvc repro train`)")


def test_a_logged_model_holds_its_file_code_format_signature_and_pinned_requirements_and_loads_unpickled(
        model_file, store, tmp_path, monkeypatch, caplog):
    model, path = model_file
    monkeypatch.setattr(sys, "path", list(sys.path))  # loading the model puts its code first there
    for name, value in NO_PICKLE.items():
        monkeypatch.setenv(name, value)
    experiment = store.create_experiment("e", artifact_location=(tmp_path / "mlruns").as_uri())
    run_id = store.create_run(experiment).info.run_id
    store.log_param(run_id, "model.latent_dim", "2")
    with caplog.at_level(logging.WARNING, logger="mlflow"):
        log_model(store, run_id, path, IMAGES[:2])
    # An environment without pip (one uv installs) warns of it at every logged model: nothing a user can act on.
    assert not [record for record in caplog.records if "pip version" in record.getMessage()]

    (logged,) = mlflow.search_logged_models(experiment_ids=[experiment], output_format="list")
    assert (logged.name, logged.source_run_id, logged.params) == ("model", run_id, {"model.latent_dim": "2"})
    info = mlflow.models.get_model_info(f"models:/{logged.model_id}")
    assert info.flavors["python_function"]["config"] == {FORMAT_KEY: FORMAT}
    (inputs,), (outputs,) = info.signature.inputs.inputs, info.signature.outputs.inputs
    assert inputs.shape == outputs.shape == (-1, 28, 28, 1) and inputs.type == np.dtype("float32")
    folder = Path(logged.artifact_location.removeprefix("file://"))
    assert (folder / "artifacts" / "cvae.keras").read_bytes() == path.read_bytes()
    assert (folder / "code" / "cvae_pipeline" / "tracking" / "logged_model.py").is_file()
    requirements = (folder / "requirements.txt").read_text().split()
    assert {f"{name}=={version(name)}" for name in ("tensorflow", "keras", "mlflow")} <= set(requirements)

    served = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
    np.testing.assert_allclose(served.predict(IMAGES), mean_reconstructions(model, IMAGES), rtol=1e-5, atol=1e-7)
