"""The machine training runs on, and the settings that are fastest on it: `train.precision`, `train.jit_compile`.

`detect()` reads the CPU (model and instruction-set flags from /proc/cpuinfo) and the GPUs TensorFlow sees (name and
compute capability). `auto` then means what the hardware does natively, never what it emulates:

- precision: on GPUs, bfloat16 from compute capability 8.0 (Ampere and newer); float16 with loss scaling on GPUs 7.x
  (Volta, Turing: tensor cores without bfloat16); float32 below. On CPUs, float32 unless the CPU has AVX512-BF16 or
  AMX and bfloat16 *measures* faster there: the flag alone does not tell (an AMD EPYC with AVX512-BF16 trains faster
  in bfloat16, an Intel Xeon with AVX512-BF16 but no AMX slower; docs/performance.md), so the model's
  convolutions are timed in both precisions once per machine (the result is cached, so that a
  machine always makes the same choice and a seed the same model). On an AVX2-only CPU bfloat16 is emulated and
  trains several times slower than float32; only x86 flags are read, so other CPUs train
  in float32. `ONEDNN_MAX_CPU_ISA` below AVX512_CORE_BF16 (say AVX2) keeps TensorFlow's CPU kernels off bfloat16
  instructions, so `auto` then takes float32 too.
- XLA (`jit_compile`): on GPUs, where it fuses the loss's many small element-wise ops; not on CPUs, where it trained
  slower (docs/performance.md).
"""

import hashlib
import json
import logging
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tensorflow as tf

from cvae_pipeline import tensorflow_runtime
from cvae_pipeline.fileio import write_json_atomic

log = logging.getLogger(__name__)

CPUINFO = Path("/proc/cpuinfo")
BFLOAT16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")  # as /proc/cpuinfo spells them, the better first
# oneDNN (TensorFlow's CPU kernels) uses no more of the CPU than ONEDNN_MAX_CPU_ISA allows; these levels include
# native bfloat16 (oneDNN's names; DEFAULT and ALL: whatever the CPU has).
ISA_LIMIT = "ONEDNN_MAX_CPU_ISA"
BFLOAT16_ISA_LEVELS = ("AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX512_CORE_AMX", "AVX512_CORE_AMX_FP16",
                       "AVX10_1_512", "AVX10_1_512_AMX", "AVX10_1_512_AMX_FP16", "AVX10_2_512", "AVX10_2_512_AMX_2",
                       "DEFAULT", "ALL")
SHOWN_CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")  # what decides speed here
PROBE_SECONDS = 0.15  # per precision and round
PROBE_ROUNDS = 3  # alternating, each precision's best round counts: other work on the machine slows both alike
CACHE_ENV = "CVAE_CACHE_DIR"  # where measured speed-ups are kept (default: $XDG_CACHE_HOME/cvae-pipeline)


@dataclass(frozen=True)
class Gpu:
    name: str
    compute_capability: tuple[int, int] | None  # None when TensorFlow does not say (not a CUDA device)


@dataclass(frozen=True)
class Machine:
    """The CPU (model and flags) and the GPUs that TensorFlow trains on."""

    cpu_model: str
    cpu_flags: frozenset[str] = field(default_factory=frozenset)
    gpus: tuple[Gpu, ...] = ()

    @property
    def on_gpu(self) -> bool:
        return bool(self.gpus)

    @property
    def shown_cpu_flags(self) -> list[str]:
        limits = sorted(flag for flag in self.cpu_flags if flag.startswith(ISA_LIMIT))
        return [flag for flag in SHOWN_CPU_FLAGS if flag in self.cpu_flags] + limits

    def describe(self) -> str:
        """`CPU (AMD EPYC; avx2 avx512f avx512_bf16)` or `GPU x2 (NVIDIA A100-SXM4-40GB, compute capability 8.0)`."""
        if not self.gpus:
            return f"CPU ({self.cpu_model}; {' '.join(self.shown_cpu_flags) or 'none of ' + ' '.join(SHOWN_CPU_FLAGS)})"
        kinds = sorted({f"{gpu.name}, compute capability {'.'.join(map(str, gpu.compute_capability))}"
                        if gpu.compute_capability else gpu.name for gpu in self.gpus})
        return f"GPU x{len(self.gpus)} ({'; '.join(kinds)})"


@dataclass(frozen=True)
class Choice:
    """A setting as used, and why (logged, and recorded in the MLflow run)."""

    value: str | bool
    reason: str


