"""The per-epoch test ELBO and progress grid: in float32 whatever the training precision, from the trained weights."""

import numpy as np
import pytest
import tensorflow as tf

from conftest import params_with
from cvae_pipeline.losses import elbo_terms
from cvae_pipeline.model import build_cvae
from cvae_pipeline.trainer import Trainer

BFLOAT16 = {"batch_size": 32, "learning_rate": 1e-3, "schedule": "constant", "eval_limit": None,
            "precision": "mixed_bfloat16"}


def float32_copy(model):
    copy = build_cvae(params_with(model={"latent_dim": 4}).model, "float32")
    copy.set_weights(model.get_weights())
    return copy


def test_the_test_set_is_scored_in_float32_whatever_the_training_precision(small_data):
    trainer = Trainer(params_with(model={"latent_dim": 4}, train=BFLOAT16), small_data)
    trainer.train_epoch(1)
    scored = trainer.scorer.evaluate()
    images = tf.constant(trainer.scorer.images.astype(np.float32))
    reconstruction, kl = elbo_terms(float32_copy(trainer.model), images, trainer.scorer.noise)
    expected = -float(tf.reduce_mean(reconstruction + kl))
    assert scored["test_elbo"] == pytest.approx(expected, abs=1e-4)
    assert scored["test_reconstruction"] + scored["test_kl"] == pytest.approx(-expected, abs=1e-4)
    reconstruction, kl = elbo_terms(trainer.model, images, trainer.scorer.noise)  # what bfloat16 would have said
    assert abs(-float(tf.reduce_mean(reconstruction + kl)) - expected) > 1e-3
    assert scored["eval_seconds"] > 0


def test_the_progress_grid_decodes_the_trained_weights_in_float32(small_data):
    trainer = Trainer(params_with(model={"latent_dim": 4}, train=BFLOAT16), small_data)
    scorer = trainer.scorer

    def expected():
        logits = float32_copy(trainer.model).decode(scorer.progress_latent)
        return np.round(tf.sigmoid(logits).numpy()[..., 0] * 255).astype(np.uint8)

    initial = scorer.progress_grid(take_weights=True)  # before any scoring: the grid of epoch 0
    assert initial.shape == (16, 28, 28) and initial.dtype == np.uint8
    np.testing.assert_array_equal(initial, expected())
    trainer.train_epoch(1)
    assert not np.array_equal(scorer.progress_grid(take_weights=True), initial)
    np.testing.assert_array_equal(scorer.progress_grid(), expected())
