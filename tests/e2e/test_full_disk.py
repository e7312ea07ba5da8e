"""A full disk, end to end: a stage whose write finds no room stops in one line naming the file, the previous file is
kept whole, and the next run resumes (train) or writes it again (evaluate).

The disk fills by a real limit on the size of the files the stage's process writes (RLIMIT_FSIZE, set on the running
stage), so every write fails as it would on a full disk, with EFBIG where a full disk says ENOSPC. The stages log to
no MLflow store here (tracking.required: false, a server that is not there): its own database would fill first.
"""

import json
import resource
import signal
import subprocess

import numpy as np
import pytest

from helpers import free_port, run, subprocess_env
from repositories import QUICK_EVALUATION, TINY, setup_copy, stage_commands

pytestmark = [pytest.mark.slow, pytest.mark.reliability]

LIMIT_BYTES = 200  # smaller than any checkpoint or report


def _copy(repo, fake_mnist, **sections) -> dict[str, str]:
    env = setup_copy(repo, fake_mnist, tracking={"required": False}, **sections)
    return {**env, "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}"}


def _start_stage(repo, name: str, env: dict[str, str], limit: int | None = None) -> subprocess.Popen:
    """The stage's command as dvc.yaml declares it, its stderr piped; a write past the file-size limit fails with
    EFBIG instead of killing it (SIGXFSZ ignored), and `limit` applies from the start when given."""
    def prepare_process():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        if limit is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    return subprocess.Popen(stage_commands(repo)[name], cwd=repo, env=subprocess_env(**env), text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=prepare_process)


def _stopped_in_one_line(stderr: str, path: str) -> None:
    assert "Traceback" not in stderr, stderr[-3000:]
    assert stderr.splitlines()[-1].startswith(f"{path}: cannot be written (File too large); the previous "), stderr


def test_a_checkpoint_that_finds_no_room_stops_training_in_one_line_and_the_next_run_resumes(repo_copy, fake_mnist):
    env = _copy(repo_copy, fake_mnist, train={**TINY["train"], "epochs": 4})
    assert run(["dvc", "repro", "prepare"], repo_copy, **env).returncode == 0
    stage = _start_stage(repo_copy, "train", env)
    lines = []
    for line in stage.stderr:
        lines.append(line)
        if "epoch 2/4" in line:  # the disk is full from here on: epoch 2's checkpoint or epoch 3's finds no room
            resource.prlimit(stage.pid, resource.RLIMIT_FSIZE, (LIMIT_BYTES, resource.RLIM_INFINITY))
    assert stage.wait(timeout=600) == 1
    _stopped_in_one_line("".join(lines), "models/checkpoint.npz")

    checkpoint = repo_copy / "models/checkpoint.npz"
    with np.load(checkpoint) as kept:  # whole, as the last complete write left it
        epoch = int(kept["epoch"])
        assert epoch in (1, 2) and not bool(kept["finished"]) and len(json.loads(str(kept["history"]))) == epoch
    assert [path.name for path in checkpoint.parent.iterdir() if ".tmp" in path.name] == []

    resumed = run(["dvc", "repro", "train"], repo_copy, **env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming after epoch {epoch} from models/checkpoint.npz" in resumed.stderr
    assert json.loads((repo_copy / "reports/train_metrics.json").read_text())["epochs"] == 4


def test_a_report_that_finds_no_room_stops_evaluate_in_one_line_keeping_the_previous_report(repo_copy, fake_mnist):
    env = _copy(repo_copy, fake_mnist, evaluate=QUICK_EVALUATION)
    assert run(["dvc", "repro", "evaluate"], repo_copy, **env).returncode == 0
    report = repo_copy / "reports/metrics.json"
    before = report.read_bytes()
    stage = _start_stage(repo_copy, "evaluate", env, limit=LIMIT_BYTES)
    _, stderr = stage.communicate(timeout=600)
    assert stage.returncode == 1
    _stopped_in_one_line(stderr, "reports/metrics.json")
    assert report.read_bytes() == before
    assert [path.name for path in report.parent.iterdir() if ".tmp" in path.name] == []
    again = run(["dvc", "repro", "evaluate", "--force"], repo_copy, **env)
    assert again.returncode == 0 and report.read_bytes() == before  # the same seed: the same report
