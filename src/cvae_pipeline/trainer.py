"""Training the CVAE: a seeded tf.data pipeline, a compiled step, per-epoch test metrics and resumable checkpoints.

`Trainer` owns the model, the optimizer and the noise generator, and trains epoch by epoch. The per-epoch test ELBO,
from which time to quality is read, is scored in float32 whatever the training precision (by a float32 twin of the
model that takes its weights), and an epoch's checkpoint and logging run in the background while the next one trains.
"""

import dataclasses
import functools
import logging
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from cvae_pipeline import checkpoints, devices, optimization, sources
from cvae_pipeline.checkpoints import TrainingState
from cvae_pipeline.config import Params
from cvae_pipeline.data import PreparedData
from cvae_pipeline.distribution import is_chief, lost_worker, make_strategy
from cvae_pipeline.errors import TrainingError, UserInputError
from cvae_pipeline.losses import elbo_terms
from cvae_pipeline.model import build_cvae

log = logging.getLogger(__name__)

PROGRESS_IMAGES = 16  # the tutorial's 4x4 grid of images decoded from fixed latent vectors
EVAL_BATCH = 1000
# The history's measures of time, which differ from run to run; every other column a seed fixes.
TIMING_COLUMNS = ("epoch_seconds", "eval_seconds", "elapsed_seconds", "images_per_second")


