"""The one-channel transposed convolution against TensorFlow's own: the same outputs and the same gradients."""

import numpy as np
import pytest
import tensorflow as tf

from cvae_pipeline.model.convolution import one_channel_conv_transpose


@pytest.mark.parametrize("channels", [1, 5])
def test_outputs_and_gradients_are_tensorflows_conv2d_transpose(channels):
    rng = np.random.default_rng(0)
    # An asymmetric kernel and a non-square image: a kernel left unflipped, or rows and columns swapped, would show.
    inputs = tf.constant(rng.normal(0, 1, (3, 9, 7, channels)), tf.float32)
    kernel = tf.constant(rng.normal(0, 1, (3, 3, 1, channels)), tf.float32)
    upstream = tf.constant(rng.normal(0, 1, (3, 9, 7, 1)), tf.float32)  # a loss that weighs every output pixel

    def outputs_and_gradients(convolve):
        with tf.GradientTape() as tape:
            tape.watch([inputs, kernel])
            outputs = convolve(inputs, kernel)
            loss = tf.reduce_sum(outputs * upstream)
        return [outputs, *tape.gradient(loss, [inputs, kernel])]

    ours = outputs_and_gradients(one_channel_conv_transpose)
    theirs = outputs_and_gradients(lambda x, k: tf.nn.conv2d_transpose(x, k, (3, 9, 7, 1), 1, "SAME"))
    for mine, reference in zip(ours, theirs, strict=True):
        assert mine.shape == reference.shape
        np.testing.assert_allclose(mine.numpy(), reference.numpy(), rtol=1e-5, atol=1e-5)
