"""What the tests share: small IDX datasets, the environment of the processes they start, tiny params and trainers,
and readers of what runs left in MLflow. Copies of the repository and runs in them are in repositories.py; the
fixtures built on both in conftest.py."""

import contextlib
import gzip
import hashlib
import json
import os
import resource
import signal
import socket
import struct
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
FAKE_COUNTS = {"train": 300, "test": 100}
IDX_NAMES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def idx_bytes(array: np.ndarray) -> bytes:
    """The IDX encoding of a uint8 array (magic 0x801 for 1-D labels, 0x803 for 3-D images)."""
    magic = 0x800 + array.ndim
    return struct.pack(f">{1 + array.ndim}I", magic, *array.shape) + array.astype(np.uint8).tobytes()


def fake_arrays(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, count in FAKE_COUNTS.items():
        arrays[f"{split}_images"] = rng.integers(0, 256, size=(count, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = rng.integers(0, 10, size=count, dtype=np.uint8)
    return arrays


def write_manifest(path: Path, arrays: dict[str, np.ndarray], mirrors: list[str] | None = None) -> Path:
    files = {
        key: {"name": IDX_NAMES[key], "md5": hashlib.md5(idx_bytes(array)).hexdigest(), "count": len(array)}
        for key, array in arrays.items()
    }
    path.write_text(json.dumps({"mirrors": mirrors or ["https://127.0.0.1:9/"], "files": files}))
    return path


def learnable_arrays(seed: int = 0) -> dict[str, np.ndarray]:
    """Like `fake_arrays`, but images a VAE learns within a few steps (`synthetic_digits`), where the trials of a
    search must differ by how well they learn."""
    images, labels = synthetic_digits(sum(FAKE_COUNTS.values()), seed)
    train = FAKE_COUNTS["train"]
    return {"train_images": images[:train] * 255, "train_labels": labels[:train],
            "test_images": images[train:] * 255, "test_labels": labels[train:]}


def write_fake_mnist(folder: Path, arrays: dict[str, np.ndarray] | None = None
                     ) -> tuple[Path, Path, dict[str, np.ndarray]]:
    """A mirror folder of small gzipped IDX files (`fake_arrays` unless given), and a manifest with their MD5 sums."""
    arrays = fake_arrays() if arrays is None else arrays
    mirror = folder / "mirror"
    mirror.mkdir()
    for key, array in arrays.items():
        (mirror / f"{IDX_NAMES[key]}.gz").write_bytes(gzip.compress(idx_bytes(array), mtime=0))
    manifest = write_manifest(folder / "manifest.json", arrays)
    return mirror, manifest, arrays


def subprocess_env(**overrides: str) -> dict[str, str]:
    """The environment of a stage run: this venv's `python` and `dvc` first on PATH, no inherited mirror, MLflow
    store, credentials (`mlflow.set_tracking_uri` in a test exports MLFLOW_TRACKING_URI) or TensorFlow log level."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("MNIST_MIRROR", "MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "DVC_ROOT", "DVC_EXP_NAME",
                        "DVC_EXP_BASELINE_REV", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                        "TF_CPP_MIN_LOG_LEVEL")}
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env["PATH"]
    env.update(overrides)
    return env


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run(command: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, env=subprocess_env(**env), capture_output=True, text=True)


def synthetic_digits(count: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Binary 28x28 images with structure a VAE can learn: one of ten fixed templates, with 2% of pixels flipped."""
    rng = np.random.default_rng(seed)
    templates = rng.random((10, 28, 28)) < 0.15
    labels = rng.integers(0, 10, count).astype(np.uint8)
    flips = rng.random((count, 28, 28)) < 0.02
    return (templates[labels] ^ flips).astype(np.uint8), labels


def make_trainer(params, data, machine=None):
    """A `Trainer` of `params` on `data`, after the process-wide setup the train stage does first (for `machine`:
    by default, this one)."""
    from cvae_pipeline.training.loop import Trainer
    from cvae_pipeline.training.process import set_up

    return Trainer(params, data, set_up(params, machine))


def model_params(latent_dim: int, encoder_filters=(32, 64), decoder_filters=(64, 32)):
    """A model section: the tutorial's filters by default."""
    from cvae_pipeline.config import ModelParams

    return ModelParams(latent_dim=latent_dim, encoder_filters=encoder_filters, decoder_filters=decoder_filters)


def params_with(**sections):
    """The shipped params.yaml with some keys replaced, e.g. params_with(train={"epochs": 2})."""
    from cvae_pipeline.config import parse_params

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    for section, values in sections.items():
        if isinstance(values, dict):
            raw[section].update(values)
        else:
            raw[section] = values
    return parse_params(yaml.safe_dump(raw))


def run_record(run_id: str) -> dict:
    """Everything MLflow holds of a run, to compare before and after: params, tags, every metric point, artifacts."""
    client = mlflow.MlflowClient()
    found = client.get_run(run_id)
    return {
        "status": found.info.status,
        "params": found.data.params,
        "tags": found.data.tags,
        "metrics": {key: [(m.step, m.value) for m in client.get_metric_history(run_id, key)]
                    for key in found.data.metrics},
        "artifacts": sorted(a.path for folder in ("", "figures") for a in client.list_artifacts(run_id, folder)),
        "models": [m.model_id for m in mlflow.search_logged_models(
            experiment_ids=[found.info.experiment_id], filter_string=f"source_run_id = '{run_id}'",
            output_format="list")],
    }


NO_PICKLE = {"MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false"}  # MLflow refuses cloudpickled models


# Python that takes this environment's editable install of the project off sys.path, as on a machine where only MLflow
# is installed, and stops the process (status 3) when the project is still importable: a test that proved nothing.
# A user's script starts with it; the scoring server's processes load it as their sitecustomize.
HIDE_THE_PROJECT = """
import importlib.util, os, sys
sys.path[:] = [entry for entry in sys.path if not entry.rstrip("/").endswith("/src")]
if importlib.util.find_spec("cvae_pipeline") is not None:
    sys.stderr.write("the project is importable: the test would prove nothing\\n")
    os._exit(3)
"""

# A user's script, where the project cannot be imported: only the code that travels with the model can make it load.
PREDICT = HIDE_THE_PROJECT + """
import mlflow
import numpy as np
mlflow.set_tracking_uri(sys.argv[1])
np.save(sys.argv[4], mlflow.pyfunc.load_model(sys.argv[2]).predict(np.load(sys.argv[3])))
import cvae_pipeline
print("cvae_pipeline from", cvae_pipeline.__file__)
"""


def predict_in_fresh_process(tracking_uri: str, model_uri: str, images: np.ndarray, folder: Path,
                             **env: str) -> np.ndarray:
    """Load a logged model with `mlflow.pyfunc` in a new Python process that cannot import the project, and predict:
    the pixel probabilities of the images' mean reconstructions. The process refuses pickled models, as a careful
    deployment does: the model must be logged as code. `env`: more of its environment (a server's credentials)."""
    np.save(folder / "inputs.npy", images)
    loaded = subprocess.run([sys.executable, "-c", PREDICT, tracking_uri, model_uri, str(folder / "inputs.npy"),
                             str(folder / "outputs.npy")], env=subprocess_env(**NO_PICKLE, **env), capture_output=True,
                            text=True)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    assert "/code/cvae_pipeline/__init__.py" in loaded.stdout, loaded.stdout  # the model's own copy of the code
    return np.load(folder / "outputs.npy")


def timeless(history):
    """A training history (pandas.DataFrame) without its timing columns: what a seed fixes on one machine."""
    from cvae_pipeline.training.loop import TIMING_COLUMNS

    return history.drop(columns=list(TIMING_COLUMNS))


@contextlib.contextmanager
def file_size_limit(size: int):
    """A real limit on the size of every file this process writes (as a full disk would stop a write), lifted after;
    a write past it fails with EFBIG instead of killing the process (SIGXFSZ ignored)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
