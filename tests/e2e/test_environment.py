"""The environment is reproducible like the data: uv.lock matches pyproject.toml, and make never installs a stale lock;
the Makefile picks the GPU build only where a GPU is listed; CI lets no test skip itself unseen."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import no_skips
from helpers import REPO

UV = shutil.which("uv") or str(REPO / ".tools/bin/uv")  # as the Makefile finds it; make installs the latter


@pytest.fixture(scope="module")
def uv():
    if not Path(UV).is_file():
        pytest.skip("no uv: `make venv` installs it into .tools/")
    return UV


def test_the_committed_lock_matches_pyproject(uv):
    checked = subprocess.run([uv, "lock", "--check"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert checked.returncode == 0, checked.stderr[-2000:]


def test_make_refuses_a_lock_that_no_longer_matches_pyproject(uv, tmp_path):
    for name in ("Makefile", "pyproject.toml", "uv.lock", "README.md"):
        shutil.copy(REPO / name, tmp_path / name)
    shutil.copytree(REPO / "src", tmp_path / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace('    "tabulate>=0.10,<1",\n',
                                                       '    "tabulate>=0.10,<1",\n    "six>=1.16",\n'))
    made = subprocess.run(["make", "venv", f"UV={uv}", "EXTRAS="], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert made.returncode != 0
    assert "needs to be updated" in made.stderr and "--locked" in made.stderr
    assert not (tmp_path / ".venv/.installed").exists()


# What nvidia-smi -L prints with a GPU, and without a driver (NVIDIA-SMI has failed ..., exit status 9).
@pytest.mark.parametrize(("script", "gpu"), [("echo 'GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)'", True),
                                             ("echo 'NVIDIA-SMI has failed' >&2; exit 9", False)])
def test_make_installs_the_gpu_build_where_nvidia_smi_lists_a_gpu(script, gpu, tmp_path):
    (tmp_path / "nvidia-smi").write_text(f"#!/bin/sh\n{script}\n")
    (tmp_path / "nvidia-smi").chmod(0o755)
    planned = subprocess.run(["make", "-n", "-B", "venv", f"VENV={tmp_path / 'venv'}"], cwd=REPO, capture_output=True,
                             text=True, env={**os.environ, "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}"})
    assert planned.returncode == 0, planned.stderr
    assert " sync --locked" in planned.stdout
    assert ("--extra gpu" in planned.stdout) == gpu, planned.stdout


def test_on_ci_a_test_that_skips_itself_fails_and_elsewhere_it_skips(tmp_path):
    (tmp_path / "test_skipped_module.py").write_text(
        "import pytest\n\npytest.importorskip('no_such_module_anywhere')\n")
    (tmp_path / "test_inner.py").write_text(
        "import pytest\n\n"
        "@pytest.fixture\ndef server():\n    pytest.skip('no server here')\n\n"
        "def test_needs_a_server(server):\n    pass\n\n"
        "@pytest.mark.xfail(reason='known')\ndef test_known_failure():\n    assert False\n\n"
        "def test_runs():\n    pass\n")

    def inner_pytest(*names: str, **env) -> tuple[int, dict[str, int], str]:
        """Its exit status, its summary ({"passed": 1, ...}) and its output."""
        environment = {key: value for key, value in os.environ.items() if key != no_skips.ENV}
        result = subprocess.run([sys.executable, "-m", "pytest", "-p", "no_skips", "-p", "no:cacheprovider", "-q",
                                 "-o", "addopts=", *names], cwd=tmp_path, capture_output=True, text=True,
                                env={**environment, "PYTHONPATH": str(REPO / "tests"), **env}, timeout=120)
        last = result.stdout.splitlines()[-1]  # "1 passed, 1 skipped, 1 xfailed in 0.1s"
        return result.returncode, {kind: int(count) for count, kind in re.findall(r"(\d+) (\w+)", last)}, result.stdout

    ci = {no_skips.ENV: "1"}
    status, counts, output = inner_pytest("test_inner.py", "test_skipped_module.py")
    assert status == 0 and counts == {"passed": 1, "skipped": 2, "xfailed": 1}, output
    status, counts, output = inner_pytest("test_inner.py", **ci)
    assert status != 0 and counts == {"passed": 1, "xfailed": 1, "error": 1}, output
    assert "no server here" in output
    status, counts, output = inner_pytest("test_skipped_module.py", **ci)
    assert status != 0 and "skipped" not in counts and "no_such_module_anywhere" in output, output
