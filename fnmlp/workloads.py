"""The seed notebook's workload, defined once for the tests, the benchmark and the example.

make_regression (6 features -> 3 targets, 5 informative, noise 1, a bias drawn from the seed),
1000 train / 9100 valid samples; the network 6-32-32-32-32-3 with tanh, softmax, sigmoid, relu
and linear activations; MSE, SGD lr 0.01, batch 333, 32 epochs, float64.
"""

from __future__ import annotations

import random

import torch

from fnmlp.nn import MLP, Dense

SEED_LAYERS = (("tanh", 32), ("softmax", 32), ("sigmoid", 32), ("relu", 32), ("identity", 3))
SEED_FEATURES, SEED_TARGETS, SEED_TRAIN, SEED_SAMPLES = 6, 3, 1000, 10_100
SEED_EPOCHS, SEED_BATCH_SIZE, SEED_LR, SEED_DTYPE = 32, 333, 0.01, torch.float64


def seed_model() -> MLP:
    """The notebook's network: 6-32-32-32-32-3, tanh, softmax, sigmoid, relu, linear."""
    return MLP(SEED_FEATURES, [Dense(units, activation) for activation, units in SEED_LAYERS])


def seed_data(*, dtype: torch.dtype = SEED_DTYPE, device="cpu", seed: int = 0,
              samples: int = SEED_SAMPLES, train: int = SEED_TRAIN):
    """``(x_train, y_train, x_valid, y_valid)``: the notebook's data, the first ``train`` of
    ``samples`` rows for training (x (m, 6), y (m, 3))."""
    from sklearn.datasets import make_regression

    x, y = make_regression(n_samples=samples, n_features=SEED_FEATURES, n_targets=SEED_TARGETS,
                           n_informative=SEED_FEATURES - 1, bias=random.Random(seed).random(),
                           noise=1, random_state=seed)
    x = torch.tensor(x, dtype=dtype, device=device)
    y = torch.tensor(y, dtype=dtype, device=device)
    return x[:train], y[:train], x[train:], y[train:]
