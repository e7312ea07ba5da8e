"""Training the CVAE: compiled optimizer steps over seeded batches, epoch by epoch, with a resumable checkpoint.

`Trainer` owns the model, the optimizer and the noise generator, and trains epoch by epoch: the training set and the
order of its batches are `batches`', the per-epoch validation ELBO (in float32) and progress grid `scoring`'s, the file
`checkpoints`'. An epoch's checkpoint and logging run in the background while the next one trains.
"""

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

from cvae_pipeline import code_dependencies, scores
from cvae_pipeline.config import Params
from cvae_pipeline.data import PreparedData
from cvae_pipeline.errors import TrainingError
from cvae_pipeline.model import optimization
from cvae_pipeline.model.losses import elbo_terms
from cvae_pipeline.model.network import build_cvae
from cvae_pipeline.training import checkpoints
from cvae_pipeline.training.batches import TrainingSet
from cvae_pipeline.training.checkpoints import Checkpoint, Progress, Snapshot, TrainingState
from cvae_pipeline.training.distribution import lost_worker
from cvae_pipeline.training.process import Setup
from cvae_pipeline.training.scoring import EpochScorer

log = logging.getLogger(__name__)

# The history's measures of time, which differ from run to run; every other column a seed fixes.
TIMING_COLUMNS = ("epoch_seconds", "eval_seconds", "elapsed_seconds", "images_per_second")


