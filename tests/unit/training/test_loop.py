"""The training loop in-process: it learns, it is deterministic, it resumes exactly, it stops on NaN."""

import dataclasses
import re
import threading

import keras
import numpy as np
import pytest
import tensorflow as tf

from cvae_pipeline.data import Split
from cvae_pipeline.errors import TrainingError
from cvae_pipeline.model.losses import elbo_terms
from cvae_pipeline.model.network import build_cvae
from cvae_pipeline.training.loop import TIMING_COLUMNS, Trainer
from cvae_pipeline.training.stage import final_metrics
from helpers import make_trainer, params_with

pytestmark = pytest.mark.training  # every test here trains a model for real

FAST = {"batch_size": 32, "learning_rate": 1e-3, "schedule": "constant", "epochs": 2, "eval_limit": None}


def small_params(**train):
    return params_with(model={"latent_dim": 4}, train={**FAST, **train})


def test_one_epoch_on_512_images_lowers_the_loss(small_data):
    trainer = make_trainer(small_params(), small_data)
    before = trainer.scorer.evaluate()
    metrics = trainer.train_epoch(1)
    after = trainer.scorer.evaluate()
    assert after["test_elbo"] > before["test_elbo"] + 50  # nats per image
    assert metrics["train_loss"] < -before["test_elbo"]
    assert trainer.training_set.steps_per_epoch == 16


def first_step_loss(data, **train) -> float:
    """The loss of the first optimizer step (computed before its update), same seed: same weights, batch, noise."""
    trainer = make_trainer(small_params(precision="float32", **train), data)
    return float(trainer._train_steps(trainer.training_set.batches(1, 1), tf.constant(1))[0])


def test_the_loss_trained_on_weights_the_kl_by_beta_and_estimates_it_as_train_kl_says(small_data):
    # At initialisation the KL is about 0.01 nats against a loss of about 540: large betas make it measurable.
    loss = {(kl, beta): first_step_loss(small_data, kl=kl, beta=beta)
            for kl in ("analytic", "monte_carlo") for beta in (0.0, 100.0, 200.0)}
    reconstruction = loss["analytic", 0.0]
    assert loss["monte_carlo", 0.0] == pytest.approx(reconstruction, rel=1e-6)  # beta 0: no KL at all
    kl_terms = {}
    for kl in ("analytic", "monte_carlo"):
        kl_terms[kl] = (loss[kl, 200.0] - reconstruction) / 200
        assert abs(kl_terms[kl]) > 1e-3
        assert (loss[kl, 100.0] - reconstruction) / 100 == pytest.approx(kl_terms[kl], rel=1e-2)  # linear in beta
    # One draw of log q - log p differs from the closed form (their expectations agree: test_losses.py).
    assert kl_terms["monte_carlo"] != pytest.approx(kl_terms["analytic"], rel=0.05)


def timeless(history):
    return [{k: v for k, v in row.items() if k not in TIMING_COLUMNS} for row in history]


def train_fresh(params, data, path):
    """A trainer trained from scratch, checkpointing to `path`, and the progress of its training."""
    trainer = make_trainer(params, data)
    checkpoint = trainer.checkpoint(path)
    return trainer, trainer.fit(trainer.start(checkpoint), checkpoint)


def start(trainer, path):
    """The progress `trainer` trains from, after reading the checkpoint at `path` (its state is then the file's)."""
    return trainer.start(trainer.checkpoint(path))


def resumed_epoch(trainer, path) -> int:
    """The epoch `trainer` resumes after, from the checkpoint at `path` (0: it starts afresh)."""
    start(trainer, path)
    return trainer.state.epoch


def test_same_seed_gives_the_same_metrics_and_another_seed_does_not(small_data, tmp_path):
    _, first = train_fresh(small_params(), small_data, tmp_path / "a.npz")
    _, second = train_fresh(small_params(), small_data, tmp_path / "b.npz")
    assert timeless(first.history) == timeless(second.history)
    _, other = train_fresh(params_with(seed=1, model={"latent_dim": 4}, train=FAST), small_data, tmp_path / "c.npz")
    assert timeless(other.history) != timeless(first.history)


