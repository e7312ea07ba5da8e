"""Dataset lineage: each split a stage uses is an input of its run, with its own digest, DVC's MD5 of the prepared
file, the data params and its use."""

import mlflow
import pytest

from cvae_pipeline.config import TrackingParams
from cvae_pipeline.tracking import lineage
from cvae_pipeline.tracking.session import Session
from helpers import params_with, synthetic_digits


@pytest.fixture
def session(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    yield Session(TrackingParams(experiment="e", sweep=None, required=True))
    mlflow.set_tracking_uri(None)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def prepared(tmp_path, validation: bool = True):
    """A prepared file of three (or two) splits of different synthetic digits, read back as the stages read it."""
    from cvae_pipeline.data import PreparedData, Split, load_prepared, save_prepared

    parts = {name: Split(*synthetic_digits(count, seed)) for name, count, seed in
             (("train", 30, 0), ("validation", 20, 1), ("test", 20, 2))}
    if not validation:
        parts["validation"] = None
    save_prepared(PreparedData(**parts), tmp_path / "mnist.npz")
    return load_prepared(tmp_path / "mnist.npz")


def test_each_split_is_its_own_dataset_with_the_digest_of_its_own_images_and_the_files_md5(session, tmp_path,
                                                                                           monkeypatch):
    data = prepared(tmp_path)
    params = params_with(data={"validation_size": 5000, "validation_seed": 3}).data
    hashed = []
    monkeypatch.setattr(lineage, "file_md5", lambda path: hashed.append(path) or "0123456789abcdef")
    with session.open_run() as run:
        keys = lineage.log_datasets(session, data, params, ["train", "validation", "test"])
    assert hashed == [tmp_path / "mnist.npz"]  # the prepared file hashed once for all the splits
    inputs = session.client.get_run(run.info.run_id).inputs.dataset_inputs
    by_name = {found.dataset.name: found for found in inputs}
    assert set(by_name) == {"mnist_binarized/train", "mnist_binarized/validation", "mnist_binarized/test"}
    digests = {name: found.dataset.digest for name, found in by_name.items()}
    assert len(set(digests.values())) == 3  # MLflow tells the splits apart
    for split in ("train", "validation", "test"):
        assert keys[split] == (f"mnist_binarized/{split}", digests[f"mnist_binarized/{split}"])
        assert digests[f"mnist_binarized/{split}"] == lineage.images_digest(getattr(data, split).images)
    contexts = {name: {tag.key: tag.value for tag in found.tags}["mlflow.data.context"]
                for name, found in by_name.items()}
    assert contexts == {"mnist_binarized/train": "training", "mnist_binarized/validation": "validation",
                        "mnist_binarized/test": "testing"}
    tags = {tag.key: tag.value for tag in by_name["mnist_binarized/validation"].tags}
    assert tags["dvc_md5"] == "0123456789abcdef" and tags["dvc_path"] == (tmp_path / "mnist.npz").as_posix()
    assert tags["data.validation_size"] == "5000" and tags["data.validation_seed"] == "3"
    assert tags["data.threshold"] == "0.5" and tags["data.train_limit"] == "null"


def test_a_split_s_digest_is_that_of_its_images_whatever_file_holds_them(tmp_path):
    first, other = prepared(tmp_path / "a"), prepared(tmp_path / "b", validation=False)
    assert lineage.file_md5(first.source) != lineage.file_md5(other.source)
    assert lineage.images_digest(first.test.images) == lineage.images_digest(other.test.images)
    flipped = first.test.images.copy()
    flipped[0, 0, 0] ^= 1
    assert lineage.images_digest(flipped) != lineage.images_digest(first.test.images)
