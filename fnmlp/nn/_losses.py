"""Loss primitives: a scalar value beside its gradient with respect to the predictions.

``forward(pred, target, weight=None) -> (value, residual)``; ``backward(residual, dvalue=None)
-> dpred`` (``dvalue``: the cotangent of the value, 1 when None). ``weight`` (m,) weighs the
rows as scikit-learn's ``sample_weight``: ``reduction="mean"`` becomes the weighted mean of the
per-row losses, sum_i w_i·l_i / sum_i w_i, and ``"sum"`` the weighted sum. The compiled step pads
a short batch with rows of weight 0, which then count for nothing.

Without weights, ``"mean"`` averages over elements (mse, l1, huber, smooth l1, binary
cross-entropy) or rows (cross-entropy), as ``torch.nn`` does, with the same arithmetic; ``"sum"``
adds. A row's loss l_i is the mean over its elements, so the weighted mean with all weights 1 is
the plain mean. ``"none"`` gives the per-row losses (m,) (times the row weights, if any), whose
cotangent ``dvalue`` is then (m,); training needs "mean" or "sum".

A loss of one's own subclasses ``Loss`` (see its docstring: the methods, their shapes, row
weights), is registered once with ``fnmlp.register`` (savable, and twinnable given its
``torch.nn`` loss) and is checked with ``fnmlp.testing.check_loss``. A loss whose ``forward``
takes no row weights refuses them (``supports_weights``; ``check_loss_weights``) rather than
ignoring them.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from typing import Any, ClassVar

import torch
from torch import Tensor

from fnmlp import _registry, _validate

REDUCTIONS = ("mean", "sum", "none")


@dataclasses.dataclass(frozen=True)
class Loss:
    """Base class: a hashable description of a loss and its explicit gradient.

    Arguments (every loss):
        reduction: "mean" (over elements, or rows for cross-entropy; with ``weight``, the
            weighted mean of the per-row losses), "sum", or "none" (the per-row losses).

    Writing a loss: a frozen dataclass subclassing ``Loss`` (its options are dataclass fields,
    after ``reduction``) that implements two methods, with m rows and n outputs:

        forward(pred (m, n), target, weight (m,) or None = None) -> (value, residual)
            ``target``: (m, n) floats, or what ``check_target`` accepts (class labels (m,)).
            ``value``: 0-d for "mean" and "sum", the per-row losses (m,) for "none".
            ``residual``: whatever ``backward`` needs (tensors, numbers, tuples).
        backward(residual, dvalue (0-d, (m,) for "none") or None = None) -> dpred (m, n)
            the gradient of ``value`` with respect to ``pred`` times ``dvalue`` (1 when None).

    Row weights (``sample_weight``) reach ``forward`` as ``weight``: "mean" is then the
    weighted mean of the per-row losses l_i, sum_i w_i·l_i / sum_i w_i, "sum" the weighted
    sum, and "none" the per-row losses times w_i; ``reduce_per_element`` does all three for a
    loss made of per-element terms. A row of weight 0 must count for nothing (a compiled step
    pads a short batch with such rows), and weights of 1 must give the unweighted value. A
    loss whose ``forward`` has no third argument (``forward(self, pred, target)``) takes no
    row weights: its ``supports_weights`` is False and ``sample_weight`` is refused
    (``check_loss_weights``) instead of ignored; set ``supports_weights`` on the class to
    decide otherwise. Optional hooks: ``check_target`` (the target's form),
    ``check_target_values`` (a pass over the values, once per fit) and ``check_labels``.

    ``fnmlp.testing.check_loss(loss, pred, y, weight)`` checks ``backward`` against finite
    differences and autograd, and that rows of weight 0 count for nothing; ``fnmlp.register``
    makes the class savable (and twinnable, given its ``torch.nn`` loss).
    """

    reduction: str = "mean"
    name: ClassVar[str]
    supports_weights: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs):
        """fnmlp's own losses register themselves (a user's: ``fnmlp.register``); a class
        that does not set ``supports_weights`` takes it from its ``forward``'s arguments."""
        super().__init_subclass__(**kwargs)
        if "supports_weights" not in cls.__dict__ and "forward" in cls.__dict__:
            cls.supports_weights = _takes_weights(cls.forward)
        if not cls.supports_weights:
            cls.forward = _refusing_weights(cls.forward)
        _registry.add_own(cls, "loss")

    def __post_init__(self):
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {self.reduction!r}")

    def forward(self, pred: Tensor, target: Tensor, weight: Tensor | None = None
                ) -> tuple[Tensor, Any]:
        """``(value, residual)``: value 0-d ((m,) for "none"); see the class docstring."""
        raise NotImplementedError

    def backward(self, residual, dvalue: Tensor | None = None) -> Tensor:
        """``dpred`` (m, n): d value / d pred times ``dvalue`` (1 when None)."""
        raise NotImplementedError

    def check_target(self, target, out_features: int, like: Tensor, name: str = "y") -> Tensor:
        """``target`` as a float (m, out_features) tensor like ``like``; raises if it is not."""
        integers = (not target.is_floating_point() and target.dtype != torch.bool
                    if isinstance(target, Tensor) else _is_integer_array(target))
        if integers and (target.dim() if isinstance(target, Tensor)
                         else _dimensions(target)) == 1:
            raise TypeError(f"{name} holds integer class labels, but {type(self).__name__} "
                            "takes float targets (samples, columns): for classification pass "
                            "loss=fnmlp.cross_entropy; for regression give float targets "
                            f"({name}.reshape(-1, 1) for one output)")
        target = _validate.as_data(target, name, like)
        if target.dim() == 1 and out_features == 1:
            raise ValueError(f"{name} must be 2-D (samples, 1), got shape {tuple(target.shape)}; "
                             f"use {name}.reshape(-1, 1)")
        _validate.check_matrix(target, name, out_features, "columns")
        return target

    def check_target_values(self, target: Tensor, classes: int, name: str = "y") -> None:
        """Value checks that need a pass over the data (done once per fit)."""
        _validate.check_finite(target, name)

    def check_labels(self, target: Tensor, classes: int, name: str = "y") -> None:
        """Checks a compiled step cannot do for itself (class label ranges); none here."""

    def __call__(self, pred: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
        return self.forward(pred, target, weight)[0]


def _takes_weights(forward) -> bool:
    """Whether ``forward(self, pred, target, ...)`` has a third argument (or ``*args``)."""
    try:
        parameters = list(inspect.signature(forward).parameters.values())[1:]  # past self
    except (TypeError, ValueError):  # no signature to read: assume the protocol
        return True
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY,
                                                        p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 3 or any(p.kind is p.VAR_POSITIONAL for p in parameters)


def _refusing_weights(forward):
    """``forward`` taking the protocol's ``weight=None``, raising for any other value: the
    safety net behind ``check_loss_weights`` where a path does not call it."""
    if getattr(forward, "_refuses_weights", False):
        return forward
    takes = _takes_weights(forward)

    @functools.wraps(forward)
    def refusing(self, pred, target, weight=None):
        if weight is not None:
            raise TypeError(_no_weights_message(type(self).__name__, "row weights") + (
                "; a compiled training step passes them too (1 per row, 0 for padding): "
                "train with compile=False"))
        return forward(self, pred, target, None) if takes else forward(self, pred, target)

    refusing._refuses_weights = True
    return refusing


def _no_weights_message(name: str, what: str) -> str:
    return (f"{name} takes no row weights ({name}.supports_weights is False), so {what} "
            f"cannot be used with it; drop {what}, or give {name}.forward a third argument, the "
            f"row weights (m,), and implement the weighted reduction "
            f"(fnmlp.nn.reduce_per_element)")


def check_loss_weights(loss: Loss, weight: Any, name: str = "sample_weight") -> None:
    """Refuse row weights for a loss that cannot take them (``supports_weights`` False).

    Arguments:
        loss: an fnmlp loss.
        weight: the row weights given (any form: (m,), (K, m), array-like), or None for none;
            only whether they are given is looked at.
        name: what the weights are called in the message ("sample_weight", "bagging").

    Raises ``TypeError`` naming the loss's class and what to do; returns None otherwise.
    """
    if weight is not None and not getattr(loss, "supports_weights", True):
        raise TypeError(_no_weights_message(type(loss).__name__, name))


def reduce_per_element(loss: Loss, per_element: Tensor, weight: Tensor | None):
    """Reduce per-element losses (m, n); return (value, gradient scale: a number or (m, 1))."""
    columns = per_element.shape[1]
    if loss.reduction == "none":  # per-row losses: the mean over a row, times its weight
        per_row = per_element.mean(dim=1)
        if weight is None:
            return per_row, 1 / columns
        return per_row * weight, (weight / columns).unsqueeze(1)
    if weight is not None:
        scale = weight if loss.reduction == "sum" else weight / (weight.sum() * columns)
        scale = scale.unsqueeze(1)
        return (per_element * scale).sum(), scale
    if loss.reduction == "sum":
        return per_element.sum(), 1.0
    return per_element.mean(), 1 / per_element.numel()


def _scaled(gradient: Tensor, dvalue: Tensor | None) -> Tensor:
    """The gradient times the value's cotangent (a scalar, or (m,) per row for "none")."""
    if dvalue is None:
        return gradient
    return gradient * (dvalue.unsqueeze(1) if dvalue.dim() == 1 else dvalue)


def _floats(values, name: str) -> tuple[float, ...] | None:
    """A static, hashable tuple of floats from a tensor, array, list or tuple (or None)."""
    if values is None:
        return None
    if isinstance(values, Tensor):
        values = values.detach().cpu().reshape(-1).tolist()
    try:
        floats = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a 1-D sequence of numbers, got {values!r}") from None
    if not floats or not all(math.isfinite(v) for v in floats):
        raise ValueError(f"{name} must be finite numbers, got {floats}")
    return floats


def _check_width(values, out_features: int, what: str, name: str) -> None:
    if values is not None and len(values) != out_features:
        raise ValueError(f"{name} has {len(values)} entries but the model has {out_features} "
                         f"{what}")


@dataclasses.dataclass(frozen=True)
class MSE(Loss):
    """L = mean((p - y)²);  dL/dp = (p - y)·2/n (n = number of elements; 2 for "sum")."""

    name: ClassVar[str] = "mse"

    def forward(self, pred, target, weight=None):
        diff = pred - target
        value, scale = reduce_per_element(self, diff.pow(2), weight)
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
        value, scale = reduce_per_element(self, diff.abs(), weight)
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
        value, scale = reduce_per_element(self, per, weight)
        return value, (diff, scale)

    def backward(self, residual, dvalue=None):
        diff, scale = residual
        return _scaled(torch.clamp(diff, -self.delta, self.delta) * scale, dvalue)


@dataclasses.dataclass(frozen=True)
class SmoothL1(Loss):
    """Per element d = p - y: ½d²/β where |d| < β, else |d| - ½β;
    dL/dp = -1 where d <= -β, 1 where d >= β, else d/β (``nn.SmoothL1Loss``; β = 0 is the L1
    loss, sign(d), as torch makes it)."""

    beta: float = 1.0
    name: ClassVar[str] = "smooth_l1"

    def __post_init__(self):
        super().__post_init__()
        if not self.beta >= 0:
            raise ValueError(f"smooth l1 beta must be >= 0, got {self.beta}")

    def forward(self, pred, target, weight=None):
        diff = pred - target
        size = diff.abs()
        if self.beta == 0:
            per = size
        else:
            per = torch.where(size < self.beta, 0.5 * diff * diff / self.beta,
                              size - 0.5 * self.beta)
        value, scale = reduce_per_element(self, per, weight)
        return value, (diff, scale)

    def backward(self, residual, dvalue=None):
        diff, scale = residual
        if self.beta == 0:
            slope = torch.sign(diff)
        else:
            slope = torch.where(diff <= -self.beta, -1.0,
                                torch.where(diff >= self.beta, 1.0, diff / self.beta))
        return _scaled(slope * scale, dvalue)


_NLL_REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}  # aten's reduction codes
_NO_IGNORED_LABEL = -(2**63)  # nll_loss's ignore_index where none is: no label can be it


