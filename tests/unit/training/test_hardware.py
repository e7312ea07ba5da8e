"""What `auto` makes of a machine (precision, XLA, the images' dtype, the global batch), and the Trainer applying it."""

import logging
import random

import keras
import numpy as np
import pytest
import tensorflow as tf

from cvae_pipeline.training import hardware
from cvae_pipeline.training.hardware import Gpu, Machine, choose_jit, choose_precision, parse_cpuinfo, replica_batch
from helpers import make_trainer, params_with

ZEN3 = Machine("AMD EPYC 7763 64-Core Processor", frozenset({"fpu", "sse2", "avx", "avx2", "fma"}))
ZEN4 = Machine("AMD EPYC 9654 96-Core Processor", frozenset({"avx2", "avx512f", "avx512_bf16"}))
SAPPHIRE_RAPIDS = Machine("Intel(R) Xeon(R) Platinum 8480+", frozenset({"avx2", "avx512f", "avx512_bf16", "amx_bf16"}))
# A cloud VM's Xeon that shows AVX512-BF16 and AVX512-FP16 but no AMX: bfloat16 trained at 0.65x float32 there.
XEON_WITHOUT_AMX = Machine("Intel(R) Xeon(R) Processor", frozenset({"avx2", "avx512f", "avx512_bf16", "avx512_fp16"}))
SPEEDUPS = {ZEN4: 1.3, SAPPHIRE_RAPIDS: 2.0, XEON_WITHOUT_AMX: 0.67}  # bfloat16 over float32, as a probe measures it


def speedup_of(machine: Machine) -> float:
    return SPEEDUPS[machine]  # a KeyError: measured on a machine where it should not be


def gpus(*capabilities) -> Machine:
    return Machine("host", frozenset({"avx2"}), tuple(Gpu(f"GPU {c}", c) for c in capabilities))


def test_cpuinfo_gives_the_model_and_the_first_cores_flags():
    text = ("processor\t: 0\nmodel name\t: AMD EPYC 9654\nflags\t\t: fpu avx2 avx512f avx512_bf16\n\n"
            "processor\t: 1\nmodel name\t: other\nflags\t\t: fpu\n")
    model, flags = parse_cpuinfo(text)
    assert model == "AMD EPYC 9654"
    assert flags == {"fpu", "avx2", "avx512f", "avx512_bf16"}
    assert Machine(model, flags).describe() == "CPU (AMD EPYC 9654; avx2 avx512f avx512_bf16)"


@pytest.mark.parametrize(("machine", "precision", "why"), [
    (ZEN3, "float32", "neither AVX512-BF16 nor AMX"),
    (ZEN4, "mixed_bfloat16", "natively (avx512_bf16), and bfloat16 measured 1.30x as fast as float32"),
    (SAPPHIRE_RAPIDS, "mixed_bfloat16", "amx_bf16"),
    (XEON_WITHOUT_AMX, "float32", "the CPU has avx512_bf16, but bfloat16 measured 0.67x as fast as float32"),
    (gpus((6, 1)), "float32", "compute capability 6.1"),
    (gpus((7, 0)), "mixed_float16", "compute capability 7.0 has float16 tensor cores"),
    (gpus((7, 5), (7, 5)), "mixed_float16", "7.5"),
    (gpus((8, 0)), "mixed_bfloat16", "compute capability 8.0 computes bfloat16"),
    (gpus((9, 0), (7, 0)), "mixed_float16", "7.0"),  # every replica runs the same program: the weakest decides
    (gpus(None), "float32", "does not report"),
])
def test_auto_precision_is_what_the_hardware_computes_natively_and_measures_faster(machine, precision, why):
    choice = choose_precision("auto", machine, speedup_of)
    assert choice.value == precision
    assert why in choice.reason and choice.reason.startswith("auto: ")


@pytest.mark.parametrize(("machine", "precision", "warned"), [
    (ZEN3, "mixed_bfloat16", "bfloat16 is emulated"), (ZEN3, "mixed_float16", "no fast float16"),
    (ZEN4, "mixed_bfloat16", None), (ZEN4, "float32", None),
    (XEON_WITHOUT_AMX, "mixed_bfloat16", "bfloat16 measured 0.67x as fast as float32 on this CPU"),
    (XEON_WITHOUT_AMX, "float32", None),
    (gpus((7, 5)), "mixed_bfloat16", "no native bfloat16"), (gpus((8, 0)), "mixed_float16", None),
])
def test_an_explicit_precision_is_kept_with_a_warning_when_the_hardware_emulates_it_or_measured_it_slower(
        machine, precision, warned, caplog, monkeypatch):
    monkeypatch.setattr(hardware, "cached_bfloat16_speedup", lambda found: SPEEDUPS.get(found))  # measured before
    with caplog.at_level(logging.WARNING, logger=hardware.__name__):
        assert choose_precision(precision, machine, speedup_of).value == precision
    if warned:
        assert f"train.precision={precision}: " in caplog.text and warned in caplog.text
        assert "`auto` would choose" in caplog.text
    else:
        assert caplog.text == ""


def test_auto_jit_compiles_with_xla_on_gpus_only():
    assert choose_jit("auto", gpus((8, 0))).value is True
    assert choose_jit("auto", ZEN4).value is False
    assert choose_jit(True, ZEN4) == hardware.Choice(True, "set in params")


