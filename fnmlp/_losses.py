"""Loss primitives: a scalar value beside its gradient with respect to the predictions."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from torch import Tensor, nn


@dataclasses.dataclass(frozen=True)
class Loss:
    """Base class. ``forward(pred, y) -> (value, residual)``; ``backward(residual) -> dpred``."""

    name: ClassVar[str]

    def forward(self, pred: Tensor, target: Tensor) -> tuple[Tensor, object]:
        raise NotImplementedError

    def backward(self, residual) -> Tensor:
        raise NotImplementedError

    def to_torch(self) -> nn.Module:
        raise NotImplementedError

    def __call__(self, pred: Tensor, target: Tensor) -> Tensor:
        return self.forward(pred, target)[0]


@dataclasses.dataclass(frozen=True)
class MSE(Loss):
    """L = mean((p - y)²) over all m × n elements;  dL/dp = (p - y) * (2 / (m n))."""

    name: ClassVar[str] = "mse"

    def forward(self, pred, target):
        diff = pred - target
        return diff.pow(2).mean(), diff

    def backward(self, diff):
        return diff * (2 / diff.numel())

    def to_torch(self):
        return nn.MSELoss()


mse = MSE()
