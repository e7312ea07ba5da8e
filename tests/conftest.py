"""The fixtures every test folder shares; the helpers they are built from are in helpers.py."""

import os

import pytest

from helpers import make_repo_copy, synthetic_digits, write_fake_mnist

# With CVAE_TESTS_NO_SKIPS set (as CI sets it), a test that skips itself fails.
pytest_plugins = ["no_skips"]


@pytest.fixture(scope="session", autouse=True)
def machine_cache(tmp_path_factory):
    """Where `train.precision: auto` keeps what it measured (hardware.CACHE_ENV): one folder per test session, for the
    stages the tests run in other processes too; never the user's own cache."""
    os.environ["CVAE_CACHE_DIR"] = str(tmp_path_factory.mktemp("machine-cache"))


@pytest.fixture
def fake_mnist(tmp_path):
    return write_fake_mnist(tmp_path)


@pytest.fixture
def repo_copy(tmp_path):
    return make_repo_copy(tmp_path / "repo")


@pytest.fixture
def small_data():
    from cvae_pipeline.data import PreparedData, Split

    train, test = synthetic_digits(512, seed=1), synthetic_digits(128, seed=2)
    return PreparedData(Split(*train), Split(*test))

