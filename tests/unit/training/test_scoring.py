"""The per-epoch ELBO and progress grid: of the validation set, in float32 whatever the training precision, from the
trained weights."""

import numpy as np
import pytest
import tensorflow as tf

from cvae_pipeline.model.losses import elbo_terms
from cvae_pipeline.model.network import build_cvae
from cvae_pipeline.training.loop import Trainer
from helpers import make_trainer, params_with

BFLOAT16 = {"batch_size": 32, "learning_rate": 1e-3, "schedule": "constant", "eval_limit": None,
            "precision": "mixed_bfloat16", "ema_momentum": 0}


def bfloat16_trainer(data) -> Trainer:
    return make_trainer(params_with(model={"latent_dim": 4}, train=BFLOAT16), data)


def float32_copy(trainer: Trainer):
    copy = build_cvae(trainer.params.model, "float32")
    copy.set_weights(trainer.model.get_weights())
    return copy


def test_the_test_set_is_scored_in_float32_whatever_the_training_precision(small_data):
    trainer = bfloat16_trainer(small_data)
    trainer.train_epoch(1)
    scored = trainer.scorer.evaluate()
    images = tf.constant(trainer.scorer.images.astype(np.float32))
    reconstruction, kl = elbo_terms(float32_copy(trainer), images, trainer.scorer.noise)
    assert scored["test_reconstruction"] == pytest.approx(float(tf.reduce_mean(reconstruction)), abs=1e-4)
    assert scored["test_kl"] == pytest.approx(float(tf.reduce_mean(kl)), abs=1e-4)
    expected = -float(tf.reduce_mean(reconstruction + kl))
    assert scored["test_elbo"] == pytest.approx(expected, abs=1e-4)
    reconstruction, kl = elbo_terms(trainer.model, images, trainer.scorer.noise)  # what bfloat16 would have said
    assert abs(-float(tf.reduce_mean(reconstruction + kl)) - expected) > 1e-3
    assert scored["eval_seconds"] > 0


def test_the_progress_grids_decode_the_trained_weights_in_float32_from_epoch_0(small_data, tmp_path):
    trainer = bfloat16_trainer(small_data)
    scorer = trainer.scorer

    def expected():
        logits = float32_copy(trainer).decode(scorer.progress_latent)
        return np.round(tf.sigmoid(logits).numpy()[..., 0] * 255).astype(np.uint8)

    initial = trainer.start(trainer.checkpoint(tmp_path / "none.npz")).grids  # a fresh start: the grid of epoch 0
    assert len(initial) == 1 and initial[0].shape == (16, 28, 28) and initial[0].dtype == np.uint8
    np.testing.assert_array_equal(initial[0], expected())
    trainer.train_epoch(1)
    scorer.evaluate()
    after = scorer.progress_grid()
    assert not np.array_equal(after, initial[0])
    np.testing.assert_array_equal(after, expected())


def test_each_epoch_scores_the_validation_set_and_the_test_set_only_where_there_is_none(small_data):
    from cvae_pipeline.data import PreparedData, Split
    from helpers import synthetic_digits

    with_validation = PreparedData(small_data.train, small_data.test, Split(*synthetic_digits(64, seed=3)))
    params = params_with(model={"latent_dim": 4}, train={**BFLOAT16, "precision": "float32"})
    scorer = make_trainer(params, with_validation).scorer
    assert scorer.split == "validation"
    np.testing.assert_array_equal(scorer.images[..., 0], with_validation.validation.images)
    assert set(scorer.evaluate()) == {"validation_elbo", "validation_reconstruction", "validation_kl", "eval_seconds"}
    tutorial = make_trainer(params, small_data).scorer  # data.validation_size 0
    assert tutorial.split == "test" and "test_elbo" in tutorial.evaluate()
