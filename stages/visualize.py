"""visualize stage: reconstructions, prior samples, latent space, training curves and the training animation."""

import os
from pathlib import Path

from cvae_pipeline.cli import run_stage, stage_arguments
from cvae_pipeline.config import load_params
from cvae_pipeline.data import load_prepared


def main() -> None:
    args = stage_arguments(__doc__, ["prepared", "model", "history", "progress", "run", "figures"])
    params = load_params(args.params)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from cvae_pipeline.figures import draw_all  # TensorFlow loads after validation

    draw_all(params, load_prepared(args.prepared), Path(args.model), Path(args.history), Path(args.progress),
             Path(args.run), Path(args.figures))


if __name__ == "__main__":
    run_stage("visualize", main)
