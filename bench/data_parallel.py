"""Data-parallel scaling on this machine: per-step compute vs all-reduce time.

    python bench/data_parallel.py [--quick] [--eager] [--json FILE]

For the seed and wide workloads: one process with 2 threads and with 1 thread (``TrainStep``),
and 2 gloo ranks × 1 thread (``torchrun``, ``DistributedStep``), each step timed in its three
parts on rank 0: the shard's gradient, the all-reduce of the flat bucket, the update. Compiled
by default (the fastest path of each).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import fnmlp
from fnmlp.train.engine import Batch, Carry
from workloads import WORKLOADS  # bench/'s: a script's own folder is on sys.path


def _batch(name: str, quick: bool):
    workload = WORKLOADS[name]
    model, params, x, y = workload.build("cpu", quick=quick)
    batch = workload.batch_size
    return model, params, x[:batch].contiguous(), y[:batch].contiguous(), workload.lr


def single(name: str, steps: int, compile: bool, quick: bool) -> dict:
    """One process (this one, its current thread count): median step time."""
    model, params, x, y, lr = _batch(name, quick)
    optimizer = fnmlp.sgd(lr)
    step = fnmlp.train_step(model, fnmlp.mse, optimizer, compile=compile)
    opt_state, state = optimizer.init(params), model.state_or_default(None, None)
    out, _ = step.run(Carry(params, opt_state, state), Batch.of(x, y))
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        out, _ = step.run(out, Batch.of(x, y))
        times.append(time.perf_counter() - start)
    return {"step_us": 1e6 * statistics.median(times)}


def ranked(name: str, steps: int, compile: bool, quick: bool) -> dict:
    """This rank of a torchrun job: median gradient, all-reduce and update times."""
    fnmlp.distributed.init(timeout=120)
    model, params, x, y, lr = _batch(name, quick)
    optimizer = fnmlp.sgd(lr)
    step = fnmlp.distributed.DistributedStep(model, fnmlp.mse, optimizer, compile=compile)
    opt_state = optimizer.init(params)
    mine, size = step.shard(x.shape[0])
    xs, ys = x[mine], y[mine]
    ws = torch.ones(xs.shape[0], dtype=x.dtype)
    leaves = torch.utils._pytree.tree_leaves(params)
    opt_leaves = torch.utils._pytree.tree_leaves(opt_state)
    gradient, update = step.parts(params, opt_state, xs, ys, ws)  # timed apart
    parts = {"gradient": [], "all_reduce": [], "update": []}
    bucket = gradient(*leaves, xs, ys, ws)
    for _ in range(steps):
        torch.distributed.barrier()
        t0 = time.perf_counter()
        bucket = gradient(*leaves, xs, ys, ws)
        t1 = time.perf_counter()
        summed = bucket.clone()
        torch.distributed.all_reduce(summed)
        t2 = time.perf_counter()
        outputs = update(*leaves, *opt_leaves, summed)
        t3 = time.perf_counter()
        leaves = list(outputs[:len(leaves)])
        for part, seconds in zip(parts, (t1 - t0, t2 - t1, t3 - t2)):
            parts[part].append(seconds)
    result = {f"{part}_us": 1e6 * statistics.median(t) for part, t in parts.items()}
    result["step_us"] = sum(result.values())
    if compile:  # whole steps: the all-reduce between two graphs, or inside one graph
        state = model.state_or_default(None, None)
        for collective in ("between", "in_graph"):
            whole = fnmlp.distributed.DistributedStep(model, fnmlp.mse, optimizer, compile=True,
                                                      collective=collective)
            out, _ = whole.run(Carry(params, opt_state, state), Batch.of(x, y))
            times = []
            for _ in range(steps):
                torch.distributed.barrier()
                start = time.perf_counter()
                out, _ = whole.run(out, Batch.of(x, y))
                times.append(time.perf_counter() - start)
            result[f"whole_step_{collective}_us"] = 1e6 * statistics.median(times)
    result["bucket_bytes"] = bucket.numel() * bucket.element_size()
    result["rows_per_rank"] = size
    torch.distributed.destroy_process_group()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--eager", action="store_true", help="eager steps instead of compiled")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--role", default="main", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    steps = 10 if args.quick else 200
    compile = not args.eager
    names = ["seed", "wide"]
    if args.role == "rank":
        results = {name: ranked(name, steps, compile, args.quick) for name in names}
        Path(args.out).with_suffix(f".{os.environ.get('RANK', '0')}.json").write_text(
            json.dumps(results))
        return
    if args.role == "single":
        results = {name: single(name, steps, compile, args.quick) for name in names}
        Path(args.out).write_text(json.dumps(results))
        return
    figures = {}
    with tempfile.TemporaryDirectory() as folder:
        for threads in (2, 1):
            out = Path(folder) / f"single{threads}.json"
            env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
            subprocess.run([sys.executable, __file__, "--role", "single", "--out", str(out),
                            *(["--quick"] if args.quick else []),
                            *(["--eager"] if args.eager else [])], env=env, check=True)
            figures[f"1 process x {threads} threads"] = json.loads(out.read_text())
        out = Path(folder) / "ranks"
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                        __file__, "--role", "rank", "--out", str(out),
                        *(["--quick"] if args.quick else []),
                        *(["--eager"] if args.eager else [])], env=env, check=True)
        figures["2 ranks x 1 thread (rank 0)"] = json.loads(out.with_suffix(".0.json")
                                                            .read_text())
    mode = "eager" if args.eager else "compiled"
    print(f"\n== data-parallel on this machine ({os.cpu_count()} cores, gloo), {mode} steps, "
          "medians in µs")
    for name in names:
        ranks = figures["2 ranks x 1 thread (rank 0)"][name]
        one, two = (figures[f"1 process x {t} threads"][name]["step_us"] for t in (1, 2))
        print(f"{name}: 1 process x 2 threads {two:.0f}; 1 process x 1 thread {one:.0f}"
              f"; 2 ranks x 1 thread {ranks['step_us']:.0f} (gradient {ranks['gradient_us']:.0f}"
              f" + all-reduce {ranks['all_reduce_us']:.0f} of {ranks['bucket_bytes']} bytes + "
              f"update {ranks['update_us']:.0f}), {ranks['rows_per_rank']} rows per rank")
        if "whole_step_in_graph_us" in ranks:
            print(f"  whole step, all-reduce between two graphs "
                  f"{ranks['whole_step_between_us']:.0f}, inside one graph "
                  f"{ranks['whole_step_in_graph_us']:.0f}")
    if args.json:
        args.json.write_text(json.dumps({"torch": torch.__version__, "mode": mode,
                                         "figures": figures}, indent=2))


if __name__ == "__main__":
    main()
