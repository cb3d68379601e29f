"""``python bench/run.py --workload threads``: one thread or all, by step size.

The seed network (6-w-w-w-w-3, its activations, MSE, SGD, batch 333) at hidden widths w from
32 to 512: the median step time of fnmlp's eager and compiled steps with ``threads=1`` against
``threads=N`` (torch's current count), side by side in one run, and the step's size in
multiply-adds. ``fnmlp.train_step(threads="auto")`` measures the same choice for each step
shape on the machine it runs on (``fnmlp.train._calibration``); this table shows where the
crossover lies here (run it with ``--load 1`` too: a busy core changes the answer).
"""

from __future__ import annotations

import statistics
import time

import torch

import fnmlp
from fnmlp import workloads as seed
from fnmlp.train.engine import choose_threads, step_work

WIDTHS = (32, 64, 128, 256, 512)


def model_of(width: int) -> fnmlp.MLP:
    *hidden, (last_activation, outputs) = seed.SEED_LAYERS
    return fnmlp.MLP(seed.SEED_FEATURES, [*(fnmlp.Dense(width, activation)
                                            for activation, _ in hidden),
                                          fnmlp.Dense(outputs, last_activation)])


def _timer(model, dtype, compile: bool, threads: int):
    params = model.init(torch.Generator().manual_seed(0), dtype=dtype)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(seed.SEED_BATCH_SIZE, model.in_features, generator=g, dtype=dtype)
    y = torch.randn(seed.SEED_BATCH_SIZE, model.out_features, generator=g, dtype=dtype)
    optimizer = fnmlp.sgd(seed.SEED_LR)
    step = fnmlp.train_step(model, fnmlp.mse, optimizer, compile=compile, threads=threads)
    state = [params, optimizer.init(params)]

    def run(repeats: int) -> float:
        start = time.perf_counter()
        for _ in range(repeats):
            state[0], state[1], _ = step(state[0], state[1], x, y)
        return (time.perf_counter() - start) / repeats

    run(3)  # compiles (a graph per thread count), warms up
    return run


def run(quick: bool = False, dtype: torch.dtype = torch.float64, rounds: int = 9) -> dict:
    widths = WIDTHS[:2] if quick else WIDTHS
    rounds, repeats = (2, 3) if quick else (rounds, 20)
    available = torch.get_num_threads()
    counts = sorted({1, available})
    rows = []
    for width in widths:
        model = model_of(width)
        for compile in (False, True):
            timers = {n: _timer(model, dtype, compile, n) for n in counts}
            times = {n: [] for n in counts}
            for _ in range(rounds):  # interleaved: each count sees the same machine
                for n in counts:
                    times[n].append(timers[n](repeats))
            medians = {n: statistics.median(t) for n, t in times.items()}
            work = step_work(model, seed.SEED_BATCH_SIZE)
            rows.append({"width": width, "step": "compiled" if compile else "eager",
                         "multiply_adds": work, "median_s": {str(n): m for n, m in medians.items()},
                         "auto_threads": choose_threads("auto", model, seed.SEED_BATCH_SIZE)})
    return {"dtype": str(dtype).replace("torch.", ""), "threads": available, "counts": counts,
            "rounds": rounds, "repeats": repeats, "rows": rows}


def format_result(result: dict) -> str:
    counts = result["counts"]
    lines = [f"\n== threads: seed network by hidden width ({result['dtype']}, batch "
             f"{seed.SEED_BATCH_SIZE}; median of {result['rounds']} rounds x "
             f"{result['repeats']} steps, interleaved)",
             f"{'width':>5} {'step':<9} {'M mul-add':>9} "
             + " ".join(f"{f'{n} thr µs':>11}" for n in counts)
             + f" {'1 / N':>6} {'auto':>5}"]
    for row in result["rows"]:
        m = row["median_s"]
        ratio = m["1"] / m[str(counts[-1])]
        lines.append(f"{row['width']:>5} {row['step']:<9} {row['multiply_adds'] / 1e6:>9.1f} "
                     + " ".join(f"{m[str(n)] * 1e6:>11.1f}" for n in counts)
                     + f" {ratio:>5.2f}x {row['auto_threads']:>5}")
    lines.append("1 / N < 1: one thread is faster; auto: the count threads='auto' picks")
    return "\n".join(lines)
