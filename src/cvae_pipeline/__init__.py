"""cvae-pipeline: the convolutional VAE of the TensorFlow tutorial as a reproducible DVC + MLflow pipeline."""