class Interrupted(Exception):
    pass


def interrupt_after(params, data, path, epoch: int) -> None:
    """Train from scratch into the checkpoint at `path`, stopped after `epoch`'s checkpoint, before it is logged: as
    a kill there would."""
    def interrupt(finished, metrics):
        if finished == epoch:
            raise Interrupted

    broken = make_trainer(params, data)
    with pytest.raises(Interrupted):
        broken.fit(start(broken, path), broken.checkpoint(path), on_epoch=interrupt)


def resume(params, data, path, epoch: int):
    """Resume the interrupted training at `path` (asserting it resumes after `epoch`) and finish it."""
    resumed = make_trainer(params, data)
    progress = start(resumed, path)
    assert resumed.state.epoch == epoch and len(progress.history) == epoch
    return resumed, resumed.fit(progress, resumed.checkpoint(path))


def assert_same_weights(trainer, other):
    for a, b in zip(trainer.model.get_weights(), other.model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.reliability
def test_a_resumed_run_ends_where_an_uninterrupted_one_does(small_data, tmp_path):
    params = small_params(epochs=3)
    whole, whole_state = train_fresh(params, small_data, tmp_path / "whole.npz")
    interrupt_after(params, small_data, tmp_path / "resumed.npz", epoch=2)
    resumed, state = resume(params, small_data, tmp_path / "resumed.npz", epoch=2)
    assert timeless(state.history) == timeless(whole_state.history)
    assert_same_weights(resumed, whole)
    assert len(state.grids) == 4  # epoch 0 and each of the 3 epochs
    np.testing.assert_array_equal(np.stack(state.grids), np.stack(whole_state.grids))


@pytest.mark.reliability
@pytest.mark.parametrize(("precision", "jit_compile"), [("mixed_float16", False), ("float32", True),
                                                         ("mixed_bfloat16", True)],
                         ids=["float16-loss-scaled", "xla", "bfloat16-xla"])
def test_what_a_gpu_trains_with_learns_and_resumes_exactly_here_too(small_data, tmp_path, precision, jit_compile):
    # What `auto` picks on GPUs (XLA; float16 with loss scaling below compute capability 8.0) runs on the CPU too.
    params = small_params(epochs=2, precision=precision, jit_compile=jit_compile)
    if precision == "mixed_float16":
        # CPUs emulate float16, many times slower: a quarter of the images, in as many steps (the loss scale skips the
        # first steps, whose scaled gradients overflow, until it has come down).
        params = small_params(epochs=2, precision=precision, jit_compile=jit_compile, batch_size=8)
        small_data = dataclasses.replace(small_data, train=Split(small_data.train.images[:128],
                                                                 small_data.train.labels[:128]))
    try:
        whole, whole_state = train_fresh(params, small_data, tmp_path / "whole.npz")
        assert (whole.precision.value, whole.jit_compile.value) == (precision, jit_compile)
        assert whole._train_step._jit_compile is jit_compile  # what the compiled step was built with
        assert whole.model.encoder.get_layer("encoder_conv_1").compute_dtype == precision.removeprefix("mixed_")
        assert whole.optimizer.__class__.__name__ == ("LossScaleOptimizer" if precision == "mixed_float16"
                                                      else "AveragingAdam")
        first, second = whole_state.history
        assert second["train_loss"] < first["train_loss"] and second["test_elbo"] > first["test_elbo"]
        interrupt_after(params, small_data, tmp_path / "resumed.npz", epoch=1)
        resumed, state = resume(params, small_data, tmp_path / "resumed.npz", epoch=1)
        assert timeless(state.history) == timeless(whole_state.history)
        assert_same_weights(resumed, whole)
        for a, b in zip(resumed.optimizer.variables, whole.optimizer.variables, strict=True):
            np.testing.assert_array_equal(a.numpy(), b.numpy())  # a loss scale too, where there is one
    finally:
        keras.mixed_precision.set_dtype_policy("float32")


def test_a_checkpoint_of_another_configuration_is_not_resumed(small_data, tmp_path):
    train_fresh(small_params(epochs=1), small_data, tmp_path / "c.npz")
    other = make_trainer(small_params(epochs=1, learning_rate=2e-3), small_data)
    assert resumed_epoch(other, tmp_path / "c.npz") == 0
    same = make_trainer(small_params(epochs=1), small_data)
    assert resumed_epoch(same, tmp_path / "c.npz") == 1


@pytest.mark.reliability
def test_a_damaged_checkpoint_starts_afresh(small_data, tmp_path):
    (tmp_path / "c.npz").write_bytes(b"not a checkpoint")
    assert resumed_epoch(make_trainer(small_params(), small_data), tmp_path / "c.npz") == 0


@pytest.mark.reliability
@pytest.mark.parametrize("damage", ["a variable missing", "a variable unknown", "a shape changed"])
def test_a_whole_checkpoint_that_does_not_fit_the_state_starts_afresh_with_the_initial_variables(small_data, tmp_path,
                                                                                                caplog, damage):
    trained, _ = train_fresh(small_params(epochs=1), small_data, tmp_path / "c.npz")
    with np.load(tmp_path / "c.npz") as saved:
        arrays = {name: saved[name] for name in saved.files}
    kernel = "variables/model/encoder/encoder_conv_1/kernel"
    if damage == "a variable missing":
        del arrays["variables/optimizer/adam/iteration"]
    elif damage == "a variable unknown":
        arrays["variables/model/encoder/encoder_conv_3/kernel"] = arrays[kernel]
    else:
        arrays[kernel] = arrays[kernel][..., :16]
    with open(tmp_path / "c.npz", "wb") as handle:  # whole, and of this fingerprint, but not of this state
        np.savez(handle, **arrays)
    fresh = make_trainer(small_params(epochs=1), small_data)
    initial = fresh.state.snapshot().variables
    assert resumed_epoch(fresh, tmp_path / "c.npz") == 0
    assert "is damaged" in caplog.text and ("iteration" in caplog.text or "encoder_conv_" in caplog.text)
    after = fresh.state.snapshot().variables
    assert after.keys() == initial.keys()
    for name in after:
        np.testing.assert_array_equal(after[name], initial[name])  # nothing of the file was assigned
    assert not np.array_equal(after["model/" + kernel.split("/", 2)[2]], trained.model.get_weights()[0])


@pytest.mark.reliability
def test_divergence_stops_at_once_naming_epoch_and_step(small_data, tmp_path):
    trainer = make_trainer(small_params(learning_rate=1e30), small_data)
    with pytest.raises(TrainingError, match=r"loss is (nan|inf) at epoch 1, step \d+; try a lower train.learning_rate"):
        trainer.fit(start(trainer, tmp_path / "c.npz"), trainer.checkpoint(tmp_path / "c.npz"))
    assert not (tmp_path / "c.npz").exists()


def test_final_metrics_summarize_the_history_and_time_quality_on_the_scored_split():
    history = [{"epoch": 1, "train_loss": 9.0, "validation_elbo": -9.0, "validation_reconstruction": 7.0,
                "validation_kl": 2.0, "epoch_seconds": 2.0, "images_per_second": 100.0, "elapsed_seconds": 6.5},
               {"epoch": 2, "train_loss": 8.0, "validation_elbo": -8.0, "validation_reconstruction": 6.0,
                "validation_kl": 2.0, "epoch_seconds": 3.0, "images_per_second": 300.0, "elapsed_seconds": 10.0}]
    final = final_metrics(history, "validation")
    assert final == {"epochs": 2, "train_loss": 8.0, "validation_elbo": -8.0, "validation_reconstruction": 6.0,
                     "validation_kl": 2.0, "train_seconds": 5.0, "elapsed_seconds": 10.0, "images_per_second": 200.0,
                     "epoch_to_quality": 1, "seconds_to_quality": 6.5}  # -9.0 is already better than -78.3
    slow = [{**row, "validation_elbo": elbo} for row, elbo in zip(history, (-80.0, -78.3), strict=True)]
    assert final_metrics(slow, "validation")["epoch_to_quality"] == 2
    assert final_metrics(slow, "validation")["seconds_to_quality"] == 10.0
    assert "epoch_to_quality" not in final_metrics(slow[:1], "validation")  # not reached: absent, not made up
    tutorial = [{key.replace("validation", "test"): value for key, value in row.items()} for row in slow]
    assert final_metrics(tutorial, "test")["test_elbo"] == -78.3  # no validation set: named after the test set


def test_steps_per_call_changes_the_loop_not_the_numbers(small_data, tmp_path):
    _, per_step = train_fresh(small_params(epochs=1), small_data, tmp_path / "a.npz")
    _, chunked = train_fresh(small_params(epochs=1, steps_per_call=5), small_data, tmp_path / "b.npz")  # 5+5+5+1
    assert timeless(chunked.history) == timeless(per_step.history)


def test_divergence_inside_a_chunk_names_the_exact_step(small_data, tmp_path):
    per_step = make_trainer(small_params(learning_rate=1e30), small_data)
    with pytest.raises(TrainingError) as first:
        per_step.train_epoch(1)
    chunked = make_trainer(small_params(learning_rate=1e30, steps_per_call=16), small_data)
    with pytest.raises(TrainingError) as second:
        chunked.train_epoch(1)
    assert str(first.value) == str(second.value)


@pytest.mark.reliability
@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan], ids=["inf", "-inf", "nan"])
def test_a_non_finite_loss_stops_training_at_its_epoch_and_step(small_data, bad):
    trainer = make_trainer(small_params(steps_per_call=4), small_data)
    compiled, calls = trainer._train_steps, []

    def poisoned(iterator, count):
        losses = compiled(iterator, count).numpy()
        if len(calls) == 1:
            losses[2] = bad  # the 3rd step of the 2nd call: step 7 of the epoch
        calls.append(count)
        return tf.constant(losses)

    trainer._train_steps = poisoned
    with pytest.raises(TrainingError, match=rf"loss is {re.escape(str(np.float32(bad)))} at epoch 3, step 7;"):
        trainer.train_epoch(3)
    assert len(calls) == 2  # stopped at once, not at the end of the epoch


