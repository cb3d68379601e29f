"""The seed notebook's experiment through fnmlp's public API.

make_regression (6 features -> 3 targets), 1000 train / 9100 valid samples, the network
6-32-32-32-32-3 with tanh, softmax, sigmoid, relu and linear activations, MSE, SGD lr 0.01,
batch 333, 32 epochs, float64: trained with fnmlp and with its nn.Module twin side by side.

    python examples/seed_notebook.py [--device cpu|cuda] [--dtype float64|float32] [--epochs 32]
"""

from __future__ import annotations

import argparse
import time

import torch

import fnmlp
from fnmlp import workloads
from fnmlp.metrics import mape


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    parser.add_argument("--epochs", type=int, default=workloads.SEED_EPOCHS)
    parser.add_argument("--lr", type=float, default=workloads.SEED_LR)
    parser.add_argument("--batch-size", type=int, default=workloads.SEED_BATCH_SIZE)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def twin_fit(twin: fnmlp.TorchTwin, x, y, *, epochs, batch_size, valid):
    """The notebook's TorchSequential.fit on the twin (autograd + torch.optim): losses per
    epoch, the train loss the mean of the batch losses."""
    train, valid_losses = [], []
    for _ in range(epochs):
        batch_losses = [twin.step(x[start:start + batch_size], y[start:start + batch_size]).item()
                        for start in range(0, len(x), batch_size)]
        train.append(sum(batch_losses) / len(batch_losses))
        valid_losses.append(twin.evaluate(*valid))
    return train, valid_losses


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def first_parting_step(model, params, optimizer, x, y, *, epochs, batch_size, tolerance=1e-9):
    """Replay both runs step by step; return (first step whose parameters part by more than
    ``tolerance``, number of steps, whether every step stayed bit-identical)."""
    twin = fnmlp.TorchTwin(model, params, optimizer=optimizer)
    opt_state = optimizer.init(params)
    step, parted, identical = 0, None, True
    for _ in range(epochs):
        for start in range(0, len(x), batch_size):
            xb, yb = x[start:start + batch_size], y[start:start + batch_size]
            _, grads = model.value_and_grad(params, xb, yb)
            params, opt_state = optimizer.update(params, grads, opt_state)
            twin.step(xb, yb)
            twin_leaves = [p.detach() for p in twin.module.parameters()]
            leaves = torch.utils._pytree.tree_leaves(params)
            identical &= all(torch.equal(a, b) for a, b in zip(leaves, twin_leaves))
            worst = max(relative_difference(a, b) for a, b in zip(leaves, twin_leaves))
            if parted is None and worst > tolerance:
                parted = step
            step += 1
    return parted, step, identical


def main() -> None:
    args = parse_args()
    dtype = getattr(torch, args.dtype)
    x_train, y_train, x_valid, y_valid = workloads.seed_data(dtype=dtype, device=args.device,
                                                             seed=args.seed)
    print(f"data: x_train {tuple(x_train.shape)}, x_valid {tuple(x_valid.shape)}, "
          f"{args.dtype} on {args.device}")

    model = workloads.seed_model()
    optimizer = fnmlp.sgd(args.lr)
    scratch_params = model.init(torch.Generator().manual_seed(args.seed), dtype=dtype,
                                device=args.device, init="normal")
    twin = fnmlp.TorchTwin(model, model.init(torch.Generator().manual_seed(args.seed + 1),
                                             dtype=dtype, device=args.device),
                           optimizer=optimizer)
    print(twin.module)

    with torch.no_grad():
        print(f"\nMAPE of predictions before copying parameters: "
              f"{mape(model.apply(scratch_params, x_valid), twin.module(x_valid)):.6g}")
        params = twin.params()  # copy the twin's parameters
        print(f"MAPE of predictions after copying parameters:  "
              f"{mape(model.apply(params, x_valid), twin.module(x_valid)):.6g}")
        loss_fnmlp = model.evaluate(params, x_valid, y_valid)
        loss_twin = twin.evaluate(x_valid, y_valid)
        print(f"valid loss: fnmlp {loss_fnmlp:.10g}, twin {loss_twin:.10g}, "
              f"MAPE {mape(loss_fnmlp, loss_twin):.3g}")

    start_params = params
    start = time.perf_counter()
    result = fnmlp.fit(model, params, x_train, y_train, epochs=args.epochs,
                       batch_size=args.batch_size, optimizer=optimizer,
                       valid=(x_valid, y_valid))
    fnmlp_seconds = time.perf_counter() - start
    start = time.perf_counter()
    twin_train, twin_valid = twin_fit(twin, x_train, y_train, epochs=args.epochs,
                                      batch_size=args.batch_size, valid=(x_valid, y_valid))
    twin_seconds = time.perf_counter() - start

    history = result.history
    print(f"\n{'epoch':>5} | {'fnmlp L':>14} {'twin L':>14} | {'fnmlp L_v':>14} "
          f"{'twin L_v':>14} | {'max rel diff':>12}")
    for epoch in range(args.epochs):
        pairs = [(history.train_loss[epoch], twin_train[epoch]),
                 (history.valid_loss[epoch], twin_valid[epoch])]
        worst = max(abs(a - b) / abs(b) for a, b in pairs)
        print(f"{epoch:>5} | {pairs[0][0]:>14.4f} {pairs[0][1]:>14.4f} | {pairs[1][0]:>14.4f} "
              f"{pairs[1][1]:>14.4f} | {worst:>12.3g}")
    print(f"training time: fnmlp {fnmlp_seconds:.2f} s, twin {twin_seconds:.2f} s")

    parted, steps, identical = first_parting_step(
        model, start_params, optimizer, x_train, y_train, epochs=args.epochs,
        batch_size=args.batch_size)
    if identical:
        print(f"step by step: all {steps} steps bit-identical to the twin")
    elif parted is None:
        print(f"step by step: parameters within 1e-9 of the twin over all {steps} steps "
              "(not bit-identical)")
    else:
        print(f"step by step: parameters first part from the twin's by more than 1e-9 at step "
              f"{parted} of {steps}")

    with torch.no_grad():
        print(f"\nMAPE of predictions after training: "
              f"{mape(model.apply(result.params, x_valid), twin.module(x_valid)):.6g}")
        ours = [p for p in result.params if isinstance(p, fnmlp.nn.LinearParams)]
        theirs = [p for p in twin.params() if isinstance(p, fnmlp.nn.LinearParams)]
        print(f"{'layer':>5} | {'MAPE weight':>12} | {'MAPE bias':>12}")
        for i, (layer, linear) in enumerate(zip(ours, theirs)):
            print(f"{i:>5} | {mape(layer.weight, linear.weight):>12.3g} | "
                  f"{mape(layer.bias, linear.bias):>12.3g}")


if __name__ == "__main__":
    main()
