"""Using a trained model in-process: loading a `.keras` file (safely, in float32, or one clear error) and
reconstructing images in batches."""

import keras
import numpy as np
import pytest
from mlflow.exceptions import MlflowException

from cvae_pipeline.config import ModelParams
from cvae_pipeline.errors import UserInputError
from cvae_pipeline.model.loading import BATCH, load_model_file, load_trained, reconstruct
from cvae_pipeline.model.network import build_cvae

SMALL = ModelParams(latent_dim=2, encoder_filters=(4, 8), decoder_filters=(8, 4))


@pytest.fixture
def saved(tmp_path):
    keras.mixed_precision.set_dtype_policy("float32")
    model = build_cvae(SMALL)
    path = tmp_path / "cvae.keras"
    model.save(path)
    return model, path


def test_a_saved_model_loads_in_float32_whatever_policy_is_set(saved):
    model, path = saved
    try:
        keras.mixed_precision.set_dtype_policy("mixed_bfloat16")
        loaded = load_model_file(path)
    finally:
        keras.mixed_precision.set_dtype_policy("float32")
    assert loaded.compute_dtype == "float32" and loaded.encoder_filters == (4, 8)
    for mine, theirs in zip(loaded.get_weights(), model.get_weights(), strict=True):
        np.testing.assert_array_equal(mine, theirs)


def test_reconstructions_are_the_decoded_posterior_means_as_probabilities_in_batches(saved):
    model, _ = saved
    images = np.random.default_rng(0).integers(0, 2, (BATCH + 3, 28, 28, 1)).astype(np.float32)
    probabilities = reconstruct(model, images)
    assert probabilities.shape == images.shape and probabilities.dtype == np.float32
    mean, _ = model.encode(images[-3:])
    expected = keras.ops.convert_to_numpy(keras.ops.sigmoid(model.decode(mean)))
    np.testing.assert_allclose(probabilities[-3:], expected, rtol=1e-5, atol=1e-7)  # the last, short batch too
    assert ((probabilities > 0) & (probabilities < 1)).all()


def test_a_missing_damaged_or_foreign_file_raises_one_clear_error_of_the_callers_type(saved, tmp_path):
    _, path = saved
    with pytest.raises(UserInputError, match="no trained model; run `dvc repro train` first"):
        load_model_file(tmp_path / "none.keras")
    damaged = tmp_path / "damaged.keras"
    damaged.write_bytes(path.read_bytes()[:500])
    with pytest.raises(MlflowException, match=r"damaged\.keras: not a model this version of cvae_pipeline can load"):
        load_model_file(damaged, error=MlflowException)
    other = tmp_path / "other.keras"
    keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)]).save(other)
    with pytest.raises(UserInputError, match="a Sequential, not the CVAE that train writes"):
        load_model_file(other)
    with pytest.raises(UserInputError, match=r"does not match model\.latent_dim=3"):
        load_trained(path, ModelParams(latent_dim=3, encoder_filters=(4, 8), decoder_filters=(8, 4)))
