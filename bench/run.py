"""fnmlp against its peers, side by side in one process: ``python bench/run.py``.

For every workload and contender: median step time (min-max over rounds, contenders measured
round-robin so that machine noise hits all alike), epoch time, samples/s, ratio to PyTorch
eager, ratio to the GEMM floor (the step's matrix products alone) and first-call (compile)
time; a parity line; cold and warm compile times of fnmlp's compiled step in fresh processes.
The chunked contenders (fnmlp's ``run_chunk``, JAX's ``jit(lax.scan)``) run the epoch's N
batches per call, the short last one padded with rows of weight 0: their step time is the
call's over N.

    python bench/run.py [--workload seed|wide|all|sklearn|ensemble|sweep|threads] [--load N]
                        [--device cpu|cuda] [--dtype float32|float64]
                        [--batch-size N] [--threads N] [--quick] [--json PATH] [--plot PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import fnmlp
# siblings in bench/: run as a script, its own folder is on sys.path
from contenders import (FnmlpChunkContender, FnmlpContender, GemmFloor, JaxContender,
                        JaxScanContender, JaxUnavailable, SklearnContender, TorchContender,
                        synchronize)
from workloads import WORKLOADS

HERE = Path(__file__).resolve().parent


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="fnmlp benchmark")
    parser.add_argument("--workload", default="all",
                        choices=["all", *WORKLOADS, "sklearn", "ensemble", "sweep", "threads"],
                        help="'all': the step workloads; 'sklearn': whole fits against "
                             "sklearn.neural_network (minutes); 'ensemble': K networks in one "
                             "step against K sequential steps, torch.func and JAX (minutes); "
                             "'sweep': fits over hidden widths, compiles included; 'threads': "
                             "steps on one thread against all, by hidden width")
    parser.add_argument("--sizes", type=str, default=None,
                        help="ensemble sizes for --workload ensemble, e.g. 1,8,32,128")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["float32", "float64"], default=None,
                        help="override the workload's dtype")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None,
                        help="threads for every contender (default: torch's current count)")
    parser.add_argument("--rounds", type=int, default=None, help="timing rounds")
    parser.add_argument("--quick", action="store_true", help="a smoke run: few rounds, small data")
    parser.add_argument("--no-compile-time", action="store_true",
                        help="skip the cold/warm compile measurement in fresh processes")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    parser.add_argument("--plot", type=Path, default=None, help="write a PNG bar chart here")
    parser.add_argument("--load", type=int, default=0,
                        help="N busy processes (one spinning loop each) run beside the "
                             "measurement, the same for every contender: a shared machine")
    return parser.parse_args(argv)


@contextlib.contextmanager
def busy_processes(count: int):
    """``count`` processes spinning a core each while the block runs (``--load``)."""
    processes = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
                 for _ in range(count)]
    try:
        yield
    finally:
        for process in processes:
            process.kill()
            process.wait()


def time_rounds(contenders, method: str, rounds: int, repeats: int, device: str):
    """Seconds per call of ``method`` for each contender, one list of rounds each."""
    times = {c.name: [] for c in contenders if getattr(c, method) is not None}
    for _ in range(rounds):
        for contender in contenders:
            function = getattr(contender, method)
            if function is None:
                continue
            synchronize(device)
            start = time.perf_counter()
            for _ in range(repeats):
                function()
            synchronize(device)
            times[contender.name].append((time.perf_counter() - start) / repeats)
    return times


def per_step(contenders, times: dict[str, list[float]]) -> dict[str, list[float]]:
    """Seconds per step from seconds per call: a chunked contender's over its
    ``steps_per_call``."""
    calls = {c.name: getattr(c, "steps_per_call", 1) for c in contenders}
    return {name: [t / calls[name] for t in values] for name, values in times.items()}


def parity(model, params, x, y, lr, device) -> dict[str, float]:
    """Relative differences after one step from the same parameters: fnmlp (eager and compiled)
    against its twin (``fnmlp.TorchTwin``: autograd and torch.optim)."""
    optimizer = fnmlp.sgd(lr)
    twin = fnmlp.TorchTwin(model, params, optimizer=optimizer)
    twin_loss = twin.step(x, y).item()
    expected = [p.detach() for p in twin.module.parameters()]
    result = {}
    for compile in (False, True):
        step = fnmlp.train_step(model, fnmlp.mse, optimizer, compile=compile)
        new, _, value = step(params, optimizer.init(params), x, y)
        got = torch.utils._pytree.tree_leaves(new)
        worst = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(got, expected))
        worst = max(worst, abs(value.item() - twin_loss) / abs(twin_loss))
        result["compiled" if compile else "eager"] = worst
    return result


def compile_times(workload: str, device: str, threads: int) -> dict[str, float]:
    """First-call seconds of the compiled step in fresh processes: cold (empty caches), then
    warm caches; and a new graph where inductor's one-time set-up is already cached."""
    result = {}

    def run(cache: str, label: str | None, *flags: str) -> None:
        done = subprocess.run(
            [sys.executable, str(HERE / "compile_time.py"), "--workload", workload,
             "--device", device, "--threads", str(threads), *flags],
            env=dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache), capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"bench/compile_time.py failed:\n{done.stderr[-2000:]}")
        if label is not None:
            figures = json.loads(done.stdout.strip().splitlines()[-1])
            result[label] = figures["first_call_seconds"]
            result[f"{label}_compiler_import"] = figures["compiler_import_seconds"]

    with tempfile.TemporaryDirectory() as cache:
        run(cache, "cold")
        run(cache, "warm")
    with tempfile.TemporaryDirectory() as cache:
        run(cache, None, "--prime")
        run(cache, "new_graph")
    return result


