"""The optimizer and its step size over training, from the train section of params.yaml."""

import keras
import tensorflow as tf

from cvae_pipeline.config import TrainParams


def learning_rate(cfg: TrainParams, steps_per_epoch: int) -> float | keras.optimizers.schedules.LearningRateSchedule:
    """`constant`: `cfg.learning_rate` throughout. `cosine`: a linear warm-up from 0 to `cfg.learning_rate` over
    `cfg.warmup_epochs` (at most all epochs but the last: `-S train.epochs=1` for a quick run still decays), then a
    cosine decay that reaches `cfg.final_learning_rate` at the last configured step.
    A function of the optimizer's step count, which the checkpoint holds: a resumed run continues on the curve."""
    if cfg.schedule == "constant":
        return cfg.learning_rate
    warmup_epochs = min(cfg.warmup_epochs, cfg.epochs - 1)
    warmup_steps = warmup_epochs * steps_per_epoch
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0 if warmup_steps else cfg.learning_rate,
        decay_steps=(cfg.epochs - warmup_epochs) * steps_per_epoch,
        alpha=cfg.final_learning_rate / cfg.learning_rate,  # Keras' floor, as a fraction of the peak
        warmup_target=cfg.learning_rate if warmup_steps else None,
        warmup_steps=warmup_steps,
    )


class AveragingAdam(keras.optimizers.Adam):
    """Adam keeping Keras' moving average of the weights (`use_ema`), whose momentum warms up as TensorFlow's
    `ExponentialMovingAverage(num_updates=...)` does: min(ema_momentum, (1 + t) / (10 + t)) at step t.
    Keras' own average weighs the initial weights by ema_momentum ** t, which at 0.995 still leaves them a share of the
    average after an epoch's hundreds of steps: a quick run of an epoch or two would be scored and saved mostly
    untrained.

    Each variable's step is TensorFlow's fused Adam kernel, the same update as Keras' to float rounding: Keras
    composes it of a dozen small operations per variable, which take longer on the CPU (docs/performance.md)."""

    def update_step(self, gradient, variable, learning_rate):
        if self.amsgrad:  # a third moment the kernel does not keep
            return super().update_step(gradient, variable, learning_rate)
        index = self._get_variable_index(variable)
        dtype = variable.dtype
        step = tf.cast(self.iterations + 1, dtype)
        beta_1, beta_2 = tf.constant(self.beta_1, dtype), tf.constant(self.beta_2, dtype)
        tf.raw_ops.ResourceApplyAdam(
            var=variable.handle, m=self._momentums[index].value.handle, v=self._velocities[index].value.handle,
            beta1_power=beta_1**step, beta2_power=beta_2**step, lr=tf.cast(learning_rate, dtype), beta1=beta_1,
            beta2=beta_2, epsilon=tf.constant(self.epsilon, dtype), grad=tf.cast(gradient, dtype))

    def _update_model_variables_moving_average(self, trainable_variables):
        steps = keras.ops.cast(self.iterations, "float32")  # before this step's increment: 0 at the first step
        # As Keras: the first step's weights start the average (it has no value before them).
        momentum = keras.ops.minimum(self.ema_momentum, (1.0 + steps) / (10.0 + steps)) * keras.ops.sign(steps)
        for variable, average in zip(trainable_variables, self._model_variables_moving_average, strict=True):
            average.assign_sub((1.0 - momentum) * (average - variable))  # = momentum * average + (1 - momentum) * ...


def make_optimizer(cfg: TrainParams, precision: str, steps_per_epoch: int) -> keras.optimizers.Optimizer:
    """Adam with the configured schedule, keeping the moving average of the weights when `cfg.ema_momentum` > 0
    (among the optimizer's variables: the checkpoint holds it); with loss scaling under float16, whose small
    gradients underflow."""
    # Named, not numbered by Keras (adam_1, ...): its variables are saved and restored by these names.
    optimizer = AveragingAdam(learning_rate(cfg, steps_per_epoch), use_ema=cfg.ema_momentum > 0,
                              ema_momentum=cfg.ema_momentum, name="adam")
    if precision == "mixed_float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer, name="loss_scale")
    return optimizer


def current_learning_rate(optimizer: keras.optimizers.Optimizer) -> float:
    """The step size the optimizer's next step takes."""
    return float(keras.ops.convert_to_numpy(optimizer.learning_rate))
