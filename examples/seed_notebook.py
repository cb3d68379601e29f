"""The seed notebook's experiment through fnmlp's public API.

make_regression (6 features -> 3 targets), 1000 train / 9100 valid samples, the network
6-32-32-32-32-3 with tanh, softmax, sigmoid, relu and linear activations, MSE, SGD lr 0.01,
batch 333, 32 epochs, float64: trained with fnmlp and with its nn.Module twin side by side.

    python examples/seed_notebook.py [--device cpu|cuda] [--dtype float64|float32] [--epochs 32]
"""

from __future__ import annotations

import argparse
import random
import time

import torch
from sklearn.datasets import make_regression
from torch import nn

import fnmlp
from fnmlp.metrics import mape

N_FEATURES, N_TARGETS, N_TRAIN, N_SAMPLES = 6, 3, 1000, 10_100


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    parser.add_argument("--epochs", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--batch-size", type=int, default=N_TRAIN // 3)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def make_data(seed: int, dtype: torch.dtype, device: str):
    bias = random.Random(seed).random()
    x, y = make_regression(n_samples=N_SAMPLES, n_features=N_FEATURES, n_targets=N_TARGETS,
                           n_informative=N_FEATURES - 1, bias=bias, noise=1, random_state=seed)
    x = torch.tensor(x, dtype=dtype, device=device)
    y = torch.tensor(y, dtype=dtype, device=device)
    return (x[:N_TRAIN], y[:N_TRAIN]), (x[N_TRAIN:], y[N_TRAIN:])


def twin_fit(twin: nn.Module, optimizer: fnmlp.SGD, x, y, *, epochs, batch_size, valid):
    """The notebook's TorchSequential.fit: autograd + torch.optim.SGD, losses per epoch."""
    torch_optimizer = optimizer.to_torch(twin.parameters())
    loss_fn = fnmlp.mse.to_torch()
    train, valid_losses = [], []
    for _ in range(epochs):
        batch_losses = []
        for start in range(0, len(x), batch_size):
            torch_optimizer.zero_grad()
            loss = loss_fn(twin(x[start:start + batch_size]), y[start:start + batch_size])
            batch_losses.append(loss.item())
            loss.backward()
            torch_optimizer.step()
        train.append(sum(batch_losses) / len(batch_losses))
        with torch.no_grad():
            valid_losses.append(loss_fn(twin(valid[0]), valid[1]).item())
    return train, valid_losses


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def first_parting_step(model, params, optimizer, x, y, *, epochs, batch_size, tolerance=1e-9):
    """Replay both runs step by step; return (first step whose parameters part by more than
    ``tolerance``, number of steps, whether every step stayed bit-identical)."""
    twin = fnmlp.to_torch(model, params)
    torch_optimizer = optimizer.to_torch(twin.parameters())
    loss_fn = fnmlp.mse.to_torch()
    opt_state = optimizer.init(params)
    step, parted, identical = 0, None, True
    for _ in range(epochs):
        for start in range(0, len(x), batch_size):
            xb, yb = x[start:start + batch_size], y[start:start + batch_size]
            _, grads = model.value_and_grad(params, xb, yb)
            params, opt_state = optimizer.update(params, grads, opt_state)
            torch_optimizer.zero_grad()
            loss_fn(twin(xb), yb).backward()
            torch_optimizer.step()
            twin_leaves = [p.detach() for p in twin.parameters()]
            leaves = [t for layer in params for t in (layer.weight, layer.bias)]
            identical &= all(torch.equal(a, b) for a, b in zip(leaves, twin_leaves))
            worst = max(relative_difference(a, b) for a, b in zip(leaves, twin_leaves))
            if parted is None and worst > tolerance:
                parted = step
            step += 1
    return parted, step, identical


def main() -> None:
    args = parse_args()
    dtype = getattr(torch, args.dtype)
    (x_train, y_train), (x_valid, y_valid) = make_data(args.seed, dtype, args.device)
    print(f"data: x_train {tuple(x_train.shape)}, x_valid {tuple(x_valid.shape)}, "
          f"{args.dtype} on {args.device}")

    model = fnmlp.MLP(N_FEATURES, [
        fnmlp.Dense(32, "tanh"), fnmlp.Dense(32, "softmax"), fnmlp.Dense(32, "sigmoid"),
        fnmlp.Dense(32, "relu"), fnmlp.Dense(N_TARGETS, "linear"),
    ])
    scratch_params = model.init(torch.Generator().manual_seed(args.seed), dtype=dtype,
                                device=args.device, init="normal")
    twin = fnmlp.to_torch(model, model.init(torch.Generator().manual_seed(args.seed + 1),
                                            dtype=dtype, device=args.device))
    print(twin)

    with torch.no_grad():
        print(f"\nMAPE of predictions before copying parameters: "
              f"{mape(model.apply(scratch_params, x_valid), twin(x_valid)):.6g}")
        _, params = fnmlp.from_torch(twin)  # copy the twin's parameters
        print(f"MAPE of predictions after copying parameters:  "
              f"{mape(model.apply(params, x_valid), twin(x_valid)):.6g}")
        loss_fnmlp = model.evaluate(params, x_valid, y_valid)
        loss_twin = fnmlp.mse.to_torch()(twin(x_valid), y_valid).item()
        print(f"valid loss: fnmlp {loss_fnmlp:.10g}, twin {loss_twin:.10g}, "
              f"MAPE {mape(loss_fnmlp, loss_twin):.3g}")

    optimizer = fnmlp.sgd(args.lr)
    start_params = params
    start = time.perf_counter()
    result = fnmlp.fit(model, params, x_train, y_train, epochs=args.epochs,
                       batch_size=args.batch_size, optimizer=optimizer,
                       valid=(x_valid, y_valid))
    fnmlp_seconds = time.perf_counter() - start
    start = time.perf_counter()
    twin_train, twin_valid = twin_fit(twin, optimizer, x_train, y_train, epochs=args.epochs,
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
              f"{mape(model.apply(result.params, x_valid), twin(x_valid)):.6g}")
        linears = [m for m in twin if isinstance(m, nn.Linear)]
        print(f"{'layer':>5} | {'MAPE weight':>12} | {'MAPE bias':>12}")
        for i, (layer, linear) in enumerate(zip(result.params, linears)):
            print(f"{i:>5} | {mape(layer.weight, linear.weight):>12.3g} | "
                  f"{mape(layer.bias, linear.bias):>12.3g}")


if __name__ == "__main__":
    main()
