"""params.yaml loading: the shipped file validates, and every kind of broken file is refused with one clear line."""

import copy
import re
import sys

import pytest
import yaml
from pydantic import ValidationError

from cvae_pipeline.config import ModelParams, Params, load_params, parse_params
from cvae_pipeline.errors import ParamsError
from helpers import REPO, run

SHIPPED_TEXT = (REPO / "params.yaml").read_text()
SHIPPED = yaml.safe_load(SHIPPED_TEXT)
SECTIONS = "seed, data, model, train, evaluate, visualize, tracking"


def with_learning_rate(literal: str) -> str:
    """The shipped file, comments and all, with the learning rate written as `literal`."""
    return re.sub(r"(?m)^(  learning_rate:) \S+", rf"\1 {literal}", SHIPPED_TEXT)


def edited(change) -> str:
    raw = copy.deepcopy(SHIPPED)
    change(raw)
    return yaml.safe_dump(raw)


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


def _set(section, key, value):
    def change(raw):
        raw[section][key] = value
    return change


BROKEN = [
    ("negative batch", edited(_set("train", "batch_size", -3)),
     "params.yaml: train.batch_size must be a positive integer, got -3"),
    ("zero epochs", edited(_set("train", "epochs", 0)), "train.epochs must be a positive integer, got 0"),
    ("float latent", edited(_set("model", "latent_dim", 2.5)), "model.latent_dim must be a positive integer, got 2.5"),
    ("bool latent", edited(_set("model", "latent_dim", True)), "model.latent_dim must be a positive integer, got true"),
    ("zero latent", edited(_set("model", "latent_dim", 0)), "model.latent_dim must be a positive integer, got 0"),
    ("string lr", edited(_set("train", "learning_rate", "fast")),
     "train.learning_rate must be a positive finite number, got 'fast'"),
    ("negative lr", edited(_set("train", "learning_rate", -0.1)), "train.learning_rate must be a positive finite"),
    ("nan lr", with_learning_rate(".nan"),
     "train.learning_rate must be a positive finite number, got nan"),
    ("threshold 1", edited(_set("data", "threshold", 1.0)), "data.threshold must be a number in (0, 1), got 1.0"),
    ("limit zero", edited(_set("data", "train_limit", 0)),
     "data.train_limit must be a positive integer or null, got 0"),
    ("filters length", edited(_set("model", "encoder_filters", [32])),
     "model.encoder_filters must be a list of 2 positive integers, got [32]"),
    ("unknown kl", edited(_set("train", "kl", "exact")),
     "train.kl must be one of 'analytic', 'monte_carlo', got 'exact'"),
    ("unknown precision", edited(_set("train", "precision", "float8")),
     "train.precision must be one of 'auto', 'float32', 'mixed_float16', 'mixed_bfloat16', got 'float8'"),
    ("unknown schedule", edited(_set("train", "schedule", "linear")),
     "train.schedule must be one of 'constant', 'cosine', got 'linear'"),
    ("negative warm-up", edited(_set("train", "warmup_epochs", -1)),
     "train.warmup_epochs must be an integer >= 0, got -1"),
    ("floor above the peak", edited(lambda raw: raw["train"].update(schedule="cosine", learning_rate=1e-3,
                                                                    final_learning_rate=2e-3)),
     "params.yaml: train.final_learning_rate must be at most train.learning_rate (0.001), got 0.002"),
    ("negative floor", edited(_set("train", "final_learning_rate", -1e-5)),
     "train.final_learning_rate must be a finite number >= 0, got -1e-05"),
    ("negative beta", edited(_set("train", "beta", -1)), "train.beta must be a finite number >= 0, got -1"),
    ("average of no step", edited(_set("train", "ema_momentum", 1)),
     "train.ema_momentum must be a number in [0, 1), got 1"),
    ("jit not a bool", edited(_set("train", "jit_compile", "yes")),
     "train.jit_compile must be true, false or auto, got 'yes'"),
    ("deterministic not a bool", edited(_set("train", "deterministic", "auto")),
     "train.deterministic must be true or false, got 'auto'"),
    ("empty experiment", edited(_set("tracking", "experiment", " ")),
     "tracking.experiment must be a non-empty string, got ' '"),
    ("required not a bool", edited(_set("tracking", "required", "no")),
     "tracking.required must be true or false, got 'no'"),
    ("negative seed", edited(lambda raw: raw.update(seed=-1)), "seed must be an integer >= 0, got -1"),
    ("unknown key", edited(_set("train", "batchsize", 10)),
     "unknown key train.batchsize (allowed in train: epochs, batch_size, learning_rate, schedule, "),
    ("unknown section", edited(lambda raw: raw.update(optimizer={"name": "sgd"})), "unknown key optimizer"),
    ("missing key", edited(lambda raw: raw["train"].pop("epochs")), "missing key train.epochs (a positive integer)"),
    ("missing section", edited(lambda raw: raw.pop("model")), "missing key model (a section with keys latent_dim"),
    ("section not a mapping", edited(lambda raw: raw.update(data=[1, 2])), "data must be a mapping with keys"),
    ("top level list", "- 1\n- 2\n", f"the file must be a mapping with keys {SECTIONS}"),
    ("syntax error", "train:\n  epochs: [1, 2\n", "params.yaml: YAML syntax error at line"),
    ("tab indentation", "train:\n\tepochs: 3\n", "params.yaml: YAML syntax error"),
    ("duplicate key", "seed: 0\nseed: 1\n", "duplicate key 'seed'"),
    ("empty file", "", f"params.yaml: the file is empty; expected the keys {SECTIONS}"),
    ("comments only", "# nothing here\n", "the file is empty"),
]


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
    params.write_text(edited(_set("train", "batch_size", -3)))
    outputs = {name: tmp_path / name for name in ("raw", "prepared.npz", "summary.json")}
    result = run([sys.executable, str(REPO / "stages/prepare.py"), "--params", str(params),
                  "--manifest", str(REPO / "data/mnist.json"), "--raw-dir", str(outputs["raw"]),
                  "--prepared", str(outputs["prepared.npz"]), "--summary", str(outputs["summary.json"])], cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == f"{params}: train.batch_size must be a positive integer, got -3"
    assert not any(path.exists() for path in outputs.values())
