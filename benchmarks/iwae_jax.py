"""The importance-weighted bound of a trained model on a GPU with JAX and no TensorFlow (a cross-check, not a stage).

The pipeline's `evaluate` stage needs TensorFlow; a machine with only JAX (a lent GPU with no package registry, say)
can still score the model file it wrote: Keras 3 loads `models/cvae.keras` on its JAX backend and this script
computes the same estimator as `cvae_pipeline.evaluation.stage` (one set of K draws z ~ q(z|x) per test image;
log (1/k) sum_i p(x|z_i) p(z_i) / q(z_i|x) over the first k draws for each k asked for), in float32 with
full-precision matrix products (no TF32). Its draws are JAX's, so its bounds differ from evaluate's by Monte Carlo
noise only: the k=5000 figure in docs/recipe.md came from here, with k=1000 and k=2500 matching evaluate's to 0.02 nats.

    KERAS_BACKEND=jax PYTHONPATH=src python benchmarks/iwae_jax.py models/cvae.keras data/prepared/mnist.npz 5000 1000

`--decodes` (default 50,000) decoder evaluations per step: about 65 GB of GPU memory; lower it on smaller cards.
"""

import argparse
import math
import time

import jax
import jax.numpy as jnp
import keras
import numpy as np

from cvae_pipeline.model import network as _registers_cvae  # noqa: F401  (load_model needs the CVAE class)

LOG_2PI = math.log(2.0 * math.pi)


def log_normal(sample, mean, log_variance):
    return jnp.sum(-0.5 * ((sample - mean) ** 2 * jnp.exp(-log_variance) + log_variance + LOG_2PI), axis=-1)


def log_weights_function(model, k: int):
    """jit-compiled: for a batch of images, log p(x, z_i) - log q(z_i|x) for k draws each, (batch, k)."""

    @jax.jit
    def log_weights(key, images):
        mean, log_variance = model.encode(images)
        noise = jax.random.normal(key, (images.shape[0], k, mean.shape[-1]))
        latent = mean[:, None, :] + jnp.exp(log_variance[:, None, :] * 0.5) * noise
        logits = model.decode(latent.reshape(-1, mean.shape[-1])).reshape(images.shape[0], k, -1)
        targets = images.reshape(images.shape[0], 1, -1)
        cross_entropy = jnp.maximum(logits, 0) - logits * targets + jnp.log1p(jnp.exp(-jnp.abs(logits)))
        log_prior_ratio = log_normal(latent, 0.0, 0.0) - log_normal(latent, mean[:, None, :], log_variance[:, None, :])
        return log_prior_ratio - jnp.sum(cross_entropy, axis=-1)

    return log_weights


def log_mean_exp(values: np.ndarray) -> np.ndarray:
    top = values.max(axis=1, keepdims=True)
    return top[:, 0] + np.log(np.mean(np.exp(values - top), axis=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("prepared")
    parser.add_argument("k", type=int, nargs="+",
                        help="importance samples; the largest is drawn, smaller ones reuse its first draws")
    parser.add_argument("--decodes", type=int, default=50_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--images", type=int, default=None, help="only the first N test images (a quick check)")
    args = parser.parse_args()
    jax.config.update("jax_default_matmul_precision", "highest")
    model = keras.saving.load_model(args.model, compile=False)
    packed = np.load(args.prepared)["test_images"]
    images = np.unpackbits(packed, axis=1, count=28 * 28).reshape(-1, 28, 28, 1).astype(np.float32)[:args.images]
    draws = max(args.k)
    per_step = max(1, args.decodes // draws)
    log_weights = log_weights_function(model, draws)
    key, bounds = jax.random.key(args.seed), {k: [] for k in sorted(set(args.k), reverse=True)}
    started = time.perf_counter()
    for begin in range(0, len(images), per_step):
        key, step_key = jax.random.split(key)
        weights = np.asarray(log_weights(step_key, jnp.asarray(images[begin:begin + per_step])), dtype=np.float64)
        for k, parts in bounds.items():
            parts.append(log_mean_exp(weights[:, :k]))
    seconds = time.perf_counter() - started
    print(f"{jax.devices()[0].device_kind}: {len(images)} images x {draws} draws in {seconds:.1f} s "
          f"({len(images) * draws / seconds:,.0f} decodes/s, compilation included)")
    for k, parts in bounds.items():
        values = np.concatenate(parts)
        spread = values.std() / math.sqrt(len(values))
        print(f"iwae k={k}: {values.mean():.4f} (standard error over images {spread:.4f})")


if __name__ == "__main__":
    main()