@pytest.mark.reliability
def test_weights_that_score_non_finite_stop_training_at_that_epoch_before_it_is_checkpointed(small_data, tmp_path):
    trainer = make_trainer(small_params(epochs=3), small_data)
    scored = trainer.scorer.evaluate

    def blown_up_in_epoch_2():
        metrics = scored()
        return {**metrics, "test_elbo": float("nan")} if trainer.state.epoch == 1 else metrics

    trainer.scorer.evaluate = blown_up_in_epoch_2
    checkpoint = trainer.checkpoint(tmp_path / "c.npz")
    with pytest.raises(TrainingError, match=r"the test ELBO is nan after epoch 2; try a lower"):
        trainer.fit(trainer.start(checkpoint), checkpoint)
    assert checkpoint.read()[0].epoch == 1  # the last epoch that scored is what a rerun resumes from


# --- issue 16: the schedule, the background checkpoint ---------------------------------------------

def test_the_step_size_is_logged_per_epoch_along_the_cosine_schedule(small_data, tmp_path):
    # The schedule itself: test_optimization.py.
    _, state = train_fresh(small_params(schedule="cosine", epochs=3, warmup_epochs=1, final_learning_rate=1e-5),
                           small_data, tmp_path / "c.npz")
    logged = [row["learning_rate"] for row in state.history]
    assert logged[0] == pytest.approx(FAST["learning_rate"])  # the end of the warm-up: the peak
    assert logged[2] == pytest.approx(1e-5)  # the last step: the floor
    assert logged[0] > logged[1] > logged[2]