def parse_cpuinfo(text: str) -> tuple[str, frozenset[str]]:
    """The CPU's model name and the flags of its first core, from the text of /proc/cpuinfo."""
    model, flags = "", frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key == "flags" and not flags:
            flags = frozenset(value.split())
    return model or platform.processor() or platform.machine() or "unknown CPU", flags


def detect() -> Machine:
    """This machine. Call it before any tensor exists: GPU memory is then claimed as needed, not all at once
    (`tensorflow_runtime.start`)."""
    try:
        model, flags = parse_cpuinfo(CPUINFO.read_text(errors="replace"))
    except OSError:  # not Linux
        model, flags = parse_cpuinfo("")
    gpus = []
    for device in tensorflow_runtime.start():  # their memory grows: two trainings can share a GPU
        details = tf.config.experimental.get_device_details(device)
        capability = details.get("compute_capability")
        gpus.append(Gpu(details.get("device_name", device.name), tuple(capability) if capability else None))
    limit = os.environ.get(ISA_LIMIT, "").strip().upper()
    if limit and limit not in BFLOAT16_ISA_LEVELS:  # e.g. AVX2: bfloat16 is emulated, whatever the CPU could do
        flags = flags - set(BFLOAT16_CPU_FLAGS) | {f"{ISA_LIMIT}={limit}"}
    return Machine(model, flags, tuple(gpus))


def bfloat16_speedup() -> float:
    """How many times faster this CPU trains in bfloat16 than in float32, measured on the model's convolutions
    (forward and backward, a batch of 100; their ratio tracked the whole model's within 0.05 on the CPUs tried).
    Deterministic inputs, no random ops: the draw of the seeded model is untouched."""
    inputs = np.random.default_rng(0).uniform(size=(100, 28, 28, 1)).astype(np.float32)
    kernels = [np.random.default_rng(1).normal(0, 0.1, size=shape).astype(np.float32)
               for shape in ((3, 3, 1, 32), (3, 3, 32, 64))]

    def steps_per_second(dtype: tf.DType) -> Callable[[], float]:
        x, k1, k2 = (tf.constant(value, dtype) for value in (inputs, *kernels))

        @tf.function
        def step():
            with tf.GradientTape() as tape:
                tape.watch([k1, k2])
                hidden = tf.nn.relu(tf.nn.conv2d(tf.nn.relu(tf.nn.conv2d(x, k1, 2, "SAME")), k2, 2, "SAME"))
                up = tf.nn.relu(tf.nn.conv2d_transpose(hidden, k2, (100, 14, 14, 32), 2, "SAME"))
                out = tf.nn.conv2d_transpose(up, k1, (100, 28, 28, 1), 2, "SAME")
                loss = tf.reduce_sum(tf.square(tf.cast(out, tf.float32)))
            return tape.gradient(loss, [k1, k2])

        step()  # tracing

        def rate() -> float:
            count, started = 0, time.perf_counter()
            while time.perf_counter() - started < PROBE_SECONDS:
                gradients, count = step(), count + 1
            gradients[0].numpy()
            return count / (time.perf_counter() - started)

        return rate

    rates = {dtype: steps_per_second(dtype) for dtype in (tf.float32, tf.bfloat16)}
    best = {dtype: max(rate() for _ in range(PROBE_ROUNDS)) for dtype, rate in rates.items()}
    return best[tf.bfloat16] / best[tf.float32]


def _cache_file(machine: Machine) -> Path:
    folder = Path(os.environ.get(CACHE_ENV) or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache",
                                                    "cvae-pipeline"))
    key = f"{machine.cpu_model}|{' '.join(sorted(machine.cpu_flags))}|{tf.__version__}"
    return folder / f"bfloat16-speedup-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


