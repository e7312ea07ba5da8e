"""Using a trained model: load it safely in float32, and encode or decode many images in batches."""

from pathlib import Path

import keras
import numpy as np

from cvae_pipeline import tensorflow_runtime
from cvae_pipeline.config import ModelParams
from cvae_pipeline.errors import UserInputError
from cvae_pipeline.fileio import DAMAGED_FILE_ERRORS
from cvae_pipeline.model.network import CVAE, build_cvae

BATCH = 1000


def load_model_file(path: str | Path, error: type[Exception] = UserInputError,
                    remedy: str | None = None) -> CVAE:
    """A trained `.keras` file as a float32 CVAE (however it was trained), loaded with Keras' safe mode; a missing,
    damaged or foreign file raises `error` with one line naming it and saying what to do: `remedy`, else retrain."""
    path = Path(path)
    tensorflow_runtime.start()  # wherever a model is loaded (a stage, a command, a served model): GPU memory grows
    if not path.is_file():
        raise error(f"{path}: no trained model; {remedy or 'run `dvc repro train` first'}")
    try:
        saved = keras.models.load_model(path, safe_mode=True, compile=False)
    except DAMAGED_FILE_ERRORS as problem:
        raise error(f"{path}: not a model this version of cvae_pipeline can load ({type(problem).__name__}: "
                    f"{problem}); {remedy or 'run `dvc repro train` to write it again'}") from None
    if not isinstance(saved, CVAE):
        raise error(f"{path}: a {type(saved).__name__}, not the CVAE that train writes; "
                    f"{remedy or 'run `dvc repro train`'}")
    model = build_cvae(ModelParams(latent_dim=saved.latent_dim, encoder_filters=saved.encoder_filters,
                                    decoder_filters=saved.decoder_filters), "float32")
    model.set_weights(saved.get_weights())
    return model


def load_trained(path: str | Path, cfg: ModelParams) -> CVAE:
    """The trained model of `path`, which must match `cfg` (params.yaml's model section)."""
    model = load_model_file(path)
    if model.latent_dim != cfg.latent_dim:
        raise UserInputError(f"{path}: model does not match model.latent_dim={cfg.latent_dim} in params.yaml; "
                             "run `dvc repro train`")
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


def reconstruct(model: CVAE, images: np.ndarray) -> np.ndarray:
    """Pixel probabilities of the mean reconstructions of (n, 28, 28, 1) float32 images, same shape, in batches."""
    chunks = [keras.ops.convert_to_numpy(keras.ops.sigmoid(model(images[start:start + BATCH])))
              for start in range(0, len(images), BATCH)]
    return np.concatenate(chunks) if chunks else np.zeros((0, 28, 28, 1), np.float32)


def decode_probabilities(model: CVAE, latent: np.ndarray) -> np.ndarray:
    """Pixel probabilities (n, 28, 28) for latent vectors (n, latent_dim), in batches."""
    latent = latent.astype(np.float32)
    chunks = [keras.ops.convert_to_numpy(keras.ops.sigmoid(model.decode(latent[start:start + BATCH])))
              for start in range(0, len(latent), BATCH)]
    return np.concatenate(chunks)[..., 0]
