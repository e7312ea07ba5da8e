"""The pictures people look at: reconstructions, prior samples, the latent space, training curves, the animation.

Every figure is drawn from the trained model, the prepared data and the train stage's outputs only, with seeded
randomness, so the same inputs give the same files.
"""

import statistics
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure  # not pyplot: no backend, no global state, nothing to close
from PIL import Image, ImageDraw

from cvae_pipeline import scores
from cvae_pipeline.config import TUTORIAL_ELBO, Params, VisualizeParams
from cvae_pipeline.data import PreparedData
from cvae_pipeline.errors import UserInputError
from cvae_pipeline.evaluation.train_outputs import UpstreamOutputs
from cvae_pipeline.fileio import DAMAGED_FILE_ERRORS, atomic_path
from cvae_pipeline.model.loading import decode_probabilities, load_trained, posterior
from cvae_pipeline.model.network import CVAE
from cvae_pipeline.tracking import runs
from cvae_pipeline.tracking.session import Session

DPI = 100
PNG_METADATA = {"Software": None}  # no version string: identical inputs give identical bytes


def tile(images: np.ndarray, columns: int) -> np.ndarray:
    """(n, 28, 28) images to one (rows*28, columns*28) mosaic, row by row, with blank cells at the end."""
    rows = -(-len(images) // columns)
    padded = np.zeros((rows * columns, *images.shape[1:]), images.dtype)
    padded[: len(images)] = images
    return padded.reshape(rows, columns, *images.shape[1:]).swapaxes(1, 2).reshape(rows * images.shape[1], -1)


def _save(figure, path: Path) -> None:
    with atomic_path(path) as temporary:
        figure.savefig(temporary, dpi=DPI, format="png", metadata=PNG_METADATA)


def _image_axes(axes, mosaic: np.ndarray, title: str) -> None:
    axes.imshow(mosaic, cmap="gray_r", vmin=0.0, vmax=1.0, interpolation="nearest")
    axes.set_title(title)
    axes.set_xticks([])
    axes.set_yticks([])


def reconstructions(model: CVAE, images: np.ndarray, cfg: VisualizeParams, path: Path) -> None:
    """The first `examples` test digits (top row) above their mean reconstructions (bottom row)."""
    shown = images[: cfg.examples]
    means, _ = posterior(model, shown)
    rebuilt = decode_probabilities(model, means)
    figure = Figure(figsize=(max(4.0, 0.8 * len(shown)), 2.8))
    axes = figure.subplots(2, 1)
    _image_axes(axes[0], tile(shown.astype(np.float32), len(shown)), "Test digits (binarized)")
    _image_axes(axes[1], tile(rebuilt, len(shown)), "Reconstructions: p(x | z = posterior mean)")
    figure.tight_layout()
    _save(figure, path)


def prior_samples(model: CVAE, cfg: VisualizeParams, latent_dim: int, seed: int, path: Path) -> None:
    latent = np.random.default_rng([seed, 2]).standard_normal((cfg.prior_grid**2, latent_dim))
    figure = Figure(figsize=(6, 6.4))
    axes = figure.subplots()
    _image_axes(axes, tile(decode_probabilities(model, latent), cfg.prior_grid),
                f"{cfg.prior_grid ** 2} samples from the prior, z ~ N(0, I), pixel probabilities")
    _save(figure, path)


def latent_manifold(model: CVAE, size: int, path: Path) -> None:
    """The tutorial's figure for latent_dim 2: z on a `size` x `size` grid of standard-normal quantiles, decoded."""
    normal = statistics.NormalDist()
    quantiles = np.array([normal.inv_cdf(q) for q in np.linspace(0.05, 0.95, size)])
    z1, z2 = np.meshgrid(quantiles, quantiles[::-1])  # z2 grows upwards, as on a plot
    decoded = decode_probabilities(model, np.stack([z1.ravel(), z2.ravel()], axis=1))
    figure = Figure(figsize=(8, 8.4))
    axes = figure.subplots()
    # One unit per cell; the quantiles are not evenly spaced in z, so the ticks name the z of their cell.
    axes.imshow(tile(decoded, size), cmap="gray_r", vmin=0, vmax=1, interpolation="nearest",
                extent=(0, size, 0, size))
    ticks = np.unique(np.linspace(0, size - 1, min(size, 7)).round().astype(int))
    axes.set_xticks(ticks + 0.5, [f"{quantiles[i]:.2f}" for i in ticks])
    axes.set_yticks(ticks + 0.5, [f"{quantiles[i]:.2f}" for i in ticks])
    axes.set_title(f"Latent manifold: decoded z on a {size}x{size} grid of N(0, 1) quantiles (5%-95%)")
    axes.set_xlabel("z[0]")
    axes.set_ylabel("z[1]")
    _save(figure, path)


def project_2d(means: np.ndarray) -> tuple[np.ndarray, str, str]:
    """Points to plot and their axis names: z itself up to 2 dimensions, else its first two principal components
    (signs fixed, so the same model always gives the same picture)."""
    if means.shape[1] == 1:
        return np.column_stack([means[:, 0], np.zeros(len(means))]), "z[0]", "(one latent dimension)"
    if means.shape[1] == 2:
        return means, "z[0]", "z[1]"
    centred = means - means.mean(axis=0)
    _, singular, components = np.linalg.svd(centred, full_matrices=False)
    components = components[:2] * np.where(components[:2].sum(axis=1, keepdims=True) < 0, -1.0, 1.0)
    share = singular[:2] ** 2 / np.sum(singular**2)
    return (centred @ components.T, f"principal component 1 ({share[0]:.0%} of variance)",
            f"principal component 2 ({share[1]:.0%} of variance)")


def latent_scatter(model: CVAE, images: np.ndarray, labels: np.ndarray, path: Path) -> None:
    """Test posterior means coloured by digit label."""
    means, _ = posterior(model, images)
    points, x_name, y_name = project_2d(means)
    how = f", PCA of {means.shape[1]} dimensions" if means.shape[1] > 2 else ""
    figure = Figure(figsize=(8, 7))
    axes = figure.subplots()
    scatter = axes.scatter(points[:, 0], points[:, 1], c=labels, cmap="tab10", vmin=-0.5, vmax=9.5, s=4, alpha=0.7)
    figure.colorbar(scatter, ax=axes, ticks=range(10), label="digit")
    axes.set_title(f"Posterior means of {len(images):,} test images{how}")
    axes.set_xlabel(x_name)
    axes.set_ylabel(y_name)
    _save(figure, path)


def training_curves(history: pd.DataFrame, path: Path) -> None:
    figure = Figure(figsize=(15, 4.2))
    axes = figure.subplots(1, 3)
    axes[0].plot(history["epoch"], history[scores.TRAIN_LOSS], label="training loss (negative ELBO)")
    split = scores.scored_split(history)
    elbo, reconstruction, kl = scores.epoch_columns(split)
    axes[0].plot(history["epoch"], -history[elbo], label=f"{split} negative ELBO")
    axes[0].set_title("Negative ELBO (lower is better)")
    axes[1].plot(history["epoch"], history[reconstruction], color="tab:green")
    axes[1].set_title(f"{split.capitalize()} reconstruction, -log p(x|z)")
    axes[2].plot(history["epoch"], history[kl], color="tab:red")
    axes[2].set_title(f"{split.capitalize()} KL(q(z|x) || p(z))")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.set_ylabel("nats per image")
        ax.grid(alpha=0.3)
    axes[0].axhline(-TUTORIAL_ELBO, color="gray", linestyle=":",
                    label=f"the tutorial's test {TUTORIAL_ELBO} (100 epochs)")
    if len(history) > 2:  # the first epoch's loss dwarfs the rest: show the curves from the second on
        later = pd.concat([history[scores.TRAIN_LOSS], -history[elbo]])[history["epoch"].gt(1).tolist() * 2]
        axes[0].set_ylim(min(later.min(), -TUTORIAL_ELBO) - 1, later.max() + 1)
    axes[0].legend(loc="center right")
    if "learning_rate" in history:  # the step size beside the curve it shapes
        rate = axes[0].twinx()
        rate.plot(history["epoch"], history["learning_rate"], color="tab:gray", alpha=0.5, linewidth=1)
        rate.set_ylabel("learning rate (gray)")
        rate.set_ylim(bottom=0)
    figure.tight_layout()
    _save(figure, path)


def progress_animation(grids: np.ndarray, epochs: np.ndarray, cfg: VisualizeParams, path: Path) -> None:
    """The tutorial's GIF: the same 16 latent vectors decoded after each epoch (epoch 0 = before training)."""
    side = int(np.ceil(np.sqrt(grids.shape[1])))
    frames = []
    for grid, epoch in zip(grids, epochs, strict=True):
        mosaic = 255 - tile(grid, side)  # dark digits on white, like the other figures
        frame = Image.fromarray(mosaic.astype(np.uint8)).resize((mosaic.shape[1] * 3, mosaic.shape[0] * 3),
                                                                Image.Resampling.NEAREST)
        captioned = Image.new("L", (frame.width, frame.height + 16), 255)
        captioned.paste(frame, (0, 16))
        ImageDraw.Draw(captioned).text((4, 2), f"epoch {int(epoch)}", fill=0)
        frames.append(captioned)
    with atomic_path(path) as temporary:
        frames[0].save(temporary, format="GIF", save_all=True, append_images=frames[1:],
                       duration=cfg.frame_milliseconds, loop=0)


FIGURES = ("reconstructions.png", "prior_samples.png", "latent_scatter.png", "training_curves.png",
           "training_progress.gif", "latent_manifold.png")


def load_progress(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The progress grids ((epochs + 1, 16, 28, 28) uint8) and their epochs; one clear line when missing or damaged."""
    try:
        with np.load(path, allow_pickle=False) as progress:
            grids, epochs = progress["grids"], progress["epochs"]
    except FileNotFoundError:
        raise UserInputError(f"{path}: missing; run `dvc repro train` first") from None
    except DAMAGED_FILE_ERRORS as error:
        raise UserInputError(f"{path}: damaged progress grids ({type(error).__name__}: {error}); "
                             "run `dvc repro train` to write them again") from None
    if grids.ndim != 4 or grids.shape[2:] != (28, 28) or grids.dtype != np.uint8 or len(epochs) != len(grids):
        raise UserInputError(f"{path}: damaged progress grids (shape {grids.shape}, {len(epochs)} epochs); "
                             "run `dvc repro train` to write them again")
    return grids, epochs


def draw_all(params: Params, data: PreparedData, model_path: Path, progress_path: Path, upstream: UpstreamOutputs,
             folder: Path) -> list[Path]:
    """The visualize stage: every figure into `folder`, and into this execution's MLflow run as artifacts."""
    model = load_trained(model_path, params.model)
    grids, epochs = load_progress(progress_path)
    history, _, _ = upstream.read()
    cfg, test = params.visualize, data.test
    session = Session(params.tracking)
    with runs.stage_run(session, params, "visualize", upstream):
        folder.mkdir(parents=True, exist_ok=True)
        reconstructions(model, test.images, cfg, folder / "reconstructions.png")
        prior_samples(model, cfg, params.model.latent_dim, params.seed, folder / "prior_samples.png")
        latent_scatter(model, test.images, test.labels, folder / "latent_scatter.png")
        training_curves(history, folder / "training_curves.png")
        progress_animation(grids, epochs, cfg, folder / "training_progress.gif")
        written = [folder / name for name in FIGURES[:-1]]
        if params.model.latent_dim == 2:
            latent_manifold(model, cfg.manifold_size, folder / "latent_manifold.png")
            written.append(folder / "latent_manifold.png")
        else:
            (folder / "latent_manifold.png").unlink(missing_ok=True)  # left from a 2-D run: it would mislead
        session.log_artifacts(written, "figures")
    return written
