"""Loss primitives: a scalar value beside its gradient with respect to the predictions.

``forward(pred, target, weight=None) -> (value, residual)``; ``backward(residual, dvalue=None)
-> dpred`` (``dvalue``: the cotangent of the value, 1 when None). ``weight`` (m,) weighs the
rows as scikit-learn's ``sample_weight``: ``reduction="mean"`` becomes the weighted mean of the
per-row losses, sum_i w_i·l_i / sum_i w_i, and ``"sum"`` the weighted sum. The compiled step pads
a short batch with rows of weight 0, which then count for nothing.

Without weights, ``"mean"`` averages over elements (mse, l1, huber, binary cross-entropy) or rows
(cross-entropy), as ``torch.nn`` does, with the same arithmetic; ``"sum"`` adds. A row's loss
l_i is the mean over its elements, so the weighted mean with all weights 1 is the plain mean.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from torch import Tensor

from fnmlp import _validate

REDUCTIONS = ("mean", "sum")


@dataclasses.dataclass(frozen=True)
class Loss:
    """Base class: a hashable description of a loss and its explicit gradient.

    Arguments (every loss):
        reduction: "mean" (over elements, or rows for cross-entropy; with ``weight``, the
            weighted mean of the per-row losses) or "sum".

    ``forward(pred (m, n), target, weight (m,) or None) -> (value (0-d), residual)``;
    ``backward(residual, dvalue=None) -> dpred (m, n)``.
    """

    reduction: str = "mean"
    name: ClassVar[str]

    def __post_init__(self):
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {self.reduction!r}")

    def forward(self, pred: Tensor, target: Tensor, weight: Tensor | None = None
                ) -> tuple[Tensor, object]:
        raise NotImplementedError

    def backward(self, residual, dvalue: Tensor | None = None) -> Tensor:
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

    def __call__(self, pred: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
        return self.forward(pred, target, weight)[0]


def _row_scale(loss: Loss, weight: Tensor, columns: int) -> Tensor:
    """(m, 1) factors turning per-element losses into the weighted reduction: w_i/(n·sum w) for
    "mean" over n columns, w_i for "sum"."""
    if loss.reduction == "sum":
        return weight.unsqueeze(1)
    return (weight / (weight.sum() * columns)).unsqueeze(1)


def _elementwise(loss: Loss, per_element: Tensor, weight: Tensor | None):
    """Reduce per-element losses (m, n); return (value, gradient scale: a number or (m, 1))."""
    if weight is not None:
        scale = _row_scale(loss, weight, per_element.shape[1])
        return (per_element * scale).sum(), scale
    if loss.reduction == "sum":
        return per_element.sum(), 1.0
    return per_element.mean(), 1 / per_element.numel()


def _scaled(gradient: Tensor, dvalue: Tensor | None) -> Tensor:
    return gradient if dvalue is None else gradient * dvalue


@dataclasses.dataclass(frozen=True)
class MSE(Loss):
    """L = mean((p - y)²);  dL/dp = (p - y)·2/n (n = number of elements; 2 for "sum")."""

    name: ClassVar[str] = "mse"

    def forward(self, pred, target, weight=None):
        diff = pred - target
        value, scale = _elementwise(self, diff.pow(2), weight)
        return value, (diff, scale)

    def backward(self, residual, dvalue=None):
        diff, scale = residual
        return _scaled(diff * (2 * scale), dvalue)


@dataclasses.dataclass(frozen=True)
class L1(Loss):
    """L = mean|p - y|;  dL/dp = sign(p - y)/n."""

    name: ClassVar[str] = "l1"

    def forward(self, pred, target, weight=None):
        diff = pred - target
        value, scale = _elementwise(self, diff.abs(), weight)
        return value, (diff, scale)

    def backward(self, residual, dvalue=None):
        diff, scale = residual
        return _scaled(torch.sign(diff) * scale, dvalue)


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

    def forward(self, pred, target, weight=None):
        diff = pred - target
        size = diff.abs()
        per = torch.where(size < self.delta, 0.5 * diff * diff,
                          self.delta * (size - 0.5 * self.delta))
        value, scale = _elementwise(self, per, weight)
        return value, (diff, scale)

    def backward(self, residual, dvalue=None):
        diff, scale = residual
        return _scaled(torch.clamp(diff, -self.delta, self.delta) * scale, dvalue)


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

    def forward(self, logits, target, weight=None):
        is_probabilities = target.dim() == 2
        log_probs = torch.log_softmax(logits, dim=1)
        target = self._targets(logits, target)
        per_row = -(target * log_probs).sum(dim=1)
        if weight is not None:
            scale = weight if self.reduction == "sum" else weight / weight.sum()
            value = (per_row * scale).sum()
            scale = scale.unsqueeze(1)
        elif self.reduction == "sum":
            value, scale = per_row.sum(), 1.0
        else:
            rows = logits.shape[0]
            value, scale = per_row.sum() / rows, 1 / rows
        return value, (log_probs, target, scale, is_probabilities)

    def backward(self, residual, dvalue=None):
        log_probs, target, scale, is_probabilities = residual
        probs = torch.exp(log_probs)
        if is_probabilities:
            probs = probs * target.sum(dim=1, keepdim=True)
        return _scaled((probs - target) * scale, dvalue)

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

    def forward(self, logits, target, weight=None):
        per = (torch.clamp(logits, min=0) - logits * target
               + torch.log1p(torch.exp(-logits.abs())))
        value, scale = _elementwise(self, per, weight)
        return value, (logits, target, scale)

    def backward(self, residual, dvalue=None):
        logits, target, scale = residual
        return _scaled((torch.sigmoid(logits) - target) * scale, dvalue)

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
