"""One trial: the pipeline's own train stage, run as dvc.yaml runs it, in a folder of its own with its own params.

The command is dvc.yaml's train `cmd`, with every output moved into the trial's folder and `--params` pointing at the
trial's params file: the workspace and the other trials are untouched, and there is no second training loop. The
stage writes a checkpoint after each epoch; its per-epoch history is what pruning reads, from this (worker) process,
which holds the live Optuna trial. A pruned or stopped trial's stage gets SIGINT, as Ctrl-C would give it: it ends
its MLflow run KILLED and exits. The stage dies with its worker (Linux' parent-death signal), so a killed worker
leaves no training behind.
"""

import ctypes
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from cvae_pipeline.tracking.runs import TRIAL_ENV

PATH_VARIABLE = re.compile(r"\$\{paths\.(\w+)\}")
POLL_SECONDS = 0.25  # a look at the checkpoint's time: cheap; it is read only when replaced
STOP_GRACE_SECONDS = 60  # after SIGINT, how long a stage has to end its MLflow run before SIGKILL
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class Outcome:
    """How a trial's stage ended: `state` is complete, pruned, failed or stopped; `metrics` its final metrics
    (complete); `reason` a line saying why it did not complete."""

    state: str
    metrics: dict | None = None
    reason: str = ""


def _pipeline(root: Path) -> dict:
    return yaml.safe_load((root / "dvc.yaml").read_text(encoding="utf-8"))


def pipeline_paths(root: Path) -> dict[str, str]:
    """dvc.yaml's `paths` (its vars): the one source of every path."""
    return next(entry["paths"] for entry in _pipeline(root)["vars"] if "paths" in entry)


def train_command(root: Path, folder: Path, prepared: Path, params_file: Path) -> tuple[list[str], dict[str, Path]]:
    """dvc.yaml's train command with its outputs in `folder`, its data `prepared` and its params `params_file`; and the
    outputs by their dvc.yaml name."""
    paths = pipeline_paths(root)
    command = " ".join(_pipeline(root)["stages"]["train"]["cmd"].split())
    used = PATH_VARIABLE.findall(command)
    outputs = {name: folder / Path(paths[name]).name for name in used if name != "prepared"}
    where = {**{name: str(path) for name, path in outputs.items()}, "prepared": str(prepared)}
    command = PATH_VARIABLE.sub(lambda match: shlex.quote(where[match.group(1)]), command)
    words = shlex.split(command)
    if words[0] == "python":  # the worker's own interpreter: the one make's environment put on PATH
        words[0] = sys.executable
    return [*words, "--params", str(params_file)], outputs


def read_history(checkpoint: Path) -> list[dict]:
    """The per-epoch history in a train stage's checkpoint (written whole, by rename, after each epoch); [] before the
    first one or while it cannot be read."""
    try:
        with np.load(checkpoint, allow_pickle=False) as archive:
            return json.loads(str(archive["history"]))
    except (OSError, KeyError, ValueError):
        return []


def _modified(path: Path) -> int | None:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return None


def _die_with_parent() -> None:
    """In the child, before it runs: SIGKILL when the thread that started it dies (Linux), so a worker killed with -9
    leaves no training behind."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def last_line(log: Path) -> str:
    """The stage's last line of output: its one-line error, when it stopped on one."""
    try:
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return lines[-1][:500] if lines else ""


class TrialProcess:
    """The train stage of one trial, running: started, watched epoch by epoch, stopped."""

    def __init__(self, command: list[str], outputs: dict[str, Path], log: Path, env: dict[str, str]):
        self.command, self.outputs, self.log, self.env = command, outputs, log, env

    def run(self, on_epoch: Callable[[dict], str | None], stop: threading.Event, cwd: Path) -> Outcome:
        """Run the stage to its end. `on_epoch(row)` sees each epoch's history row once and returns a reason to prune
        it (or None); `stop` set means stop it (Ctrl-C)."""
        seen, checkpoint = 0, self.outputs["checkpoint"]
        with open(self.log, "wb") as sink:
            process = subprocess.Popen(self.command, cwd=cwd, env=self.env, stdout=sink, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=_die_with_parent)
            try:
                changed = None
                while process.poll() is None:
                    history, stamp = [], _modified(checkpoint)
                    if stamp != changed:  # replaced by a rename after each epoch: read once a time
                        history = read_history(checkpoint)
                        changed = stamp if history else None
                    for row in history[seen:]:
                        reason = on_epoch(row)
                        if reason is not None:
                            self._interrupt(process)
                            return Outcome("pruned", reason=reason)
                    seen = max(seen, len(history))
                    if stop.wait(POLL_SECONDS):
                        self._interrupt(process)
                        return Outcome("stopped", reason="stopped by the user (Ctrl-C) during the trial")
            finally:
                if process.poll() is None:  # an error in this process: the stage goes with it
                    process.kill()
                    process.wait()
        for row in read_history(checkpoint)[seen:]:  # the epochs after the last look: recorded, too late to prune
            on_epoch(row)
        if process.returncode != 0:
            return Outcome("failed", reason=last_line(self.log) or f"the train stage exited with {process.returncode}")
        try:
            return Outcome("complete", metrics=json.loads(self.outputs["train_metrics"].read_text()))
        except (OSError, ValueError) as error:
            return Outcome("failed", reason=f"the train stage exited 0 without its metrics ({error})")

    @staticmethod
    def _interrupt(process: subprocess.Popen) -> None:
        """SIGINT, as Ctrl-C: the stage ends its MLflow run KILLED; SIGKILL if it has not exited in time."""
        process.send_signal(signal.SIGINT)
        try:
            process.wait(STOP_GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def trial_environment(run_name: str, tags: dict[str, str]) -> dict[str, str]:
    """The stage's environment: this one, plus the run name and tags of the trial's MLflow run."""
    return {**os.environ, TRIAL_ENV: json.dumps({"name": run_name, "tags": tags})}

