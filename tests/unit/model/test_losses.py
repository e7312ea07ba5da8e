"""The negative ELBO's terms against NumPy references written from their definitions."""

import math

import numpy as np
import pytest
import tensorflow as tf

from cvae_pipeline.config import ModelParams
from cvae_pipeline.model.losses import analytic_kl, elbo_terms, kl_divergence, monte_carlo_kl, reconstruction_nll
from cvae_pipeline.model.network import build_cvae

rng = np.random.default_rng(42)


def np_log_normal(x, mean, log_variance):
    variance = np.exp(log_variance)
    return np.sum(-0.5 * np.log(2 * math.pi * variance) - (x - mean) ** 2 / (2 * variance), axis=-1)


def np_bernoulli_nll(images, logits):
    probabilities = 1 / (1 + np.exp(-logits.astype(np.float64)))
    log_likelihood = images * np.log(probabilities) + (1 - images) * np.log1p(-probabilities)
    return -log_likelihood.reshape(len(images), -1).sum(axis=1)


def np_kl(mean, log_variance):
    # KL(N(m, s^2) || N(0, 1)) = log(1/s) + (s^2 + m^2)/2 - 1/2, per dimension
    variance = np.exp(log_variance)
    return np.sum(-0.5 * log_variance + (variance + mean**2) / 2 - 0.5, axis=-1)


def test_reconstruction_nll_is_the_bernoulli_negative_log_likelihood():
    images = rng.integers(0, 2, (6, 28, 28, 1)).astype(np.float32)
    logits = rng.normal(0, 3, (6, 28, 28, 1)).astype(np.float32)
    np.testing.assert_allclose(reconstruction_nll(tf.constant(images), tf.constant(logits)),
                               np_bernoulli_nll(images, logits), rtol=1e-5)


def test_reconstruction_nll_is_stable_for_large_logits():
    images = np.ones((1, 28, 28, 1), np.float32)
    logits = np.full((1, 28, 28, 1), -200.0, np.float32)  # sigmoid underflows to 0 in float32
    np.testing.assert_allclose(reconstruction_nll(tf.constant(images), tf.constant(logits)), [200.0 * 784])


def test_analytic_kl_matches_the_closed_form():
    mean = rng.normal(size=(8, 5)).astype(np.float32)
    log_variance = rng.normal(size=(8, 5)).astype(np.float32)
    np.testing.assert_allclose(analytic_kl(mean, log_variance), np_kl(mean, log_variance), rtol=1e-5)
    assert np.allclose(analytic_kl(np.zeros((1, 5), np.float32), np.zeros((1, 5), np.float32)), 0.0)


def test_monte_carlo_kl_is_log_q_minus_log_p():
    mean = rng.normal(size=(8, 5)).astype(np.float32)
    log_variance = rng.normal(size=(8, 5)).astype(np.float32)
    latent = rng.normal(size=(8, 5)).astype(np.float32)
    expected = np_log_normal(latent, mean, log_variance) - np_log_normal(latent, 0.0, 0.0)
    np.testing.assert_allclose(monte_carlo_kl(latent, mean, log_variance), expected, rtol=1e-4, atol=1e-4)


def test_monte_carlo_kl_averages_to_the_analytic_kl():
    mean = np.tile(rng.normal(size=(1, 3)), (200_000, 1)).astype(np.float32)
    log_variance = np.tile(rng.normal(size=(1, 3)), (200_000, 1)).astype(np.float32)
    latent = mean + np.exp(log_variance / 2) * rng.normal(size=mean.shape).astype(np.float32)
    estimate = float(np.mean(monte_carlo_kl(latent, mean, log_variance)))
    assert estimate == pytest.approx(float(np_kl(mean[:1], log_variance[:1])[0]), abs=0.02)


def test_unknown_kl_mode_is_refused():
    with pytest.raises(ValueError, match="kl must be one of analytic, monte_carlo"):
        kl_divergence("exact", None, None, None)


@pytest.mark.parametrize("kl_mode", ["analytic", "monte_carlo"])
def test_elbo_terms_of_a_model_match_numpy(kl_mode):
    model = build_cvae(ModelParams(latent_dim=4, encoder_filters=(4, 8), decoder_filters=(8, 4)))
    images = rng.integers(0, 2, (3, 28, 28, 1)).astype(np.float32)
    noise = rng.normal(size=(3, 4)).astype(np.float32)
    reconstruction, kl = elbo_terms(model, tf.constant(images), tf.constant(noise), kl_mode)

    mean, log_variance = (np.asarray(t) for t in model.encode(images))
    latent = mean + np.exp(log_variance / 2) * noise
    logits = np.asarray(model.decode(latent))
    np.testing.assert_allclose(reconstruction, np_bernoulli_nll(images, logits), rtol=1e-4)
    expected_kl = (np_kl(mean, log_variance) if kl_mode == "analytic"
                   else np_log_normal(latent, mean, log_variance) - np_log_normal(latent, 0, 0))
    np.testing.assert_allclose(kl, expected_kl, rtol=1e-4, atol=1e-4)