def test_a_run_resumed_mid_schedule_ends_where_an_uninterrupted_one_does(small_data, tmp_path):
    params = small_params(schedule="cosine", epochs=3, warmup_epochs=1, final_learning_rate=0)
    whole, whole_state = train_fresh(params, small_data, tmp_path / "whole.npz")

    class Interrupted(Exception):
        pass

    def stop_after_epoch_1(epoch, metrics):
        if epoch == 1:
            raise Interrupted

    broken = make_trainer(params, small_data)
    with pytest.raises(Interrupted):
        broken.fit(start(broken, tmp_path / "resumed.npz"), broken.checkpoint(tmp_path / "resumed.npz"),
                   on_epoch=stop_after_epoch_1)
    resumed = make_trainer(params, small_data)
    state = resumed.fit(start(resumed, tmp_path / "resumed.npz"), resumed.checkpoint(tmp_path / "resumed.npz"))
    assert timeless(state.history) == timeless(whole_state.history)
    assert [row["epoch"] for row in state.history] == [1, 2, 3]
    for a, b in zip(resumed.model.get_weights(), whole.model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_an_epoch_is_checkpointed_while_the_next_one_trains(small_data, tmp_path, monkeypatch):
    from cvae_pipeline.training.checkpoints import Checkpoint

    next_epoch_started = threading.Event()
    original_train_epoch, original_save = Trainer.train_epoch, Checkpoint.save

    def train_epoch(self, epoch, batches=None):
        if epoch == 2:
            next_epoch_started.set()
        return original_train_epoch(self, epoch, batches)

    def save(self, snapshot, progress, finished=False):
        if snapshot.epoch == 1:  # a slow disk: epoch 1's write finishes only once epoch 2 is training
            assert next_epoch_started.wait(60), "training waited for the checkpoint"
        original_save(self, snapshot, progress, finished)

    monkeypatch.setattr(Trainer, "train_epoch", train_epoch)
    monkeypatch.setattr(Checkpoint, "save", save)
    # No average of the weights: the model keeps the weights the checkpoint holds.
    trainer, state = train_fresh(small_params(epochs=2, ema_momentum=0), small_data, tmp_path / "c.npz")
    with np.load(tmp_path / "c.npz") as saved:  # fit returns once the last epoch's checkpoint is on disk
        assert int(saved["epoch"]) == 2
        np.testing.assert_array_equal(saved["variables/model/encoder/encoder_conv_1/kernel"],
                                      trainer.model.get_weights()[0])
    elapsed = [row["elapsed_seconds"] for row in state.history]
    assert 0 < elapsed[0] < elapsed[1]


def test_a_failed_background_checkpoint_stops_training(small_data, tmp_path, monkeypatch):
    from cvae_pipeline.training.checkpoints import Checkpoint

    def save(self, snapshot, progress, finished=False):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Checkpoint, "save", save)
    with pytest.raises(OSError, match="No space left"):
        train_fresh(small_params(epochs=3), small_data, tmp_path / "c.npz")


