"""Loss primitives: a scalar value beside its gradient with respect to the predictions."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from torch import Tensor, nn


@dataclasses.dataclass(frozen=True)
class Loss:
    """Base class. ``forward(pred, y, valid_rows=None) -> (value, residual)``;
    ``backward(residual) -> dpred``.

    ``valid_rows`` (a 0-d integer tensor) says that only the leading rows count: the compiled
    step pads a short last batch to the full batch size, so one graph serves every batch.
    Padded rows get a zero gradient and do not enter the mean.
    """

    name: ClassVar[str]

    def forward(self, pred: Tensor, target: Tensor, valid_rows: Tensor | None = None
                ) -> tuple[Tensor, object]:
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

    def forward(self, pred, target, valid_rows=None):
        diff = pred - target
        if valid_rows is None:
            return diff.pow(2).mean(), (diff, 2 / diff.numel())
        diff = torch.where(leading_rows(diff, valid_rows), diff, 0.0)
        count = (valid_rows * diff.shape[1]).to(diff.dtype)
        return diff.pow(2).sum() / count, (diff, 2 / count)

    def backward(self, residual):
        diff, scale = residual
        return diff * scale

    def to_torch(self):
        return nn.MSELoss()


mse = MSE()


def leading_rows(values: Tensor, valid_rows: Tensor) -> Tensor:
    """A (m, 1) boolean mask that is True for the first ``valid_rows`` rows of ``values``."""
    rows = torch.arange(values.shape[0], device=values.device)
    return (rows < valid_rows).unsqueeze(1)
