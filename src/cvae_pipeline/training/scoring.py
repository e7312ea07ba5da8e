"""The validation set (the test set where there is none) scored after every epoch, in float32 whatever the training
precision.

The per-epoch ELBO is the number time to quality is read from, so it must not be a bfloat16 or float16 estimate:
a float32 twin of the model takes the trained weights before each scoring (the model itself, when it trains in
float32 and keeps no average). When the optimizer keeps a moving average of the weights, the twin takes that
average, which is what the train stage saves as the model. The twin also decodes the tutorial's progress grid, from
fixed latent vectors.
"""

import time

import keras
import numpy as np
import tensorflow as tf

from cvae_pipeline import scores
from cvae_pipeline.config import ModelParams
from cvae_pipeline.model.losses import elbo_terms
from cvae_pipeline.model.network import CVAE, build_cvae

PROGRESS_IMAGES = 16  # the tutorial's 4x4 grid of images decoded from fixed latent vectors
EVAL_BATCH = 1000


class EpochScorer:
    """Scores the model after each epoch on one split; its metrics are named after it (`validation_elbo`)."""

    def __init__(self, model: CVAE, cfg: ModelParams, split: str, images: np.ndarray, seed: int, float32: bool,
                 jit_compile: bool, averaging: keras.optimizers.Optimizer | None = None):
        """`split`: the name of the split `images` ((n, 28, 28, 1), binarized) come from; `float32`: whether `model`
        trains in float32 (then, without `averaging`, it scores itself); `averaging`: the optimizer whose moving
        average of the weights (Keras' `use_ema`) is scored instead of the weights, once it has taken a step. Build
        it in the strategy's scope."""
        self.model = model
        self.split = split
        self.images = images
        self.averaging = averaging
        self.twin = model if float32 and averaging is None else build_cvae(cfg, "float32")
        rng = np.random.default_rng([seed, 1])  # one fixed draw of z per image, and the grid's latent vectors
        self.noise = rng.standard_normal((len(images), cfg.latent_dim)).astype(np.float32)
        self.progress_latent = tf.constant(rng.standard_normal((PROGRESS_IMAGES, cfg.latent_dim)).astype(np.float32))
        self._score = tf.function(self._score_chunk, jit_compile=jit_compile)
        self._copy = tf.function(self._copy_weights) if self.twin is not model else lambda: None
        self._decode_progress = tf.function(self._progress)

    def take_weights(self) -> None:
        """The twin takes the model's current weights, or their average once there is one (`evaluate` does this
        first)."""
        if self.averaging is not None and int(keras.ops.convert_to_numpy(self.averaging.iterations)) > 0:
            # Keras' own way to put the averages in place (as `fit` ends), here into the twin, not the model.
            self.averaging.finalize_variable_values(self.twin.trainable_variables)
        else:
            self._copy()

    def _copy_weights(self):
        for target, source in zip(self.twin.weights, self.model.weights, strict=True):
            target.assign(tf.cast(source, target.dtype))

    def _score_chunk(self, images, noise):
        """One forward pass of the float32 model over a chunk of the images: sums of its ELBO's two terms."""
        reconstruction, kl = elbo_terms(self.twin, tf.cast(images, tf.float32), noise, "analytic")
        return tf.reduce_sum(reconstruction), tf.reduce_sum(kl)

    def _progress(self):
        return tf.round(tf.sigmoid(self.twin.decode(self.progress_latent))[..., 0] * 255)

    def evaluate(self) -> dict[str, float]:
        """The split's ELBO (analytic KL, one fixed draw of z per image) and its two terms, in nats per image,
        computed in float32, as `<split>_elbo`, `<split>_reconstruction`, `<split>_kl`; and the seconds it took."""
        started = time.perf_counter()
        self.take_weights()
        reconstruction = kl = 0.0
        for start in range(0, len(self.images), EVAL_BATCH):
            chunk = slice(start, start + EVAL_BATCH)
            chunk_reconstruction, chunk_kl = self._score(self.images[chunk], self.noise[chunk])
            reconstruction += float(chunk_reconstruction)
            kl += float(chunk_kl)
        n = len(self.images)
        elbo, reconstruction_name, kl_name = scores.epoch_columns(self.split)
        return {elbo: -(reconstruction + kl) / n, reconstruction_name: reconstruction / n, kl_name: kl / n,
                "eval_seconds": time.perf_counter() - started}

    def progress_grid(self) -> np.ndarray:
        """The fixed latent vectors decoded to pixel probabilities, as (16, 28, 28) uint8, by the weights the twin
        last took (when the model scores itself: its current ones)."""
        return self._decode_progress().numpy().astype(np.uint8)
