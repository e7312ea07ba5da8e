"""Starting TensorFlow in a process: its start-up log kept out of the pipeline's output, and GPU memory that grows.

Every stage and command that runs TensorFlow calls `start()` before its first TensorFlow work:
- TensorFlow's C++ runtime prints a dozen lines while it loads (oneDNN, the CUDA stub, the CPU's instructions, "All log
  messages before absl::InitializeLog()"), before its own log level applies. `start` loads it with the process's
  standard error caught, and passes on every caught line but that known start-up chatter: an error or a warning that
  matters still reaches the user. `TF_CPP_MIN_LOG_LEVEL` set by the user (0 shows everything) turns all of this off:
  TensorFlow then prints what its own setting says.
- A TensorFlow process takes all of a GPU's memory by default; with memory growth it takes what it uses, so that two
  sweep workers (or a stage and a served model) share one GPU.
"""

import contextlib
import functools
import logging
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

LOG_LEVEL = "TF_CPP_MIN_LOG_LEVEL"  # TensorFlow's own: set by the user, start-up lines are theirs to see
QUIET_LEVEL = "1"  # what the runtime logs after start-up: its warnings and errors, not its information
NVIDIA_DRIVER = Path("/proc/driver/nvidia")
# The runtime's start-up lines that say nothing a user can act on; a pattern per line, matched anywhere in it.
STARTUP_CHATTER = (
    r"All log messages before absl::InitializeLog\(\) is called are written to STDERR",
    r"oneDNN custom operations are on",
    r"cudart_stub\.cc.*Could not find cuda drivers",
    r"cpu_feature_guard\.cc",
    r"^To enable the following instructions: .* rebuild TensorFlow with the appropriate compiler flags\.$",
    r"TF-TRT Warning: Could not find TensorRT",
    r"Unable to register (cuDNN|cuFFT|cuBLAS) factory",
    r"computation placer already registered",
)
# Where no NVIDIA driver is loaded, CUDA failing to start says only that there is no GPU.
NO_DRIVER_CHATTER = (r"failed call to cuInit",)


def chatter(line: str, driver_loaded: bool) -> bool:
    """Whether `line`, caught while TensorFlow started, is start-up chatter rather than something to show."""
    patterns = STARTUP_CHATTER if driver_loaded else STARTUP_CHATTER + NO_DRIVER_CHATTER
    return not line.strip() or any(re.search(pattern, line) for pattern in patterns)


@contextlib.contextmanager
def _standard_error_caught(driver_loaded: bool) -> Iterator[None]:
    """Standard error (the file descriptor, which C++ writes to) goes to a temporary file; at the end, what is not
    chatter is written to it after all."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as caught:
        os.dup2(caught.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            caught.seek(0)
            kept = [line for line in caught.read().decode(errors="replace").splitlines()
                    if not chatter(line, driver_loaded)]
            if kept:
                print("\n".join(kept), file=sys.stderr, flush=True)


@functools.cache
def start() -> tuple:
    """Load TensorFlow (its start-up chatter hidden unless the user set `TF_CPP_MIN_LOG_LEVEL`), let every GPU's memory
    grow, and return the GPUs (TensorFlow's physical devices). Once per process; call it before any tensor exists."""
    quiet = LOG_LEVEL not in os.environ
    if quiet:
        os.environ[LOG_LEVEL] = QUIET_LEVEL
    caught = _standard_error_caught(NVIDIA_DRIVER.exists()) if quiet else contextlib.nullcontext()
    with caught:
        import tensorflow as tf

        gpus = tuple(tf.config.list_physical_devices("GPU"))  # starts CUDA, which logs too
    for gpu in gpus:
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError as error:  # the process used the GPU before: its memory is claimed already
            log.warning("cannot let %s's memory grow (%s): this process holds all of it", gpu.name, error)
    return gpus
