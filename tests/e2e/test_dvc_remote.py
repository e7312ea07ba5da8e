"""The DVC remote: outputs pushed from one clone are pulled into a fresh one without retraining; experiments too."""

import json
import subprocess

import pytest

from helpers import run
from repositories import QUICK_EVALUATION, make_repo_copy, setup_copy

pytestmark = pytest.mark.slow


def git(*args: str, cwd) -> str:
    done = subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout


def succeeds(command: list[str], cwd, **env) -> str:
    done = run(command, cwd, **env)
    assert done.returncode == 0, f"{' '.join(command)}:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    return done.stdout


def test_the_default_remote_is_a_directory_beside_the_repository(tmp_path):
    repo = make_repo_copy(tmp_path / "repo")
    remotes = succeeds(["dvc", "remote", "list"], repo, COLUMNS="1000")  # rich wraps a long path at 80 columns
    assert remotes.split()[:2] == ["storage", str(tmp_path / "dvc-storage")]  # beside the repository
    assert succeeds(["dvc", "config", "core.remote"], repo).strip() == "storage"


def test_pushed_outputs_pulled_into_a_fresh_clone_need_no_retraining(tmp_path, ran_pipeline):
    repo, _ = ran_pipeline  # at tmp_path/repo: the remote is beside it
    git("add", "-A", cwd=repo)
    git("commit", "-qm", "trained", cwd=repo)
    succeeds(["dvc", "push"], repo)
    assert any((tmp_path / "dvc-storage").rglob("*"))  # beside the repository, as .dvc/config says

    clone = tmp_path / "clone"  # beside it too, so the same relative remote
    git("clone", "-q", str(repo), str(clone), cwd=tmp_path)
    succeeds(["dvc", "pull"], clone)
    assert "Data and pipelines are up to date" in succeeds(["dvc", "status"], clone)
    again = succeeds(["dvc", "repro"], clone)  # no MNIST mirror, no training: everything is there
    assert "Running stage" not in again
    for output in ("models/cvae.keras", "models/checkpoint.npz", "data/prepared/mnist.npz"):
        assert (clone / output).read_bytes() == (repo / output).read_bytes(), output


def test_an_experiment_round_trips_through_exp_push_and_exp_pull(tmp_path, fake_mnist):
    origin = tmp_path / "origin.git"
    git("init", "-q", "--bare", str(origin), cwd=tmp_path)
    repo = make_repo_copy(tmp_path / "repo")
    env = setup_copy(repo, fake_mnist, evaluate=QUICK_EVALUATION)
    git("commit", "-qam", "tiny", cwd=repo)
    git("remote", "add", "origin", str(origin), cwd=repo)
    git("push", "-q", "origin", "HEAD", cwd=repo)
    succeeds(["dvc", "exp", "run", "-n", "one-epoch", "-S", "train.epochs=1"], repo, **env)
    metrics = json.loads((repo / "reports/metrics.json").read_text())
    succeeds(["dvc", "exp", "push", "origin", "one-epoch"], repo)

    clone = tmp_path / "clone"
    git("clone", "-q", str(origin), str(clone), cwd=tmp_path)
    succeeds(["dvc", "exp", "pull", "origin", "one-epoch"], clone)
    assert "one-epoch" in succeeds(["dvc", "exp", "list", "--name-only"], clone).split()
    succeeds(["dvc", "exp", "apply", "one-epoch"], clone)
    assert "Data and pipelines are up to date" in succeeds(["dvc", "status"], clone)
    assert json.loads((clone / "reports/metrics.json").read_text()) == metrics
    assert (clone / "models/cvae.keras").read_bytes() == (repo / "models/cvae.keras").read_bytes()
