"""The training state, saved and restored whole and by name, its checkpoint file, and the background writer."""

import threading

import numpy as np
import pytest

from cvae_pipeline.training.checkpoints import Checkpoint, Progress, Saver, Snapshot, TrainingState


def test_work_runs_in_order_one_at_a_time_off_the_calling_thread():
    done, threads = [], set()
    release = threading.Event()

    def work(index):
        def run():
            threads.add(threading.get_ident())
            if index == 0:
                assert release.wait(10)  # the caller goes on while this one waits
            done.append(index)
        return run

    with Saver() as saver:
        saver.submit(work(0))
        assert done == []  # submit did not wait for it
        release.set()
        saver.submit(work(1))  # waits for 0 first
        assert done == [0]
    assert done == [0, 1]  # leaving waits for the last
    assert threading.get_ident() not in threads


def test_an_error_in_the_background_surfaces_at_the_next_submit_or_wait():
    def fail():
        raise OSError("disk full")

    saver = Saver()
    saver.submit(fail)
    with pytest.raises(OSError, match="disk full"):
        saver.submit(lambda: None)
    with pytest.raises(OSError, match="disk full"), Saver() as other:
        other.submit(fail)


def test_an_error_of_the_caller_is_not_hidden_by_one_in_the_background(caplog):
    def fail():
        raise OSError("disk full")

    with pytest.raises(KeyError), Saver() as saver:
        saver.submit(fail)
        raise KeyError("the caller's")
    assert "the last checkpoint may not have been written (OSError: disk full)" in caplog.text


def small_state(seed: int):
    """A training state of a small model with its optimizer built, and a generator, all seeded."""
    import keras
    import tensorflow as tf

    from cvae_pipeline.config import ModelParams
    from cvae_pipeline.model.network import build_cvae
    from cvae_pipeline.model.optimization import make_optimizer
    from helpers import params_with

    keras.utils.set_random_seed(seed)
    model = build_cvae(ModelParams(latent_dim=2, encoder_filters=(4, 8), decoder_filters=(8, 4)))
    optimizer = make_optimizer(params_with().train, "float32", steps_per_epoch=10)
    optimizer.build(model.trainable_variables)
    return TrainingState(model, optimizer, tf.random.Generator.from_seed(seed))


def test_the_state_is_saved_and_restored_whole_and_by_name(tmp_path):
    saved = small_state(seed=1)
    saved.epoch, saved.run_id = 3, "0123abcd"
    saved.optimizer.iterations.assign(30)
    saved.generator.normal((5,))  # the generator moves on
    checkpoint = Checkpoint(tmp_path / "c.npz", key="k")
    checkpoint.save(saved.snapshot(), Progress([{"epoch": 1}], [np.zeros((16, 28, 28), np.uint8)] * 2))
    names = saved.snapshot().variables.keys()
    assert {"model/encoder/encoder_conv_1/kernel", "optimizer/adam/iteration", "generator/state"} <= names

    restored = small_state(seed=2)
    progress = checkpoint.restore(restored)
    assert (restored.epoch, restored.run_id, progress.history) == (3, "0123abcd", [{"epoch": 1}])
    for name, value in saved.snapshot().variables.items():
        np.testing.assert_array_equal(restored.snapshot().variables[name], value, err_msg=name)
    assert int(restored.optimizer.iterations.numpy()) == 30


def test_values_go_to_the_variable_of_their_name_whatever_the_order(tmp_path):
    state = small_state(seed=1)
    snapshot = state.snapshot()
    # Two variables of one shape, their values swapped: restored by name, each takes the other's value.
    first, second = "model/encoder/encoder_conv_1/bias", "model/decoder/decoder_deconv_2/bias"
    swapped = dict(reversed(snapshot.variables.items()))
    swapped[first], swapped[second] = snapshot.variables[second] + 1, snapshot.variables[first] + 2
    state.restore(Snapshot(snapshot.epoch, snapshot.run_id, swapped))
    after = state.snapshot().variables
    np.testing.assert_array_equal(after[first], snapshot.variables[second] + 1)
    np.testing.assert_array_equal(after[second], snapshot.variables[first] + 2)


def test_a_checkpoint_of_another_training_or_a_finished_one_is_not_resumed(tmp_path):
    state = small_state(seed=1)
    progress = Progress([], [np.zeros((16, 28, 28), np.uint8)])
    Checkpoint(tmp_path / "c.npz", key="other").save(state.snapshot(), progress)
    assert Checkpoint(tmp_path / "c.npz", key="mine").restore(state) is None
    Checkpoint(tmp_path / "c.npz", key="mine").save(state.snapshot(), progress, finished=True)
    assert Checkpoint(tmp_path / "c.npz", key="mine").restore(state) is None
    assert Checkpoint(tmp_path / "absent.npz", key="mine").restore(state) is None
