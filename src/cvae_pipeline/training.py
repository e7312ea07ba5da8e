"""Training the CVAE: a seeded tf.data pipeline, a compiled step, per-epoch test metrics and resumable checkpoints.

`Trainer` owns the model, the optimizer and the noise generator; `train_and_track` is the train stage: it resumes
the checkpoint of an interrupted training of the same params, data and code, else trains from epoch 1 in a new MLflow
run, logs every epoch once, writes the stage's outputs, and marks the checkpoint finished.
"""

import dataclasses
import functools
import logging
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from cvae_pipeline import checkpoints, devices, lineage, records, sources, tracking
from cvae_pipeline.checkpoints import TrainingState
from cvae_pipeline.config import Params
from cvae_pipeline.data import PreparedData
from cvae_pipeline.distribution import is_chief, lost_worker, make_strategy, require_same_on_every_worker
from cvae_pipeline.errors import TrainingError, UserInputError
from cvae_pipeline.fileio import atomic_path, remove_leftover_temporaries, write_json_atomic
from cvae_pipeline.losses import elbo_terms
from cvae_pipeline.model import build_cvae

log = logging.getLogger(__name__)

PROGRESS_IMAGES = 16  # the tutorial's 4x4 grid of images decoded from fixed latent vectors
EVAL_BATCH = 1000


class Trainer:
    def __init__(self, params: Params, data: PreparedData, script: Path | None = None,
                 machine: devices.Machine | None = None):
        self.params = params
        self.script = script or Path(__file__)  # the entry point whose code (and the modules it imports) trains
        cfg = params.train
        self.strategy = make_strategy(cfg.strategy)  # first: a multi-worker strategy must precede other TF work
        self.is_chief = is_chief(self.strategy)
        self.machine = machine or devices.detect()
        self.precision = devices.choose_precision(cfg.precision, self.machine)
        self.jit_compile = devices.choose_jit(cfg.jit_compile, self.machine)
        keras.utils.set_random_seed(params.seed)
        if cfg.deterministic:
            tf.config.experimental.enable_op_determinism()
        keras.mixed_precision.set_dtype_policy(self.precision.value)
        with self.strategy.scope():  # variables mirrored on every replica; each replica its own noise stream
            self.model = build_cvae(params.model)
            optimizer = keras.optimizers.Adam(cfg.learning_rate)
            if self.precision.value == "mixed_float16":  # float16 gradients underflow without loss scaling
                optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
            self.optimizer = optimizer
            self.optimizer.build(self.model.trainable_variables)
            self.generator = tf.random.Generator.from_seed(params.seed)

        self.train_images = data.train.images[..., None]
        # The images stay where the model runs, one copy on each replica's device, in a dtype that device can gather;
        # tf.data shuffles and batches only their indices, and each step gathers its batch there: no host-to-device
        # copy per step.
        stored = self.train_images.astype(devices.image_dtype(self.machine).as_numpy_dtype)
        self._replica_images = self.strategy.experimental_distribute_values_from_function(
            lambda context: tf.identity(tf.constant(stored)))
        self._indices = tf.data.Dataset.range(len(self.train_images))
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
        rng = np.random.default_rng([params.seed, 1])
        latent = params.model.latent_dim
        self.eval_noise = rng.standard_normal((len(self.eval_images), latent)).astype(np.float32)
        self.progress_latent = rng.standard_normal((PROGRESS_IMAGES, latent)).astype(np.float32)
        self._train_step = tf.function(self._step, jit_compile=self.jit_compile.value)
        # The loop over a call's steps stays outside XLA: it reads the tf.data iterator.
        self._train_steps = tf.function(self._steps)
        self._eval_step = tf.function(self._eval, jit_compile=self.jit_compile.value)

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

    def _eval(self, images, noise):
        reconstruction, kl = elbo_terms(self.model, tf.cast(images, tf.float32), noise, "analytic")
        return tf.reduce_sum(reconstruction), tf.reduce_sum(kl)

    def epoch_batches(self, epoch: int) -> tf.data.Dataset:
        """This epoch's order depends on (seed, epoch) only, so a resumed run sees the same batches."""
        shuffled = self._indices.shuffle(len(self.train_images), seed=self.params.seed * 100_003 + epoch)
        return shuffled.batch(self.batch_size, drop_remainder=self._drop_remainder).prefetch(
            tf.data.AUTOTUNE)

    def train_epoch(self, epoch: int) -> dict[str, float]:
        bar = keras.utils.Progbar(self.steps_per_epoch, verbose=1 if sys.stdout.isatty() else 2,
                                  stateful_metrics=["loss"], unit_name="step")
        started, total, done = time.perf_counter(), 0.0, 0
        iterator = iter(self.strategy.experimental_distribute_dataset(self.epoch_batches(epoch)))
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
        """Test ELBO (analytic KL, one fixed draw of z per image) and its two terms, in nats per image."""
        reconstruction = kl = 0.0
        for start in range(0, len(self.eval_images), EVAL_BATCH):
            chunk = slice(start, start + EVAL_BATCH)
            batch_reconstruction, batch_kl = self._eval_step(self.eval_images[chunk], self.eval_noise[chunk])
            reconstruction += float(batch_reconstruction)
            kl += float(batch_kl)
        n = len(self.eval_images)
        return {"test_elbo": -(reconstruction + kl) / n, "test_reconstruction": reconstruction / n,
                "test_kl": kl / n}

    def progress_grid(self) -> np.ndarray:
        """The fixed latent vectors decoded to pixel probabilities, as (16, 28, 28) uint8."""
        probabilities = keras.ops.sigmoid(self.model.decode(self.progress_latent))
        return np.round(keras.ops.convert_to_numpy(probabilities)[..., 0] * 255).astype(np.uint8)

    def save_checkpoint(self, path: Path, state: TrainingState) -> None:
        current = self._snapshot()
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
        """Train from `state.epoch` to the configured number of epochs, checkpointing after each one."""
        epochs = self.params.train.epochs
        for epoch in range(state.epoch + 1, epochs + 1):
            metrics = self.train_epoch(epoch)
            metrics.update(self.evaluate())
            log.info("epoch %d/%d: loss %.2f, test ELBO %.2f (reconstruction %.2f, KL %.2f), %.1f s, %.0f images/s",
                     epoch, epochs, metrics["train_loss"], metrics["test_elbo"], metrics["test_reconstruction"],
                     metrics["test_kl"], metrics["epoch_seconds"], metrics["images_per_second"])
            state = TrainingState(epoch, [*state.history, {"epoch": epoch, **metrics}],
                                  [*state.grids, self.progress_grid()], state.run_id)
            self.save_checkpoint(checkpoint, state)
            on_epoch(epoch, metrics)  # after the checkpoint: a kill between the two is mended by the next start
        return state


