"""`make sample`'s command: digits decoded from the seeded prior, as one PNG grid, from a `.keras` file or any model
URI (by default the champion of the params file's registered name); bad arguments and a model that does not load are
one line. `make sample` on the pipeline's own models, end to end: test_serving.py."""

import sys

import keras
import mlflow
import numpy as np
import pytest
import yaml
from PIL import Image

from cvae_pipeline.cli import stage_status
from cvae_pipeline.commands import sample
from cvae_pipeline.model.network import build_cvae
from helpers import REPO, model_params


@pytest.fixture
def folder(tmp_path, monkeypatch):
    """The working directory, tmp_path, with a params file naming registered model `cvae`: the default store is its
    mlflow.db."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL", raising=False)  # which the command sets
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["registry"]["model_name"] = "cvae"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    yield tmp_path
    mlflow.set_tracking_uri(None)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def saved_model(folder, latent_dim: int = 2):
    """A small untrained CVAE and its `.keras` file, as the train stage writes it."""
    model = build_cvae(model_params(latent_dim, (4, 8), (8, 4)), "float32")
    model.save(folder / f"cvae{latent_dim}.keras")
    return model, folder / f"cvae{latent_dim}.keras"


def run_sample(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """`python -m cvae_pipeline.commands.sample ARGS`: its exit status, stdout and stderr."""
    monkeypatch.setattr(sys, "argv", ["sample", *args])
    status = stage_status("sample", sample.main)
    out, err = capsys.readouterr()
    return status, out, err


@pytest.mark.parametrize("bad", [("--count", "0"), ("--seed", "-1"), ("--manifold", "1"), ("--manifold", "-2")])
def test_bad_numbers_are_one_line_before_any_model_is_looked_for(folder, monkeypatch, capsys, bad):
    assert run_sample(monkeypatch, capsys, "absent.keras", *bad) == (
        1, "", "--count must be >= 1, --seed >= 0 and --manifold 0 (none) or >= 2\n")


def pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.format == "PNG"
        return np.asarray(image)


def test_the_samples_are_the_seeded_prior_decoded_as_one_grid_of_ink_on_white(folder, monkeypatch, capsys):
    model, path = saved_model(folder)
    status, out, _ = run_sample(monkeypatch, capsys, str(path), "--count", "5", "--seed", "3", "--out", "grid/a.png")
    assert (status, out) == (0, f"5 samples from the prior of {path} (seed 3) -> grid/a.png\n")
    grid = pixels(folder / "grid" / "a.png")
    assert grid.shape == (2 * 28 * 2, 3 * 28 * 2)  # 5 images, 3 to a row, each pixel 2x2
    z = np.random.default_rng(3).standard_normal((5, 2)).astype(np.float32)  # z ~ N(0, I), seeded
    probabilities = keras.ops.convert_to_numpy(keras.ops.sigmoid(model.decode(z)))[..., 0]
    for index in range(5):
        row, column = divmod(index, 3)
        cell = grid[row * 56:(row + 1) * 56, column * 56:(column + 1) * 56].astype(int)
        expected = np.kron(np.round((1 - probabilities[index]) * 255), np.ones((2, 2)))  # probability 1: black
        np.testing.assert_allclose(cell, expected, atol=1)
    assert (grid[56:, 112:] == 255).all()  # the sixth cell: none, white

    run_sample(monkeypatch, capsys, str(path), "--count", "5", "--seed", "3", "--out", "b.png")
    run_sample(monkeypatch, capsys, str(path), "--count", "5", "--seed", "4", "--out", "c.png")
    assert (folder / "b.png").read_bytes() == (folder / "grid" / "a.png").read_bytes()
    assert not np.array_equal(pixels(folder / "c.png"), grid)


def test_the_manifold_is_drawn_beside_the_grid_for_a_2d_latent_space_only(folder, monkeypatch, capsys):
    _, flat = saved_model(folder, latent_dim=2)
    status, out, _ = run_sample(monkeypatch, capsys, str(flat), "--count", "2", "--manifold", "3", "--out", "s.png")
    assert status == 0 and out.endswith("the decoded 3x3 latent manifold -> s_manifold.png\n")
    assert pixels(folder / "s_manifold.png").size
    _, deep = saved_model(folder, latent_dim=4)
    status, _, err = run_sample(monkeypatch, capsys, str(deep), "--count", "2", "--manifold", "3", "--out", "d.png")
    assert (status, err) == (1, f"--manifold: the latent space of {deep} has 4 dimensions, not 2\n")


def test_any_model_uri_loads_by_default_the_params_champion_and_one_that_does_not_load_is_one_line(
        folder, monkeypatch, capsys):
    from cvae_pipeline.tracking.logged_model import log_model

    monkeypatch.setattr(sys, "path", list(sys.path))  # loading a logged model puts its code first there
    _, path = saved_model(folder)
    store = f"sqlite:///{folder / 'mlflow.db'}"
    status, _, err = run_sample(monkeypatch, capsys, "--out", "none.png")  # no champion yet
    # After MLflow's lines creating the store: the error, in one line.
    assert status == 1 and "Traceback" not in err and not (folder / "none.png").exists()
    assert err.splitlines()[-1] == (f"models:/cvae@champion: cannot load it from the MLflow store {store} (Registered "
                                    "Model with name=cvae not found)")
    status, _, err = run_sample(monkeypatch, capsys, "absent.keras")
    assert (status, err) == (1, "absent.keras: no trained model; run `dvc repro train` first\n")

    mlflow.set_tracking_uri(store)
    client = mlflow.MlflowClient(store)
    experiment = client.create_experiment("e")
    run_id = client.create_run(experiment).info.run_id
    log_model(client, run_id, path, np.zeros((1, 28, 28, 1), np.float32))
    (logged,) = mlflow.search_logged_models(experiment_ids=[experiment], output_format="list")
    client.create_registered_model("cvae")
    client.create_model_version("cvae", f"models:/{logged.model_id}", model_id=logged.model_id)
    client.set_registered_model_alias("cvae", "champion", "1")
    references = {"file": str(path), "run": f"runs:/{run_id}/model", "champion": None}
    for name, model in references.items():
        status, out, err = run_sample(monkeypatch, capsys, *[model] * (model is not None), "--out", f"{name}.png")
        assert status == 0, err
        assert out.startswith(f"64 samples from the prior of {model or 'models:/cvae@champion'} (seed 0)")
    assert (folder / "run.png").read_bytes() == (folder / "champion.png").read_bytes() == (
        folder / "file.png").read_bytes()
