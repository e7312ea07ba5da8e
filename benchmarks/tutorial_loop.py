"""The yardstick of `make bench`: the TensorFlow tutorial's convolutional VAE and training loop (2020 edition), float32.

Written for this project from the tutorial's description, on purpose independent of the project's code but for reading
its prepared data: the tutorial's model (encoder Conv2D(32,3,s2)-Conv2D(64,3,s2)-Flatten-Dense(2*latent), decoder
Dense(7*7*32)-Reshape-Conv2DTranspose(64,3,s2)-Conv2DTranspose(32,3,s2)-Conv2DTranspose(1,3,s1)), its loss (a
single-sample Monte Carlo ELBO: the sigmoid cross-entropy summed over the pixels, plus log q(z|x) - log p(z)), Adam
1e-4, batches of 100 shuffled by tf.data, one `tf.function` call per optimizer step, and the test set scored after
every epoch. The tutorial published a test ELBO of -78.3 after 100 epochs at latent 50 (docs/recipe.md).

It trains on the prepared file's training split, the images the project's train stage trains on (50,000 by default:
`data.validation_size` holds 10,000 of the 60,000 out), and scores the file's test split. Each epoch's timings and
ELBO go to stdout, one JSON line each, and with `--json` to a file.

    python benchmarks/tutorial_loop.py --epochs 2 [--train-limit N] [--prepared data/prepared/mnist.npz] [--json out]
"""

import argparse
import json
import math
import time
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
import yaml
from keras import layers

from cvae_pipeline.data import load_prepared

ROOT = Path(__file__).resolve().parents[1]
LOG_2PI = math.log(2.0 * math.pi)


class TutorialCVAE(keras.Model):
    """The tutorial's CVAE: an encoder to the mean and log-variance of q(z|x), a decoder from z to pixel logits."""

    def __init__(self, latent_dim: int):
        super().__init__()
        self.latent_dim = latent_dim
        self.encoder = keras.Sequential([
            keras.Input(shape=(28, 28, 1)),
            layers.Conv2D(32, 3, strides=2, activation="relu"),
            layers.Conv2D(64, 3, strides=2, activation="relu"),
            layers.Flatten(),
            layers.Dense(latent_dim + latent_dim),  # no activation: the mean and the log-variance
        ])
        self.decoder = keras.Sequential([
            keras.Input(shape=(latent_dim,)),
            layers.Dense(7 * 7 * 32, activation="relu"),
            layers.Reshape((7, 7, 32)),
            layers.Conv2DTranspose(64, 3, strides=2, padding="same", activation="relu"),
            layers.Conv2DTranspose(32, 3, strides=2, padding="same", activation="relu"),
            layers.Conv2DTranspose(1, 3, strides=1, padding="same"),  # no activation: logits
        ])

    def encode(self, images):
        mean, log_variance = tf.split(self.encoder(images), num_or_size_splits=2, axis=1)
        return mean, log_variance

    @staticmethod
    def reparameterize(mean, log_variance):
        noise = tf.random.normal(shape=tf.shape(mean))
        return noise * tf.exp(log_variance * 0.5) + mean

    def decode(self, latent):
        return self.decoder(latent)


def log_normal_pdf(sample, mean, log_variance):
    """log N(sample; mean, exp(log_variance)), summed over the latent dimensions."""
    return tf.reduce_sum(-0.5 * ((sample - mean) ** 2.0 * tf.exp(-log_variance) + log_variance + LOG_2PI), axis=1)


def compute_loss(model: TutorialCVAE, images):
    """The negative ELBO, estimated with one z per image, averaged over the batch."""
    mean, log_variance = model.encode(images)
    latent = model.reparameterize(mean, log_variance)
    logits = model.decode(latent)
    cross_entropy = tf.nn.sigmoid_cross_entropy_with_logits(logits=logits, labels=images)
    log_likelihood = -tf.reduce_sum(cross_entropy, axis=[1, 2, 3])
    log_prior = log_normal_pdf(latent, 0.0, 0.0)
    log_posterior = log_normal_pdf(latent, mean, log_variance)
    return -tf.reduce_mean(log_likelihood + log_prior - log_posterior)


def as_float_images(images: np.ndarray) -> np.ndarray:
    """The prepared 0/1 images (n, 28, 28) as the tutorial feeds them: float32 (n, 28, 28, 1)."""
    return images[..., None].astype(np.float32)


def train(arguments: argparse.Namespace) -> dict:
    """Train for `arguments.epochs` epochs; the history of each epoch's timings and test ELBO, and the set's sizes."""
    keras.utils.set_random_seed(arguments.seed)
    data = load_prepared(arguments.prepared)
    train_images = as_float_images(data.train.images[: arguments.train_limit])
    test_images = as_float_images(data.test.images)
    train_batches = (tf.data.Dataset.from_tensor_slices(train_images)
                     .shuffle(len(train_images), seed=arguments.seed).batch(arguments.batch))
    test_batches = tf.data.Dataset.from_tensor_slices(test_images).batch(arguments.batch)
    model = TutorialCVAE(arguments.latent)
    optimizer = keras.optimizers.Adam(arguments.learning_rate)

    @tf.function
    def train_step(images):
        with tf.GradientTape() as tape:
            loss = compute_loss(model, images)
        gradients = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(gradients, model.trainable_variables, strict=True))

    # The tutorial scores eagerly; compiled, the yardstick's epochs are a little shorter: a comparison in its favour.
    score_step = tf.function(lambda images: compute_loss(model, images))

    history = []
    for epoch in range(1, arguments.epochs + 1):
        started = time.perf_counter()
        for images in train_batches:
            train_step(images)
        trained = time.perf_counter()
        losses = [float(score_step(images)) for images in test_batches]
        scored = time.perf_counter()
        history.append({"epoch": epoch, "seconds": scored - started, "epoch_seconds": trained - started,
                        "eval_seconds": scored - trained, "images_per_second": len(train_images) / (trained - started),
                        "test_elbo": -float(np.mean(losses))})  # as the tutorial: the mean of the batches' means
        print(json.dumps(history[-1]), flush=True)
    return {"train_images": len(train_images), "test_images": len(test_images),
            "parameters": model.encoder.count_params() + model.decoder.count_params(), "history": history}


def main() -> None:
    prepared = yaml.safe_load((ROOT / "dvc.yaml").read_text())["vars"][0]["paths"]["prepared"]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--latent", type=int, default=50, help="latent dimensions (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=100, help="images per optimizer step (default: %(default)s)")
    parser.add_argument("--learning-rate", type=float, default=1e-4, help="Adam's (default: %(default)s)")
    parser.add_argument("--train-limit", type=int, default=None, help="train on the first N training images only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prepared", type=Path, default=ROOT / prepared, help="default: %(default)s")
    parser.add_argument("--json", type=Path, help="where to write the history and the sets' sizes")
    arguments = parser.parse_args()
    result = train(arguments)
    if arguments.json:
        arguments.json.write_text(json.dumps({"arguments": {**vars(arguments), "prepared": str(arguments.prepared),
                                                            "json": str(arguments.json)}, **result}, indent=1))


if __name__ == "__main__":
    main()