@dataclasses.dataclass(frozen=True)
class CrossEntropy(Loss):
    """Cross-entropy from logits z (m, C), fused with log-softmax for stability
    (``nn.CrossEntropyLoss``).

    Targets are class indices (m,) or probabilities (m, C) that sum to 1 per row. Each row's
    loss is -sum_c T_c log softmax(z)_c with T its (smoothed, weighted) target:
    labels: T_c = (1 - ε)·w_y·[c = y] + ε·w_c/C; probabilities: T_c = w_c·((1 - ε)·t_c + ε/C);
    w the class weights (1 without). "mean" divides by sum_i w_{y_i} for labels (rows with
    ``ignore_index`` count for nothing) and by m for probabilities, as torch does; row weights
    s_i multiply each row's loss and its share of the divisor. dL/dz = (softmax(z)·sum_c T_c -
    T)·s_i/divisor.

    Arguments:
        reduction: "mean", "sum" or "none".
        label_smoothing: ε in [0, 1].
        weight: (C,) class weights (any finite numbers, as torch), or None.
        ignore_index: a label whose rows are ignored (labels only), or None.
    """

    label_smoothing: float = 0.0
    weight: tuple[float, ...] | None = None
    ignore_index: int | None = None
    name: ClassVar[str] = "cross_entropy"

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.label_smoothing <= 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1], got {self.label_smoothing}")
        object.__setattr__(self, "weight", _floats(self.weight, "cross_entropy weight"))
        if self.ignore_index is not None and (isinstance(self.ignore_index, bool) or not hasattr(
                self.ignore_index, "__index__")):
            raise TypeError(f"ignore_index must be an integer or None, got {self.ignore_index!r}")

    def forward(self, logits, target, weight=None):
        log_probs = torch.log_softmax(logits, dim=1)
        if target.dim() == 1 and self.weight is None and self.ignore_index is None:
            if weight is None and not self.label_smoothing and self.reduction != "none":
                return self._labels_only(log_probs, target)
            return self._plain_labels(logits, log_probs, target, weight)
        targets, divisor = self.targets(logits, target)
        per_row = -(targets * log_probs).sum(dim=1)
        if weight is not None:
            per_row, divisor = per_row * weight, divisor * weight
        if self.reduction == "none":
            value, scale = per_row, (1.0 if weight is None else weight.unsqueeze(1))
        elif self.reduction == "sum":
            value, scale = per_row.sum(), (1.0 if weight is None else weight.unsqueeze(1))
        else:
            total = divisor.sum()
            value = per_row.sum() / total  # NaN when every row is ignored, as torch
            inverse = torch.where(total != 0, 1 / total, 0.0)  # ... whose gradient is then 0
            scale = inverse if weight is None else (weight * inverse).unsqueeze(1)
        return value, (log_probs, targets, scale, True)

    def _labels_only(self, log_probs, labels):
        """Class indices alone (the common case): torch's own two kernels each way,
        ``nll_loss`` and the backward pair autograd runs for ``F.cross_entropy`` — the same
        numbers as autograd, and no one-hot matrix. Its residual is tagged "nll"."""
        reduction = _NLL_REDUCTIONS[self.reduction]
        value, total = torch.ops.aten.nll_loss_forward(log_probs, labels, None, reduction,
                                                       _NO_IGNORED_LABEL)
        return value, (log_probs, labels, total, "nll")

    def _plain_labels(self, logits, log_probs, labels, weight):
        """Class indices without class weights or ignored rows: torch's own arithmetic."""
        classes = logits.shape[1]
        target = torch.nn.functional.one_hot(labels, classes).to(logits.dtype)
        if self.label_smoothing:
            target = target * (1 - self.label_smoothing) + self.label_smoothing / classes
        per_row = -(target * log_probs).sum(dim=1)
        if self.reduction == "none":
            if weight is None:
                return per_row, (log_probs, target, 1.0, False)
            return per_row * weight, (log_probs, target, weight.unsqueeze(1), False)
        if weight is not None:
            scale = weight if self.reduction == "sum" else weight / weight.sum()
            return (per_row * scale).sum(), (log_probs, target, scale.unsqueeze(1), False)
        if self.reduction == "sum":
            return per_row.sum(), (log_probs, target, 1.0, False)
        rows = logits.shape[0]
        return per_row.sum() / rows, (log_probs, target, 1 / rows, False)

    def targets(self, logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """(T (m, C), each row's share of the "mean" divisor (m,))."""
        rows, classes = logits.shape
        dtype, device = logits.dtype, logits.device
        eps = self.label_smoothing
        class_weight = (None if self.weight is None
                        else torch.tensor(self.weight, dtype=dtype, device=device))
        if target.dim() == 2:
            targets = target * (1 - eps) + eps / classes if eps else target
            if class_weight is not None:
                targets = targets * class_weight
            return targets, torch.ones(rows, dtype=dtype, device=device)
        labels = target
        keep = None
        if self.ignore_index is not None:
            keep = target != self.ignore_index
            labels = torch.where(keep, target, 0)
        one_hot = torch.nn.functional.one_hot(labels, classes).to(dtype)
        row_weight = (torch.ones(rows, dtype=dtype, device=device) if class_weight is None
                      else class_weight[labels])
        if keep is not None:
            row_weight = row_weight * keep.to(dtype)
        targets = one_hot * ((1 - eps) * row_weight).unsqueeze(1)
        if eps:
            smooth = (eps / classes) * (class_weight if class_weight is not None
                                        else torch.ones(classes, dtype=dtype, device=device))
            targets = targets + smooth * (keep.to(dtype).unsqueeze(1) if keep is not None
                                          else 1.0)
        return targets, row_weight

    def backward(self, residual, dvalue=None):
        log_probs, target, scale, general = residual
        if general == "nll":  # dL/dz = (softmax(z) - onehot(y))/m, as autograd computes it
            dvalue = torch.ones((), dtype=log_probs.dtype, device=log_probs.device) \
                if dvalue is None else dvalue.to(log_probs.dtype)
            dlog_probs = torch.ops.aten.nll_loss_backward(
                dvalue, log_probs, target, None, _NLL_REDUCTIONS[self.reduction],
                _NO_IGNORED_LABEL, scale)
            return torch.ops.aten._log_softmax_backward_data(dlog_probs, log_probs, 1,
                                                             log_probs.dtype)
        probs = torch.exp(log_probs)
        if general:
            probs = probs * target.sum(dim=1, keepdim=True)
        return _scaled((probs - target) * scale, dvalue)

    def check_target(self, target, out_features, like, name="y"):
        is_labels = (not target.is_floating_point() if isinstance(target, Tensor)
                     else _is_integer_array(target))
        if is_labels:
            labels = _validate.as_labels(target, name, like)
            if labels.dim() != 1:
                raise ValueError(f"class labels {name} must be 1-D (samples,), got shape "
                                 f"{tuple(labels.shape)}")
            if labels.shape[0] == 0:
                raise ValueError(f"{name} is empty: it has 0 samples")
            _check_width(self.weight, out_features, "classes", "cross_entropy weight")
            return labels.long()
        if (target.dim() if isinstance(target, Tensor) else _dimensions(target)) == 1:
            dtype = target.dtype if isinstance(target, Tensor) else "floats"
            raise TypeError(f"class labels {name} must be integers (use {name}.long()), got "
                            f"{dtype}")
        _check_width(self.weight, out_features, "classes", "cross_entropy weight")
        return super().check_target(target, out_features, like, name)

    def check_labels(self, target, classes, name="y"):
        """Label range checks (one pass over the labels; also before compiled steps)."""
        if target.dim() != 1:
            return
        labels = target if self.ignore_index is None else target[target != self.ignore_index]
        if labels.numel() == 0:
            return
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= classes:
            raise ValueError(f"label {low if low < 0 else high} in {name} is out of range: "
                             f"the model has {classes} classes (labels 0..{classes - 1}"
                             + (f", or {self.ignore_index} to ignore a row)"
                                if self.ignore_index is not None else ")"))

    def check_target_values(self, target, classes, name="y"):
        if target.dim() == 1:
            self.check_labels(target, classes, name)
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
class PoissonNLL(Loss):
    """Poisson negative log-likelihood of log-rates z: per element exp(z) - y·z;
    dL/dz = exp(z) - y (``nn.PoissonNLLLoss(log_input=True, full=False)``; the predicted rate
    is exp(z)). Targets are counts or rates y >= 0."""

    name: ClassVar[str] = "poisson_nll"

    def forward(self, pred, target, weight=None):
        rate = pred.exp()
        value, scale = reduce_per_element(self, rate - target * pred, weight)
        return value, (rate - target, scale)

    def backward(self, residual, dvalue=None):
        difference, scale = residual
        return _scaled(difference * scale, dvalue)

    def check_target_values(self, target, classes, name="y"):
        super().check_target_values(target, classes, name)
        if bool((target < 0).any()):
            raise ValueError(f"{name} must be >= 0 for the Poisson loss (counts or rates)")


@dataclasses.dataclass(frozen=True)
class BinaryCrossEntropyWithLogits(Loss):
    """Per element, with σ the sigmoid, w the column weight and q the positive weight
    (``nn.BCEWithLogitsLoss``): -w·(q·y·log σ(z) + (1 - y)·log(1 - σ(z))), computed stably;
    dL/dz = w·((1 + (q - 1)·y)·σ(z) - q·y)/n (σ(z) - y without weights).

    Arguments:
        reduction: "mean", "sum" or "none".
        weight: (n,) weights of the output columns, or None.
        pos_weight: (n,) weights of the positive examples per column, or None.
    """

    weight: tuple[float, ...] | None = None
    pos_weight: tuple[float, ...] | None = None
    name: ClassVar[str] = "binary_cross_entropy_with_logits"

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "weight", _floats(self.weight, "bce weight"))
        object.__setattr__(self, "pos_weight", _floats(self.pos_weight, "bce pos_weight"))

    def forward(self, logits, target, weight=None):
        # torch's stable per-element kernel, one call (the value only: the gradient is below)
        pos_weight = None if self.pos_weight is None else self._tensor(self.pos_weight, logits)
        if weight is None and self.weight is None and self.reduction != "none":
            value = torch.nn.functional.binary_cross_entropy_with_logits(
                logits, target, reduction=self.reduction, pos_weight=pos_weight)
            scale = 1 / logits.numel() if self.reduction == "mean" else 1.0
            return value, (logits, target, scale)
        per = torch.nn.functional.binary_cross_entropy_with_logits(
            logits, target, reduction="none", pos_weight=pos_weight)
        if self.weight is not None:
            per = per * self._tensor(self.weight, logits)
        value, scale = reduce_per_element(self, per, weight)
        return value, (logits, target, scale)

    def backward(self, residual, dvalue=None):
        logits, target, scale = residual
        if self.pos_weight is None:
            gradient = torch.sigmoid(logits) - target
        else:
            positive = self._tensor(self.pos_weight, logits)
            gradient = (1 + (positive - 1) * target) * torch.sigmoid(logits) - positive * target
        if self.weight is not None:
            gradient = gradient * self._tensor(self.weight, logits)
        return _scaled(gradient * scale, dvalue)

    @staticmethod
    def _tensor(values: tuple[float, ...], like: Tensor) -> Tensor:
        return torch.tensor(values, dtype=like.dtype, device=like.device)

    def check_target(self, target, out_features, like, name="y"):
        _check_width(self.weight, out_features, "outputs", "bce weight")
        _check_width(self.pos_weight, out_features, "outputs", "bce pos_weight")
        return super().check_target(target, out_features, like, name)

    def check_target_values(self, target, classes, name="y"):
        super().check_target_values(target, classes, name)
        if bool(((target < 0) | (target > 1)).any()):
            raise ValueError(f"binary targets {name} must lie in [0, 1]")


def _dimensions(value) -> int | None:
    import numpy as np

    try:
        return np.asarray(value).ndim
    except Exception:  # not array-like: as_data names the problem
        return None


def _is_integer_array(value) -> bool:
    import numpy as np

    return np.issubdtype(np.asarray(value).dtype, np.integer)


mse = MSE()
l1 = L1()
huber = Huber()
smooth_l1 = SmoothL1()
poisson_nll = PoissonNLL()
cross_entropy = CrossEntropy()
binary_cross_entropy_with_logits = BinaryCrossEntropyWithLogits()
