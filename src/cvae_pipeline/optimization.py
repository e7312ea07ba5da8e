"""The optimizer and its step size over training, from the train section of params.yaml."""

import keras

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


def make_optimizer(cfg: TrainParams, precision: str, steps_per_epoch: int) -> keras.optimizers.Optimizer:
    """Adam with the configured schedule; with loss scaling under float16, whose small gradients underflow."""
    optimizer = keras.optimizers.Adam(learning_rate(cfg, steps_per_epoch))
    if precision == "mixed_float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


def current_learning_rate(optimizer: keras.optimizers.Optimizer) -> float:
    """The step size the optimizer's next step takes."""
    return float(keras.ops.convert_to_numpy(optimizer.learning_rate))
