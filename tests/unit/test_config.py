"""params.yaml loading: the shipped file validates, and every kind of broken file is refused with one clear line."""

import sys

import pytest
import yaml
from pydantic import ValidationError

from bad_params import BROKEN, edited, set_key, with_learning_rate
from cvae_pipeline.config import ModelParams, Params, load_params, parse_params
from cvae_pipeline.errors import ParamsError
from helpers import REPO, params_with, run


def test_shipped_params_load_as_typed_frozen_objects():
    params = load_params(REPO / "params.yaml")
    assert isinstance(params, Params)
    assert isinstance(params.model, ModelParams)
    assert params.model.encoder_filters == (32, 64)
    assert isinstance(params.train.learning_rate, float)
    with pytest.raises(ValidationError, match="frozen"):
        params.train.epochs = 3


def test_tutorial_2020_configuration_is_reachable_by_params_alone():
    def tutorial(raw):
        raw["model"]["latent_dim"] = 50
        raw["train"].update(batch_size=100, learning_rate=1e-4, epochs=100)

    params = parse_params(edited(tutorial))
    assert (params.model.latent_dim, params.train.batch_size) == (50, 100)
    assert (params.train.learning_rate, params.train.epochs) == (1e-4, 100)


def test_exponent_floats_without_a_dot_are_numbers():
    # PyYAML alone reads `1e-3` as a string; DVC's `-S train.learning_rate=1e-3` writes exactly that.
    assert parse_params(with_learning_rate("1e-3")).train.learning_rate == 1e-3
    assert parse_params(with_learning_rate("2E-5")).train.learning_rate == 2e-5


def test_integers_are_accepted_where_numbers_are_expected():
    params = parse_params(edited(lambda raw: raw["train"].update(learning_rate=1)))
    assert params.train.learning_rate == 1.0
    assert isinstance(params.train.learning_rate, float)


@pytest.mark.reliability
@pytest.mark.parametrize(("text", "message"), [case[1:] for case in BROKEN], ids=[case[0] for case in BROKEN])
def test_broken_params_name_the_key_and_what_is_allowed(text, message):
    with pytest.raises(ParamsError) as caught:
        parse_params(text)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_missing_params_file_is_named(tmp_path):
    with pytest.raises(ParamsError, match=r"nope\.yaml: file not found"):
        load_params(tmp_path / "nope.yaml")


def test_bad_params_stop_the_stage_with_status_2_one_line_and_no_output(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(edited(set_key("train", "batch_size", -3)))
    outputs = {name: tmp_path / name for name in ("raw", "prepared.npz", "summary.json")}
    result = run([sys.executable, str(REPO / "stages/prepare.py"), "--params", str(params),
                  "--manifest", str(REPO / "data/mnist.json"), "--raw-dir", str(outputs["raw"]),
                  "--prepared", str(outputs["prepared.npz"]), "--summary", str(outputs["summary.json"])], cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == f"{params}: train.batch_size must be a positive integer, got -3"
    assert not any(path.exists() for path in outputs.values())


def test_a_validation_set_of_all_training_images_is_refused_before_any_download(tmp_path):
    """MNIST's 60,000 training images are known before it is fetched: a validation set that would leave none to train
    on stops prepare as every other bad param does, exit 2 and one line, without looking for the data."""
    assert parse_params(edited(set_key("data", "validation_size", 59_999))).data.validation_size == 59_999
    params = tmp_path / "params.yaml"
    params.write_text(edited(set_key("data", "validation_size", 60_000)))
    outputs = {name: tmp_path / name for name in ("raw", "prepared.npz", "summary.json")}
    result = run([sys.executable, str(REPO / "stages/prepare.py"), "--params", str(params),
                  "--manifest", str(REPO / "data/mnist.json"), "--raw-dir", str(outputs["raw"]),
                  "--prepared", str(outputs["prepared.npz"]), "--summary", str(outputs["summary.json"])],
                 cwd=tmp_path, MNIST_MIRROR=str(tmp_path / "absent"))  # a download would fail otherwise (exit 1)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == (f"{params}: data.validation_size must be an integer >= 0 and < 60,000 (MNIST's "
                                     "training images), got 60000")
    assert not any(path.exists() for path in outputs.values())


def test_params_are_flattened_as_params_yaml_spells_them():
    flat = params_with(train={"batch_size": 64}).flat()
    assert flat["train.batch_size"] == "64"
    assert flat["data.train_limit"] == "null"
    assert flat["train.jit_compile"] == "auto" and flat["train.deterministic"] == "true"
    assert flat["model.encoder_filters"] == "[32, 64]"
    assert flat["train.kl"] == "analytic"
    assert flat["seed"] == "0"
    shipped = yaml.safe_load((REPO / "params.yaml").read_text())
    assert len(flat) == sum(len(section) for section in shipped.values() if isinstance(section, dict)) + 1  # + seed