class Trainer:
    """The training state (model, optimizer, noise generator), placed by the strategy, and the loop that trains it."""

    def __init__(self, params: Params, data: PreparedData, setup: Setup, script: Path | None = None,
                 started: float | None = None):
        """`setup`: what `process.set_up` made of the params on this machine, already applied; `script`: the entry
        point whose code (and the modules it imports) trains; `started`: its `time.perf_counter()` at start, from
        which each epoch's `elapsed_seconds` counts (default: now)."""
        self.params = params
        self.script = script or Path(__file__)
        self.started = time.perf_counter() if started is None else started
        self.machine, self.strategy, self.is_chief = setup.machine, setup.strategy, setup.is_chief
        self.precision, self.jit_compile = setup.precision, setup.jit_compile
        cfg = params.train
        self.training_set = TrainingSet(data.train.images[..., None], cfg.batch_size, params.seed, self.strategy,
                                        self.machine)
        with self.strategy.scope():  # variables mirrored on every replica; each replica its own noise stream
            model = build_cvae(params.model)
            optimizer = optimization.make_optimizer(cfg, self.precision.value, self.training_set.steps_per_epoch)
            optimizer.build(model.trainable_variables)
            self.state = TrainingState(model, optimizer, tf.random.Generator.from_seed(params.seed))
            # In the scope: a twin the averages are written into must be placed like the model.
            split, scored = data.selection  # never the test set while there is a validation set
            self.scorer = EpochScorer(model, params.model, split, scored.images[: cfg.eval_limit, ..., None],
                                      params.seed, self.precision.value == "float32", self.jit_compile.value,
                                      optimizer if cfg.ema_momentum > 0 else None)
        self._train_step = tf.function(self._step, jit_compile=self.jit_compile.value)
        # The loop over a call's steps stays outside XLA: it reads the tf.data iterator.
        self._train_steps = tf.function(self._steps)

    @property
    def model(self) -> keras.Model:
        return self.state.model

    @property
    def optimizer(self) -> keras.optimizers.Optimizer:
        return self.state.optimizer

    def settings(self) -> dict[str, str]:
        """What this machine made of the params (`auto` decided, the batch rounded), and why: MLflow tags."""
        return {"device": self.machine.describe(), "precision": str(self.precision.value),
                "precision_reason": self.precision.reason, "jit_compile": str(self.jit_compile.value).lower(),
                "jit_compile_reason": self.jit_compile.reason, "replicas": str(self.strategy.num_replicas_in_sync),
                "global_batch_size": str(self.training_set.batch_size)}

    @functools.cached_property  # hashes the whole training set: once, not at every checkpoint
    def fingerprint(self) -> str:
        # What is trained: the params of the sections train depends on in dvc.yaml but tracking (where it is
        # recorded), not evaluate's or visualize's. How the work is spread is not what is trained either, but what it
        # decides is: a run may resume under another strategy, on other devices, if they train the same batches in
        # the same precision.
        settings = {"seed": self.params.seed, "model": self.params.model.model_dump(),
                    "train": self.params.train.model_dump()}
        settings["train"].pop("strategy")
        settings["train"].update(precision=self.precision.value, jit_compile=self.jit_compile.value,
                                 batch_size=self.training_set.batch_size,
                                 whole_batches_only=self.training_set.whole_batches_only)
        return checkpoints.fingerprint(settings, code_dependencies.code_digest(self.script), self.training_set.images,
                                       self.scorer.images)

    def checkpoint(self, path: Path) -> Checkpoint:
        """The checkpoint at `path` of this training, under its fingerprint."""
        return Checkpoint(path, self.fingerprint)

    def start(self, checkpoint: Checkpoint) -> Progress:
        """Where to train from: the checkpoint's state and progress when it holds this training, interrupted; else
        the initial state at epoch 0, whose progress grid the initial weights decode."""
        progress = checkpoint.restore(self.state)
        if progress is None:
            self.scorer.take_weights()
            progress = Progress(grids=[self.scorer.progress_grid()])
        return progress

    def _step(self, indices, replica_images):
        """One replica's share of an optimizer step: its images by index, and its part of the global mean loss."""
        images = tf.cast(tf.gather(replica_images, indices), tf.float32)
        noise = self.state.generator.normal((tf.shape(images)[0], self.params.model.latent_dim))
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
            per_replica = self.strategy.run(self._train_step, args=(next(iterator), self.training_set.replica_images))
            losses = losses.write(index, self.strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None))
        return losses.stack()

    def train_epoch(self, epoch: int, batches=None) -> dict[str, float]:
        """One epoch's optimizer steps, from `batches` (an iterator of `TrainingSet.batches`, positioned at this
        epoch's start), or from an iterator of this epoch alone."""
        steps_per_epoch = self.training_set.steps_per_epoch
        bar = keras.utils.Progbar(steps_per_epoch, verbose=1 if sys.stdout.isatty() else 2,
                                  stateful_metrics=["loss"], unit_name="step")
        started, total, done = time.perf_counter(), 0.0, 0
        iterator = batches if batches is not None else self.training_set.batches(epoch, epoch)
        while done < steps_per_epoch:
            count = min(self.params.train.steps_per_call, steps_per_epoch - done)
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
        return {scores.TRAIN_LOSS: total / steps_per_epoch, "epoch_seconds": seconds,
                "images_per_second": len(self.training_set.images) / seconds}

    def fit(self, progress: Progress, checkpoint: Checkpoint,
            on_epoch: Callable[[int, dict[str, float]], None] = lambda epoch, metrics: None) -> Progress:
        """Train from the state's epoch to the configured number of epochs, checkpointing the state and `progress`
        after each one; `on_epoch` runs after that epoch's checkpoint is written, on the checkpoint's thread. The
        progress of the whole training."""
        state, epochs = self.state, self.params.train.epochs
        # Seconds since the training began, over all the processes a resumed training ran in.
        earlier = progress.history[-1]["elapsed_seconds"] if progress.history else 0.0
        batches = self.training_set.batches(state.epoch + 1, epochs)
        with checkpoints.Saver() as saver:
            for epoch in range(state.epoch + 1, epochs + 1):
                metrics = self.train_epoch(epoch, batches) | self.scorer.evaluate()
                metrics["learning_rate"] = optimization.current_learning_rate(self.optimizer)
                metrics["elapsed_seconds"] = earlier + time.perf_counter() - self.started
                split = self.scorer.split
                elbo, reconstruction, kl = (metrics[name] for name in scores.epoch_columns(split))
                # Weights that blew up in the epoch's last steps score NaN before any step's loss does.
                if not math.isfinite(elbo):
                    raise TrainingError(f"training diverged: the {split} ELBO is {elbo} after epoch {epoch}; try a "
                                        f"lower train.learning_rate (now {self.params.train.learning_rate:g})")
                log.info("epoch %d/%d: loss %.2f, %s ELBO %.2f (reconstruction %.2f, KL %.2f), %.1f s "
                         "(scoring %.1f s), %.0f images/s", epoch, epochs, metrics[scores.TRAIN_LOSS], split, elbo,
                         reconstruction, kl, metrics["epoch_seconds"], metrics["eval_seconds"],
                         metrics["images_per_second"])
                state.epoch = epoch
                progress = Progress([*progress.history, {"epoch": epoch, **metrics}],
                                    [*progress.grids, self.scorer.progress_grid()])
                # A kill between the checkpoint and the logging is mended by the next start.
                saver.submit(functools.partial(save_then, checkpoint, state.snapshot(), progress,
                                               functools.partial(on_epoch, epoch, metrics)))
        # The trained model is what every epoch scored: the average of the weights, when one is kept (Keras' `fit`
        # ends the same way). The checkpoint holds the weights and the average apart, to resume from.
        self.optimizer.finalize_variable_values(self.model.trainable_variables)
        return progress


def save_then(checkpoint: Checkpoint, snapshot: Snapshot, progress: Progress, then: Callable[[], None]) -> None:
    checkpoint.save(snapshot, progress)
    then()
