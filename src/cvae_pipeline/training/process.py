"""What a training sets for its whole process, once, in one place, before any model exists.

TensorFlow and Keras keep these settings process-wide: the GPUs' memory growth and the distribution strategy (both
before any other TensorFlow work), the seeds, op determinism and Keras' dtype policy, which every layer built afterwards
takes. `set_up` decides and applies them all; the `Trainer` built next takes the result.
"""

from dataclasses import dataclass

import keras
import tensorflow as tf

from cvae_pipeline.config import Params
from cvae_pipeline.training import hardware
from cvae_pipeline.training.distribution import is_chief, make_strategy


@dataclass(frozen=True)
class Setup:
    """The process's machine and what was made of `train.*` on it: the strategy, the precision and XLA."""

    machine: hardware.Machine
    strategy: tf.distribute.Strategy
    is_chief: bool  # whether this process logs to MLflow: a cluster's other workers do not
    precision: hardware.Choice
    jit_compile: hardware.Choice


def set_up(params: Params, machine: hardware.Machine | None = None) -> Setup:
    """Make the strategy, choose the precision and XLA for `machine` (default: this one, detected), seed every
    generator, turn on op determinism when `train.deterministic`, and set Keras' dtype policy."""
    cfg = params.train
    machine = machine or hardware.detect()  # first: GPU memory growth can be set only before any tensor exists
    strategy = make_strategy(cfg.strategy)  # next: a multi-worker strategy must precede other TensorFlow work
    precision = hardware.choose_precision(cfg.precision, machine)
    jit_compile = hardware.choose_jit(cfg.jit_compile, machine)
    keras.utils.set_random_seed(params.seed)
    if cfg.deterministic:
        tf.config.experimental.enable_op_determinism()
    keras.mixed_precision.set_dtype_policy(precision.value)
    return Setup(machine, strategy, is_chief(strategy), precision, jit_compile)
