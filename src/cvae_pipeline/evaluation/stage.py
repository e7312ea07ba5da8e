"""The numbers a VAE paper reports, in nats per image, on the test set (the final report: nothing chooses by it) and on
the validation set (what runs are compared and promoted by), so the gap between them shows.

- `elbo`: reconstruction averaged over `evaluate.samples` draws of z, plus the analytic KL;
- `iwae`: the importance-weighted bound of Burda et al. (2015), log (1/k) sum_i p(x, z_i) / q(z_i|x) with
  z_i ~ q(z|x), a log-mean-exp computed stably; it is >= the ELBO and rises towards log p(x) with k;
- `pixel_accuracy`, `bce_per_pixel`: of the reconstruction decoded from the posterior mean;
- `active_units`: latent dimensions whose posterior mean varies across the split (variance > 0.01).

All draws of z are vectorized: one decoder call scores `decode_batch` (image, sample) pairs, so that the IWAE pass,
50 million decoder calls at the standard k = 5000, is as fast as the CPU allows (the decoder's one-channel output
layer included: `model.OneChannelConv2DTranspose`).
"""

import logging
import math
import sys
import time
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from cvae_pipeline import scores
from cvae_pipeline.config import EvaluateParams, Params
from cvae_pipeline.data import PreparedData
from cvae_pipeline.evaluation.train_outputs import UpstreamOutputs
from cvae_pipeline.fileio import write_json_atomic
from cvae_pipeline.model.loading import BATCH, as_inputs, load_trained
from cvae_pipeline.model.losses import analytic_kl, log_normal_pdf, reconstruction_nll
from cvae_pipeline.model.network import CVAE
from cvae_pipeline.tracking import lineage, runs
from cvae_pipeline.tracking.session import Session

log = logging.getLogger(__name__)

ACTIVE_UNIT_THRESHOLD = 0.01


def log_mean_exp(log_values: np.ndarray) -> np.ndarray:
    """log(mean(exp(x))) along the last axis, without overflow or underflow."""
    log_values = np.asarray(log_values, dtype=np.float64)
    peak = log_values.max(axis=-1, keepdims=True)
    return peak[..., 0] + np.log(np.mean(np.exp(log_values - peak), axis=-1))


