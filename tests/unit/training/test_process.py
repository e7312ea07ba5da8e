"""What a training sets for its whole process before any model exists: the precision and XLA chosen for the machine it
is given, Keras' dtype policy, the seeds, op determinism and the strategy."""

import random

import keras
import numpy as np
import pytest
import tensorflow as tf

from cvae_pipeline.training.hardware import Gpu, Machine
from cvae_pipeline.training.process import set_up
from helpers import make_trainer, params_with

FAST = {"batch_size": 32, "learning_rate": 1e-3, "schedule": "constant", "epochs": 2, "eval_limit": None}
CPU = Machine("AMD EPYC 7763 64-Core Processor", frozenset({"avx2", "fma"}))  # no bfloat16: auto is float32


def small_params(**train):
    return params_with(model={"latent_dim": 4}, train={**FAST, **train})


def gpus(*capabilities) -> Machine:
    return Machine("host", frozenset({"avx2"}), tuple(Gpu(f"GPU {c}", c) for c in capabilities))


@pytest.fixture
def float32_after():
    yield
    keras.mixed_precision.set_dtype_policy("float32")


@pytest.mark.parametrize(("machine", "precision", "jit"), [(CPU, "float32", False),
                                                           (gpus((8, 0)), "mixed_bfloat16", True),
                                                           (gpus((7, 0)), "mixed_float16", True)],
                         ids=["cpu", "gpu-8.0", "gpu-7.0"])
def test_auto_is_decided_for_the_machine_given_and_sets_the_dtype_policy_every_layer_takes(float32_after, machine,
                                                                                          precision, jit):
    keras.mixed_precision.set_dtype_policy("mixed_bfloat16" if precision == "float32" else "float32")  # not left so
    setup = set_up(small_params(precision="auto", jit_compile="auto"), machine)
    assert setup.machine is machine  # not this machine, detected
    assert (setup.precision.value, setup.jit_compile.value) == (precision, jit)
    assert keras.mixed_precision.dtype_policy().name == precision
    assert keras.layers.Dense(1).compute_dtype == precision.removeprefix("mixed_")
    # The ops still run on this CPU: one device, the default strategy, and this process logs.
    assert setup.strategy is tf.distribute.get_strategy() and setup.is_chief


def seeded_draws() -> list:
    """What a seed fixes: Python's, NumPy's, TensorFlow's and Keras' random draws."""
    return [random.random(), np.random.random(), float(tf.random.normal(())), float(keras.random.normal(()))]


def test_the_seed_of_params_seeds_every_generator():
    set_up(params_with(seed=3, train={"precision": "float32"}), CPU)
    first = seeded_draws()
    seeded_draws()  # every generator moves on
    set_up(params_with(seed=3, train={"precision": "float32"}), CPU)
    assert seeded_draws() == first
    set_up(params_with(seed=4, train={"precision": "float32"}), CPU)
    assert all(a != b for a, b in zip(seeded_draws(), first, strict=True))


@pytest.mark.parametrize("deterministic", [True, False])
def test_train_deterministic_is_tensorflows_op_determinism(small_data, monkeypatch, deterministic):
    enabled = []
    monkeypatch.setattr(tf.config.experimental, "enable_op_determinism", lambda: enabled.append(True))
    make_trainer(small_params(deterministic=deterministic), small_data)
    assert enabled == ([True] if deterministic else [])
