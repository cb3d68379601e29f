"""One rank of the data-parallel tests (tests/distributed/test_distributed.py), started by
the test with RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT set (or in a single process,
without them).

    python tests/distributed/distributed_worker.py OUT_DIR MODE [options as JSON]

MODE "steps": DistributedStep directly on the seed workload's global batches, the parameters
after every step saved; "fit": fnmlp.fit(distributed=...) with the options (checkpoint, resume,
faults injected: raise, hang or die on a rank at an epoch's end; "rank_rate": a callback that
sets a rank-dependent learning rate after the first epoch).
"""

import json
import os
import signal
import sys
import time

import torch

import fnmlp
from fnmlp.train.engine import Batch, Carry
from fnmlp._tree import flatten
from fnmlp.workloads import seed_data, seed_model


def main(out_dir: str, mode: str, options: dict) -> None:
    distributed = "WORLD_SIZE" in os.environ
    if distributed:
        fnmlp.distributed.init(timeout=options.get("timeout", 20.0))
    rank = fnmlp.distributed.rank()
    dtype = torch.float64
    model = seed_model()
    params = model.init(torch.Generator().manual_seed(0), dtype=dtype)
    rows = options.get("rows", 1000)
    x, y, x_valid, y_valid = seed_data(dtype=dtype, samples=rows + 301, train=rows)
    if options.get("other_data_on_rank_1") and rank == 1:
        x = x + 1
    optimizer = getattr(fnmlp, options.get("optimizer", "sgd"))(options.get("lr", 0.01))
    l2 = options.get("l2", 0.0)
    result = {"rank": rank}
    if mode == "steps":
        batch = options.get("batch", 333)
        if distributed:
            step = fnmlp.distributed.DistributedStep(model, fnmlp.mse, optimizer,
                                                     compile=options.get("compile", False),
                                                     l2=l2, collective=options.get(
                                                         "collective", "in_graph"))
        else:
            step = fnmlp.train_step(model, fnmlp.mse, optimizer, compile=False, l2=l2)
        carry = Carry(params, optimizer.init(params), model.state_or_default(None, None))
        history = []
        for start in range(0, x.shape[0], batch):
            xb, yb = x[start:start + batch], y[start:start + batch]
            carry, value = step.run(carry, Batch(xb, yb, None, None, xb.shape[0], None, (True,)))
            history.append(([leaf.clone() for leaf in flatten(carry.params)[0]], value.item()))
        result["history"] = history
    else:
        fault = options.get("fault")

        def on_epoch_end(epoch, logs):
            if fault and rank == fault["rank"] and epoch == fault["epoch"]:
                if fault["kind"] == "raise":
                    raise RuntimeError("injected failure")
                if fault["kind"] == "hang":
                    time.sleep(600)
                if fault["kind"] == "die":
                    os.kill(os.getpid(), signal.SIGKILL)
            return options.get("stop_on_rank_1") and rank == 1

        class RankRate(fnmlp.callbacks.Callback):
            """Sets the rate from rank-local information: rank_rate·(rank + 1)."""

            def on_epoch_end(self, epoch, logs):
                if epoch == 0:
                    self.trainer.learning_rate = options["rank_rate"] * (rank + 1)

        callbacks = [RankRate()] if "rank_rate" in options else None
        fit = fnmlp.fit(model, params, x, y, epochs=options.get("epochs", 3), batch_size=333,
                        optimizer=optimizer, shuffle=True,
                        generator=torch.Generator().manual_seed(options.get("seed", 0)),
                        l2=l2, compile=options.get("compile", False),
                        valid=(x_valid, y_valid),
                        checkpoint=options.get("checkpoint"), resume=options.get("resume", False),
                        on_epoch_end=on_epoch_end, callbacks=callbacks,
                        distributed=distributed)
        result["params"] = flatten(fit.params)[0]
        result["lr"] = fit.opt_state.learning_rate.item()
        result["train_loss"] = fit.history.train_loss
        result["valid_loss"] = fit.history.valid_loss
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    if distributed:  # leave the group before exiting: gloo's threads stopped, not killed
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], json.loads(sys.argv[3]) if len(sys.argv) > 3 else {})
