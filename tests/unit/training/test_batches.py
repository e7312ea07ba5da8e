"""The training set's batches: every image once an epoch, in an order that (seed, epoch) alone fixes."""

import numpy as np
import pytest
import tensorflow as tf

from cvae_pipeline.errors import UserInputError
from cvae_pipeline.training.batches import TrainingSet
from cvae_pipeline.training.hardware import Machine
from helpers import make_trainer, params_with
from repositories import TINY

CPU = Machine("test CPU", frozenset({"avx2"}))


def training_set(count=10, batch_size=4, seed=0) -> TrainingSet:
    images = np.zeros((count, 28, 28, 1), np.uint8)
    return TrainingSet(images, batch_size, seed, tf.distribute.get_strategy(), CPU)


def epochs_of(batches, steps_per_epoch, epochs) -> list[list[np.ndarray]]:
    return [[next(batches).numpy() for _ in range(steps_per_epoch)] for _ in range(epochs)]


def test_each_epoch_holds_every_image_once_with_the_last_short_batch_kept():
    images = training_set(count=10, batch_size=4)
    assert images.steps_per_epoch == 3 and not images.whole_batches_only
    for epoch in epochs_of(images.batches(1, 2), images.steps_per_epoch, 2):
        assert [len(batch) for batch in epoch] == [4, 4, 2]
        assert sorted(np.concatenate(epoch).tolist()) == list(range(10))


def test_an_epochs_order_depends_on_the_seed_and_the_epoch_only():
    whole = epochs_of(training_set().batches(1, 3), 3, 3)
    resumed = epochs_of(training_set().batches(2, 3), 3, 2)  # a run resumed after epoch 1
    for a, b in zip(whole[1:], resumed, strict=True):
        np.testing.assert_array_equal(np.concatenate(a), np.concatenate(b))
    assert not np.array_equal(np.concatenate(whole[0]), np.concatenate(whole[1]))
    other_seed = epochs_of(training_set(seed=1).batches(1, 1), 3, 1)
    assert not np.array_equal(np.concatenate(other_seed[0]), np.concatenate(whole[0]))


class TwoReplicas:
    """As much of a two-device `tf.distribute.Strategy` as placing the images asks of one."""

    num_replicas_in_sync = 2

    @staticmethod
    def experimental_distribute_values_from_function(function):
        return function(None)


def test_one_device_trains_a_batch_larger_than_the_set_as_one_batch_of_all_images():
    images = training_set(count=10, batch_size=11)
    assert images.steps_per_epoch == 1
    assert sorted(next(images.batches(1, 1)).numpy().tolist()) == list(range(10))


def test_several_replicas_train_whole_batches_only_and_refuse_a_batch_larger_than_the_set():
    images = np.zeros((10, 28, 28, 1), np.uint8)
    shared = TrainingSet(images, 4, 0, TwoReplicas(), CPU)
    # The last 2 images wait for another epoch's order (batch lengths: test_distribution.py, with real replicas).
    assert (shared.steps_per_epoch, shared.whole_batches_only) == (2, True)
    with pytest.raises(UserInputError, match=r"^train\.batch_size: a batch of 12 is more than the 10 training "
                                             r"images; with 2 replicas a batch must be whole$"):
        TrainingSet(images, 12, 0, TwoReplicas(), CPU)


def test_the_validation_images_never_appear_in_a_training_batch(fake_mnist, tmp_path, monkeypatch):
    from cvae_pipeline.data import load_manifest, prepare

    mirror, manifest, _ = fake_mnist
    monkeypatch.setenv("MNIST_MIRROR", str(mirror))
    params = params_with(**TINY)  # 100 of the 300 training images held out
    data = prepare(load_manifest(manifest), tmp_path / "raw", params.data)
    training = make_trainer(params, data).training_set
    trained = set()
    for epoch in epochs_of(training.batches(1, 2), training.steps_per_epoch, 2):
        trained |= {training.images[index].tobytes() for index in np.concatenate(epoch)}
    validation = {image[..., None].tobytes() for image in data.validation.images}
    assert len(validation) == 100 and len(trained) == 200  # the random images are all different
    assert not trained & validation
