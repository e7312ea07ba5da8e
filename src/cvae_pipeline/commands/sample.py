"""Draw digits from a trained model: `python -m cvae_pipeline.commands.sample MODEL` (`make sample MODEL=...`).

MODEL is a model URI that MLflow resolves (`models:/cvae-mnist@champion`, `models:/m-...`, `runs:/<run id>/model`)
or the path of a `.keras` file that the train stage wrote (`models/cvae.keras`). It writes `--count` samples from the
prior, z ~ N(0, I) seeded by `--seed`, decoded to pixel probabilities, as one PNG grid; with `--manifold` and a 2-D
latent space, also the decoded latent manifold (the tutorial's figure) beside it.
"""

import argparse
import math
from pathlib import Path

import numpy as np
from PIL import Image

from cvae_pipeline import tensorflow_runtime
from cvae_pipeline.cli import run_stage
from cvae_pipeline.config import DEFAULT_PARAMS_FILE, load_params
from cvae_pipeline.errors import UserInputError
from cvae_pipeline.fileio import atomic_path
from cvae_pipeline.tracking.registry import ALIAS

SCALE = 2  # screen pixels per image pixel


def load_cvae(model: str):
    """The float32 CVAE behind a model URI or a `.keras` path."""
    from cvae_pipeline.model.loading import load_model_file  # TensorFlow: after the arguments are checked

    if Path(model).is_file() or model.endswith(".keras"):
        return load_model_file(model)
    import mlflow
    from mlflow.exceptions import MlflowException

    from cvae_pipeline.tracking.logged_model import ReconstructionModel
    from cvae_pipeline.tracking.store import tracking_uri

    mlflow.set_tracking_uri(tracking_uri())
    try:
        loaded = mlflow.pyfunc.load_model(model).unwrap_python_model()
    except (MlflowException, OSError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserInputError(f"{model}: cannot load it from the MLflow store {tracking_uri()} ({first})") from None
    if not isinstance(loaded, ReconstructionModel):
        raise UserInputError(f"{model}: not a model that the train stage logged ({type(loaded).__name__})")
    return loaded.model


def prior_samples(model, count: int, seed: int) -> np.ndarray:
    """`count` images (count, 28, 28) of pixel probabilities, decoded from z ~ N(0, I)."""
    from cvae_pipeline.model.loading import decode_probabilities

    latent = np.random.default_rng(seed).standard_normal((count, model.latent_dim))
    return decode_probabilities(model, latent)


def write_grid(images: np.ndarray, path: Path) -> None:
    """Images side by side, as square a grid as their number allows, white background, black ink."""
    from cvae_pipeline.evaluation.figures import tile

    mosaic = tile(images, math.ceil(math.sqrt(len(images))))
    pixels = np.round((1.0 - mosaic) * 255).astype(np.uint8)
    picture = Image.fromarray(pixels).resize((pixels.shape[1] * SCALE, pixels.shape[0] * SCALE), Image.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as temporary:
        picture.save(temporary, format="PNG")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", help="models:/<name>@<alias>, models:/<model id>, runs:/<run id>/model, "
                        "or a .keras file (default: models:/<registry.model_name>@champion)")
    parser.add_argument("--params", default=DEFAULT_PARAMS_FILE, help="params file (default: %(default)s)")
    parser.add_argument("--count", type=int, default=64, help="samples from the prior (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the draws (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=Path("reports/samples.png"), help="PNG (default: %(default)s)")
    parser.add_argument("--manifold", type=int, metavar="SIZE", default=0,
                        help="also the decoded manifold on a SIZE x SIZE grid (2-D latent only), beside --out")
    args = parser.parse_args()
    if args.count < 1 or args.seed < 0 or args.manifold == 1 or args.manifold < 0:
        raise UserInputError("--count must be >= 1, --seed >= 0 and --manifold 0 (none) or >= 2")
    if args.model is None:
        args.model = f"models:/{load_params(args.params).registry.model_name}@{ALIAS}"
    tensorflow_runtime.start()  # quietly, with GPU memory that grows
    model = load_cvae(args.model)
    write_grid(prior_samples(model, args.count, args.seed), args.out)
    print(f"{args.count} samples from the prior of {args.model} (seed {args.seed}) -> {args.out}")
    if args.manifold:
        if model.latent_dim != 2:
            raise UserInputError(f"--manifold: the latent space of {args.model} has {model.latent_dim} dimensions, "
                                 "not 2")
        from cvae_pipeline.evaluation.figures import latent_manifold

        out = args.out.with_name(f"{args.out.stem}_manifold.png")
        latent_manifold(model, args.manifold, out)
        print(f"the decoded {args.manifold}x{args.manifold} latent manifold -> {out}")


if __name__ == "__main__":
    run_stage("sample", main)
