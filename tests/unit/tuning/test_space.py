"""tune.yaml: the shipped search validates; every kind of mistake is one line naming the key, exit 2, before any
trial; each trial's params are params.yaml, then `fixed`, then the sampled values, checked by params.yaml's model."""

import subprocess
import sys

import pytest
import yaml

from cvae_pipeline.errors import ParamsError
from cvae_pipeline.tuning.space import load_search, parse_search, with_values
from helpers import REPO, subprocess_env

BASE = yaml.safe_load((REPO / "params.yaml").read_text())
GOOD = {"study": "s", "trials": 3, "fixed": {"train.epochs": 2},
        "space": {"train.learning_rate": {"low": 1e-3, "high": 1e-2, "log": True},
                  "train.warmup_epochs": {"low": 0, "high": 2},
                  "train.ema_momentum": {"choices": [0, 0.99]}}}


def search_of(**changes):
    raw = {**GOOD, **changes}
    return parse_search(yaml.safe_dump(raw), BASE)


def test_the_shipped_tune_yaml_validates_against_the_shipped_params():
    search, base = load_search(REPO / "tune.yaml", REPO / "params.yaml")
    assert search.objectives == ("validation_elbo",) and search.directions == ["maximize"] and search.prunes
    assert {dimension.key for dimension in search.space} >= {"train.learning_rate", "train.ema_momentum"}
    assert base == BASE


def test_a_range_of_integers_is_an_integer_dimension_and_the_rest_floats_or_choices():
    dimensions = {dimension.key: dimension for dimension in search_of().space}
    assert dimensions["train.warmup_epochs"].low == 0 and isinstance(dimensions["train.warmup_epochs"].high, int)
    assert dimensions["train.learning_rate"].log
    assert dimensions["train.ema_momentum"].choices == (0, 0.99)


def test_a_trials_params_are_params_yaml_then_fixed_then_the_sampled_values():
    search = search_of()
    params, raw = search.trial_params(BASE, {"train.learning_rate": 0.005}, "trial 0")
    assert params.train.learning_rate == 0.005 and params.train.epochs == 2
    assert params.train.batch_size == BASE["train"]["batch_size"]  # params.yaml's, untouched
    assert raw["train"]["epochs"] == 2 and BASE["train"]["epochs"] != 2  # the base itself is not changed


def test_a_sampled_configuration_that_the_params_model_rejects_is_a_params_error():
    with pytest.raises(ParamsError, match="warmup_epochs"):
        search_of().trial_params(BASE, {"train.warmup_epochs": -1}, "trial 3")


@pytest.mark.parametrize(("changes", "message"), [
    ({"space": {"train.learning_rat": {"low": 1e-3, "high": 1e-2}}},
     "tune.yaml: space: unknown key train.learning_rat (a dotted params.yaml key"),
    ({"space": {"train.learning_rate": {"low": 1e-2, "high": 1e-3}}},
     "tune.yaml: space.train.learning_rate: empty range: low (0.01) must be less than high (0.001)"),
    ({"space": {"train.ema_momentum": {"choices": [0.99, 1.5]}}}, "tune.yaml: space.train.ema_momentum = 1.5"),
    ({"space": {"train.learning_rate": {"low": 0, "high": 1e-2, "log": True}}}, "a log range needs low > 0"),
    ({"space": {"train.learning_rate": {"low": 1e-3}}}, "needs low and high (a range) or choices"),
    ({"space": {"train.ema_momentum": {"choices": []}}}, "either {choices: [a non-empty list]}"),
    ({"space": {"data.threshold": {"low": 0.3, "high": 0.6}}}, "data.threshold cannot be set here"),
    ({"space": {}}, "space names nothing to vary"),
    ({"fixed": {"train.epoch": 2}}, "tune.yaml: fixed: unknown key train.epoch"),
    ({"fixed": {"train.learning_rate": 1e-3}}, "train.learning_rate is both fixed and varied"),
    ({"fixed": {"train.epochs": 0}}, "train.epochs"),
    ({"fixed": {"data.validation_size": 0}}, "the trials need a validation set"),
    ({"objectives": ["test_elbo"]}, "objectives must be one or two of validation_elbo, train_seconds"),
    ({"trials": 0}, "tune.yaml: trials must be an integer >= 1, got 0"),
    ({"sampler": {"name": "grid"}}, "sampler.name must be one of tpe, random"),
    ({"pruner": {"name": "hyperband"}}, "pruner.name must be one of median, none"),
    ({"study": "a/b"}, "study must be a non-empty name without '/'"),
    ({"budget": 3}, "tune.yaml: unknown key budget"),
])
def test_a_mistake_in_tune_yaml_is_one_error_naming_it(changes, message):
    with pytest.raises(ParamsError) as raised:
        search_of(**changes)
    assert message in str(raised.value) and "\n" not in str(raised.value)


def test_two_objectives_do_not_prune():
    search = search_of(objectives=["validation_elbo", "train_seconds"])
    assert search.directions == ["maximize", "minimize"] and not search.prunes


def test_make_tune_stops_on_a_bad_tune_yaml_in_one_line_exit_2_before_any_trial(tmp_path):
    bad = tmp_path / "tune.yaml"
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    bad.write_text(yaml.safe_dump({**GOOD, "space": {"train.learning_rate": {"low": 1e-2, "high": 1e-3}}}))
    done = subprocess.run([sys.executable, "-m", "cvae_pipeline.commands.tune", "--file", str(bad), "run"],
                          cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [f"{bad}: space.train.learning_rate: empty range: low (0.01) must be less than "
                                        "high (0.001)"]
    assert not (tmp_path / ".tune").exists()  # no study, no storage: nothing started


def test_with_values_sets_dotted_keys_on_a_copy():
    raw = with_values(BASE, {"train.epochs": 1, "seed": 5})
    assert raw["train"]["epochs"] == 1 and raw["seed"] == 5 and BASE["train"]["epochs"] != 1
