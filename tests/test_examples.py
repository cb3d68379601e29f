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
