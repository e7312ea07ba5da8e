"""The training loop in-process: it learns, it is deterministic, it resumes exactly, it stops on NaN."""

import re

import numpy as np
import pytest
import tensorflow as tf

from conftest import params_with
from cvae_pipeline.errors import TrainingError
from cvae_pipeline.training import Trainer, final_metrics

FAST = {"batch_size": 32, "learning_rate": 1e-3, "epochs": 2, "eval_limit": None}


def small_params(**train):
    return params_with(model={"latent_dim": 4}, train={**FAST, **train})


def test_one_epoch_on_512_images_lowers_the_loss(small_data):
    trainer = Trainer(small_params(), small_data)
    before = trainer.evaluate()
    metrics = trainer.train_epoch(1)
    after = trainer.evaluate()
    assert after["test_elbo"] > before["test_elbo"] + 50  # nats per image
    assert metrics["train_loss"] < -before["test_elbo"]
    assert trainer.steps_per_epoch == 16


def first_step_loss(data, **train) -> float:
    """The loss of the first optimizer step (computed before its update), same seed: same weights, batch, noise."""
    trainer = Trainer(small_params(precision="float32", **train), data)
    iterator = iter(trainer.strategy.experimental_distribute_dataset(trainer.epoch_batches(1)))
    return float(trainer._train_steps(iterator, tf.constant(1))[0])


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
    return [{k: v for k, v in row.items() if k not in ("epoch_seconds", "images_per_second")} for row in history]


def train_fresh(params, data, checkpoint):
    trainer = Trainer(params, data)
    return trainer, trainer.fit(trainer.restore_checkpoint(checkpoint), checkpoint)


def test_same_seed_gives_the_same_metrics_and_another_seed_does_not(small_data, tmp_path):
    _, first = train_fresh(small_params(), small_data, tmp_path / "a.npz")
    _, second = train_fresh(small_params(), small_data, tmp_path / "b.npz")
    assert timeless(first.history) == timeless(second.history)
    _, other = train_fresh(params_with(seed=1, model={"latent_dim": 4}, train=FAST), small_data, tmp_path / "c.npz")
    assert timeless(other.history) != timeless(first.history)


@pytest.mark.reliability
def test_a_resumed_run_ends_where_an_uninterrupted_one_does(small_data, tmp_path):
    params = small_params(epochs=3)
    whole, whole_state = train_fresh(params, small_data, tmp_path / "whole.npz")

    class Interrupted(Exception):
        pass

    def interrupt_in_epoch_2(epoch, metrics):
        if epoch == 2:
            raise Interrupted  # after epoch 2's checkpoint, before it is logged: as a kill there would

    broken = Trainer(params, small_data)
    with pytest.raises(Interrupted):
        broken.fit(broken.restore_checkpoint(tmp_path / "resumed.npz"), tmp_path / "resumed.npz",
                   on_epoch=interrupt_in_epoch_2)

    resumed = Trainer(params, small_data)
    state = resumed.restore_checkpoint(tmp_path / "resumed.npz")
    assert state.epoch == 2
    state = resumed.fit(state, tmp_path / "resumed.npz")
    assert timeless(state.history) == timeless(whole_state.history)
    for a, b in zip(resumed.model.get_weights(), whole.model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    assert len(state.grids) == 4  # epoch 0 and each of the 3 epochs
    np.testing.assert_array_equal(np.stack(state.grids), np.stack(whole_state.grids))


def test_a_checkpoint_of_another_configuration_is_not_resumed(small_data, tmp_path):
    train_fresh(small_params(epochs=1), small_data, tmp_path / "c.npz")
    other = Trainer(small_params(epochs=1, learning_rate=2e-3), small_data)
    assert other.restore_checkpoint(tmp_path / "c.npz").epoch == 0
    same = Trainer(small_params(epochs=1), small_data)
    assert same.restore_checkpoint(tmp_path / "c.npz").epoch == 1


@pytest.mark.reliability
def test_a_damaged_checkpoint_starts_afresh(small_data, tmp_path):
    (tmp_path / "c.npz").write_bytes(b"not a checkpoint")
    assert Trainer(small_params(), small_data).restore_checkpoint(tmp_path / "c.npz").epoch == 0


@pytest.mark.reliability
def test_divergence_stops_at_once_naming_epoch_and_step(small_data, tmp_path):
    trainer = Trainer(small_params(learning_rate=1e30), small_data)
    with pytest.raises(TrainingError, match=r"loss is (nan|inf) at epoch 1, step \d+; try a lower train.learning_rate"):
        trainer.fit(trainer.restore_checkpoint(tmp_path / "c.npz"), tmp_path / "c.npz")
    assert not (tmp_path / "c.npz").exists()


def test_final_metrics_summarize_the_history():
    history = [{"epoch": 1, "train_loss": 9.0, "test_elbo": -9.0, "test_reconstruction": 7.0, "test_kl": 2.0,
                "epoch_seconds": 2.0, "images_per_second": 100.0},
               {"epoch": 2, "train_loss": 8.0, "test_elbo": -8.0, "test_reconstruction": 6.0, "test_kl": 2.0,
                "epoch_seconds": 3.0, "images_per_second": 300.0}]
    final = final_metrics(history)
    assert final == {"epochs": 2, "train_loss": 8.0, "test_elbo": -8.0, "test_reconstruction": 6.0, "test_kl": 2.0,
                     "train_seconds": 5.0, "images_per_second": 200.0}


def test_steps_per_call_changes_the_loop_not_the_numbers(small_data, tmp_path):
    _, per_step = train_fresh(small_params(epochs=1), small_data, tmp_path / "a.npz")
    _, chunked = train_fresh(small_params(epochs=1, steps_per_call=5), small_data, tmp_path / "b.npz")  # 5+5+5+1
    assert timeless(chunked.history) == timeless(per_step.history)


def test_divergence_inside_a_chunk_names_the_exact_step(small_data, tmp_path):
    per_step = Trainer(small_params(learning_rate=1e30), small_data)
    with pytest.raises(TrainingError) as first:
        per_step.train_epoch(1)
    chunked = Trainer(small_params(learning_rate=1e30, steps_per_call=16), small_data)
    with pytest.raises(TrainingError) as second:
        chunked.train_epoch(1)
    assert str(first.value) == str(second.value)


@pytest.mark.reliability
@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan], ids=["inf", "-inf", "nan"])
def test_a_non_finite_loss_stops_training_at_its_epoch_and_step(small_data, bad):
    trainer = Trainer(small_params(steps_per_call=4), small_data)
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
