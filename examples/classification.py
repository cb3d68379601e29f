"""Classify scikit-learn's handwritten digits with fnmlp, beside its nn.Module twin.

load_digits (8x8 images, 10 classes), standardized; 1400 train / 397 test samples. The network
64-64-32-10 uses layer norm, relu, gelu and dropout; cross-entropy from logits; Adam with a
cosine schedule. The twin (torch.nn + autograd + torch.optim, the same dropout masks) trains
side by side and the two runs are compared epoch by epoch.

    python examples/classification.py [--epochs 30] [--compile] [--dtype float64|float32]
"""

from __future__ import annotations

import argparse
import time

import torch
from sklearn.datasets import load_digits

import fnmlp


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    parser.add_argument("--compile", action="store_true", help="train with the compiled step")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)

    images, labels = load_digits(return_X_y=True)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(args.seed))
    x = torch.tensor(images, dtype=dtype)[order]
    y = torch.tensor(labels)[order]
    x = (x - x[:1400].mean(0)) / (x[:1400].std(0) + 1e-6)
    x_train, y_train, x_test, y_test = x[:1400], y[:1400], x[1400:], y[1400:]

    model = fnmlp.MLP(64, [
        fnmlp.Dense(64, "relu", layer_norm=True, dropout=0.2, init="kaiming_uniform"),
        fnmlp.Dense(32, "gelu", dropout=0.1),
        fnmlp.Dense(10),
    ])
    params = model.init(torch.Generator().manual_seed(args.seed), dtype=dtype)
    steps_per_epoch = -(-len(x_train) // args.batch_size)
    optimizer = fnmlp.adam(fnmlp.schedules.cosine(3e-3, total_steps=args.epochs * steps_per_epoch,
                                                  eta_min=1e-4))
    loss = fnmlp.cross_entropy
    twin = fnmlp.TorchTwin(model, params, optimizer=optimizer, loss=loss)
    step = fnmlp.train_step(model, loss, optimizer, compile=args.compile)
    state = optimizer.init(params)

    print(f"{model}\n")
    print(f"{'epoch':>5} | {'fnmlp loss':>11} {'twin loss':>11} | {'test loss':>10} "
          f"{'test acc':>8} | {'max rel diff':>12}")
    count, seconds = 0, 0.0
    for epoch in range(args.epochs):
        ours, theirs = [], []
        for start in range(0, len(x_train), args.batch_size):
            xb = x_train[start:start + args.batch_size]
            yb = y_train[start:start + args.batch_size]
            key = fnmlp.dropout_key(args.seed, count)
            begin = time.perf_counter()
            params, state, value = step(params, state, xb, yb, key=key)
            ours.append(value.item())
            seconds += time.perf_counter() - begin
            theirs.append(twin.step(xb, yb, key).item())
            count += 1
        test_loss = model.evaluate(params, x_test, y_test, loss)
        accuracy = fnmlp.metrics.accuracy(model.predict_classes(params, x_test, loss=loss),
                                          y_test)
        pairs = [(sum(ours) / len(ours), sum(theirs) / len(theirs)),
                 (test_loss, twin.evaluate(x_test, y_test))]
        worst = max(abs(a - b) / abs(b) for a, b in pairs)
        print(f"{epoch:>5} | {pairs[0][0]:>11.5f} {pairs[0][1]:>11.5f} | {test_loss:>10.5f} "
              f"{accuracy:>8.3f} | {worst:>12.3g}")
    print(f"\ntest accuracy {accuracy:.3f}; fnmlp training time {seconds:.2f} s "
          f"({'compiled' if args.compile else 'eager'})")


if __name__ == "__main__":
    main()
