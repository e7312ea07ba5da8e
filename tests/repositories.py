"""Temporary copies of the repository for the end-to-end tests, and what runs in them: a copy as a clone would be, a
copy of one in which the pipeline ran, its params made tiny, its stages' commands, runs and queues, a training killed
at its first checkpoint."""

import contextlib
import hashlib
import os
import re
import shlex
import shutil
import signal
import sqlite3
import subprocess
import tempfile
import time
from pathlib import Path

import mlflow
import yaml

from helpers import REPO, run, subprocess_env


def _project_files() -> list[str]:
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO, capture_output=True, text=True, check=True,
    ).stdout
    return [name for name in listed.split("\0") if name and (REPO / name).is_file()]


def make_repo_copy(copy: Path) -> Path:
    """A fresh git + DVC repository holding the project's files as a clone would: no outputs, no cache."""
    for name in _project_files():
        (copy / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, copy / name)
    for command in (["git", "init", "-q"], ["git", "add", "-A"],
                    ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "copy"]):
        subprocess.run(command, cwd=copy, check=True, capture_output=True)
    return copy


def copy_repository(source: Path, copy: Path) -> Path:
    """A copy at `copy` of a repository copy in which the pipeline ran: its files, Git history, DVC cache and MLflow
    store, as if it had run there. MLflow records where artifacts are as absolute paths (in its database, and in each
    logged model's MLmodel): they are moved to the copy. DVC's own temporary state is left behind; DVC rebuilds it."""
    shutil.copytree(source, copy, symlinks=True,
                    ignore=lambda folder, names: ["tmp"] if Path(folder) == source / ".dvc" else [])
    old, new = f"{source}/", f"{copy}/"
    for model in (copy / "mlruns").rglob("MLmodel"):
        model.write_text(model.read_text().replace(old, new))
    if (copy / "mlflow.db").exists():
        with contextlib.closing(sqlite3.connect(copy / "mlflow.db")) as store, store:
            tables = [row[0] for row in store.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
            for table in tables:
                for column in [row[1] for row in store.execute(f'PRAGMA table_info("{table}")')
                               if row[2].upper().startswith(("VARCHAR", "TEXT"))]:
                    store.execute(f'UPDATE "{table}" SET "{column}" = replace("{column}", ?, ?) '
                                  f'WHERE instr("{column}", ?) > 0', (old, new, old))
    return copy


# float32: emulated bfloat16 trains several times slower on CPUs without AVX512-BF16 or AMX (docs/performance.md).
TINY = {"data": {"validation_size": 100},  # of the fake MNIST's 300 training images
        "model": {"latent_dim": 2},
        "train": {"epochs": 2, "batch_size": 50, "learning_rate": 1e-3, "precision": "float32"}}


QUICK_EVALUATION = {"iwae_k": 5, "samples": 1}  # the evaluate section of the tests' pipelines


def setup_copy(repo, fake_mnist, **sections):
    """Point the copy at the fake mirror and make its params tiny; returns the environment for its stages."""
    mirror, manifest, _ = fake_mnist
    shutil.copy(manifest, repo / "data/mnist.json")
    raw = yaml.safe_load((repo / "params.yaml").read_text())
    for section, values in {**TINY, **sections}.items():
        raw[section].update(values)
    (repo / "params.yaml").write_text(yaml.safe_dump(raw))
    return {"MNIST_MIRROR": str(mirror)}


def runs_in(repo):
    """The runs of the default experiment in the copy's own store (`mlflow.search_runs`, as a user would)."""
    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    return mlflow.search_runs(experiment_names=["cvae-mnist"])


# Loaded as sitecustomize by the Python processes of `kill_training_once_checkpointed`'s `dvc repro`: the train stage
# stops itself (SIGSTOP) once its first checkpoint is whole, after creating the file CVAE_TEST_PAUSED names. So the kill
# finds it there however fast its epochs run, and a test need not train many epochs to give a poll time to see them.
PAUSE_AT_CHECKPOINT = """
import os, signal, sys
if os.environ.get("CVAE_TEST_PAUSED") and sys.argv and sys.argv[0].endswith("stages/train.py"):
    sys.path.insert(0, os.path.join(os.getcwd(), "src"))  # the copy's code, as the stage itself imports it
    from cvae_pipeline.training.checkpoints import Checkpoint
    saved = Checkpoint.save

    def save_then_pause(self, *args, **kwargs):
        saved(self, *args, **kwargs)
        open(os.environ["CVAE_TEST_PAUSED"], "w").close()
        os.kill(os.getpid(), signal.SIGSTOP)

    Checkpoint.save = save_then_pause
"""


def kill_training_once_checkpointed(repo: Path, **env: str) -> None:
    """`dvc repro train` in `repo`, its whole process group killed with SIGKILL once epoch 1 is checkpointed (the
    stage paused there: PAUSE_AT_CHECKPOINT)."""
    hook = Path(tempfile.mkdtemp(prefix="cvae-pause-"))
    (hook / "sitecustomize.py").write_text(PAUSE_AT_CHECKPOINT)
    paused = hook / "paused"
    process = subprocess.Popen(["dvc", "repro", "train"], cwd=repo,
                               env=subprocess_env(**env, PYTHONPATH=str(hook), CVAE_TEST_PAUSED=str(paused)),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    try:
        while not paused.exists() and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.1)
        assert paused.exists(), "training ended, or took 300 s, before its first checkpoint"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        shutil.rmtree(hook, ignore_errors=True)


def stage_commands(repo: Path) -> dict[str, list[str]]:
    """Each stage's command exactly as dvc.yaml declares it, its paths filled in."""
    pipeline = yaml.safe_load((repo / "dvc.yaml").read_text())
    paths = pipeline["vars"][0]["paths"]
    return {name: shlex.split(re.sub(r"\$\{paths\.(\w+)\}", lambda m: paths[m.group(1)], stage["cmd"]))
            for name, stage in pipeline["stages"].items()}


def snapshot(repo: Path) -> dict[str, str]:
    """Every file of the copy (but .git and params.yaml) with the MD5 of its bytes."""
    return {str(path.relative_to(repo)): hashlib.md5(path.read_bytes()).hexdigest()
            for path in sorted(repo.rglob("*"))
            if path.is_file() and ".git" not in path.parts and path.name != "params.yaml"}


def queue_states(repo: Path) -> list[str]:
    """The Status column of `dvc queue status`, one entry per task."""
    lines = run(["dvc", "queue", "status"], repo).stdout.splitlines()
    return [line.split()[-1] for line in lines
            if line.split() and line.split()[-1] in ("Queued", "Running", "Success", "Failed", "Killed")]


def run_queue(repo: Path, tasks: int, jobs: int = 2, timeout: float = 900, **env: str) -> list[str]:
    """`dvc queue start -j jobs`, then wait until `tasks` tasks have ended; their states."""
    # Not captured: the workers it starts inherit its output, and a worker that lingers would keep a pipe open.
    started = subprocess.run(["dvc", "queue", "start", "-j", str(jobs)], cwd=repo, env=subprocess_env(**env),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)
    assert started.returncode == 0
    deadline = time.monotonic() + timeout
    states = []
    while time.monotonic() < deadline:
        states = queue_states(repo)
        if len(states) == tasks and all(state in ("Success", "Failed") for state in states):
            break
        time.sleep(3)
    run(["dvc", "queue", "stop"], repo)
    return states


def commit_all(repo: Path, message: str) -> str:
    """`git add -A` and commit in a copy; the new commit's hash."""
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", message], cwd=repo, check=True)
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
