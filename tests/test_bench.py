"""bench/run.py --quick runs end to end, so the benchmark never rots (timings not asserted)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def test_bench_quick_runs_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    printed = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), "--quick", "--json", str(out)],
        capture_output=True, text=True, timeout=900, check=True).stdout
    figures = json.loads(out.read_text())
    assert [r["workload"] for r in figures["results"]] == ["seed", "wide"]
    for result in figures["results"]:
        names = [row["contender"] for row in result["rows"]]
        for expected in ["fnmlp eager", "fnmlp compiled", "fnmlp fit (chunked)",
                         "PyTorch eager", "PyTorch compiled", "GEMM floor"]:
            assert expected in names
        chunked = next(r for r in result["rows"] if r["contender"] == "fnmlp fit (chunked)")
        assert chunked["steps_per_call"] == 3  # --quick: 2 batches + 1 row
        assert any(name.startswith("scikit-learn") for name in names)
        for row in result["rows"]:
            assert row["step_median_s"] > 0 and row["ratio_to_gemm_floor"] > 0
        tolerance = 1e-12 if result["dtype"] == "float64" else 1e-4
        assert result["parity"]["eager"] <= tolerance
        assert result["parity"]["compiled"] <= tolerance
    assert "fnmlp compiled" in printed and "parity" in printed


def test_bench_sklearn_workload_quick(tmp_path):
    out = tmp_path / "sklearn.json"
    printed = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), "--workload", "sklearn", "--quick",
         "--json", str(out)], capture_output=True, text=True, timeout=900, check=True).stdout
    figures = json.loads(out.read_text())
    assert [r["data"].split()[0] for r in figures["results"]] == [
        "diabetes", "digits", "breast_cancer", "synthetic"]
    for result in figures["results"]:
        for library in ("fnmlp", "sklearn"):
            assert len(result[library]["fit_s"]) == 2 and result[library]["fit_s_median"] > 0
    assert "speed-up" in printed


def test_bench_ensemble_and_sweep_workloads_quick(tmp_path):
    out = tmp_path / "ensemble.json"
    printed = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), "--workload", "ensemble", "--quick",
         "--sizes", "2", "--dtype", "float32", "--json", str(out)], capture_output=True,
        text=True, timeout=900, check=True).stdout
    figures = json.loads(out.read_text())
    (result,) = figures["results"]
    assert result["size"] == 2 and result["dtype"] == "float32"
    for name in ("fnmlp ensemble", "fnmlp ensemble (chunked)", "fnmlp sequential",
                 "torch.func vmap", "GEMM floor"):
        assert result["step_ms"][name] > 0
    assert "per-member" in printed
    out = tmp_path / "sweep.json"
    printed = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), "--workload", "sweep", "--quick",
         "--json", str(out)], capture_output=True, text=True, timeout=900, check=True).stdout
    figures = json.loads(out.read_text())
    assert figures["widths"] == [16, 32]
    for name in ("fnmlp eager", "fnmlp compiled"):
        assert figures["results"][name]["total_s"] > 0
    assert "sweep" in printed


def test_the_benchmark_charts_read_their_tables():
    """``docs/scripts/plot_benchmarks.py`` draws each chart from a table of the benchmark
    pages, found by its header: every table it reads is there, with numbers in its cells
    (drawing needs matplotlib, which only the chart script itself uses)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "plot_benchmarks", ROOT / "docs" / "scripts" / "plot_benchmarks.py")
    charts = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(charts)
    drawn = []
    charts.bars = lambda path, title, labels, values, *rest: drawn.append((path.name, values))
    charts.grouped = lambda path, title, groups, series, *rest: drawn.append(
        (path.name, [v for values in series.values() for v in values]))
    charts.main()
    assert sorted(name for name, _ in drawn) == ["cpu-ensembles.svg", "cpu-jax.svg",
                                                 "gpu-ensembles.svg", "gpu-seed.svg"]
    for name, values in drawn:
        assert values and all(v > 0 for v in values), name
        assert (ROOT / "docs" / "benchmarks" / "img" / name).is_file(), name
