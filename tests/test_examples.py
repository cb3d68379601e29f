"""The examples run end to end through the public API."""

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def test_seed_notebook_example_runs():
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "seed_notebook.py"),
                          "--epochs", "2"], capture_output=True, text=True, timeout=300,
                         check=True).stdout
    assert "MAPE of predictions after copying parameters:  0" in out
    assert "step by step:" in out
    assert out.count("|") >= 3 * 2


def test_classification_example_runs():
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "classification.py"),
                          "--epochs", "2"], capture_output=True, text=True, timeout=300,
                         check=True).stdout
    assert "test accuracy" in out and "max rel diff" in out


def test_data_parallel_example_runs_on_two_ranks():
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          str(ROOT / "examples" / "data_parallel.py"), "--epochs", "2"],
                         capture_output=True, text=True, timeout=300, check=True).stdout
    lines = [line for line in out.splitlines() if "step by step" in line]
    assert len(lines) == 2
    for line in lines:
        assert float(line.rsplit(" ", 1)[1]) <= 1e-13
