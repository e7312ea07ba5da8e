"""Figures: each is a valid image of the expected size, deterministic, and drawn from the model and data only."""

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cvae_pipeline.config import ModelParams, VisualizeParams
from cvae_pipeline.evaluation import figures
from cvae_pipeline.model.network import build_cvae
from helpers import synthetic_digits

CFG = VisualizeParams(examples=6, prior_grid=4, manifold_size=5, frame_milliseconds=100)


def test_tile_lays_images_out_row_by_row():
    images = np.arange(5 * 2 * 2).reshape(5, 2, 2)
    mosaic = figures.tile(images, 3)
    assert mosaic.shape == (4, 6)
    np.testing.assert_array_equal(mosaic[:2, 2:4], images[1])
    np.testing.assert_array_equal(mosaic[2:, :2], images[3])
    assert not mosaic[2:, 4:].any()  # blank cell after the last image


def test_projection_keeps_low_dimensions_and_is_sign_stable_pca_above():
    rng = np.random.default_rng(0)
    two = rng.normal(size=(50, 2))
    np.testing.assert_array_equal(figures.project_2d(two)[0], two)
    assert figures.project_2d(two[:, :1])[0].shape == (50, 2)
    many = rng.normal(size=(200, 5)) * [5, 2, 0.1, 0.1, 0.1]
    points, x_name, _ = figures.project_2d(many)
    assert points.shape == (200, 2) and "principal component 1" in x_name
    assert np.var(points[:, 0]) > np.var(points[:, 1])  # the first component carries the most variance


def test_pca_signs_do_not_depend_on_the_signs_the_svd_happens_to_return(monkeypatch):
    """LAPACK may return any singular vector negated; the picture must not flip with it."""
    many = np.random.default_rng(0).normal(size=(200, 5)) * [5, 2, 0.1, 0.1, 0.1]
    points, _, _ = figures.project_2d(many)
    svd = np.linalg.svd

    def negated_svd(matrix, *args, **kwargs):
        left, singular, right = svd(matrix, *args, **kwargs)
        return -left, singular, -right  # as valid a decomposition as the original

    monkeypatch.setattr(figures.np.linalg, "svd", negated_svd)
    np.testing.assert_allclose(figures.project_2d(many)[0], points, atol=1e-9)


@pytest.fixture(scope="module")
def model_2d():
    return build_cvae(ModelParams(latent_dim=2, encoder_filters=(4, 8), decoder_filters=(8, 4)))


def size_of(path):
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        return image.size, image.format, getattr(image, "n_frames", 1)


def test_each_figure_is_a_valid_image_of_the_expected_size(model_2d, tmp_path):
    images, labels = synthetic_digits(300)
    figures.reconstructions(model_2d, images, CFG, tmp_path / "r.png")
    figures.prior_samples(model_2d, CFG, 2, 0, tmp_path / "p.png")
    figures.latent_manifold(model_2d, CFG.manifold_size, tmp_path / "m.png")
    figures.latent_scatter(model_2d, images, labels, tmp_path / "s.png")
    history = pd.DataFrame({"epoch": [1, 2, 3], "train_loss": [3.0, 2.0, 1.0],
                            "validation_elbo": [-3.0, -2.5, -2.0], "validation_reconstruction": [2.0, 1.5, 1.2],
                            "validation_kl": [1.0, 1.0, 0.8],
                            "learning_rate": [2e-3, 1e-3, 0.0]})
    figures.training_curves(history, tmp_path / "c.png")
    grids = np.random.default_rng(0).integers(0, 256, (4, 16, 28, 28), dtype=np.uint8)
    figures.progress_animation(grids, np.arange(4), CFG, tmp_path / "a.gif")

    assert size_of(tmp_path / "r.png") == ((480, 280), "PNG", 1)
    assert size_of(tmp_path / "p.png") == ((600, 640), "PNG", 1)
    assert size_of(tmp_path / "m.png") == ((800, 840), "PNG", 1)
    assert size_of(tmp_path / "s.png") == ((800, 700), "PNG", 1)
    assert size_of(tmp_path / "c.png") == ((1500, 420), "PNG", 1)
    assert size_of(tmp_path / "a.gif") == ((4 * 28 * 3, 4 * 28 * 3 + 16), "GIF", 4)


def test_figures_are_deterministic(model_2d, tmp_path):
    for name in ("one.png", "two.png"):
        figures.prior_samples(model_2d, CFG, 2, 0, tmp_path / name)
    assert (tmp_path / "one.png").read_bytes() == (tmp_path / "two.png").read_bytes()
    figures.prior_samples(model_2d, CFG, 2, 1, tmp_path / "other_seed.png")
    assert (tmp_path / "other_seed.png").read_bytes() != (tmp_path / "one.png").read_bytes()


def test_animation_frames_follow_the_epochs(tmp_path):
    grids = np.zeros((3, 16, 28, 28), np.uint8)
    grids[2] = 255  # the last epoch's digits are solid: dark on white
    figures.progress_animation(grids, np.arange(3), CFG, tmp_path / "a.gif")
    with Image.open(tmp_path / "a.gif") as gif:
        gif.seek(2)
        last = np.asarray(gif.convert("L"))
        assert gif.info["duration"] == 100 and gif.info["loop"] == 0
    assert last[16:].mean() < 10  # the mosaic below the caption is black
