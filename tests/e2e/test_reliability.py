"""Reliability, end to end: kill -9 at random points, broken params.yaml, bad data and a tracking server that is down.

Run this suite alone with `pytest -m reliability` (it also holds the sweep, NaN and security tests of other files).
"""

import gzip
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml

from bad_params import BROKEN
from helpers import IDX_NAMES, run, subprocess_env, timeless
from repositories import (
    QUICK_EVALUATION,
    TINY,
    kill_training_once_checkpointed,
    runs_in,
    setup_copy,
    snapshot,
    stage_commands,
)

pytestmark = [pytest.mark.slow, pytest.mark.reliability]

KILLS = 5
KILL_EPOCHS = 30
TRACKING_DEADLINE_S = 30


def wait_until(condition, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)


# --- 1. kill -9 ----------------------------------------------------------------------------------------------------

def test_kill_9_five_times_at_random_points_then_resume_matches_an_uninterrupted_run(repo_copy, fake_mnist, tmp_path):
    env = setup_copy(repo_copy, fake_mnist, train={**TINY["train"], "epochs": KILL_EPOCHS})
    uninterrupted = tmp_path / "uninterrupted"
    shutil.copytree(repo_copy, uninterrupted)
    assert run(["dvc", "repro", "prepare"], repo_copy, **env).returncode == 0
    checkpoint = repo_copy / "models/checkpoint.npz"
    rng = random.Random(20261125)
    epochs_at_kill = []
    for attempt in range(KILLS):
        log = tmp_path / f"attempt-{attempt}.log"
        with open(log, "w") as output:  # DVC's output unbuffered, to see when it starts the stage
            process = subprocess.Popen(["dvc", "repro", "train"], cwd=repo_copy,
                                       env=subprocess_env(**env, PYTHONUNBUFFERED="1"), stdout=output,
                                       stderr=subprocess.STDOUT, start_new_session=True)
        # A random point: during the stage's start-up (imports, MLflow), or a random moment after 0-2 more epochs.
        # Never before DVC has started the stage: a kill while DVC itself writes its lock file (.dvc/tmp/rwlock) leaves
        # it empty, which DVC does not recover from (docs/guarantees.md, "Not covered").
        point = rng.choice(["start-up", 0, 1, 2])
        wait_until(lambda log=log: "Running stage 'train'" in log.read_text(), process)
        if point == "start-up":
            time.sleep(rng.uniform(0.0, 3.0))
        else:
            wait_until(lambda log=log, epochs=point: "training on" in log.read_text() and
                       log.read_text().count("train: epoch ") >= epochs, process)
            time.sleep(rng.uniform(0.0, 0.4))
        assert process.poll() is None, f"attempt {attempt} ended before its kill:\n{log.read_text()[-2000:]}"
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        if checkpoint.exists():  # whatever moment the kill hit, the checkpoint is whole
            with np.load(checkpoint, allow_pickle=False) as saved:
                epoch = int(saved["epoch"])
                epochs_at_kill.append(epoch)
                # Every array reads back (a torn zip would not), and all of them are of the same epoch.
                arrays = {name: saved[name] for name in saved.files}
                assert len(json.loads(str(arrays["history"]))) == epoch and len(arrays["grids"]) == epoch + 1
                assert sum(name.startswith("variables/model/") for name in arrays) == 14  # 7 layers: kernel, bias
        else:
            epochs_at_kill.append(0)
    assert epochs_at_kill == sorted(epochs_at_kill) and epochs_at_kill[-1] < KILL_EPOCHS, epochs_at_kill

    resumed = run(["dvc", "repro", "train"], repo_copy, **env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    if epochs_at_kill[-1]:
        assert f"resuming after epoch {epochs_at_kill[-1]}" in resumed.stderr
    whole = run(["dvc", "repro", "train"], uninterrupted, **env)
    assert whole.returncode == 0, whole.stderr[-3000:]

    pd.testing.assert_frame_equal(timeless(pd.read_csv(repo_copy / "reports/train_history.csv")),
                                  timeless(pd.read_csv(uninterrupted / "reports/train_history.csv")))
    final = json.loads((repo_copy / "reports/train_metrics.json").read_text())
    expected = json.loads((uninterrupted / "reports/train_metrics.json").read_text())
    for key in ("train_loss", "validation_elbo", "validation_reconstruction", "validation_kl"):
        assert final[key] == pytest.approx(expected[key], rel=1e-6), key
    assert not list((repo_copy / "models").glob(".*tmp*")), "a killed write left its temporary file"

    runs = runs_in(repo_copy)
    assert "RUNNING" not in set(runs["status"]), runs[["run_id", "status"]]
    finished = runs[runs["status"] == "FINISHED"]
    assert len(finished) == 1 and set(runs["status"]) <= {"FINISHED", "KILLED"}
    assert finished.iloc[0]["run_id"] == json.loads((repo_copy / "models/mlflow_run.json").read_text())["run_id"]
    steps = [m.step for m in mlflow.MlflowClient().get_metric_history(finished.iloc[0]["run_id"], "validation_elbo")]
    assert sorted(steps) == list(range(1, KILL_EPOCHS + 1))  # each epoch once: no point logged twice


# --- 2. broken params.yaml -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def previous_outputs(tmp_path_factory):
    """A copy in which every declared output of every stage already exists (as after an earlier run)."""
    from repositories import make_repo_copy

    repo = make_repo_copy(tmp_path_factory.mktemp("params") / "repo")
    paths = yaml.safe_load((repo / "dvc.yaml").read_text())["vars"][0]["paths"]
    for name, relative in paths.items():
        target = repo / relative
        if name in ("raw", "figures"):
            target.mkdir(parents=True, exist_ok=True)
            (target / "previous.bin").write_bytes(f"previous {name}".encode())
        elif not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(f"previous {name}".encode())
    return repo


@pytest.mark.parametrize(("text", "message"), [case[1:] for case in BROKEN], ids=[case[0] for case in BROKEN])
def test_broken_params_stop_every_stage_with_status_2_one_line_and_nothing_changed(previous_outputs, text, message):
    repo = previous_outputs
    (repo / "params.yaml").write_text(text)
    before = snapshot(repo)
    for stage, command in stage_commands(repo).items():
        result = run(command, repo, MNIST_MIRROR=str(repo / "absent"))
        assert result.returncode == 2, (stage, result.stderr[-2000:])
        assert result.stderr.count("\n") == 1 and message in result.stderr, (stage, result.stderr)
        assert snapshot(repo) == before, stage
    assert not (repo / "mlflow.db").exists() and not (repo / "mlruns").exists()  # no MLflow run either


# --- 3. bad data ---------------------------------------------------------------------------------------------------

def _rewrite(mirror: Path, name: str, change) -> None:
    path = mirror / f"{name}.gz"
    path.write_bytes(gzip.compress(change(gzip.decompress(path.read_bytes())), mtime=0))


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


TRAIN_IMAGES = IDX_NAMES["train_images"]
BAD_DATA = {
    "truncated gzip": (lambda m: (m / f"{TRAIN_IMAGES}.gz").write_bytes((m / f"{TRAIN_IMAGES}.gz").read_bytes()[:900]),
                       f"{TRAIN_IMAGES}.gz: truncated or corrupt gzip"),
    "wrong magic": (lambda m: _rewrite(m, TRAIN_IMAGES, lambda raw: b"\x00\x00\x08\x01" + raw[4:]),
                    f"{TRAIN_IMAGES}: wrong IDX magic number"),
    "wrong count": (lambda m: _rewrite(m, TRAIN_IMAGES, lambda raw: raw[:4] + (299).to_bytes(4, "big") + raw[8:]),
                    f"{TRAIN_IMAGES}: header says 299 items, expected 300"),
    "md5 mismatch": (lambda m: _rewrite(m, TRAIN_IMAGES, lambda raw: raw[:-1] + bytes([(raw[-1] + 1) % 256])),
                     f"{TRAIN_IMAGES}: MD5"),
    "missing file": (lambda m: (m / f"{TRAIN_IMAGES}.gz").unlink(), f"neither {TRAIN_IMAGES}.gz nor {TRAIN_IMAGES}"),
    "mirror not answering": (None, f"{TRAIN_IMAGES}.gz: could not be downloaded"),
}


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_data_is_named_and_the_previous_prepared_data_stays(repo_copy, fake_mnist, tmp_path, case):
    env = setup_copy(repo_copy, fake_mnist)
    assert run(["dvc", "repro", "prepare"], repo_copy, **env).returncode == 0
    prepared = {path: path.read_bytes() for path in (repo_copy / "data/prepared/mnist.npz",
                                                     repo_copy / "reports/data_summary.json")}
    break_mirror, message = BAD_DATA[case]
    mirror = tmp_path / "broken-mirror"
    shutil.copytree(env["MNIST_MIRROR"], mirror)
    if break_mirror:
        break_mirror(mirror)
        env = {"MNIST_MIRROR": str(mirror)}
    else:
        env = {"MNIST_MIRROR": f"https://127.0.0.1:{_closed_port()}/"}
    (repo_copy / "data/raw" / TRAIN_IMAGES).unlink()  # so that prepare must fetch it again

    result = run(["dvc", "repro", "prepare"], repo_copy, **env)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr[-2000:]
    for path, content in prepared.items():
        assert path.read_bytes() == content, f"{path} changed"
    assert not (repo_copy / "data/raw" / TRAIN_IMAGES).exists()  # nothing unverified is kept


# --- 4. tracking server down ---------------------------------------------------------------------------------------

@pytest.fixture
def silent_server():
    """A tracking server URI that accepts connections and never answers."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        yield f"http://127.0.0.1:{server.getsockname()[1]}"


def test_a_tracking_server_that_does_not_answer_stops_training_before_it_starts(repo_copy, fake_mnist, silent_server):
    env = setup_copy(repo_copy, fake_mnist)
    assert run(["dvc", "repro", "prepare"], repo_copy, **env).returncode == 0
    started = time.monotonic()
    result = run(["dvc", "repro", "train"], repo_copy, **env, MLFLOW_TRACKING_URI=silent_server)
    elapsed = time.monotonic() - started
    assert result.returncode != 0
    assert elapsed < TRACKING_DEADLINE_S, elapsed
    assert f"MLflow tracking server {silent_server} does not answer" in result.stderr
    assert "set tracking.required: false" in result.stderr
    assert "train: epoch" not in result.stderr and not (repo_copy / "models/checkpoint.npz").exists()


def test_tracking_not_required_trains_anyway_and_keeps_the_metrics_in_dvc(repo_copy, fake_mnist):
    env = setup_copy(repo_copy, fake_mnist, tracking={"required": False}, evaluate=QUICK_EVALUATION)
    down = f"http://127.0.0.1:{_closed_port()}"
    result = run(["dvc", "repro"], repo_copy, **env, MLFLOW_TRACKING_URI=down)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "going on without MLflow" in result.stderr
    assert json.loads((repo_copy / "models/mlflow_run.json").read_text())["run_id"] is None
    assert json.loads((repo_copy / "reports/metrics.json").read_text())["test"]["iwae"] < 0
    assert pd.read_csv(repo_copy / "reports/train_history.csv")["epoch"].tolist() == [1, 2]
    assert (repo_copy / "reports/figures/training_curves.png").exists()
    shown = run(["dvc", "metrics", "show", "--json"], repo_copy)
    assert "validation_elbo" in shown.stdout and "iwae" in shown.stdout
    assert not (repo_copy / "mlflow.db").exists()


@pytest.mark.reliability
def test_epochs_trained_while_mlflow_was_down_are_logged_when_a_resumed_run_reaches_it(repo_copy, fake_mnist):
    env = setup_copy(repo_copy, fake_mnist, tracking={"required": False}, train={**TINY["train"], "epochs": 3})
    assert run(["dvc", "repro", "prepare"], repo_copy, **env).returncode == 0
    # Trains without MLflow until killed.
    kill_training_once_checkpointed(repo_copy, MLFLOW_TRACKING_URI=f"http://127.0.0.1:{_closed_port()}", **env)

    resumed = run(["dvc", "repro", "train"], repo_copy, **env)  # now with the repository's own store
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming after epoch" in resumed.stderr
    runs = runs_in(repo_copy)
    assert len(runs) == 1 and runs.iloc[0]["status"] == "FINISHED"
    logged = mlflow.MlflowClient().get_metric_history(runs.iloc[0]["run_id"], "validation_elbo")
    history = pd.read_csv(repo_copy / "reports/train_history.csv")
    assert [metric.step for metric in logged] == history["epoch"].tolist() == [1, 2, 3]
    assert [metric.value for metric in logged] == pytest.approx(history["validation_elbo"].tolist(), rel=1e-5)
