"""Evaluation metrics against NumPy references on a tiny model, and the IWAE bound's known properties."""

import math

import numpy as np
import pytest
import tensorflow as tf

from cvae_pipeline.config import EvaluateParams, ModelParams
from cvae_pipeline.evaluation.stage import Evaluator, active_units, log_mean_exp
from cvae_pipeline.model.network import build_cvae
from helpers import make_trainer, params_with, synthetic_digits

LOG_2PI = math.log(2 * math.pi)


def np_log_normal(x, mean, log_variance):
    return np.sum(-0.5 * ((x - mean) ** 2 * np.exp(-log_variance) + log_variance + LOG_2PI), axis=-1)


def np_bce(images, logits):
    logits = logits.astype(np.float64)
    return np.maximum(logits, 0) - logits * images + np.log1p(np.exp(-np.abs(logits)))


def test_log_mean_exp_is_stable_at_extremes():
    assert log_mean_exp(np.array([[1000.0, 1000.0]]))[0] == pytest.approx(1000.0)
    assert log_mean_exp(np.array([[-1000.0, -1000.0 + math.log(3)]]))[0] == pytest.approx(-1000.0 + math.log(2))
    assert log_mean_exp(np.array([[5.0]]))[0] == 5.0


def test_active_units_count_dimensions_whose_mean_varies():
    rng = np.random.default_rng(0)
    means = np.column_stack([rng.normal(0, 1, 500), rng.normal(0, 0.05, 500), np.full(500, 3.0)])
    assert active_units(means) == 1  # variances about 1, 0.0025, 0


def test_every_metric_matches_numpy_on_a_tiny_model():
    seed, latent_dim = 7, 3
    model = build_cvae(ModelParams(latent_dim=latent_dim, encoder_filters=(4, 8), decoder_filters=(8, 4)))
    images, _ = synthetic_digits(6, seed=3)
    cfg = EvaluateParams(samples=3, iwae_k=7, decode_batch=1000)  # one batch of 6 images, one chunk of 7 draws
    metrics = Evaluator(model, cfg, seed).evaluate(images)

    x = images[..., None].astype(np.float32)
    mean, log_variance = (t.numpy().astype(np.float64) for t in model.encode(x))
    noise = tf.random.Generator.from_seed(seed).normal((6, 7, latent_dim)).numpy().astype(np.float64)
    latent = mean[:, None] + np.exp(log_variance[:, None] / 2) * noise
    logits = model.decode(latent.reshape(-1, latent_dim).astype(np.float32)).numpy().reshape(6, 7, 28, 28, 1)
    log_likelihood = -np_bce(x[:, None], logits).reshape(6, 7, -1).sum(axis=-1)
    log_weights = log_likelihood + np_log_normal(latent, 0, 0) - np_log_normal(latent, mean[:, None],
                                                                                 log_variance[:, None])
    kl = 0.5 * np.sum(np.exp(log_variance) + mean**2 - 1 - log_variance, axis=1)
    reconstruction = -log_likelihood[:, :3].mean(axis=1)
    iwae = np.log(np.mean(np.exp(log_weights), axis=1))
    mean_logits = model.decode(mean.astype(np.float32)).numpy()

    assert metrics["kl"] == pytest.approx(kl.mean(), rel=1e-5)
    assert metrics["reconstruction_nll"] == pytest.approx(reconstruction.mean(), rel=1e-5)
    assert metrics["elbo"] == pytest.approx(-(reconstruction.mean() + kl.mean()), rel=1e-5)
    assert metrics["iwae"] == pytest.approx(iwae.mean(), rel=1e-5)
    assert metrics["pixel_accuracy"] == pytest.approx(np.mean((mean_logits >= 0) == (x >= 0.5)), abs=1e-9)
    assert metrics["bce_per_pixel"] == pytest.approx(np_bce(x, mean_logits).mean(), rel=1e-5)
    assert metrics["active_units"] == int(np.sum(np.var(mean, axis=0) > 0.01))
    assert (metrics["iwae_k"], metrics["samples"], metrics["images"]) == (7, 3, 6)


@pytest.fixture(scope="module")
def trained(request):
    from cvae_pipeline.data import PreparedData, Split

    data = PreparedData(Split(*synthetic_digits(512, seed=1)), Split(*synthetic_digits(200, seed=2)))
    trainer = make_trainer(params_with(model={"latent_dim": 4}, train={"batch_size": 32, "learning_rate": 1e-3}), data)
    for epoch in (1, 2):
        trainer.train_epoch(epoch)
    return trainer.model, data.test.images


def evaluate_with(model, images, k, samples=1, decode_batch=10_000, seed=0):
    cfg = EvaluateParams(samples=samples, iwae_k=k, decode_batch=decode_batch)
    return Evaluator(model, cfg, seed=seed).evaluate(images)


def test_iwae_is_at_least_the_elbo_and_rises_with_k(trained):
    model, images = trained
    elbo = evaluate_with(model, images, k=1, samples=20)["elbo"]
    bounds = [evaluate_with(model, images, k)["iwae"] for k in (1, 10, 100)]
    assert bounds[0] == pytest.approx(elbo, abs=1.0)  # k = 1 is a one-sample ELBO
    assert bounds[0] < bounds[1] < bounds[2]
    assert bounds[2] >= elbo


def test_chunking_the_draws_changes_nothing_but_the_noise(trained):
    model, images = trained
    whole = evaluate_with(model, images, k=50)
    chunked = evaluate_with(model, images, k=50, decode_batch=16)  # 3 images a step, draws in chunks of 16
    assert chunked["iwae"] == pytest.approx(whole["iwae"], abs=0.5)
    assert chunked["kl"] == pytest.approx(whole["kl"], rel=1e-5)  # analytic: no noise at all
    assert chunked["pixel_accuracy"] == whole["pixel_accuracy"]


def test_same_seed_same_metrics_and_another_seed_other_draws(trained):
    model, images = trained
    first = evaluate_with(model, images, k=20, samples=5)
    assert evaluate_with(model, images, k=20, samples=5) == first
    other = evaluate_with(model, images, k=20, samples=5, seed=1)
    # The draws of z depend on the seed: the sampled estimates move, the analytic KL does not.
    assert other["iwae"] != first["iwae"] and other["reconstruction_nll"] != first["reconstruction_nll"]
    assert other["kl"] == first["kl"]


def test_evaluate_reports_the_test_and_the_validation_set_each_with_the_same_draws(trained):
    from cvae_pipeline.data import PreparedData, Split
    from cvae_pipeline.evaluation.stage import evaluate_splits

    model, test_images = trained
    validation = Split(*synthetic_digits(50, seed=3))
    cfg = EvaluateParams(samples=2, iwae_k=5, decode_batch=10_000)
    both = evaluate_splits(model, PreparedData(Split(test_images[:1], np.zeros(1)), Split(test_images, np.zeros(200)),
                                               validation), cfg, seed=0)
    assert set(both) == {"test", "validation"}
    assert both["test"] == evaluate_with(model, test_images, k=5, samples=2)  # whatever the other split
    assert both["validation"] == evaluate_with(model, validation.images, k=5, samples=2)
    assert both["validation"]["images"] == 50 and both["test"]["images"] == 200
    tutorial = evaluate_splits(model, PreparedData(validation, Split(test_images, np.zeros(200))), cfg, seed=0)
    assert set(tutorial) == {"test"}  # data.validation_size 0: nothing else to report
