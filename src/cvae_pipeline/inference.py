"""Using a trained model: load it safely in float32, and encode or decode many images in batches."""

from pathlib import Path

import keras
import numpy as np

from cvae_pipeline.config import ModelParams
from cvae_pipeline.errors import UserInputError
from cvae_pipeline.fileio import DAMAGED_FILE_ERRORS
from cvae_pipeline.model import CVAE, build_cvae

BATCH = 1000


def load_trained(path: str | Path, cfg: ModelParams) -> CVAE:
    """The trained weights in a float32 model (however it was trained), loaded with Keras' safe mode."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"{path}: no trained model; run `dvc repro train` first")
    try:
        saved = keras.models.load_model(path, safe_mode=True, compile=False)
    except DAMAGED_FILE_ERRORS as error:
        raise UserInputError(f"{path}: not a model this pipeline can load ({type(error).__name__}: {error}); "
                             "run `dvc repro train` to write it again") from None
    if not isinstance(saved, CVAE) or saved.latent_dim != cfg.latent_dim:
        raise UserInputError(f"{path}: model does not match model.latent_dim={cfg.latent_dim} in params.yaml; "
                             "run `dvc repro train`")
    keras.mixed_precision.set_dtype_policy("float32")
    model = build_cvae(cfg)
    model.set_weights(saved.get_weights())
    return model


def as_inputs(images: np.ndarray) -> np.ndarray:
    """(n, 28, 28) 0/1 uint8 to the model's (n, 28, 28, 1) float32."""
    return images[..., None].astype(np.float32)


def posterior(model: CVAE, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and log-variance of q(z|x) for every image, in batches."""
    means, log_variances = [], []
    for start in range(0, len(images), BATCH):
        mean, log_variance = model.encode(as_inputs(images[start:start + BATCH]))
        means.append(keras.ops.convert_to_numpy(mean))
        log_variances.append(keras.ops.convert_to_numpy(log_variance))
    return np.concatenate(means), np.concatenate(log_variances)


def decode_probabilities(model: CVAE, latent: np.ndarray) -> np.ndarray:
    """Pixel probabilities (n, 28, 28) for latent vectors (n, latent_dim), in batches."""
    latent = latent.astype(np.float32)
    chunks = [keras.ops.convert_to_numpy(keras.ops.sigmoid(model.decode(latent[start:start + BATCH])))
              for start in range(0, len(latent), BATCH)]
    return np.concatenate(chunks)[..., 0]
