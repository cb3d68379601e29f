"""Time the first call of fnmlp's compiled step in this process (cold or warm caches).

Run by bench/run.py in fresh processes: once with an empty TORCHINDUCTOR_CACHE_DIR (cold) and
once more with the same directory (warm); and, in another empty directory, once after a
``--prime`` run that compiled a different, tiny step (a new graph on a machine where inductor
has already done its one-time set-up: its CPU ISA probe). Prints, as JSON, the seconds of the
first step and, apart, of importing torch's compiler (``torch._dynamo``, ``torch._inductor``),
which every process pays once whatever it compiles.
"""

import argparse
import importlib
import json
import time

import torch

import fnmlp
from workloads import WORKLOADS  # bench/'s: a script's own folder is on sys.path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workload", default="seed", choices=sorted(WORKLOADS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--compiler", default="auto")
    parser.add_argument("--prime", action="store_true",
                        help="only compile a tiny, different step (inductor's one-time set-up)")
    args = parser.parse_args()
    if args.prime:
        prime(args.device, args.compiler)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    importlib.import_module("torch._dynamo")
    importlib.import_module("torch._inductor.compile_fx")
    import_seconds = time.perf_counter() - start
    workload = WORKLOADS[args.workload]
    model, params, x, y = workload.build(args.device, quick=True)
    optimizer = fnmlp.sgd(workload.lr)
    step = fnmlp.train_step(model, fnmlp.mse, optimizer, compiler=args.compiler)
    state = optimizer.init(params)
    xb, yb = x[:workload.batch_size], y[:workload.batch_size]
    start = time.perf_counter()
    _, _, loss = step(params, state, xb, yb)
    loss.item()
    print(json.dumps({"first_call_seconds": time.perf_counter() - start,
                      "compiler_import_seconds": import_seconds}))


def prime(device: str, compiler: str) -> None:
    model = fnmlp.MLP(2, [fnmlp.Dense(2, "relu"), fnmlp.Dense(1)])
    params = model.init(torch.Generator().manual_seed(0), device=device)
    optimizer = fnmlp.sgd(0.1)
    step = fnmlp.train_step(model, fnmlp.nn.l1, optimizer, compiler=compiler)
    step(params, optimizer.init(params), torch.ones(4, 2, device=device),
         torch.ones(4, 1, device=device))


if __name__ == "__main__":
    main()
