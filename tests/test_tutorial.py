"""`make tutorial EDITION=2020` and `EDITION=current` reproduce the TensorFlow CVAE tutorial's two editions: the
overrides the Makefile passes to `dvc exp run -S`, applied to params.yaml as DVC applies them and validated by the
project's params model, give every setting the tutorial publishes; the README and docs/pipeline.md name them."""

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
from dvc.utils.hydra import apply_overrides

from cvae_pipeline.config import Params, load_params

REPO = Path(__file__).resolve().parents[1]

# The tutorial's published settings (https://www.tensorflow.org/tutorials/generative/cvae), by params key.
BOTH_EDITIONS = {
    "data.threshold": 0.5,  # pixels / 255 > .5 become 1 (>= 0.5 here: no 8-bit pixel is exactly 0.5)
    "data.validation_size": 0,  # it trains on all 60,000 training images
    "data.train_limit": None,
    "data.test_limit": None,  # and reports the ELBO of all 10,000 test images
    "train.eval_limit": None,  # after every epoch
    "model.encoder_filters": (32, 64),  # Conv2D(32, 3, stride 2), Conv2D(64, 3, stride 2)
    "model.decoder_filters": (64, 32),  # Conv2DTranspose(64), Conv2DTranspose(32), then one channel
    "train.learning_rate": 1e-4,  # tf.keras.optimizers.Adam(1e-4), the same step size throughout
    "train.schedule": "constant",
    "train.ema_momentum": 0.0,  # the weights themselves
    "train.kl": "monte_carlo",  # log p(x|z) + log p(z) - log q(z|x) at one sample of z
    "train.beta": 1.0,  # the ELBO itself
    "train.precision": "float32",
}
TUTORIAL = {
    "2020": {**BOTH_EDITIONS, "model.latent_dim": 50, "train.batch_size": 100, "train.epochs": 100},
    "current": {**BOTH_EDITIONS, "model.latent_dim": 2, "train.batch_size": 32, "train.epochs": 10},
}
# Settings that change how fast it trains, never the numbers: left at params.yaml's defaults by design.
SPEED_ONLY = {"train.steps_per_call", "train.jit_compile", "train.deterministic"}


def make_tutorial(*arguments: str) -> subprocess.CompletedProcess:
    """`make -n tutorial ...` in the repository: what it would run, without running it."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("MAKE")}
    return subprocess.run(["make", "-n", "--no-print-directory", "tutorial", *arguments], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)


def overrides(edition: str) -> list[str]:
    """The `-S key=value` overrides of the `dvc exp run` that `make tutorial EDITION=<edition>` runs."""
    result = make_tutorial(f"EDITION={edition}")
    assert result.returncode == 0, result.stderr
    (command,) = [line for line in result.stdout.splitlines() if line.startswith("dvc exp run ")]
    words = shlex.split(command)
    assert words[:5] == ["dvc", "exp", "run", "-n", f"tutorial-{edition}"], command
    assert words[5::2] == ["-S"] * len(words[5::2]), command
    return words[6::2]


def applied(changes: list[str], folder: Path) -> Params:
    """params.yaml with the overrides written into it by DVC's own code (what `dvc exp run -S` does), validated."""
    shutil.copy(REPO / "params.yaml", folder / "params.yaml")
    apply_overrides(folder / "params.yaml", changes)
    return load_params(folder / "params.yaml")


def value(params: Params, key: str):
    for part in key.split("."):
        params = getattr(params, part)
    return params


def differences(params: Params, edition: str) -> dict[str, tuple]:
    """{key: (as the experiment would train, as the tutorial publishes)} for each setting that differs."""
    return {key: (value(params, key), expected) for key, expected in TUTORIAL[edition].items()
            if value(params, key) != expected or type(value(params, key)) is not type(expected)}


@pytest.mark.parametrize("edition", sorted(TUTORIAL))
def test_make_tutorial_trains_with_every_setting_the_tutorial_publishes(edition, tmp_path):
    changes = overrides(edition)
    assert differences(applied(changes, tmp_path), edition) == {}
    changed = {change.partition("=")[0] for change in changes}
    assert changed <= set(TUTORIAL[edition]), f"not a tutorial setting: {changed - set(TUTORIAL[edition])}"
    assert not changed & SPEED_ONLY


def test_a_wrong_override_is_found(tmp_path):
    changes = [change.replace("train.learning_rate=1e-4", "train.learning_rate=1e-3") for change in overrides("2020")]
    assert differences(applied(changes, tmp_path), "2020") == {"train.learning_rate": (1e-3, 1e-4)}
    missing = [change for change in overrides("current") if not change.startswith("train.kl=")]
    assert differences(applied(missing, tmp_path), "current") == {"train.kl": ("analytic", "monte_carlo")}


@pytest.mark.parametrize("edition", ["", "2021", "latest"])
def test_an_unknown_edition_is_refused_in_one_line_with_status_2(edition):
    result = make_tutorial(f"EDITION={edition}")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and f"EDITION must be 2020 or current, got '{edition}'" in result.stderr


def test_the_documentation_names_both_commands_and_every_setting():
    readme = (REPO / "README.md").read_text()
    assert "make tutorial EDITION=2020" in readme and "make tutorial EDITION=current" in readme
    pipeline = " ".join((REPO / "docs" / "pipeline.md").read_text().split())
    section = re.search(r"\*\*The tutorial's two editions\*\*.*?(?= - \*\*)", pipeline)
    assert section, "docs/pipeline.md: no bullet **The tutorial's two editions**"
    for edition in TUTORIAL:
        assert f"make tutorial EDITION={edition}" in section.group()
        assert [change for change in overrides(edition) if f"`{change}`" not in section.group()] == []
