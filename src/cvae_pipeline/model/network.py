"""The tutorial's convolutional VAE: encoder to (mean, log-variance), reparameterization, decoder to logits."""

import keras
from keras import layers

from cvae_pipeline.config import ModelParams

IMAGE_SHAPE = (28, 28, 1)


@keras.saving.register_keras_serializable(package="cvae_pipeline")
class OneChannelConv2DTranspose(layers.Conv2DTranspose):
    """Conv2DTranspose to one channel at stride 1 with "same" padding (the decoder's last layer): the same weights,
    outputs (to float rounding) and gradients. With TensorFlow on a CPU, the forward pass is computed as TensorFlow's
    CPU kernels do it fast (`convolution.one_channel_conv_transpose`); elsewhere (a GPU, or another Keras backend such
    as JAX, which `benchmarks/iwae_jax.py` loads the model on) it is Keras' own Conv2DTranspose. A model saved on one
    path loads on the other: only the computation differs, never the weights."""

    def __init__(self, filters=1, kernel_size=3, **kwargs):
        super().__init__(filters, kernel_size, **kwargs)
        layout = (self.filters, self.strides, self.padding, self.dilation_rate, self.data_format)
        if layout != (1, (1, 1), "same", (1, 1), "channels_last"):
            raise ValueError(f"{type(self).__name__} computes 1 filter, strides 1, padding 'same', dilation 1, "
                             f"channels_last; got {layout}")

    def call(self, inputs):
        if keras.backend.backend() != "tensorflow":
            return super().call(inputs)
        from cvae_pipeline.model import convolution  # TensorFlow: absent beside JAX

        if not convolution.replacement_helps():
            return super().call(inputs)
        outputs = convolution.one_channel_conv_transpose(inputs, keras.ops.cast(self.kernel, inputs.dtype))
        if self.use_bias:
            outputs = outputs + keras.ops.cast(self.bias, inputs.dtype)
        return self.activation(outputs)


@keras.saving.register_keras_serializable(package="cvae_pipeline")
class CVAE(keras.Model):
    """Encoder Conv2D(32,3,s2)-Conv2D(64,3,s2)-Dense(2*latent); decoder Dense(7*7*32)-ConvT(64)-ConvT(32)-ConvT(1)."""

    def __init__(self, latent_dim: int, encoder_filters=(32, 64), decoder_filters=(64, 32), **kwargs):
        super().__init__(**kwargs)
        self.latent_dim = latent_dim
        self.encoder_filters = tuple(encoder_filters)
        self.decoder_filters = tuple(decoder_filters)
        self.encoder = keras.Sequential(
            [
                keras.Input(shape=IMAGE_SHAPE),
                layers.Conv2D(encoder_filters[0], 3, strides=2, activation="relu", name="encoder_conv_1"),
                layers.Conv2D(encoder_filters[1], 3, strides=2, activation="relu", name="encoder_conv_2"),
                layers.Flatten(name="encoder_flatten"),
                layers.Dense(2 * latent_dim, name="encoder_mean_and_log_variance"),
            ],
            name="encoder",
        )
        self.decoder = keras.Sequential(
            [
                keras.Input(shape=(latent_dim,)),
                layers.Dense(7 * 7 * 32, activation="relu", name="decoder_dense"),
                layers.Reshape((7, 7, 32), name="decoder_reshape"),
                layers.Conv2DTranspose(decoder_filters[0], 3, strides=2, padding="same", activation="relu",
                                       name="decoder_deconv_1"),
                layers.Conv2DTranspose(decoder_filters[1], 3, strides=2, padding="same", activation="relu",
                                       name="decoder_deconv_2"),
                # Computed in the policy's precision, like the layers before it (docs/performance.md: in float32 it
                # slowed a bfloat16 training step); `decode` hands the loss float32 logits all the same.
                OneChannelConv2DTranspose(1, 3, strides=1, padding="same", name="decoder_logits"),
            ],
            name="decoder",
        )

    def encode(self, images):
        """Posterior q(z|x) = N(mean, exp(log_variance)); both float32."""
        mean, log_variance = keras.ops.split(self.encoder(images), 2, axis=-1)
        return keras.ops.cast(mean, "float32"), keras.ops.cast(log_variance, "float32")

    @staticmethod
    def reparameterize(mean, log_variance, noise):
        """z = mean + exp(log_variance / 2) * noise, with noise ~ N(0, I) drawn by the caller (seeded)."""
        return mean + keras.ops.exp(log_variance * 0.5) * noise

    def decode(self, latent):
        """Bernoulli logits of the 28x28x1 image, in float32."""
        return keras.ops.cast(self.decoder(latent), "float32")

    def call(self, images):
        """The mean reconstruction's logits: decode the posterior mean (deterministic, for serving)."""
        mean, _ = self.encode(images)
        return self.decode(mean)

    def get_config(self):
        return {
            **super().get_config(),
            "latent_dim": self.latent_dim,
            "encoder_filters": list(self.encoder_filters),
            "decoder_filters": list(self.decoder_filters),
        }


def build_cvae(cfg: ModelParams, dtype_policy: str | None = None) -> CVAE:
    """The model for `cfg`, with its weights created (so it can be counted, saved and restored at once).
    `dtype_policy`: its layers' precision (`float32`, `mixed_bfloat16`...); by default Keras' global policy."""
    previous = keras.mixed_precision.dtype_policy()
    if dtype_policy is not None:
        keras.mixed_precision.set_dtype_policy(dtype_policy)
    try:
        model = CVAE(cfg.latent_dim, cfg.encoder_filters, cfg.decoder_filters, name="cvae")
        model.build((None, *IMAGE_SHAPE))
    finally:
        keras.mixed_precision.set_dtype_policy(previous)
    return model
