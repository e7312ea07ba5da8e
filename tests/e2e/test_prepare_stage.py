"""End to end: `dvc repro prepare` in a temporary copy of the repository, as a user runs it."""

import json
import os
import shutil

import numpy as np
import pytest
import yaml

from cvae_pipeline.data import binarize, load_prepared
from helpers import run
from repositories import setup_copy

pytestmark = pytest.mark.slow


def outputs(repo):
    return repo / "data/prepared/mnist.npz", repo / "reports/data_summary.json", repo / "data/raw"


def test_dvc_repro_prepare_writes_the_declared_outputs_and_fetches_once(repo_copy, fake_mnist):
    mirror, _, arrays = fake_mnist
    setup_copy(repo_copy, fake_mnist)  # 100 of the 300 training images held out for validation
    result = run(["dvc", "repro", "prepare"], repo_copy, MNIST_MIRROR=str(mirror))
    assert result.returncode == 0, result.stderr + result.stdout

    prepared, summary, raw = outputs(repo_copy)
    loaded = load_prepared(prepared)
    held_out = loaded.validation.indices
    assert len(held_out) == 100 and sorted({*held_out, *loaded.train.indices}) == list(range(300))
    np.testing.assert_array_equal(loaded.train.images, binarize(arrays["train_images"][loaded.train.indices], 0.5))
    np.testing.assert_array_equal(loaded.validation.images, binarize(arrays["train_images"][held_out], 0.5))
    np.testing.assert_array_equal(loaded.test.labels, arrays["test_labels"])
    assert json.loads(summary.read_text())["train"]["images"] == 200
    assert sorted(p.name for p in raw.iterdir()) == sorted(
        ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"])
    status = run(["dvc", "status", "prepare"], repo_copy)
    assert "up to date" in status.stdout, status.stdout

    # A second repro does nothing; a change of params re-runs prepare without fetching (the mirror is gone).
    again = run(["dvc", "repro", "prepare"], repo_copy, MNIST_MIRROR=str(mirror))
    assert "didn't change, skipping" in again.stdout
    params = yaml.safe_load((repo_copy / "params.yaml").read_text())
    params["data"]["train_limit"] = 120
    (repo_copy / "params.yaml").write_text(yaml.safe_dump(params))
    raw_mtimes = {p.name: p.stat().st_mtime_ns for p in raw.iterdir()}
    rerun = run(["dvc", "repro", "prepare"], repo_copy, MNIST_MIRROR=str(repo_copy / "no-mirror"))
    assert rerun.returncode == 0, rerun.stderr
    assert json.loads(summary.read_text())["train"]["images"] == 120
    assert {p.name: p.stat().st_mtime_ns for p in raw.iterdir()} == raw_mtimes


def test_corrupt_mirror_fails_with_one_line_naming_the_file(repo_copy, fake_mnist):
    mirror, manifest, _ = fake_mnist
    shutil.copy(manifest, repo_copy / "data/mnist.json")
    archive = mirror / "t10k-images-idx3-ubyte.gz"
    archive.write_bytes(archive.read_bytes()[:-40])
    prepared, summary, _ = outputs(repo_copy)
    summary_before = summary.read_bytes()  # committed to git (cache: false), as in a fresh clone
    result = run(["python", "stages/prepare.py", "--manifest", "data/mnist.json", "--raw-dir", "data/raw",
                  "--prepared", "data/prepared/mnist.npz", "--summary", "reports/data_summary.json"],
                 repo_copy, MNIST_MIRROR=str(mirror))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines[-1].endswith("t10k-images-idx3-ubyte.gz: truncated or corrupt gzip (Compressed file ended "
                              "before the end-of-stream marker was reached)")
    assert not prepared.exists()
    assert summary.read_bytes() == summary_before


@pytest.mark.skipif(not os.environ.get("MNIST_MIRROR"), reason="MNIST_MIRROR is unset: the real MNIST is not here")
def test_dvc_repro_prepare_on_the_real_mnist_verifies_published_sums(repo_copy):
    params = yaml.safe_load((repo_copy / "params.yaml").read_text())
    params["data"].update(train_limit=1000, test_limit=500)
    (repo_copy / "params.yaml").write_text(yaml.safe_dump(params))
    result = run(["dvc", "repro", "prepare"], repo_copy, MNIST_MIRROR=os.path.abspath(os.environ["MNIST_MIRROR"]))
    assert result.returncode == 0, result.stderr
    summary = json.loads(outputs(repo_copy)[1].read_text())
    assert (summary["train"]["images"], summary["validation"]["images"], summary["test"]["images"]) == (1000, 10000,
                                                                                                         500)
    # Thresholded MNIST has about 13% of its pixels on.
    assert 0.10 < summary["train"]["fraction_on"] < 0.16
    loaded = load_prepared(outputs(repo_copy)[0])
    by_position = {int(index): int(label) for split in (loaded.train, loaded.validation)
                   for index, label in zip(split.indices, split.labels, strict=True)}
    assert [by_position[index] for index in range(5)] == [5, 0, 4, 1, 9]  # the well-known first training labels