def cached_bfloat16_speedup(machine: Machine) -> float | None:
    """The speed-up measured on this machine before (same CPU, flags and TensorFlow), or None."""
    try:
        speedup = json.loads(_cache_file(machine).read_text())["bfloat16_speedup"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return float(speedup) if isinstance(speedup, (int, float)) and speedup > 0 else None


def measured_bfloat16_speedup(machine: Machine) -> float:
    """The cached speed-up, else measured now and cached (a cache that cannot be written costs only the time)."""
    speedup = cached_bfloat16_speedup(machine)
    if speedup is None:
        speedup = bfloat16_speedup()
        try:
            write_json_atomic(_cache_file(machine), {"bfloat16_speedup": speedup, "cpu": machine.describe(),
                                                     "tensorflow": tf.__version__,
                                                     "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())})
        except OSError as error:
            log.debug("cannot cache the measured bfloat16 speed-up: %s", error)
    return speedup


def choose_precision(requested: str, machine: Machine, speedup: Callable[[Machine], float] | None = None) -> Choice:
    """`train.precision` as it will train: `auto` decided from what the hardware computes natively and, on a CPU
    that has bfloat16 instructions, from bfloat16's measured speed over float32 there (`speedup`, by default
    `measured_bfloat16_speedup`)."""
    if requested != "auto":
        warning = _emulated(requested, machine)
        if warning:
            log.warning("train.precision=%s: %s; `auto` would choose %s", requested, warning,
                        choose_precision("auto", machine, speedup).value)
        return Choice(requested, "set in params")
    if machine.gpus:
        return _gpu_precision(machine)
    native = next((flag for flag in BFLOAT16_CPU_FLAGS if flag in machine.cpu_flags), None)
    if native:
        ratio = (speedup or measured_bfloat16_speedup)(machine)
        measured = f"bfloat16 measured {ratio:.2f}x as fast as float32 on the model's convolutions"
        if ratio > 1:
            return Choice("mixed_bfloat16", f"auto: the CPU computes bfloat16 natively ({native}), and {measured}")
        return Choice("float32", f"auto: the CPU has {native}, but {measured}")
    limited = next((flag for flag in machine.cpu_flags if flag.startswith(ISA_LIMIT)), None)
    if limited:
        return Choice("float32", f"auto: {limited} keeps TensorFlow off the CPU's bfloat16 instructions")
    return Choice("float32", "auto: the CPU has neither AVX512-BF16 nor AMX, so bfloat16 would be emulated "
                             "(several times slower than float32)")


def _gpu_precision(machine: Machine) -> Choice:
    capabilities = [gpu.compute_capability for gpu in machine.gpus]
    if None in capabilities:
        return Choice("float32", "auto: a GPU that does not report its compute capability")
    lowest = min(capabilities)  # every replica must run the same program
    shown = ".".join(map(str, lowest))
    if lowest >= (8, 0):
        return Choice("mixed_bfloat16", f"auto: GPU compute capability {shown} computes bfloat16 natively")
    if lowest >= (7, 0):
        return Choice("mixed_float16", f"auto: GPU compute capability {shown} has float16 tensor cores but no "
                                       "bfloat16 (float16 needs loss scaling)")
    return Choice("float32", f"auto: GPU compute capability {shown} has no fast half precision")


def _emulated(precision: str, machine: Machine) -> str | None:
    """Why `precision` will be slow here, or None."""
    if precision == "float32":
        return None
    if not machine.gpus:
        if precision == "mixed_float16":
            return "CPUs have no fast float16 arithmetic (it is emulated, slower than float32)"
        if not any(flag in machine.cpu_flags for flag in BFLOAT16_CPU_FLAGS):
            return "this CPU has neither AVX512-BF16 nor AMX: bfloat16 is emulated, several times slower than float32"
        speedup = cached_bfloat16_speedup(machine)  # measured by an earlier `auto`, if any
        if precision == "mixed_bfloat16" and speedup is not None and speedup <= 1:
            return f"bfloat16 measured {speedup:.2f}x as fast as float32 on this CPU"
        return None
    lowest = min((gpu.compute_capability or (0, 0)) for gpu in machine.gpus)
    if precision == "mixed_bfloat16" and lowest < (8, 0):
        return f"GPUs of compute capability {'.'.join(map(str, lowest))} have no native bfloat16"
    if precision == "mixed_float16" and lowest < (7, 0):
        return f"GPUs of compute capability {'.'.join(map(str, lowest))} have no float16 tensor cores"
    return None


def choose_jit(requested: bool | str, machine: Machine) -> Choice:
    """`train.jit_compile` as it will train: `auto` is XLA on GPUs only."""
    if requested != "auto":
        return Choice(bool(requested), "set in params")
    if machine.on_gpu:
        return Choice(True, "auto: on GPUs XLA fuses the loss's element-wise operations")
    return Choice(False, "auto: on CPUs XLA trained slower")


def image_dtype(machine: Machine) -> tf.DType:
    """The dtype the training images are kept in on the device: TensorFlow has no GPU gather kernel for uint8 (the
    gather would run on the host every step), so on GPUs float32 (4 bytes a pixel); on CPUs uint8 (1 byte)."""
    return tf.float32 if machine.on_gpu else tf.uint8


def replica_batch(batch_size: int, replicas: int) -> int:
    """The global batch that trains on `replicas` devices: `batch_size` rounded down to a multiple of them, so that
    each replica gets the same whole number of images (at least one). 100 on 3, 6, 7 or 8 GPUs: 99, 96, 98, 96."""
    return max(1, batch_size // replicas) * replicas
