"""The benchmark's workloads: a network, its data and its training settings."""

from __future__ import annotations

import dataclasses
import random

import torch
from sklearn.datasets import make_regression

import fnmlp


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str
    in_features: int
    layers: tuple[tuple[str, int], ...]
    dtype: torch.dtype
    batch_size: int
    samples: int
    lr: float
    description: str

    def model(self) -> fnmlp.MLP:
        return fnmlp.MLP(self.in_features, [fnmlp.Dense(units, act) for act, units in self.layers])

    def build(self, device: str, *, quick: bool = False, batch_size: int | None = None,
              dtype: torch.dtype | None = None, seed: int = 0):
        """(model, params, x, y) on ``device``."""
        dtype = dtype or self.dtype
        batch = batch_size or self.batch_size
        samples = self.samples if not quick else min(self.samples, 2 * batch + 1)
        model = self.model()
        params = model.init(torch.Generator().manual_seed(seed), dtype=dtype, device=device)
        if self.name == "seed":
            x, y = make_regression(n_samples=samples, n_features=self.in_features,
                                   n_targets=model.out_features, n_informative=5,
                                   bias=random.Random(seed).random(), noise=1,
                                   random_state=seed)
            x, y = torch.tensor(x), torch.tensor(y)
        else:
            g = torch.Generator().manual_seed(seed)
            x = torch.randn(samples, self.in_features, generator=g)
            y = torch.randn(samples, model.out_features, generator=g)
        return model, params, x.to(dtype=dtype, device=device), y.to(dtype=dtype, device=device)


WORKLOADS = {
    "seed": Workload("seed", 6, (("tanh", 32), ("softmax", 32), ("sigmoid", 32), ("relu", 32),
                                 ("identity", 3)), torch.float64, 333, 1000, 0.01,
                     "the seed notebook: 6-32-32-32-32-3, float64, batch 333, SGD lr 0.01"),
    "wide": Workload("wide", 256, (("relu", 1024), ("relu", 1024), ("relu", 1024),
                                   ("identity", 16)), torch.float32, 1024, 8192, 0.01,
                     "compute-bound: 256-1024-1024-1024-16 relu, float32, batch 1024"),
}
