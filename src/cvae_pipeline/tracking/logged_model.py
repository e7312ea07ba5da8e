"""The trained model as an MLflow pyfunc model: it loads in any process, and `mlflow models serve` serves it.

MLflow's Keras flavor cannot bring the project's `CVAE` class along (it takes no `code_paths`), so a process that never
imported `cvae_pipeline` (the scoring server, a notebook) could not load it. The model is logged as a pyfunc instead,
from code (`logged_model_code.py`, nothing pickled): its artifact is the trained `.keras` file, this package travels
with it as code, and `predict` answers a batch of images (n, 28, 28, 1), pixel values in [0, 1] (binarized: 0 or 1),
with their mean reconstructions as pixel probabilities of the same shape: the posterior mean decoded, then the sigmoid.
"""

import logging
from importlib.metadata import version
from pathlib import Path

import mlflow.pyfunc
import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from cvae_pipeline.model.loading import load_model_file, reconstruct

ARTIFACT = "keras_model"
FORMAT = 1  # what `predict` takes and returns; a model of another format is refused by name, not misread
FORMAT_KEY = "cvae_pipeline_format"
PACKAGE = Path(__file__).resolve().parents[1]  # cvae_pipeline/, which travels with the model
REQUIREMENTS = ("tensorflow", "keras", "numpy", "pyyaml", "mlflow")
# MLflow writes a conda.yaml beside the pinned requirements, and warns when the environment has no pip to pin in it (an
# environment uv installed has none): the requirements are pinned all the same, so the warning says nothing to act on.
NO_PIP_WARNING = "Failed to resolve installed pip version"


class WithoutNoPipWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return NO_PIP_WARNING not in record.getMessage()


logging.getLogger("mlflow.utils.environment").addFilter(WithoutNoPipWarning())


class ReconstructionModel(mlflow.pyfunc.PythonModel):
    """Binarized images in, the pixel probabilities of their mean reconstructions out, both (n, 28, 28, 1) float32."""

    def load_context(self, context) -> None:
        found = (context.model_config or {}).get(FORMAT_KEY)
        if found != FORMAT:
            raise MlflowException(f"this model is of cvae_pipeline format {found}, this code reads format {FORMAT}: "
                                  "load it with the version of the project that logged it")
        self.model = load_model_file(context.artifacts[ARTIFACT], error=MlflowException, remedy=(
            "download the model again, or log a new one with the project (`dvc repro train`)"))

    def predict(self, context, model_input: np.ndarray, params=None) -> np.ndarray:
        images = np.asarray(model_input, dtype=np.float32)
        if images.ndim == 3:
            images = images[..., None]
        if images.shape[1:] != (28, 28, 1):
            raise MlflowException(f"expected images of shape (n, 28, 28, 1) or (n, 28, 28), got {images.shape}",
                                  error_code=INVALID_PARAMETER_VALUE)  # HTTP 400, not 500
        return reconstruct(self.model, images)


def log_model(client, run_id: str, model_file: Path, example: np.ndarray) -> None:
    """Log `model_file` (the trained `.keras` file) as the pyfunc model `model` of the run `run_id`, in the run's
    experiment, with the run's params, its signature, an input example and pinned requirements: what
    `mlflow.pyfunc.log_model` does for the active run, here for a run named by id. `client`: an `MlflowClient` of the
    process's tracking store, which MLflow's `Model.log` writes to."""
    from mlflow.models import Model, infer_signature

    # The file MLflow runs to rebuild the model: logged by path, not pickled.
    from cvae_pipeline.tracking import logged_model_code

    with_model = ReconstructionModel()
    with_model.model = load_model_file(model_file)
    signature = infer_signature(example, with_model.predict(None, example))
    run = client.get_run(run_id)
    model = client.create_logged_model(run.info.experiment_id, name="model", source_run_id=run_id,
                                       params=run.data.params)
    Model.log(
        artifact_path=None, name="model", flavor=mlflow.pyfunc, run_id=run_id, model_id=model.model_id,
        python_model=logged_model_code.__file__, artifacts={ARTIFACT: str(model_file)}, code_paths=[str(PACKAGE)],
        signature=signature, input_example=example, model_config={FORMAT_KEY: FORMAT},
        pip_requirements=[f"{name}=={version(name)}" for name in REQUIREMENTS])
