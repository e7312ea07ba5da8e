"""The training set where the model runs, and the seeded order of its batches.

The images stay on the model's devices, one copy on each replica's device, in a dtype that device can gather; tf.data
shuffles and batches only their indices, and each step gathers its batch there: no host-to-device copy per step. Each
epoch's order is a function of (seed, epoch) only, so a resumed run sees the batches an uninterrupted one would.
"""

import logging

import numpy as np
import tensorflow as tf

from cvae_pipeline.errors import UserInputError
from cvae_pipeline.training import hardware

log = logging.getLogger(__name__)


class TrainingSet:
    def __init__(self, images: np.ndarray, batch_size: int, seed: int, strategy: tf.distribute.Strategy,
                 machine: hardware.Machine):
        """`images`: (n, 28, 28, 1) binarized; `batch_size`: `train.batch_size`, the global batch asked for."""
        self.images = images
        self.seed = seed
        self.strategy = strategy
        stored = images.astype(hardware.image_dtype(machine).as_numpy_dtype)
        self.replica_images = strategy.experimental_distribute_values_from_function(
            lambda context: tf.identity(tf.constant(stored)))
        replicas = strategy.num_replicas_in_sync
        # tf.distribute would hand some replicas fewer images, or none: each gets the same whole number.
        self.batch_size = hardware.replica_batch(batch_size, replicas)
        if self.batch_size != batch_size:
            log.warning("train.batch_size %d does not split evenly over %d replicas: training with %d (%d each)",
                        batch_size, replicas, self.batch_size, self.batch_size // replicas)
        # Nor can a last short batch be shared: with several replicas it is dropped (a different few images each epoch).
        self.whole_batches_only = replicas > 1
        count = len(images)
        whole, rest = divmod(count, self.batch_size)
        self.steps_per_epoch = whole + (1 if rest and not self.whole_batches_only else 0)
        if self.steps_per_epoch == 0:
            raise UserInputError(f"train.batch_size: a batch of {self.batch_size} is more than the {count} training "
                                 f"images; with {replicas} replicas a batch must be whole")

    def batches(self, first_epoch: int, last_epoch: int):
        """An iterator over the batches of image indices of epochs `first_epoch` to `last_epoch`, distributed over
        the replicas.

        One iterator for the whole training, without tf.data's autotuning (there is nothing to tune in batching
        indices): deleting an autotuned iterator can block for seconds, which with one iterator an epoch stalled
        training between every two epochs (docs/performance.md)."""
        count, seed = len(self.images), self.seed

        def epoch_batches(epoch):
            order = tf.random.experimental.stateless_shuffle(tf.range(count, dtype=tf.int64),
                                                             seed=tf.stack([tf.constant(seed, tf.int64), epoch]))
            return tf.data.Dataset.from_tensor_slices(order).batch(self.batch_size,
                                                                   drop_remainder=self.whole_batches_only)

        epochs = tf.data.Dataset.range(first_epoch, last_epoch + 1)
        options = tf.data.Options()
        options.autotune.enabled = False
        dataset = epochs.flat_map(epoch_batches).prefetch(2).with_options(options)
        return iter(self.strategy.experimental_distribute_dataset(dataset))
