"""The seed workload trained data-parallel: every global batch of 333 rows split across the
ranks torchrun starts, one all-reduce of the gradients per step, compared step by step with
one process training on the same global batches.

    torchrun --nproc_per_node=2 examples/data_parallel.py [--epochs 32] [--compile]

Rank 0 prints, per epoch, the largest relative difference of the parameters from the
one-process run after each step, and the epoch's loss from both.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils._pytree import tree_leaves

import fnmlp
from fnmlp.train.engine import Batch, Carry
from fnmlp import workloads


def relative_difference(a, b) -> float:
    return max(((p - q).abs().max() / q.abs().max()).item()
               for p, q in zip(tree_leaves(a), tree_leaves(b)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=workloads.SEED_EPOCHS)
    parser.add_argument("--compile", action="store_true", help="compiled gradient and update")
    parser.add_argument("--timeout", type=float, default=60.0,
                        help="seconds a rank waits for the others before failing")
    args = parser.parse_args()
    fnmlp.distributed.init(timeout=args.timeout)
    rank, ranks = fnmlp.distributed.rank(), fnmlp.distributed.world_size()
    x, y, _, _ = workloads.seed_data()
    model = workloads.seed_model()
    params = model.init(torch.Generator().manual_seed(0), dtype=workloads.SEED_DTYPE)
    optimizer, batch = fnmlp.sgd(workloads.SEED_LR), workloads.SEED_BATCH_SIZE
    # every rank starts from rank 0's parameters (fit does this itself)
    params, _, _ = fnmlp.distributed.start_alike(params, None, None)
    parallel = fnmlp.distributed.DistributedStep(model, fnmlp.mse, optimizer,
                                                 compile=args.compile)
    alone = fnmlp.train_step(model, fnmlp.mse, optimizer, compile=False)
    state = model.state_or_default(None, None)
    p_parallel = p_alone = params
    s_parallel = s_alone = optimizer.init(params)
    if rank == 0:
        print(f"{ranks} ranks ({torch.distributed.get_backend()}), global batch {batch} "
              f"({-(-batch // ranks)} rows per rank), seed workload, {args.epochs} epochs")
    start = time.perf_counter()
    for epoch in range(args.epochs):
        worst, losses = 0.0, []
        for first in range(0, x.shape[0], batch):
            xb, yb = x[first:first + batch], y[first:first + batch]
            carry, loss = parallel.run(Carry(p_parallel, s_parallel, state), Batch.of(xb, yb))
            p_parallel, s_parallel = carry.params, carry.opt_state
            if rank == 0:  # the one-process run of the same global batch
                carry, loss_alone = alone.run(Carry(p_alone, s_alone, state), Batch.of(xb, yb))
                p_alone, s_alone = carry.params, carry.opt_state
                worst = max(worst, relative_difference(p_parallel, p_alone))
                losses.append((loss.item(), loss_alone.item()))
        if rank == 0:
            mean = [sum(pair[i] for pair in losses) / len(losses) for i in (0, 1)]
            print(f"epoch {epoch:2d}: loss {mean[0]:.6f} ({ranks} ranks) vs {mean[1]:.6f} "
                  f"(one process); step by step: max rel diff of the parameters {worst:.2e}")
    if rank == 0:
        print(f"{time.perf_counter() - start:.2f} s; final max rel diff "
              f"{relative_difference(p_parallel, p_alone):.2e}")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