@pytest.mark.parametrize(("replicas", "batch"), [(1, 100), (2, 100), (3, 99), (4, 100), (5, 100), (6, 96), (7, 98),
                                                 (8, 96)])
def test_the_default_batch_rounds_down_to_whole_images_per_replica_on_1_to_8_devices(replicas, batch):
    assert replica_batch(100, replicas) == batch
    assert batch % replicas == 0


def test_a_batch_smaller_than_the_replicas_gives_each_one_image():
    assert replica_batch(3, 8) == 8


def small(**train):
    return params_with(model={"latent_dim": 4}, train={"batch_size": 32, "learning_rate": 1e-3, "epochs": 1, **train})


@pytest.mark.parametrize(("machine", "policy"), [(ZEN3, "float32"), (ZEN4, "mixed_bfloat16"),
                                                 (XEON_WITHOUT_AMX, "float32")])
def test_the_trainer_trains_in_the_precision_auto_chose(small_data, machine, policy, monkeypatch):
    monkeypatch.setattr(hardware, "measured_bfloat16_speedup", speedup_of)
    try:
        trainer = make_trainer(small(precision="auto", jit_compile="auto"), small_data, machine)
        assert trainer.precision.value == policy
        assert keras.mixed_precision.dtype_policy().name == policy
        assert trainer.jit_compile.value is False
        assert trainer.settings()["precision"] == policy and trainer.settings()["device"] == machine.describe()
    finally:
        keras.mixed_precision.set_dtype_policy("float32")


def test_on_a_gpu_the_images_are_kept_in_a_dtype_with_a_gather_kernel_and_train_the_same(small_data):
    params = small(precision="float32", jit_compile=False)
    on_cpu = make_trainer(params, small_data, ZEN3)
    assert on_cpu.training_set.replica_images.dtype == tf.uint8
    cpu_loss = on_cpu.train_epoch(1)["train_loss"]
    on_gpu = make_trainer(params, small_data, gpus((8, 0)))  # what it keeps; the ops still run on this CPU
    assert on_gpu.training_set.replica_images.dtype == tf.float32
    np.testing.assert_array_equal(on_gpu.training_set.replica_images.numpy(), small_data.train.images[..., None])
    assert on_gpu.train_epoch(1)["train_loss"] == cpu_loss


@pytest.mark.parametrize(("limit", "precision"), [(None, "mixed_bfloat16"), ("avx2", "float32"),
                                                  ("AVX512_CORE", "float32"), ("AVX512_CORE_AMX", "mixed_bfloat16")])
def test_a_onednn_isa_limit_below_bfloat16_makes_auto_take_float32(limit, precision, tmp_path, monkeypatch):
    monkeypatch.setattr(hardware, "measured_bfloat16_speedup", lambda machine: 1.3)
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("model name\t: AMD EPYC 9654\nflags\t\t: avx2 avx512f avx512_bf16\n")
    monkeypatch.setattr(hardware, "CPUINFO", cpuinfo)
    if limit:
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", limit)
    else:
        monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    machine = hardware.detect()
    choice = choose_precision("auto", machine)
    assert choice.value == precision
    if precision == "float32":
        assert f"ONEDNN_MAX_CPU_ISA={limit.upper()} keeps TensorFlow off" in choice.reason
        assert machine.describe() == f"CPU (AMD EPYC 9654; avx2 avx512f ONEDNN_MAX_CPU_ISA={limit.upper()})"


def seeded_draws() -> list:
    """What a seed fixes: Python's, NumPy's, TensorFlow's and Keras' random draws."""
    return [random.random(), np.random.random(), float(tf.random.normal(())), float(keras.random.normal(()))]


def test_the_probe_measures_bfloat16_against_float32_without_touching_the_seeded_draws():
    keras.utils.set_random_seed(7)
    expected = seeded_draws()
    keras.utils.set_random_seed(7)
    speedup = hardware.bfloat16_speedup()
    assert seeded_draws() == expected
    assert 0.02 < speedup < 50  # a ratio of two measured rates, whatever this CPU makes of bfloat16


def test_a_machine_measures_once_and_then_always_chooses_the_same(tmp_path, monkeypatch):
    measured = []

    def probe() -> float:
        measured.append(1)
        return 1.2 if len(measured) % 2 else 0.8  # noise about 1: uncached, the choice would flip from run to run

    monkeypatch.setenv("CVAE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(hardware, "bfloat16_speedup", probe)
    choices = {choose_precision("auto", ZEN4).value for _ in range(3)}
    assert choices == {"mixed_bfloat16"} and len(measured) == 1
    assert choose_precision("auto", XEON_WITHOUT_AMX).value == "float32" and len(measured) == 2  # another CPU
    for damaged in (tmp_path / "cache").iterdir():  # a damaged cache is measured again
        damaged.write_text("{")
    assert choose_precision("auto", ZEN4).value == "mixed_bfloat16" and len(measured) == 3
    monkeypatch.setenv("CVAE_CACHE_DIR", "/proc/not-writable")  # a cache that cannot be written costs only the time
    assert choose_precision("auto", ZEN4).reason.endswith("measured 0.80x as fast as float32 on the model's "
                                                          "convolutions") and len(measured) == 4