# --- issue 16: the moving average of the weights (the optimizer's own: test_optimization.py) ------

def float32_elbo(trainer, weights) -> float:
    """The test ELBO of `weights` in a float32 model, as the scorer computes it."""
    model = build_cvae(trainer.params.model, "float32")
    model.set_weights(weights)
    reconstruction, kl = elbo_terms(model, tf.constant(trainer.scorer.images.astype(np.float32)),
                                    trainer.scorer.noise)
    return -float(tf.reduce_mean(reconstruction + kl))


@pytest.mark.parametrize("precision", ["float32", "mixed_bfloat16"])
def test_a_run_with_an_average_scores_and_saves_the_average_not_the_last_weights(small_data, tmp_path, precision):
    try:
        trainer, state = train_fresh(small_params(epochs=2, ema_momentum=0.9, precision=precision), small_data,
                                     tmp_path / "c.npz")
        with np.load(tmp_path / "c.npz") as saved:  # the checkpoint keeps the weights themselves, to resume from
            weights = [saved[f"variables/model/{variable.path}"] for variable in trainer.model.weights]
        model = [w.astype(np.float32) for w in trainer.model.get_weights()]
        assert not all(np.allclose(a, b) for a, b in zip(weights, model, strict=True))
        scored = state.history[-1]["test_elbo"]
        assert float32_elbo(trainer, model) == pytest.approx(scored, abs=1e-3)  # the model is what was scored
        assert abs(float32_elbo(trainer, weights) - scored) > 1e-2
    finally:
        keras.mixed_precision.set_dtype_policy("float32")
