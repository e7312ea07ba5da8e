"""The model: the tutorial's convolutional VAE, its loss, its fast last-layer kernel, its optimizer, and loading it."""
