"""The exactness tests under each x86 CPU capability this machine can run.

ATen builds each vectorized CPU kernel once per capability (AVX2, AVX512) and dispatches to the
best the CPU has, so a bit identity that holds at AVX512 may not at AVX2 (other SIMD widths,
other lane orders: how softmax's row sums once differed). ``ATEN_CPU_CAPABILITY=avx2`` makes
torch dispatch to its AVX2 kernels on an AVX512 CPU, so one machine checks both. This test
reruns the suite's exactness-sensitive tests in subprocesses, under ``avx2`` and under the
machine's default, and asserts that both pass: the bit identities with autograd and with the
``nn.Module`` twin (softmax's and log-softmax's row sums, every activation's backward, MSE,
cross-entropy, the free-running seed run) and the layout tests.

Checked on a 2-core AMD EPYC VM with AVX512, torch 2.13.0 CPU (both capabilities pass; 30 s
to a minute, the two runs side by side). Eager tests only: no compiles.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest
import torch

TESTS = pathlib.Path(__file__).resolve().parent
ROOT = TESTS.parent
EXACTNESS_TESTS = [
    "tests/nn/test_row_sums.py",
    "tests/nn/test_primitives.py::test_backward_is_bit_identical_to_autograd_on_cpu",
    "tests/nn/test_primitives.py::test_mse_matches_autograd",
    "tests/nn/test_losses.py::test_cross_entropy_on_labels_is_autograds_to_the_bit",
    "tests/test_api.py::test_value_and_grad_matches_the_twins_autograd_gradients",
    "tests/parity/test_parity.py::test_free_seed_run_is_bit_identical_to_the_twin_on_cpu",
    "tests/test_layouts.py",
]
AVX2_OR_BETTER = ("AVX2", "AVX512")
TIMEOUT = 600


def _environment(capability: str | None) -> dict[str, str]:
    """This process's environment with ``ATEN_CPU_CAPABILITY`` set (None: removed, the
    machine's default)."""
    env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
    if capability is not None:
        env["ATEN_CPU_CAPABILITY"] = capability
    return env


def _reported(capability: str | None) -> str:
    """What torch reports in a process started with ``capability``."""
    return subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
        env=_environment(capability), capture_output=True, text=True, check=True, cwd=ROOT,
        timeout=TIMEOUT).stdout.strip()


def _start(capability: str | None) -> subprocess.Popen:
    """``python -m pytest -q -x`` over the exactness tests, started, under ``capability``."""
    command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
               "-m", "not slow", *EXACTNESS_TESTS]
    return subprocess.Popen(command, env=_environment(capability), cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


@pytest.mark.slow
def test_the_exactness_tests_pass_under_avx2_and_the_default_capability():
    default = torch.backends.cpu.get_cpu_capability()
    if os.environ.get("ATEN_CPU_CAPABILITY") is not None:
        default = _reported(None)
    if default not in AVX2_OR_BETTER:
        pytest.skip(f"this CPU runs ATen at {default}, without AVX2")
    assert _reported("avx2") == "AVX2"
    runs = {"avx2": _start("avx2"), f"default ({default})": _start(None)}  # side by side
    try:
        for name, run in runs.items():
            output, _ = run.communicate(timeout=TIMEOUT)
            tail = "\n".join(output.splitlines()[-30:])
            assert run.returncode == 0, f"the exactness tests failed under {name}:\n{tail}"
            assert " passed" in tail and " failed" not in tail, tail
    finally:
        for run in runs.values():  # a run left behind by a failure or a timeout
            if run.poll() is None:
                run.kill()
                run.wait()
