"""Loss primitives: a scalar value beside its gradient with respect to the predictions.

``forward(pred, target, valid_rows=None) -> (value, residual)``; ``backward(residual) ->
dpred``. ``valid_rows`` (a 0-d integer tensor) says that only the leading rows count: the
compiled step pads a short last batch to the full batch size so that one graph serves every
batch; padded rows get a zero gradient and do not enter the reduction.

``reduction="mean"`` averages over elements (mse, l1, huber, binary cross-entropy) or rows
(cross-entropy), as ``torch.nn`` does; ``"sum"`` adds.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from torch import Tensor, nn

from fnmlp import _validate

REDUCTIONS = ("mean", "sum")


@dataclasses.dataclass(frozen=True)
class Loss:
    """Base class: a hashable description of a loss and its explicit gradient."""

    reduction: str = "mean"
    name: ClassVar[str]

    def __post_init__(self):
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {self.reduction!r}")

    def forward(self, pred: Tensor, target: Tensor, valid_rows: Tensor | None = None
                ) -> tuple[Tensor, object]:
        raise NotImplementedError

    def backward(self, residual) -> Tensor:
        raise NotImplementedError

    def to_torch(self) -> nn.Module:
        raise NotImplementedError

    def check_target(self, target, out_features: int, like: Tensor, name: str = "y") -> Tensor:
        """``target`` as a float (m, out_features) tensor like ``like``; raises if it is not."""
        target = _validate.as_data(target, name, like)
        if target.dim() == 1 and out_features == 1:
            raise ValueError(f"{name} must be 2-D (samples, 1), got shape {tuple(target.shape)}; "
                             f"use {name}.reshape(-1, 1)")
        _validate.check_matrix(target, name, out_features, "columns")
        return target

    def check_target_values(self, target: Tensor, classes: int, name: str = "y") -> None:
        """Value checks that need a pass over the data (done once per fit)."""
        _validate.check_finite(target, name)

    def __call__(self, pred: Tensor, target: Tensor) -> Tensor:
        return self.forward(pred, target)[0]


def leading_rows(values: Tensor, valid_rows: Tensor) -> Tensor:
    """A (m, 1) boolean mask that is True for the first ``valid_rows`` rows of ``values``."""
    rows = torch.arange(values.shape[0], device=values.device)
    return (rows < valid_rows).unsqueeze(1)


def _elementwise(loss: Loss, per_element: Tensor, valid_rows: Tensor | None):
    """Reduce per-element losses (m, n); return (value, gradient scale per element)."""
    if valid_rows is None:
        if loss.reduction == "sum":
            return per_element.sum(), 1.0
        return per_element.mean(), 1 / per_element.numel()
    per_element = torch.where(leading_rows(per_element, valid_rows), per_element, 0.0)
    if loss.reduction == "sum":
        return per_element.sum(), 1.0
    count = (valid_rows * per_element.shape[1]).to(per_element.dtype)
    return per_element.sum() / count, 1 / count


def _mask_rows(values: Tensor, valid_rows: Tensor | None) -> Tensor:
    if valid_rows is None:
        return values
    return torch.where(leading_rows(values, valid_rows), values, 0.0)


@dataclasses.dataclass(frozen=True)
class MSE(Loss):
    """L = mean((p - y)²);  dL/dp = (p - y)·2/n (n = number of elements; 2 for "sum")."""

    name: ClassVar[str] = "mse"

    def forward(self, pred, target, valid_rows=None):
        diff = _mask_rows(pred - target, valid_rows)
        value, scale = _elementwise(self, diff.pow(2), valid_rows)
        return value, (diff, scale)

    def backward(self, residual):
        diff, scale = residual
        return diff * (2 * scale)

    def to_torch(self):
        return nn.MSELoss(reduction=self.reduction)


@dataclasses.dataclass(frozen=True)
class L1(Loss):
    """L = mean|p - y|;  dL/dp = sign(p - y)/n."""

    name: ClassVar[str] = "l1"

    def forward(self, pred, target, valid_rows=None):
        diff = _mask_rows(pred - target, valid_rows)
        value, scale = _elementwise(self, diff.abs(), valid_rows)
        return value, (diff, scale)

    def backward(self, residual):
        diff, scale = residual
        return torch.sign(diff) * scale

    def to_torch(self):
        return nn.L1Loss(reduction=self.reduction)


@dataclasses.dataclass(frozen=True)
class Huber(Loss):
    """Per element d = p - y: ½d² where |d| ≤ δ, else δ(|d| - ½δ);
    dL/dp = clamp(d, ±δ)/n."""

    delta: float = 1.0
    name: ClassVar[str] = "huber"

    def __post_init__(self):
        super().__post_init__()
        if not self.delta > 0:
            raise ValueError(f"huber delta must be > 0, got {self.delta}")

    def forward(self, pred, target, valid_rows=None):
        diff = _mask_rows(pred - target, valid_rows)
        size = diff.abs()
        per = torch.where(size < self.delta, 0.5 * diff * diff,
                          self.delta * (size - 0.5 * self.delta))
        value, scale = _elementwise(self, per, valid_rows)
        return value, (diff, scale)

    def backward(self, residual):
        diff, scale = residual
        return torch.clamp(diff, -self.delta, self.delta) * scale

    def to_torch(self):
        return nn.HuberLoss(reduction=self.reduction, delta=self.delta)


@dataclasses.dataclass(frozen=True)
class CrossEntropy(Loss):
    """Cross-entropy from logits z (m, C), fused with log-softmax for stability.

    Targets are class indices (m,) or probabilities (m, C) that sum to 1 per row. With label
    smoothing ε the target becomes (1 - ε)·y + ε/C. Per row: -sum_c t_c log softmax(z)_c;
    dL/dz = (softmax(z)·sum_c t_c - t)/m (m rows; 1 for "sum"), where sum_c t_c is 1 for
    class indices (exactly) and is kept for probability targets, whose sums the compiled step
    does not check.
    """

    label_smoothing: float = 0.0
    name: ClassVar[str] = "cross_entropy"

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.label_smoothing <= 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1], got {self.label_smoothing}")

    def _targets(self, logits: Tensor, target: Tensor) -> Tensor:
        classes = logits.shape[1]
        if target.dim() == 1:
            target = torch.nn.functional.one_hot(target, classes).to(logits.dtype)
        if self.label_smoothing:
            target = target * (1 - self.label_smoothing) + self.label_smoothing / classes
        return target

    def forward(self, logits, target, valid_rows=None):
        is_probabilities = target.dim() == 2
        log_probs = torch.log_softmax(logits, dim=1)
        target = _mask_rows(self._targets(logits, target), valid_rows)
        per_row = -(target * log_probs).sum(dim=1)
        if valid_rows is None:
            rows = logits.shape[0]
        else:
            per_row = torch.where(leading_rows(logits, valid_rows)[:, 0], per_row, 0.0)
            rows = valid_rows.to(logits.dtype)
        scale = 1.0 if self.reduction == "sum" else 1 / rows
        value = per_row.sum() if self.reduction == "sum" else per_row.sum() / rows
        return value, (log_probs, target, valid_rows, scale, is_probabilities)

    def backward(self, residual):
        log_probs, target, valid_rows, scale, is_probabilities = residual
        probs = _mask_rows(torch.exp(log_probs), valid_rows)
        if is_probabilities:
            probs = probs * target.sum(dim=1, keepdim=True)
        return (probs - target) * scale

    def to_torch(self):
        return nn.CrossEntropyLoss(reduction=self.reduction,
                                   label_smoothing=self.label_smoothing)

    def check_target(self, target, out_features, like, name="y"):
        is_labels = (not target.is_floating_point() if isinstance(target, Tensor)
                     else _is_integer_array(target))
        if is_labels:
            if isinstance(target, Tensor) and target.device != like.device:
                raise ValueError(f"{name} is on {target.device} but the parameters are on "
                                 f"{like.device}; move it with {name}.to('{like.device}')")
            labels = torch.as_tensor(target, device=like.device)
            if labels.dim() != 1:
                raise ValueError(f"class labels {name} must be 1-D (samples,), got shape "
                                 f"{tuple(labels.shape)}")
            if labels.shape[0] == 0:
                raise ValueError(f"{name} is empty: it has 0 samples")
            return labels.long()
        return super().check_target(target, out_features, like, name)

    def check_target_values(self, target, classes, name="y"):
        if target.dim() == 1:
            low, high = int(target.min()), int(target.max())
            if low < 0 or high >= classes:
                raise ValueError(f"label {low if low < 0 else high} in {name} is out of range: "
                                 f"the model has {classes} classes (labels 0..{classes - 1})")
            return
        super().check_target_values(target, classes, name)
        if bool((target < 0).any()):
            raise ValueError(f"probability targets {name} must be >= 0")
        sums = target.sum(dim=1)
        tolerance = 1e-6 if target.dtype == torch.float64 else 1e-4
        bad = (sums - 1).abs() > tolerance
        if bool(bad.any()):
            row = int(bad.nonzero()[0, 0])
            raise ValueError(f"probability targets {name} must sum to 1 per row; row {row} "
                             f"sums to {sums[row].item():.6g}")


@dataclasses.dataclass(frozen=True)
class BinaryCrossEntropyWithLogits(Loss):
    """Per element: max(z, 0) - z·y + log(1 + exp(-|z|)) (stable);  dL/dz = (σ(z) - y)/n."""

    name: ClassVar[str] = "binary_cross_entropy_with_logits"

    def forward(self, logits, target, valid_rows=None):
        per = (torch.clamp(logits, min=0) - logits * target
               + torch.log1p(torch.exp(-logits.abs())))
        per = _mask_rows(per, valid_rows)
        value, scale = _elementwise(self, per, valid_rows)
        return value, (logits, target, valid_rows, scale)

    def backward(self, residual):
        logits, target, valid_rows, scale = residual
        return _mask_rows(torch.sigmoid(logits) - target, valid_rows) * scale

    def to_torch(self):
        return nn.BCEWithLogitsLoss(reduction=self.reduction)

    def check_target_values(self, target, classes, name="y"):
        super().check_target_values(target, classes, name)
        if bool(((target < 0) | (target > 1)).any()):
            raise ValueError(f"binary targets {name} must lie in [0, 1]")


def _is_integer_array(value) -> bool:
    import numpy as np

    return np.issubdtype(np.asarray(value).dtype, np.integer)


mse = MSE()
l1 = L1()
huber = Huber()
cross_entropy = CrossEntropy()
binary_cross_entropy_with_logits = BinaryCrossEntropyWithLogits()
