"""The fixtures every test folder shares; the helpers they are built from are in helpers.py and repositories.py."""

import fcntl
import json
import os
import shutil
from pathlib import Path

import pytest

from helpers import run, synthetic_digits, write_fake_mnist
from repositories import QUICK_EVALUATION, copy_repository, make_repo_copy, setup_copy

# With CVAE_TESTS_NO_SKIPS set (as CI sets it), a test that skips itself fails.
pytest_plugins = ["no_skips"]

# The modules that take longest, longest first (docs/testing.md): pytest-xdist hands whole files to its workers in
# collection order (`--no-loadscope-reorder`), so these start first and the short ones even out the end, and the two
# workers finish together. A stale order costs minutes, never a result.
LONGEST_FIRST = (
    "e2e/test_mlflow_records.py",  # builds the pipeline template while the other worker starts a module without it
    "e2e/test_team_stack.py",
    "e2e/test_team_server.py",
    "e2e/test_reliability.py",
    "unit/training/test_distribution.py",
    "unit/training/test_loop.py",
    "e2e/test_sweeps.py",
    "e2e/test_tune.py",
    "e2e/test_serving.py",
)
_missing = [name for name in LONGEST_FIRST if not (Path(__file__).parent / name).is_file()]
if _missing:
    raise pytest.UsageError(f"tests/conftest.py: LONGEST_FIRST names no such test module: {', '.join(_missing)}")


def pytest_collection_modifyitems(items):
    """The modules of LONGEST_FIRST first, in its order; every other module after them, as collected."""
    tests = Path(__file__).parent
    rank = {str(tests / name): index for index, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(str(item.path), len(rank)))


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


@pytest.fixture(scope="session")
def pipeline_template(tmp_path_factory):
    """A repository copy in which the tiny pipeline ran once (`dvc repro`, its outputs not committed), and the
    environment of its stages: for the tests that start where a finished run leaves off. Built once per `pytest`: the
    first xdist worker to need it builds it in the folder the workers share, the others wait for it (a lock file)."""
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # this run's own folder, which holds each worker's
    folder, built = shared / "pipeline-template", shared / "pipeline-template.json"
    with open(shared / "pipeline-template.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not built.exists():
            shutil.rmtree(folder, ignore_errors=True)  # what a worker whose build failed left
            folder.mkdir()
            repo = make_repo_copy(folder / "repo")
            # MLflow samples system metrics every 10 s by default, longer than this training: every second here.
            env = {**setup_copy(repo, write_fake_mnist(folder), evaluate=QUICK_EVALUATION),
                   "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1"}
            done = run(["dvc", "repro"], repo, **env)
            assert done.returncode == 0, done.stderr[-3000:]
            built.write_text(json.dumps(env))
    return folder / "repo", json.loads(built.read_text())


@pytest.fixture
def ran_pipeline(tmp_path, pipeline_template):
    """A copy of `pipeline_template` of the test's own (at tmp_path/repo), and the environment of its stages: as if
    the test had run `dvc repro` there, without running it again."""
    source, env = pipeline_template
    return copy_repository(source, tmp_path / "repo"), dict(env)
