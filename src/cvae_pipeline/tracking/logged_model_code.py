"""The logged model's own code (MLflow's "models from code"): MLflow runs this file to build the model it loads.

Nothing is pickled: the model is `logged_model.ReconstructionModel`, rebuilt from the package copy that travels with it,
so it loads where pickled models are refused (`MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false`) and across cloudpickle
versions. `logged_model.log_model` names this file; importing it only tells MLflow which model the file defines.
"""

from mlflow.models import set_model

from cvae_pipeline import tensorflow_runtime

tensorflow_runtime.start()  # before the model's TensorFlow loads: quietly, with GPU memory that grows

from cvae_pipeline.tracking.logged_model import ReconstructionModel  # noqa: E402

set_model(ReconstructionModel())
