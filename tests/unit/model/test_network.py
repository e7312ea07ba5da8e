"""The tutorial's architecture: parameter counts, shapes, and a safe-mode round trip through `.keras`."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from cvae_pipeline.config import ModelParams
from cvae_pipeline.model.network import CVAE, OneChannelConv2DTranspose, build_cvae
from helpers import model_params


@pytest.mark.parametrize(("latent_dim", "count"), [(50, 366_533), (2, 69_989)])
def test_parameter_count_matches_the_tutorial(latent_dim, count):
    assert build_cvae(model_params(latent_dim)).count_params() == count


def test_filters_come_from_params():
    model = build_cvae(ModelParams(latent_dim=4, encoder_filters=(8, 16), decoder_filters=(16, 8)))
    assert model.encoder.get_layer("encoder_conv_2").filters == 16
    assert model.decoder.get_layer("decoder_deconv_1").filters == 16


def test_shapes_of_encode_reparameterize_decode():
    model = build_cvae(model_params(3))
    images = np.random.default_rng(0).integers(0, 2, (5, 28, 28, 1)).astype("float32")
    mean, log_variance = model.encode(images)
    assert mean.shape == log_variance.shape == (5, 3)
    latent = model.reparameterize(mean, log_variance, np.zeros((5, 3), "float32"))
    np.testing.assert_allclose(latent, mean)  # zero noise gives the mean
    assert model.decode(latent).shape == (5, 28, 28, 1)
    assert model(images).shape == (5, 28, 28, 1)


def test_reparameterization_scales_noise_by_the_standard_deviation():
    mean = np.array([[1.0, -2.0]], "float32")
    log_variance = np.log(np.array([[4.0, 0.25]], "float32"))
    latent = CVAE.reparameterize(mean, log_variance, np.ones((1, 2), "float32"))
    np.testing.assert_allclose(latent, [[3.0, -1.5]], rtol=1e-6)


def test_saved_model_loads_in_safe_mode_with_the_same_outputs(tmp_path):
    model = build_cvae(model_params(2))
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras", safe_mode=True)
    images = np.random.default_rng(1).random((2, 28, 28, 1), dtype="float32")
    np.testing.assert_array_equal(model(images), loaded(images))
    assert loaded.latent_dim == 2


def test_mixed_precision_computes_in_bfloat16_but_hands_out_float32():
    keras.mixed_precision.set_dtype_policy("mixed_bfloat16")
    try:
        model = build_cvae(model_params(3))
    finally:
        keras.mixed_precision.set_dtype_policy("float32")
    assert model.decoder.get_layer("decoder_logits").compute_dtype == "bfloat16"
    images = np.random.default_rng(2).integers(0, 2, (2, 28, 28, 1)).astype("float32")
    mean, log_variance = model.encode(images)
    assert mean.dtype == log_variance.dtype == model.decode(mean).dtype == model(images).dtype == "float32"


@pytest.mark.reliability
def test_a_model_file_with_code_in_it_is_refused_by_safe_mode(tmp_path):
    from cvae_pipeline.errors import UserInputError
    from cvae_pipeline.model.loading import load_trained

    inputs = keras.Input((28, 28, 1))
    unsafe = keras.Model(inputs, keras.layers.Lambda(lambda x: x * 2, name="arbitrary_code")(inputs))
    unsafe.save(tmp_path / "unsafe.keras")
    with pytest.raises(UserInputError, match=r"unsafe\.keras: not a model this version of cvae_pipeline can load "
                                              r".*safe_mode"):
        load_trained(tmp_path / "unsafe.keras", model_params(2))


@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16"])
def test_the_one_channel_output_layer_is_keras_conv2d_transpose(policy):
    rng = np.random.default_rng(0)
    keras.mixed_precision.set_dtype_policy(policy)
    try:
        ours = OneChannelConv2DTranspose(1, 3, strides=1, padding="same")
        theirs = keras.layers.Conv2DTranspose(1, 3, strides=1, padding="same")
    finally:
        keras.mixed_precision.set_dtype_policy("float32")
    inputs = tf.constant(rng.normal(0, 1, (2, 28, 28, 6)), tf.float32)
    ours.build(inputs.shape)
    theirs.build(inputs.shape)
    # Weights set after building, as training changes them: an asymmetric kernel and a bias, so that a kernel left
    # unflipped or a bias dropped would show.
    kernel = rng.normal(0, 0.5, (3, 3, 1, 6))
    for layer in (ours, theirs):
        layer.kernel.assign(kernel)
        layer.bias.assign([0.7])

    def outputs_and_gradients(layer):
        with tf.GradientTape() as tape:
            tape.watch(inputs)
            outputs = tf.cast(layer(inputs), tf.float32)
            loss = tf.reduce_sum(outputs * tf.linspace(-1.0, 1.0, 28)[:, None, None])
        return [outputs, *tape.gradient(loss, [inputs, layer.kernel, layer.bias])]

    tolerance = 1e-5 if policy == "float32" else 0.1  # bfloat16 keeps 8 bits of mantissa; sums of 54 products
    for mine, reference in zip(outputs_and_gradients(ours), outputs_and_gradients(theirs), strict=True):
        assert mine.dtype == reference.dtype and mine.shape == reference.shape
        np.testing.assert_allclose(mine.numpy(), reference.numpy(), rtol=tolerance, atol=tolerance)


def test_the_one_channel_output_layer_refuses_another_layout():
    with pytest.raises(ValueError, match="1 filter, strides 1, padding 'same'"):
        OneChannelConv2DTranspose(1, 3, strides=2, padding="same")


def decoder_operations(model) -> set[str]:
    traced = tf.function(model.decode).get_concrete_function(tf.TensorSpec((2, model.latent_dim), tf.float32)).graph
    return {operation.type for operation in traced.get_operations()}


@pytest.fixture(params=["cpu", "gpu"])
def path(request, monkeypatch):
    """Which computation of the decoder's last layer runs: forced, as on a CPU (the depthwise replacement) or as on a
    GPU (Keras' own Conv2DTranspose)."""
    from cvae_pipeline.model import convolution

    monkeypatch.setattr(convolution, "replacement_helps", lambda: request.param == "cpu")
    return request.param


def test_the_decoder_computes_its_last_layer_as_a_depthwise_convolution_on_a_cpu_only(path):
    model = build_cvae(ModelParams(latent_dim=4, encoder_filters=(4, 8), decoder_filters=(8, 4)))
    assert isinstance(model.decoder.get_layer("decoder_logits"), OneChannelConv2DTranspose)
    operations = decoder_operations(model)
    assert ("DepthwiseConv2dNative" in operations) == (path == "cpu")
    # Keras' Conv2DTranspose is TensorFlow's Conv2DBackpropInput: the decoder's two stride-2 layers, and the last one.
    transposed = [operation for operation in tf.function(model.decode).get_concrete_function(
        tf.TensorSpec((2, 4), tf.float32)).graph.get_operations() if operation.type == "Conv2DBackpropInput"]
    assert len(transposed) == (2 if path == "cpu" else 3)


def test_a_model_scores_the_same_whichever_path_saved_it_and_whichever_loads_it(tmp_path, monkeypatch):
    from cvae_pipeline.model import convolution
    from cvae_pipeline.model.loading import load_model_file
    from cvae_pipeline.model.losses import elbo_terms

    rng = np.random.default_rng(0)
    images = tf.constant((rng.uniform(size=(5, 28, 28, 1)) > 0.5).astype(np.float32))
    noise = tf.constant(rng.standard_normal((5, 4)).astype(np.float32))
    for saved_on, loaded_on in [("cpu", "gpu"), ("gpu", "cpu")]:
        monkeypatch.setattr(convolution, "replacement_helps", lambda on=saved_on: on == "cpu")
        model = build_cvae(ModelParams(latent_dim=4, encoder_filters=(4, 8), decoder_filters=(8, 4)), "float32")
        model.decoder.get_layer("decoder_logits").bias.assign([0.3])  # a bias that is used shows if it were lost
        before = [term.numpy() for term in elbo_terms(model, images, noise)]
        model.save(tmp_path / f"{saved_on}.keras")
        monkeypatch.setattr(convolution, "replacement_helps", lambda on=loaded_on: on == "cpu")
        loaded = load_model_file(tmp_path / f"{saved_on}.keras")
        assert ("DepthwiseConv2dNative" in decoder_operations(loaded)) == (loaded_on == "cpu")
        after = [term.numpy() for term in elbo_terms(loaded, images, noise)]
        for saved, reloaded in zip(before, after, strict=True):
            np.testing.assert_allclose(reloaded, saved, rtol=1e-5, atol=1e-4)
