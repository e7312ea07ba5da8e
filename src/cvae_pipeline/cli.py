"""What every stage script shares: argument parsing, logging, one-line errors with the right exit status, no modules it
does not use, and a quick exit."""

import argparse
import atexit
import logging
import os
import sys
import threading
from collections.abc import Callable
from typing import NoReturn

from cvae_pipeline.config import DEFAULT_PARAMS_FILE
from cvae_pipeline.errors import UserInputError

# Keras imports scikit-learn, when it is installed, for wrappers that no stage or command uses; it is installed only
# because MLflow depends on it. Importing it costs each stage process CPU time for nothing (docs/performance.md).
UNUSED_MODULES = ("sklearn",)
# MLflow logs its own progress at INFO (creating tables, starting its system-metrics monitor) and draws a progress bar
# for each artifact it copies, between the stage's lines; its warnings still show. MLflow's own variables, which a
# user's setting overrides (MLFLOW_LOGGING_LEVEL=INFO shows the rest).
MLFLOW_QUIET = {"MLFLOW_LOGGING_LEVEL": "WARNING", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}


def stage_arguments(description: str, paths: list[str]) -> argparse.Namespace:
    """Parse `--params` and the stage's required path options (dvc.yaml passes them: it is their one source)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", default=DEFAULT_PARAMS_FILE, help="params file (default: %(default)s)")
    for name in paths:
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, required=True)
    return parser.parse_args()


def stage_status(name: str, main: Callable[[], None]) -> int:
    """Run a stage's main and return its exit status: 0, or that of bad user input, which becomes one line on stderr,
    never a traceback. A bug is raised as it is."""
    logging.basicConfig(level=logging.INFO, format=f"{name}: %(message)s", stream=sys.stderr)
    try:
        main()
    except UserInputError as error:
        print(str(error).replace("\n", " "), file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return 130
    return 0


def end_process(status: int) -> NoReturn:
    """Exit with `status` as Python would, but without tearing down its modules and objects one by one, which for
    TensorFlow's and MLflow's takes seconds and changes nothing on disk: what Python would wait for runs first (the
    atexit handlers, which close MLflow's and logging's work, and the standard streams' buffers)."""
    if any(not thread.daemon for thread in threading.enumerate() if thread is not threading.main_thread()):
        sys.exit(status)  # a thread still at work, which Python's own exit waits for
    atexit._run_exitfuncs()  # the handlers Python runs at exit; the one way to run them before os._exit
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a reader gone or a stream closed: Python's own exit then reports status 120
            status = status or 120
    os._exit(status)


def run_stage(name: str, main: Callable[[], None]) -> NoReturn:
    """A stage script's whole run: its main (`stage_status`) without the modules it does not use, then the process ends
    with its status (`end_process`)."""
    for variable, value in MLFLOW_QUIET.items():
        os.environ.setdefault(variable, value)  # before MLflow is imported, which reads them
    for module in UNUSED_MODULES:
        sys.modules.setdefault(module, None)  # importing it then fails at once: Python's rule for None there
    end_process(stage_status(name, main))
