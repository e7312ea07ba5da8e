"""The optimizer: its step size over training (constant, or a warm-up then a cosine decay to its floor), the fused Adam
step, the moving average of the weights and its warm-up, and loss scaling under float16 only."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from cvae_pipeline.model.optimization import AveragingAdam, current_learning_rate, learning_rate, make_optimizer
from helpers import params_with

FAST = {"batch_size": 32, "learning_rate": 1e-3, "schedule": "constant", "epochs": 2, "eval_limit": None}


def small_params(**train):
    return params_with(model={"latent_dim": 4}, train={**FAST, **train})


def test_the_cosine_schedule_warms_up_and_decays_to_its_floor():
    cfg = small_params(schedule="cosine", epochs=4, warmup_epochs=1, learning_rate=2e-3,
                       final_learning_rate=1e-4).train
    schedule = learning_rate(cfg, steps_per_epoch=10)
    rates = [float(schedule(step)) for step in range(41)]
    assert rates[0] == 0 and rates[10] == pytest.approx(2e-3) and rates[40] == pytest.approx(1e-4)
    assert rates[:11] == sorted(rates[:11]) and rates[10:] == sorted(rates[10:], reverse=True)
    assert learning_rate(small_params(schedule="constant").train, 10) == FAST["learning_rate"]
    # A warm-up as long as training (a quick `-S train.epochs=1` of the default) is cut to all epochs but the last.
    short = learning_rate(small_params(schedule="cosine", epochs=2, warmup_epochs=5, learning_rate=2e-3,
                                       final_learning_rate=0).train, steps_per_epoch=10)
    assert float(short(0)) == 0 and float(short(10)) == pytest.approx(2e-3) and float(short(20)) == pytest.approx(0)
    single = learning_rate(small_params(schedule="cosine", epochs=1, warmup_epochs=1).train, steps_per_epoch=10)
    assert float(single(0)) == pytest.approx(FAST["learning_rate"]) and float(single(10)) == pytest.approx(0)


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_the_optimizer_steps_along_its_schedule_and_reports_the_next_steps_size(schedule):
    cfg = small_params(schedule=schedule, epochs=3, warmup_epochs=1, learning_rate=2e-3, final_learning_rate=1e-4,
                       ema_momentum=0).train
    weight = keras.Variable(np.zeros(2, np.float32))
    optimizer = make_optimizer(cfg, "float32", steps_per_epoch=4)
    optimizer.build([weight])
    expected = ([2e-3] * 13 if schedule == "constant"
                else [2e-3 * step / 4 for step in range(5)]  # the warm-up: linear from 0 over the first epoch
                + [1e-4 + (2e-3 - 1e-4) * (1 + np.cos(np.pi * step / 8)) / 2 for step in range(1, 9)])
    reported = []
    for _ in range(13):
        reported.append(current_learning_rate(optimizer))
        optimizer.apply([tf.constant([1.0, -1.0])], [weight])
    np.testing.assert_allclose(reported, expected, rtol=1e-5, atol=1e-9)
    assert current_learning_rate(optimizer) == pytest.approx(expected[-1])  # past the last step: the floor stays


def test_the_average_of_the_weights_warms_up_its_momentum_then_keeps_ema_momentum():
    weight = keras.Variable(np.zeros(3, np.float32))
    optimizer = make_optimizer(small_params(ema_momentum=0.8, learning_rate=0.5).train, "float32", 10)
    optimizer.build([weight])
    expected = None
    for step in range(30):
        optimizer.apply([tf.constant([1.0, -2.0, 0.5])], [weight])
        # TensorFlow's ExponentialMovingAverage(num_updates=step): the first step's weights start it.
        momentum = 0.0 if step == 0 else min(0.8, (1 + step) / (10 + step))
        expected = weight.numpy() if expected is None else momentum * expected + (1 - momentum) * weight.numpy()
        np.testing.assert_allclose(optimizer._model_variables_moving_average[0].numpy(), expected, rtol=1e-5)
    assert not np.allclose(expected, weight.numpy())  # an average of the path, not its end
    assert not make_optimizer(small_params(ema_momentum=0).train, "float32", 10).use_ema


@pytest.mark.parametrize("steps", [1, 5])
def test_the_fused_adam_step_is_keras_adam(steps):
    rng = np.random.default_rng(0)
    start = rng.normal(0, 1, (4, 3)).astype(np.float32)
    ours, theirs = keras.Variable(start), keras.Variable(start)
    fused = make_optimizer(small_params(ema_momentum=0, learning_rate=0.1).train, "float32", 10)
    keras_adam = keras.optimizers.Adam(0.1)
    for optimizer, weight in ((fused, ours), (keras_adam, theirs)):
        optimizer.build([weight])
    for _ in range(steps):  # gradients of changing sign and scale: the moments and their bias corrections show
        gradient = tf.constant(rng.normal(0, 3, (4, 3)).astype(np.float32))
        fused.apply([gradient], [ours])
        keras_adam.apply([gradient], [theirs])
    # To float32 rounding: Keras computes the moments as m + (g - m) * (1 - beta), the kernel as beta * m + ...
    np.testing.assert_allclose(ours.numpy(), theirs.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(fused._velocities[0].numpy(), keras_adam._velocities[0].numpy(), rtol=1e-4)
    assert not np.allclose(ours.numpy(), start)

    # The step is TensorFlow's fused kernel: Keras' own composition of small operations would match the above too.
    def step(gradient):
        fused.apply([gradient], [ours])

    traced = tf.function(step).get_concrete_function(tf.TensorSpec((4, 3), tf.float32)).graph
    assert "ResourceApplyAdam" in {operation.type for operation in traced.get_operations()}


@pytest.mark.parametrize("precision", ["float32", "mixed_bfloat16", "mixed_float16"])
def test_only_float16_scales_the_loss_and_the_scaled_step_is_the_plain_one(precision):
    cfg = small_params(ema_momentum=0.9, learning_rate=0.1).train
    optimizer = make_optimizer(cfg, precision, 10)
    if precision != "mixed_float16":  # bfloat16 has float32's range: its gradients do not underflow
        assert type(optimizer) is AveragingAdam and optimizer.name == "adam"
        return
    # Named as the checkpoint's variables are: loss_scale/..., and the Adam inside it adam/... as in float32.
    assert isinstance(optimizer, keras.optimizers.LossScaleOptimizer) and optimizer.name == "loss_scale"
    inner = optimizer.inner_optimizer
    assert type(inner) is AveragingAdam and inner.name == "adam" and inner.use_ema

    start = np.array([0.5, -1.0, 2.0], np.float32)
    scaled, plain = keras.Variable(start), keras.Variable(start)
    reference = make_optimizer(cfg, "float32", 10)
    optimizer.build([scaled])
    reference.build([plain])
    gradient = tf.constant([3e-6, -1e-7, 2e-5])  # below float16's smallest normal number, 6.1e-5
    scale = float(optimizer.scale_loss(tf.constant(1.0)))
    assert scale == 2.0**15  # Keras' initial dynamic scale
    for _ in range(3):
        optimizer.apply([gradient * scale], [scaled])  # the gradient of the scaled loss: unscaled before the step
        reference.apply([gradient], [plain])
    np.testing.assert_allclose(scaled.numpy(), plain.numpy(), rtol=1e-6)
    np.testing.assert_allclose(inner._model_variables_moving_average[0].numpy(),
                               reference._model_variables_moving_average[0].numpy(), rtol=1e-6)
    assert not np.allclose(scaled.numpy(), start)
