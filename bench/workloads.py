"""The benchmark's workloads: a network, its data and its training settings. The seed workload
is the package's own definition (``fnmlp.workloads``), shared with the tests and the example."""

from __future__ import annotations

import dataclasses

import torch

import fnmlp
from fnmlp import workloads as seed


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
              dtype: torch.dtype | None = None, seed_value: int = 0):
        """(model, params, x, y) on ``device``."""
        dtype = dtype or self.dtype
        batch = batch_size or self.batch_size
        samples = self.samples if not quick else min(self.samples, 2 * batch + 1)
        model = self.model()
        params = model.init(torch.Generator().manual_seed(seed_value), dtype=dtype, device=device)
        if self.name == "seed":
            x, y, _, _ = seed.seed_data(dtype=dtype, device=device, seed=seed_value,
                                        samples=samples, train=samples)
        else:
            g = torch.Generator().manual_seed(seed_value)
            x = torch.randn(samples, self.in_features, generator=g)
            y = torch.randn(samples, model.out_features, generator=g)
        return model, params, x.to(dtype=dtype, device=device), y.to(dtype=dtype, device=device)


WORKLOADS = {
    "seed": Workload("seed", seed.SEED_FEATURES, seed.SEED_LAYERS, seed.SEED_DTYPE,
                     seed.SEED_BATCH_SIZE, seed.SEED_TRAIN, seed.SEED_LR,
                     "the seed notebook: 6-32-32-32-32-3, float64, batch 333, SGD lr 0.01"),
    "wide": Workload("wide", 256, (("relu", 1024), ("relu", 1024), ("relu", 1024),
                                   ("identity", 16)), torch.float32, 1024, 8192, 0.01,
                     "compute-bound: 256-1024-1024-1024-16 relu, float32, batch 1024"),
}