def log_model(model_file: Path, example: np.ndarray) -> None:
    from cvae_pipeline import serving  # MLflow's pyfunc: imported only when a model is logged (seconds)

    serving.log_model(model_file, example)


@dataclass(frozen=True)
class TrainOutputs:
    model: Path
    history: Path
    metrics: Path
    progress: Path
    run: Path
    checkpoint: Path


def final_metrics(history: list[dict]) -> dict[str, float]:
    """The last epoch's metrics, the total training time and the median throughput."""
    last = history[-1]
    return {
        "epochs": last["epoch"],
        **{key: last[key] for key in ("train_loss", "test_elbo", "test_reconstruction", "test_kl")},
        "train_seconds": sum(row["epoch_seconds"] for row in history),
        "images_per_second": float(np.median([row["images_per_second"] for row in history])),
    }


def write_outputs(trainer: Trainer, state: TrainingState, final: dict[str, float], outputs: TrainOutputs) -> None:
    with atomic_path(outputs.model) as temporary:
        trainer.model.save(temporary)
    with atomic_path(outputs.history) as temporary:
        pd.DataFrame(state.history).to_csv(temporary, index=False, float_format="%.6g")
    with atomic_path(outputs.progress) as temporary, open(temporary, "wb") as handle:
        np.savez_compressed(handle, grids=np.stack(state.grids), epochs=np.arange(len(state.grids)))
    write_json_atomic(outputs.metrics, final)


def train_and_track(params: Params, data: PreparedData, outputs: TrainOutputs,
                    script: Path | None = None) -> dict[str, float]:
    """The train stage: resume an interrupted training or start afresh, one MLflow run per training, then the
    declared outputs, and the checkpoint marked finished. `script`: the stage's entry point (its code is in the
    checkpoint's fingerprint). Returns the final metrics."""
    tracking.connect(params.tracking)  # a tracking server that does not answer stops the stage before any work
    for path in dataclasses.astuple(outputs):
        remove_leftover_temporaries(path)  # of a run that was killed while writing
    machine = devices.detect()  # before any tensor exists: GPU memory growth can only be set then
    trainer = Trainer(params, data, script, machine)
    state = trainer.restore_checkpoint(outputs.checkpoint)
    # Workers that resumed from different checkpoints would apply one gradient to different weights, silently.
    require_same_on_every_worker(trainer.strategy, {"checkpoint epoch": state.epoch,
                                                    "training settings": int(trainer.fingerprint[:12], 16)},
                                 f"give every worker the same commit, params, data and {outputs.checkpoint}")
    if not trainer.is_chief:  # a cluster's other workers train in lockstep and write the same files, unlogged
        tracking.disable("this worker is not the chief, which logs the run")
    log.info("training on %s with %s precision (%s), XLA %s, %d replica(s); MLflow store %s", machine.describe(),
             trainer.precision.value, trainer.precision.reason, "on" if trainer.jit_compile.value else "off",
             trainer.strategy.num_replicas_in_sync, tracking.tracking_uri())
    tags = {**records.source_tags(params), **trainer.settings(), "tensorflow_version": tf.__version__}
    with records.training_run(params, state.run_id, tags) as run:
        if run is not None:
            state.run_id = run.info.run_id
        # Epochs are logged after their checkpoint; those a kill (or MLflow's absence) left unlogged are logged now.
        tracking.log_missing_epochs(state.history)
        if data.source is not None:
            lineage.log_dataset(data.source, params.data, "train")
        state = trainer.fit(state, outputs.checkpoint, on_epoch=lambda epoch, m: tracking.log_metrics(m, epoch))
        final = final_metrics(state.history)
        write_outputs(trainer, state, final, outputs)
        records.write_run_reference(outputs.run, run)
        tracking.log_metrics({f"final_{key}": value for key, value in final.items()}, once=True)
        tracking.log_model_once(lambda: log_model(outputs.model, trainer.eval_images[:2].astype(np.float32)))
    # Only now is there nothing left to resume: a later run of this stage, for whatever reason, trains afresh.
    trainer.save_checkpoint(outputs.checkpoint, dataclasses.replace(state, finished=True))
    return final
