"""What every stage script shares: argument parsing, logging, and one-line errors with the right exit status."""

import argparse
import logging
import sys
from collections.abc import Callable

from cvae_pipeline.config import DEFAULT_PARAMS_FILE
from cvae_pipeline.errors import UserInputError


def stage_arguments(description: str, paths: list[str]) -> argparse.Namespace:
    """Parse `--params` and the stage's required path options (dvc.yaml passes them: it is their one source)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", default=DEFAULT_PARAMS_FILE, help="params file (default: %(default)s)")
    for name in paths:
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, required=True)
    return parser.parse_args()


def run_stage(name: str, main: Callable[[], None]) -> None:
    """Run a stage's main; bad user input becomes one line on stderr and its exit status, never a traceback."""
    logging.basicConfig(level=logging.INFO, format=f"{name}: %(message)s", stream=sys.stderr)
    try:
        main()
    except UserInputError as error:
        print(str(error).replace("\n", " "), file=sys.stderr)
        sys.exit(error.exit_code)
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        sys.exit(130)