class Trainer:
    def __init__(self, params: Params, data: PreparedData, script: Path | None = None,
                 machine: devices.Machine | None = None, started: float | None = None):
        """`script`: the entry point whose code (and the modules it imports) trains; `started`: its
        `time.perf_counter()` at start, from which each epoch's `elapsed_seconds` counts (default: now)."""
        self.params = params
        self.script = script or Path(__file__)
        self.started = time.perf_counter() if started is None else started
        cfg = params.train
        self.strategy = make_strategy(cfg.strategy)  # first: a multi-worker strategy must precede other TF work
        self.is_chief = is_chief(self.strategy)
        self.machine = machine or devices.detect()
        self.precision = devices.choose_precision(cfg.precision, self.machine)
        self.jit_compile = devices.choose_jit(cfg.jit_compile, self.machine)
        keras.utils.set_random_seed(params.seed)
        if cfg.deterministic:
            tf.config.experimental.enable_op_determinism()
        self._place_data(data)
        keras.mixed_precision.set_dtype_policy(self.precision.value)
        with self.strategy.scope():  # variables mirrored on every replica; each replica its own noise stream
            self.model = build_cvae(params.model)
            self.optimizer = optimization.make_optimizer(cfg, self.precision.value, self.steps_per_epoch)
            self.optimizer.build(self.model.trainable_variables)
            self.generator = tf.random.Generator.from_seed(params.seed)
        # The test set is scored in float32 whatever the training precision: the twin takes the weights each epoch.
        float32 = self.precision.value == "float32"
        self.scorer = self.model if float32 else build_cvae(params.model, "float32")
        rng = np.random.default_rng([params.seed, 1])
        latent = params.model.latent_dim
        self.eval_noise = rng.standard_normal((len(self.eval_images), latent)).astype(np.float32)
        self.progress_latent = tf.constant(rng.standard_normal((PROGRESS_IMAGES, latent)).astype(np.float32))
        self._train_step = tf.function(self._step, jit_compile=self.jit_compile.value)
        # The loop over a call's steps stays outside XLA: it reads the tf.data iterator.
        self._train_steps = tf.function(self._steps)
        self._eval_step = tf.function(self._eval, jit_compile=self.jit_compile.value)
        self._take_weights = tf.function(self._copy_weights) if not float32 else lambda: None
        self._decode_progress = tf.function(self._progress)

    def _place_data(self, data: PreparedData) -> None:
        """The training images on the model's devices, the batch size that splits over them, the test images."""
        cfg = self.params.train
        self.train_images = data.train.images[..., None]
        # The images stay where the model runs, one copy on each replica's device, in a dtype that device can gather;
        # tf.data shuffles and batches only their indices, and each step gathers its batch there: no host-to-device
        # copy per step.
        stored = self.train_images.astype(devices.image_dtype(self.machine).as_numpy_dtype)
        self._replica_images = self.strategy.experimental_distribute_values_from_function(
            lambda context: tf.identity(tf.constant(stored)))
        replicas = self.strategy.num_replicas_in_sync
        # tf.distribute would hand some replicas fewer images, or none: each gets the same whole number.
        self.batch_size = devices.replica_batch(cfg.batch_size, replicas)
        if self.batch_size != cfg.batch_size:
            log.warning("train.batch_size %d does not split evenly over %d replicas: training with %d (%d each)",
                        cfg.batch_size, replicas, self.batch_size, self.batch_size // replicas)
        # Nor can a last short batch be shared: with several replicas it is dropped (a different few images each epoch).
        self._drop_remainder = replicas > 1
        count = len(self.train_images)
        self.steps_per_epoch = count // self.batch_size if self._drop_remainder else math.ceil(count / self.batch_size)
        if self.steps_per_epoch == 0:
            raise UserInputError(f"train.batch_size: a batch of {self.batch_size} is more than the {count} training "
                                 f"images; with {replicas} replicas a batch must be whole")
        self.eval_images = data.test.images[: cfg.eval_limit, ..., None]

    def settings(self) -> dict[str, str]:
        """What this machine made of the params (`auto` decided, the batch rounded), and why: MLflow tags."""
        return {"device": self.machine.describe(), "precision": str(self.precision.value),
                "precision_reason": self.precision.reason, "jit_compile": str(self.jit_compile.value).lower(),
                "jit_compile_reason": self.jit_compile.reason, "replicas": str(self.strategy.num_replicas_in_sync),
                "global_batch_size": str(self.batch_size)}

    @functools.cached_property  # hashes the whole training set: once, not at every checkpoint
    def fingerprint(self) -> str:
        settings = dataclasses.asdict(self.params)
        settings.pop("tracking")
        settings.pop("registry")
        # How the work is spread is not what is trained, but what it decides is: a run may resume under another
        # strategy, on other devices, if they train the same batches in the same precision.
        settings["train"].pop("strategy")
        settings["train"].update(precision=self.precision.value, jit_compile=self.jit_compile.value,
                                 batch_size=self.batch_size, whole_batches_only=self._drop_remainder)
        return checkpoints.fingerprint(settings, sources.code_digest(self.script), self.train_images,
                                       self.eval_images)

    def _step(self, indices, replica_images):
        """One replica's share of an optimizer step: its images by index, and its part of the global mean loss."""
        images = tf.cast(tf.gather(replica_images, indices), tf.float32)
        noise = self.generator.normal((tf.shape(images)[0], self.params.model.latent_dim))
        with tf.GradientTape() as tape:
            reconstruction, kl = elbo_terms(self.model, images, noise, self.params.train.kl)
            # Sum over this replica's images / the global batch (replicas share it evenly): the optimizer sums the
            # replicas' gradients.
            loss = tf.nn.compute_average_loss(reconstruction + self.params.train.beta * kl)
            scaled = self.optimizer.scale_loss(loss)
        gradients = tape.gradient(scaled, self.model.trainable_variables)
        self.optimizer.apply_gradients(zip(gradients, self.model.trainable_variables, strict=True))
        return loss

    def _steps(self, iterator, count):
        """`count` optimizer steps in one compiled call; their (global mean) losses, in order."""
        losses = tf.TensorArray(tf.float32, size=count)
        for index in tf.range(count):
            per_replica = self.strategy.run(self._train_step, args=(next(iterator), self._replica_images))
            losses = losses.write(index, self.strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None))
        return losses.stack()

    def _copy_weights(self):
        for target, source in zip(self.scorer.weights, self.model.weights, strict=True):
            target.assign(tf.cast(source, target.dtype))

    def _eval(self, images, noise):
        """One forward pass of the float32 model over a chunk of the test set: sums of its ELBO's two terms."""
        reconstruction, kl = elbo_terms(self.scorer, tf.cast(images, tf.float32), noise, "analytic")
        return tf.reduce_sum(reconstruction), tf.reduce_sum(kl)

    def _progress(self):
        return tf.round(tf.sigmoid(self.scorer.decode(self.progress_latent))[..., 0] * 255)

    def batches(self, first_epoch: int, last_epoch: int | None = None):
        """An iterator over the batches of image indices of epochs `first_epoch` to `last_epoch` (default: the last
        configured), each epoch's order a function of (seed, epoch) only, so a resumed run sees the same batches.

        One iterator for the whole training, without tf.data's autotuning (there is nothing to tune in batching
        indices): measured here, deleting an autotuned iterator took 0 to 11 s at random; with one such iterator an
        epoch, that was 4 to 7 s between every two epochs, a third of an epoch."""
        count, seed = len(self.train_images), self.params.seed

        def epoch_batches(epoch):
            order = tf.random.experimental.stateless_shuffle(tf.range(count, dtype=tf.int64),
                                                             seed=tf.stack([tf.constant(seed, tf.int64), epoch]))
            return tf.data.Dataset.from_tensor_slices(order).batch(self.batch_size,
                                                                   drop_remainder=self._drop_remainder)

        last_epoch = self.params.train.epochs if last_epoch is None else last_epoch
        epochs = tf.data.Dataset.range(first_epoch, last_epoch + 1)
        options = tf.data.Options()
        options.autotune.enabled = False
        dataset = epochs.flat_map(epoch_batches).prefetch(2).with_options(options)
        return iter(self.strategy.experimental_distribute_dataset(dataset))

    def train_epoch(self, epoch: int, batches=None) -> dict[str, float]:
        """One epoch's optimizer steps, from `batches` (an iterator of `self.batches`, positioned at this epoch's
        start), or from an iterator of this epoch alone."""
        bar = keras.utils.Progbar(self.steps_per_epoch, verbose=1 if sys.stdout.isatty() else 2,
                                  stateful_metrics=["loss"], unit_name="step")
        started, total, done = time.perf_counter(), 0.0, 0
        iterator = batches if batches is not None else self.batches(epoch, epoch)
        while done < self.steps_per_epoch:
            count = min(self.params.train.steps_per_call, self.steps_per_epoch - done)
            try:
                losses = self._train_steps(iterator, tf.constant(count)).numpy()
            except tf.errors.UnavailableError as error:  # a peer of a multi-worker cluster died or cannot be reached
                raise TrainingError(f"epoch {epoch}: another worker of the cluster is gone ({lost_worker(error)}); "
                                    "start every worker again, and they resume after the last checkpoint") from None
            diverged = np.flatnonzero(~np.isfinite(losses))
            if diverged.size:
                step = done + int(diverged[0]) + 1
                raise TrainingError(f"training diverged: loss is {losses[diverged[0]]} at epoch {epoch}, step {step}; "
                                    f"try a lower train.learning_rate (now {self.params.train.learning_rate:g})")
            done += count
            total += math.fsum(losses.tolist())
            bar.update(done, [("loss", total / done)])
        seconds = time.perf_counter() - started
        return {"train_loss": total / self.steps_per_epoch, "epoch_seconds": seconds,
                "images_per_second": len(self.train_images) / seconds}

    def evaluate(self) -> dict[str, float]:
        """Test ELBO (analytic KL, one fixed draw of z per image) and its two terms, in nats per image, computed in
        float32; and the seconds it took."""
        started = time.perf_counter()
        self._take_weights()
        reconstruction = kl = 0.0
        for start in range(0, len(self.eval_images), EVAL_BATCH):
            chunk = slice(start, start + EVAL_BATCH)
            batch_reconstruction, batch_kl = self._eval_step(self.eval_images[chunk], self.eval_noise[chunk])
            reconstruction += float(batch_reconstruction)
            kl += float(batch_kl)
        n = len(self.eval_images)
        return {"test_elbo": -(reconstruction + kl) / n, "test_reconstruction": reconstruction / n,
                "test_kl": kl / n, "eval_seconds": time.perf_counter() - started}

    def progress_grid(self) -> np.ndarray:
        """The fixed latent vectors decoded to pixel probabilities by the weights `evaluate` last scored (at the
        start, the initial ones), as (16, 28, 28) uint8."""
        return self._decode_progress().numpy().astype(np.uint8)

    def save_checkpoint(self, path: Path, state: TrainingState,
                        snapshot: checkpoints.Restored | None = None) -> None:
        """Write `state` with the training's variables: `snapshot`'s, taken earlier, or the current ones."""
        current = snapshot or self._snapshot()
        checkpoints.save(path, self.fingerprint, state, current.model_weights, current.optimizer_variables,
                         current.generator_state)

    def restore_checkpoint(self, path: Path) -> TrainingState:
        restored = checkpoints.restore(path, self.fingerprint)
        if restored is not None:
            initial = self._snapshot()
            try:
                self._assign(restored)
            except (ValueError, TypeError) as error:  # arrays of the wrong number or shape: damaged, though whole
                log.warning("%s is damaged (%s); ignoring it, training starts afresh at epoch 1", path, error)
                self._assign(initial)
                restored = None
        if restored is None:
            self._take_weights()
            return TrainingState(grids=[self.progress_grid()])
        log.info("resuming after epoch %d from %s", restored.state.epoch, path)
        return restored.state

    def _snapshot(self) -> checkpoints.Restored:
        return checkpoints.Restored(TrainingState(), self.model.get_weights(),
                                    [v.numpy() for v in self.optimizer.variables], self.generator.state.numpy())

    def _assign(self, restored: checkpoints.Restored) -> None:
        self.model.set_weights(restored.model_weights)
        for variable, value in zip(self.optimizer.variables, restored.optimizer_variables, strict=True):
            variable.assign(value)
        self.generator.state.assign(restored.generator_state)

    def fit(self, state: TrainingState, checkpoint: Path,
            on_epoch: Callable[[int, dict[str, float]], None] = lambda epoch, metrics: None) -> TrainingState:
        """Train from `state.epoch` to the configured number of epochs, checkpointing after each one; `on_epoch`
        runs after that epoch's checkpoint is written, on the checkpoint's thread."""
        epochs = self.params.train.epochs
        # Seconds since the training began, over all the processes a resumed training ran in.
        earlier = state.history[-1]["elapsed_seconds"] if state.history else 0.0
        batches = self.batches(state.epoch + 1)
        with checkpoints.Saver() as saver:
            for epoch in range(state.epoch + 1, epochs + 1):
                metrics = self.train_epoch(epoch, batches) | self.evaluate()
                metrics["learning_rate"] = optimization.current_learning_rate(self.optimizer)
                metrics["elapsed_seconds"] = earlier + time.perf_counter() - self.started
                log.info("epoch %d/%d: loss %.2f, test ELBO %.2f (reconstruction %.2f, KL %.2f), %.1f s "
                         "(scoring %.1f s), %.0f images/s", epoch, epochs, metrics["train_loss"],
                         metrics["test_elbo"], metrics["test_reconstruction"], metrics["test_kl"],
                         metrics["epoch_seconds"], metrics["eval_seconds"], metrics["images_per_second"])
                state = TrainingState(epoch, [*state.history, {"epoch": epoch, **metrics}],
                                      [*state.grids, self.progress_grid()], state.run_id)
                # A kill between the checkpoint and the logging is mended by the next start.
                saver.submit(functools.partial(self._checkpoint_then, checkpoint, state, self._snapshot(),
                                               functools.partial(on_epoch, epoch, metrics)))
        return state

    def _checkpoint_then(self, path: Path, state: TrainingState, snapshot: checkpoints.Restored,
                         then: Callable[[], None]) -> None:
        self.save_checkpoint(path, state, snapshot)
        then()
