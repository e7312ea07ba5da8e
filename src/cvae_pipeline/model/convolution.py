"""A convolution that TensorFlow's CPU kernels compute slowly, computed another way: same numbers, same gradients.

TensorFlow's CPU kernels (oneDNN) handle a convolution to a single output channel poorly, and the decoder's last layer,
Conv2DTranspose(1, 3x3, stride 1, "same") from 32 channels, is one (docs/performance.md has the measurements). Its
gradients run fast, since they go the other way (from one channel to 32). The replacement is for TensorFlow on a CPU
alone (`replacement_helps`): on a GPU, Keras' own Conv2DTranspose runs, whose kernels exist in every precision there.
"""

import functools

import tensorflow as tf


@functools.cache
def replacement_helps() -> bool:
    """Whether the model runs on a CPU here: TensorFlow sees no GPU, so it places the model's work on the CPU."""
    return not tf.config.list_logical_devices("GPU")


@tf.custom_gradient
def one_channel_conv_transpose(inputs, kernel):
    """conv2d_transpose(inputs, kernel) at stride 1 with "same" padding, for a `kernel` of shape (height, width, 1,
    channels) (Keras' layout): (batch, rows, columns, channels) -> (batch, rows, columns, 1).

    Forward: a stride-1 transposed convolution is the convolution with the kernel flipped in space; to one channel,
    that is a depthwise convolution (one filter per input channel) summed over the channels, which TensorFlow's CPU
    kernels compute far faster (docs/performance.md).
    Backward: the gradients TensorFlow registers for the transposed convolution itself (`Conv2DBackpropInput`)."""
    per_channel = tf.nn.depthwise_conv2d(inputs, tf.transpose(kernel[::-1, ::-1], (0, 1, 3, 2)), [1, 1, 1, 1], "SAME")
    outputs = tf.reduce_sum(per_channel, axis=-1, keepdims=True)

    def gradients(upstream):
        inputs_gradient = tf.nn.conv2d(upstream, kernel, 1, "SAME")
        kernel_gradient = tf.raw_ops.Conv2DBackpropFilter(input=upstream, filter_sizes=tf.shape(kernel),
                                                          out_backprop=inputs, strides=[1, 1, 1, 1], padding="SAME")
        return inputs_gradient, kernel_gradient

    return outputs, gradients
