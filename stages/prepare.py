"""prepare stage: fetch and verify MNIST, hold a validation set out of the training images, binarize, write the
prepared arrays and a data summary."""

import sys
from pathlib import Path

# This checkout's code, not whichever copy is installed: a DVC experiment runs in its own copy of the repository.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


from cvae_pipeline.cli import run_stage, stage_arguments
from cvae_pipeline.config import load_params
from cvae_pipeline.data import load_manifest, prepare, save_prepared, summarize
from cvae_pipeline.fileio import write_json_atomic


def main() -> None:
    args = stage_arguments(__doc__, ["manifest", "raw_dir", "prepared", "summary"])
    params = load_params(args.params)
    manifest = load_manifest(args.manifest)
    data = prepare(manifest, Path(args.raw_dir), params.data)
    save_prepared(data, args.prepared)
    write_json_atomic(args.summary, summarize(data, params.data))


if __name__ == "__main__":
    run_stage("prepare", main)