class Evaluator:
    """Scores a trained model on a set of images with seeded draws of z: the ELBO, the IWAE bound and the rest."""

    def __init__(self, model: CVAE, cfg: EvaluateParams, seed: int):
        self.model = model
        self.cfg = cfg
        self.generator = tf.random.Generator.from_seed(seed)
        self._score = tf.function(self._score_samples, reduce_retracing=True)

    def _score_samples(self, images, mean, log_variance, samples: int):
        """For each image, `samples` draws z ~ q(z|x): log p(x|z) and log p(z) - log q(z|x), each (batch, samples)."""
        batch, latent_dim = tf.shape(mean)[0], tf.shape(mean)[1]
        noise = self.generator.normal((batch, samples, latent_dim))
        latent = mean[:, None, :] + tf.exp(log_variance[:, None, :] * 0.5) * noise
        logits = self.model.decode(tf.reshape(latent, (-1, latent_dim)))
        log_likelihood = -reconstruction_nll(tf.repeat(images, samples, axis=0), logits)
        log_prior_ratio = (log_normal_pdf(latent, 0.0, 0.0)
                           - log_normal_pdf(latent, mean[:, None, :], log_variance[:, None, :]))
        return tf.reshape(log_likelihood, (batch, samples)), log_prior_ratio

    def _log_weights(self, images, mean, log_variance, samples: int) -> tuple[np.ndarray, np.ndarray]:
        """log p(x|z_i) and log w_i = log p(x, z_i) - log q(z_i|x) for `samples` draws, chunked to `decode_batch`."""
        chunk = min(samples, self.cfg.decode_batch)
        likelihoods, weights = [], []
        for start in range(0, samples, chunk):
            log_likelihood, log_prior_ratio = self._score(images, mean, log_variance, min(chunk, samples - start))
            likelihoods.append(log_likelihood.numpy())
            weights.append((log_likelihood + log_prior_ratio).numpy())
        return np.concatenate(likelihoods, axis=1), np.concatenate(weights, axis=1)

    def evaluate(self, images: np.ndarray) -> dict[str, float]:
        """All metrics over `images` ((n, 28, 28) 0/1 uint8)."""
        k, samples = self.cfg.iwae_k, self.cfg.samples
        draws = max(k, samples)  # one set of draws serves both estimators: each uses the first ones it needs
        images_per_step = max(1, self.cfg.decode_batch // min(draws, self.cfg.decode_batch))
        steps = math.ceil(len(images) / images_per_step)
        bar = keras.utils.Progbar(steps, verbose=1 if sys.stdout.isatty() else 2, unit_name="batch")
        reconstruction, iwae, kl, means = [], [], [], []
        started = time.perf_counter()
        for step, begin in enumerate(range(0, len(images), images_per_step), start=1):
            inputs = tf.constant(as_inputs(images[begin:begin + images_per_step]))
            mean, log_variance = self.model.encode(inputs)
            log_likelihood, log_weights = self._log_weights(inputs, mean, log_variance, draws)
            reconstruction.append(-log_likelihood[:, :samples].mean(axis=1))
            iwae.append(log_mean_exp(log_weights[:, :k]))
            kl.append(analytic_kl(mean, log_variance).numpy())
            means.append(mean.numpy())
            bar.update(step)
        log.info("IWAE with k=%d over %d images: %.1f s", k, len(images), time.perf_counter() - started)
        nll, kl_mean = float(np.mean(np.concatenate(reconstruction))), float(np.mean(np.concatenate(kl)))
        return {
            scores.ELBO: -(nll + kl_mean),
            scores.RECONSTRUCTION_NLL: nll,
            scores.KL: kl_mean,
            scores.IWAE: float(np.mean(np.concatenate(iwae))),
            scores.IWAE_K: k,
            scores.SAMPLES: samples,
            scores.IMAGES: len(images),
            **mean_reconstruction_metrics(self.model, images, np.concatenate(means)),
        }


def mean_reconstruction_metrics(model: CVAE, images: np.ndarray, means: np.ndarray) -> dict[str, float]:
    """Pixel accuracy and per-pixel cross-entropy of decode(posterior mean); active units of the posterior means."""
    correct = cross_entropy = 0.0
    for start in range(0, len(images), BATCH):
        targets = as_inputs(images[start:start + BATCH])
        logits = model.decode(means[start:start + BATCH])
        correct += float(tf.reduce_sum(tf.cast((logits >= 0) == (targets >= 0.5), tf.float64)))
        cross_entropy += float(tf.reduce_sum(reconstruction_nll(targets, logits)))
    pixels = images.size
    return {
        scores.PIXEL_ACCURACY: correct / pixels,
        scores.BCE_PER_PIXEL: cross_entropy / pixels,
        scores.ACTIVE_UNITS: active_units(means),
    }


def active_units(posterior_means: np.ndarray, threshold: float = ACTIVE_UNIT_THRESHOLD) -> int:
    """Latent dimensions d with Var_x(E_q[z_d | x]) > threshold (Burda et al., 2015)."""
    return int(np.sum(np.var(posterior_means.astype(np.float64), axis=0) > threshold))


def evaluate_splits(model: CVAE, data: PreparedData, cfg: EvaluateParams, seed: int) -> dict[str, dict[str, float]]:
    """Every metric on the test set and on the validation set (when there is one), `{split: {metric: value}}`; each
    split scored with the same seeded draws, whatever the other."""
    splits = {scores.TEST: data.test, **({scores.VALIDATION: data.validation} if data.validation is not None else {})}
    metrics = {}
    for split, part in splits.items():
        metrics[split] = found = Evaluator(model, cfg, seed).evaluate(part.images)
        log.info("%s ELBO %.2f, IWAE (k=%d) %.2f, KL %.2f, active units %d of %d", split, found[scores.ELBO],
                 found[scores.IWAE_K], found[scores.IWAE], found[scores.KL], found[scores.ACTIVE_UNITS],
                 model.latent_dim)
    return metrics


def evaluate_and_track(params: Params, data: PreparedData, model_path: Path, upstream: UpstreamOutputs,
                       metrics_path: Path) -> dict[str, dict[str, float]]:
    """The evaluate stage: score the trained model on the test and validation sets, write the metrics file, log them
    to this execution's MLflow run (`runs.stage_run`: the training's run, or a follow-up run of its own) and to the
    training's logged model, with the data they were computed on."""
    model = load_trained(model_path, params.model)
    session = Session(params.tracking)
    with runs.stage_run(session, params, "evaluate", upstream) as run:
        metrics = evaluate_splits(model, data, params.evaluate, params.seed)
        write_json_atomic(metrics_path, metrics)
        logged = run and runs.trained_model(session, upstream.run_id)
        model_id = logged.model_id if logged else None
        datasets = lineage.log_datasets(session, data, params.data, list(metrics), model_id) if run else {}
        for split, found in metrics.items():
            session.log_metrics(runs.evaluation_metrics({split: found}), model_id=model_id, what=f"{split} scores",
                                dataset=datasets.get(split))
    return metrics
