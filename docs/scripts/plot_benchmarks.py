"""Draw the benchmark pages' charts from their own tables:
``python docs/scripts/plot_benchmarks.py`` (needs matplotlib) writes
``docs/benchmarks/img/*.svg``.

Each chart reads one table of ``docs/benchmarks/cpu.md`` or ``gpu.md`` (found by the start of
its header row), so a chart shows exactly the numbers of the table beside it; re-run this after
changing a table.
"""

from __future__ import annotations

import re
from pathlib import Path

PAGES = Path(__file__).resolve().parents[1] / "benchmarks"
OUT = PAGES / "img"


def table(page: str, header_start: str) -> list[list[str]]:
    """The body rows (cells stripped of ``**``) of the table in ``page`` whose header row
    starts with ``header_start``."""
    lines = (PAGES / page).read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip().replace("**", "") for cell in line.strip("|").split("|")])
    return rows


def number(cell: str) -> float:
    """The first number of a cell ("416 µs (0.94×)" → 416.0)."""
    return float(re.search(r"[\d.]+", cell.replace(",", "")).group())


def _pyplot():
    """matplotlib's pyplot, drawing off screen, with SVG ids fixed (the same chart is the same
    file)."""
    import matplotlib

    matplotlib.use("Agg")
    matplotlib.rcParams["svg.hashsalt"] = "fnmlp"
    import matplotlib.pyplot as plt

    return plt


def bars(path: Path, title: str, labels: list[str], values: list[float], unit: str,
         highlight: set[str]) -> None:
    """A horizontal bar chart, fnmlp's bars in colour."""
    plt = _pyplot()

    figure, axes = plt.subplots(figsize=(8, 0.42 * len(labels) + 1.2))
    colours = ["#d9480f" if label in highlight else "#868e96" for label in labels]
    axes.barh(labels[::-1], values[::-1], color=colours[::-1])
    for y, value in enumerate(values[::-1]):
        axes.text(value, y, f" {value:g}", va="center", fontsize=8)
    axes.set_xlabel(unit)
    axes.set_title(title, fontsize=10, loc="left")
    axes.spines[["top", "right"]].set_visible(False)
    figure.tight_layout()
    figure.savefig(path, metadata={"Date": None})
    plt.close(figure)


def grouped(path: Path, title: str, groups: list[str], series: dict[str, list[float]],
            unit: str) -> None:
    """Grouped vertical bars: one group per row, one bar per series."""
    plt = _pyplot()

    figure, axes = plt.subplots(figsize=(10, 4))
    width = 0.8 / len(series)
    palette = ["#d9480f", "#f08c00", "#1c7ed6", "#74c0fc", "#868e96"]
    for i, (name, values) in enumerate(series.items()):
        axes.bar([g + i * width for g in range(len(groups))], values, width, label=name,
                 color=palette[i % len(palette)])
    axes.set_xticks([g + width * (len(series) - 1) / 2 for g in range(len(groups))],
                    groups, fontsize=8)
    axes.set_ylabel(unit)
    axes.set_title(title, fontsize=10)
    axes.legend(fontsize=8, frameon=False)
    axes.spines[["top", "right"]].set_visible(False)
    figure.tight_layout()
    figure.savefig(path, metadata={"Date": None})
    plt.close(figure)


def _short(setting: str) -> str:
    """A table's setting ("float32, 2 threads, 1 busy, flushed") as a short tick label."""
    words = {"1 busy process": "1 busy", "denormals flushed": "flushed"}
    return "\n".join(words.get(part, part) for part in setting.split(", "))


def main() -> None:
    OUT.mkdir(exist_ok=True)
    rows = table("gpu.md", "| seed (float64, batch 333)")
    bars(OUT / "gpu-seed.svg", "Seed step, NVIDIA H200, float64 (lower is better)",
         [r[0].replace("`", "") for r in rows], [number(r[2]) for r in rows], "µs per step",
         {"fnmlp compiled (train_step, one call)", "fnmlp fit (chunked)", "fnmlp eager"})
    rows = table("gpu.md", "| K | fnmlp ensemble |")
    grouped(OUT / "gpu-ensembles.svg", "Ensembles of K seed networks on an H200 (float32): µs "
            "per step for all K", [f"K = {r[0]}" for r in rows],
            {"fnmlp ensemble": [number(r[1]) for r in rows],
             "fnmlp ensemble, chunked": [number(r[2]) for r in rows],
             "JAX jit(vmap)": [number(r[3]) for r in rows],
             "JAX jit(lax.scan(vmap))": [number(r[4]) for r in rows]}, "µs per step")
    rows = table("cpu.md", "| seed step, batch 333 |")
    grouped(OUT / "cpu-jax.svg", "Seed step on a 2-core CPU against JAX jit and PyTorch eager: "
            "µs per step", [_short(r[0]) for r in rows],
            {"fnmlp compiled": [number(r[1]) for r in rows],
             "JAX jit": [number(r[2]) for r in rows],
             "PyTorch eager": [number(r[3]) for r in rows],
             "GEMM floor": [number(r[4]) for r in rows]}, "µs per step")
    rows = [r for r in table("cpu.md", "| K | dtype | fnmlp ensemble |") if r[1] == "float32"]
    grouped(OUT / "cpu-ensembles.svg", "Ensembles on a 2-core CPU (float32): µs per member "
            "and step", [f"K = {r[0]}" for r in rows],
            {"fnmlp ensemble": [number(r[2]) for r in rows],
             "K sequential compiled steps": [number(r[3]) for r in rows],
             "torch.func recipe": [number(r[4]) for r in rows],
             "JAX jit(vmap)": [number(r[5]) for r in rows]}, "µs per member and step")


if __name__ == "__main__":
    main()
