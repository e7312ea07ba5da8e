"""The negative ELBO of a VAE with a Bernoulli decoder and a N(0, I) prior, per image, in nats.

-ELBO(x) = E_q[-log p(x|z)] + KL(q(z|x) || p(z)), estimated with one (or more) z drawn by reparameterization.
The KL term is either the closed form for two Gaussians (`analytic`) or the tutorial's single-sample
estimate log q(z|x) - log p(z) (`monte_carlo`); both have the same expectation.
"""

import math

import tensorflow as tf

from cvae_pipeline.config import KL_MODES

LOG_2PI = math.log(2.0 * math.pi)


def log_normal_pdf(sample, mean, log_variance):
    """log N(sample; mean, exp(log_variance)), summed over the last axis."""
    return tf.reduce_sum(-0.5 * ((sample - mean) ** 2 * tf.exp(-log_variance) + log_variance + LOG_2PI), axis=-1)


def reconstruction_nll(images, logits):
    """-log p(x|z) for a Bernoulli decoder: the sigmoid cross-entropy summed over the 28x28x1 pixels."""
    cross_entropy = tf.nn.sigmoid_cross_entropy_with_logits(labels=images, logits=tf.cast(logits, images.dtype))
    return tf.reduce_sum(cross_entropy, axis=[1, 2, 3])


def analytic_kl(mean, log_variance):
    """KL(N(mean, exp(log_variance)) || N(0, I)) in closed form, summed over latent dimensions."""
    return 0.5 * tf.reduce_sum(tf.exp(log_variance) + mean**2 - 1.0 - log_variance, axis=-1)


def monte_carlo_kl(latent, mean, log_variance):
    """The single-sample estimate log q(z|x) - log p(z) at z = `latent`, as in the tutorial."""
    return log_normal_pdf(latent, mean, log_variance) - log_normal_pdf(latent, 0.0, 0.0)


def kl_divergence(kl_mode: str, latent, mean, log_variance):
    if kl_mode == "analytic":
        return analytic_kl(mean, log_variance)
    if kl_mode == "monte_carlo":
        return monte_carlo_kl(latent, mean, log_variance)
    raise ValueError(f"kl must be one of {', '.join(KL_MODES)}, got {kl_mode!r}")


def elbo_terms(model, images, noise, kl_mode: str = "analytic"):
    """Per-image reconstruction NLL and KL for float32 `images` (batch, 28, 28, 1), given N(0, I) `noise`."""
    mean, log_variance = model.encode(images)
    latent = model.reparameterize(mean, log_variance, noise)
    logits = model.decode(latent)
    return reconstruction_nll(images, logits), kl_divergence(kl_mode, latent, mean, log_variance)
