"""Starting TensorFlow: its start-up chatter hidden unless asked for, every other line it prints shown, GPU memory
that grows."""

import os
import subprocess
import sys

import pytest

from cvae_pipeline import tensorflow_runtime
from helpers import REPO, subprocess_env

# What TensorFlow 2.21's runtime printed while it started on a CPU machine (its timestamps and thread ids aside).
STARTUP = """WARNING: All log messages before absl::InitializeLog() is called are written to STDERR
I0000 00:00:1796402890.245077    2003 port.cc:153] oneDNN custom operations are on. You may see slightly different \
numerical results due to floating-point round-off errors from different computation orders. To turn them off, set the \
environment variable `TF_ENABLE_ONEDNN_OPTS=0`.
I0000 00:00:1796402890.246368    2003 cudart_stub.cc:31] Could not find cuda drivers on your machine, GPU will not be \
used.
I0000 00:00:1796402890.284812    2003 cpu_feature_guard.cc:227] This TensorFlow binary is optimized to use available \
CPU instructions in performance-critical operations.
To enable the following instructions: AVX2 AVX512F AVX512_BF16 AMX_BF16 FMA, in other operations, rebuild TensorFlow \
with the appropriate compiler flags.
"""
CUINIT = ("E0000 00:00:1796402893.633234    2003 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error: "
          "Failed call to cuInit: UNKNOWN ERROR (303)")
SHOWN = "W0000 00:00:1796402893.633234    2003 some_kernel.cc:12] a warning that matters"


def test_the_start_up_lines_are_chatter_and_other_lines_are_not():
    assert all(tensorflow_runtime.chatter(line, driver_loaded=True) for line in STARTUP.splitlines())
    assert not tensorflow_runtime.chatter(SHOWN, driver_loaded=False)
    assert not tensorflow_runtime.chatter("Traceback (most recent call last):", driver_loaded=False)
    # CUDA failing to start says only that there is no GPU where no NVIDIA driver is loaded; where one is, it matters.
    assert tensorflow_runtime.chatter(CUINIT, driver_loaded=False)
    assert not tensorflow_runtime.chatter(CUINIT, driver_loaded=True)


def test_what_is_caught_while_tensorflow_starts_reaches_standard_error_but_the_chatter(capfd):
    with tensorflow_runtime._standard_error_caught(driver_loaded=False):
        os.write(2, (STARTUP + CUINIT + "\n" + SHOWN + "\n" + "a Python warning\n").encode())
    assert capfd.readouterr().err == f"{SHOWN}\na Python warning\n"


def start_tensorflow(**env: str) -> str:
    """Standard error of a process that starts TensorFlow as the stages do, computes, then prints a line of its own."""
    code = ("from cvae_pipeline import tensorflow_runtime; tensorflow_runtime.start(); import tensorflow as tf; "
            "import sys; tf.reduce_sum(tf.ones((3, 3))).numpy(); print('pipeline: done', file=sys.stderr)")
    environment = {key: value for key, value in subprocess_env(PYTHONPATH=str(REPO / "src"), **env).items()
                   if value is not None}
    done = subprocess.run([sys.executable, "-c", code], env=environment, capture_output=True, text=True, check=True)
    return done.stderr


def test_a_stage_prints_its_own_lines_and_not_tensorflows_start_up_log():
    assert start_tensorflow(TF_CPP_MIN_LOG_LEVEL=None) == "pipeline: done\n"


def test_tensorflows_start_up_log_shows_when_the_user_sets_its_level(monkeypatch):
    """`TF_CPP_MIN_LOG_LEVEL` set: nothing is caught, and TensorFlow prints what its own setting says."""
    caught = []
    monkeypatch.setattr(tensorflow_runtime, "_standard_error_caught", lambda driver_loaded: caught.append(1))
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "0")
    tensorflow_runtime.start.__wrapped__()
    assert caught == [] and os.environ["TF_CPP_MIN_LOG_LEVEL"] == "0"
    monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL")
    with pytest.raises(TypeError):  # not set: caught (the stand-in is no context manager)
        tensorflow_runtime.start.__wrapped__()
    assert caught == [1] and os.environ["TF_CPP_MIN_LOG_LEVEL"] == tensorflow_runtime.QUIET_LEVEL


def test_every_gpu_s_memory_grows(monkeypatch):
    import tensorflow as tf

    grown = []
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind: ["gpu:0", "gpu:1"] if kind == "GPU" else [])
    monkeypatch.setattr(tf.config.experimental, "set_memory_growth", lambda device, grow: grown.append((device, grow)))
    assert tensorflow_runtime.start.__wrapped__() == ("gpu:0", "gpu:1")
    assert grown == [("gpu:0", True), ("gpu:1", True)]


def test_training_and_every_loaded_model_start_tensorflow_first(monkeypatch, tmp_path):
    """Train finds its devices through `hardware.detect`; evaluate, visualize, `make sample` and the served model load
    the model through `load_model_file`: each lets GPU memory grow before its first tensor."""
    from cvae_pipeline.errors import UserInputError
    from cvae_pipeline.model.loading import load_model_file
    from cvae_pipeline.training import hardware

    started = []
    monkeypatch.setattr(tensorflow_runtime, "start", lambda: started.append("started") or ())
    hardware.detect()
    assert started == ["started"]
    with pytest.raises(UserInputError):
        load_model_file(tmp_path / "absent.keras")
    assert started == ["started", "started"]