def run_workload(name: str, args, threads: int) -> dict:
    workload = WORKLOADS[name]
    dtype = getattr(torch, args.dtype) if args.dtype else None
    model, params, x, y = workload.build(args.device, quick=args.quick,
                                         batch_size=args.batch_size, dtype=dtype)
    batch = args.batch_size or workload.batch_size
    lr = workload.lr
    heavy = name == "wide"
    rounds = args.rounds or (3 if args.quick else (7 if heavy else 15))
    repeats = 1 if (args.quick or heavy) else 20
    epoch_rounds = 2 if args.quick else (3 if heavy else 7)

    common = (model, params, x, y, lr, batch)
    contenders = [
        FnmlpContender("fnmlp eager", *common, compile=False),
        FnmlpContender("fnmlp compiled", *common, compile=True),
        FnmlpChunkContender("fnmlp fit (chunked)", *common),
        TorchContender("PyTorch eager", *common, compile=False),
        TorchContender("PyTorch compiled", *common, compile=True),
    ]
    skipped = []
    if args.device == "cpu":
        activation = "tanh" if name == "seed" else "relu"
        contenders.append(SklearnContender(f"scikit-learn ({activation} only)", *common,
                                           activation=activation))
    else:
        skipped.append("scikit-learn (CPU only)")
    try:
        contenders += [JaxContender("JAX jit", *common),
                       JaxScanContender("JAX jit(lax.scan)", *common)]
    except JaxUnavailable as error:
        skipped.append(str(error))
    floor = GemmFloor(model, params, batch)
    contenders.append(floor)

    steps = per_step(contenders, time_rounds(contenders, "step", rounds, repeats, args.device))
    epochs = time_rounds(contenders, "epoch", epoch_rounds, 1, args.device)
    batches = -(-x.shape[0] // batch)
    for c in contenders:  # scikit-learn is timed per epoch only
        if c.name not in steps and c.name in epochs:
            steps[c.name] = [t / batches for t in epochs[c.name]]

    base = statistics.median(steps["PyTorch eager"])
    gemm = statistics.median(steps[floor.name])
    rows = []
    for c in contenders:
        times = steps[c.name]
        median = statistics.median(times)
        epoch = statistics.median(epochs[c.name]) if c.name in epochs else None
        rows.append({
            "contender": c.name, "step_median_s": median, "step_min_s": min(times),
            "step_max_s": max(times), "epoch_median_s": epoch,
            "samples_per_s": batch / median, "speedup_vs_pytorch_eager": base / median,
            "ratio_to_gemm_floor": median / gemm, "first_step_s": c.setup_seconds,
            "steps_per_call": getattr(c, "steps_per_call", 1),
        })
    result = {
        "workload": name, "description": workload.description, "batch_size": batch,
        "dtype": str(x.dtype).replace("torch.", ""), "samples": x.shape[0],
        "rounds": rounds, "repeats": repeats, "rows": rows, "skipped": skipped,
        "parity": parity(model, params, x[:batch], y[:batch], lr, args.device),
    }
    if not args.no_compile_time and not args.quick and name == "seed":
        result["compile_time_s"] = compile_times(name, args.device, threads)
    return result


def format_result(result: dict) -> str:
    us = 1e6
    lines = [f"\n== {result['workload']}: {result['description']} "
             f"({result['dtype']}, batch {result['batch_size']}, {result['samples']} samples; "
             f"median of {result['rounds']} rounds x {result['repeats']} steps)",
             f"{'contender':<28} {'steps/call':>10} {'step µs':>10} {'min-max µs':>19} "
             f"{'epoch ms':>9} {'samples/s':>11} {'vs PT eager':>11} {'vs GEMM':>8} "
             f"{'1st call s':>10}"]
    for row in result["rows"]:
        epoch = f"{row['epoch_median_s'] * 1e3:9.2f}" if row["epoch_median_s"] else f"{'-':>9}"
        span = f"{row['step_min_s'] * us:.0f}-{row['step_max_s'] * us:.0f}"
        lines.append(
            f"{row['contender']:<28} {row.get('steps_per_call', 1):>10} "
            f"{row['step_median_s'] * us:>10.1f} {span:>19} {epoch} "
            f"{row['samples_per_s']:>11.0f} {row['speedup_vs_pytorch_eager']:>10.2f}x "
            f"{row['ratio_to_gemm_floor']:>7.2f}x {row['first_step_s']:>10.2f}")
    for skipped in result["skipped"]:
        lines.append(f"{skipped:<28} skipped")
    if any(row.get("steps_per_call", 1) > 1 for row in result["rows"]):
        lines.append("steps/call > 1: the epoch's batches in one call (the short last one "
                     "padded with rows of weight 0); step µs = the call's time / steps")
    p = result["parity"]
    lines.append(f"parity after one step vs the twin (max relative difference): "
                 f"eager {p['eager']:.2e}, compiled {p['compiled']:.2e}")
    if "compile_time_s" in result:
        c = result["compile_time_s"]
        lines.append(f"compile time of fnmlp's step in a fresh process: cold {c['cold']:.2f} s "
                     f"(empty caches), new graph {c['new_graph']:.2f} s (inductor's one-time "
                     f"set-up cached), warm caches {c['warm']:.2f} s; plus "
                     f"{c['warm_compiler_import']:.2f} s importing torch._dynamo/_inductor, "
                     "paid once per process")
    return "\n".join(lines)


def plot(results, path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("--plot needs matplotlib (pip install matplotlib); skipped")
        return
    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4), squeeze=False)
    for ax, result in zip(axes[0], results):
        names = [row["contender"] for row in result["rows"]]
        values = [row["step_median_s"] * 1e6 for row in result["rows"]]
        ax.barh(names, values)
        ax.set_xlabel("median step time (µs)")
        ax.set_title(f"{result['workload']} ({result['dtype']}, batch {result['batch_size']})")
        ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path)
    print(f"plot written to {path}")


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device is available")
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        from threadpoolctl import threadpool_limits
        threadpool_limits(threads)
    except ImportError:
        pass
    machine = (torch.cuda.get_device_name() if args.device.startswith("cuda")
               else f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    print(f"fnmlp {fnmlp.__version__}, torch {torch.__version__}, {args.device} ({machine}), "
          f"{threads} threads, {datetime.date.today()}"
          + (f", {args.load} busy processes beside" if args.load else ""))
    with busy_processes(args.load):
        run_all(args, threads, machine)


def write_json(path: Path | None, result: dict, machine: str, threads: int) -> None:
    """``result`` with the machine's description at ``path`` (``--json``), if given."""
    if path:
        path.write_text(json.dumps({"torch": torch.__version__, "machine": machine,
                                    "threads": threads, **result}, indent=2))


def run_all(args, threads: int, machine: str) -> None:
    """The workloads ``args`` ask for, printed (and written to ``--json``, ``--plot``)."""
    if args.workload == "sklearn":
        import sklearn_fits

        result = sklearn_fits.run(quick=args.quick)
        print(sklearn_fits.format_result(result), flush=True)
        write_json(args.json, result, machine, threads)
        return
    if args.workload == "sweep":
        import sweep

        result = sweep.run(quick=args.quick)
        print(sweep.format_result(result), flush=True)
        write_json(args.json, result, machine, threads)
        return
    if args.workload == "threads":
        import threads as thread_table

        dtype = getattr(torch, args.dtype) if args.dtype else torch.float64
        result = thread_table.run(quick=args.quick, dtype=dtype, rounds=args.rounds or 9)
        print(thread_table.format_result(result), flush=True)
        write_json(args.json, result, machine, threads)
        return
    if args.workload == "ensemble":
        import ensembles

        sizes = tuple(int(k) for k in args.sizes.split(",")) if args.sizes else None
        dtypes = (args.dtype,) if args.dtype else ("float32", "float64")
        result = ensembles.run(quick=args.quick, sizes=sizes, dtypes=dtypes,
                               rounds=args.rounds or 7, device=args.device)
        print(ensembles.format_result(result), flush=True)
        write_json(args.json, result, machine, threads)
        if args.plot:
            ensembles.plot(result, args.plot)
        return
    names = list(WORKLOADS) if args.workload == "all" else [args.workload]
    results = []
    for name in names:
        result = run_workload(name, args, threads)
        results.append(result)
        print(format_result(result), flush=True)
    if args.json:
        args.json.write_text(json.dumps({
            "torch": torch.__version__, "device": args.device, "machine": machine,
            "threads": threads, "date": str(datetime.date.today()), "results": results,
        }, indent=2))
        print(f"figures written to {args.json}")
    if args.plot:
        plot(results, args.plot)


if __name__ == "__main__":
    main()
