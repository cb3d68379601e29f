"""scikit-learn's MLP losses as fnmlp losses: the same values and gradients per batch.

scikit-learn sums its per-row losses over the outputs and averages over the rows, but reports
the squared error as half the mean over every element; ``SklearnLoss`` wraps an fnmlp loss
(averaged over elements) with the two factors that give both, so ``loss_`` and the training
trajectory match ``sklearn.neural_network`` for every output count.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from torch import Tensor

from fnmlp.nn import (MSE, BinaryCrossEntropyWithLogits, CrossEntropy, Loss, PoissonNLL,
                      reduce_per_element)


@dataclasses.dataclass(frozen=True)
class SklearnLoss(Loss):
    """``inner``'s value times ``value_factor`` and its gradient times ``grad_factor``;
    ``deviance`` adds the Poisson deviance's constant sum(y·log y - y) to the value (not the
    gradient), as scikit-learn's ``poisson`` loss reports it."""

    inner: Loss = dataclasses.field(default_factory=MSE)
    value_factor: float = 1.0
    grad_factor: float = 1.0
    deviance: bool = False
    name: ClassVar[str] = "sklearn"

    def forward(self, pred: Tensor, target: Tensor, weight: Tensor | None = None):
        value, residual = self.inner.forward(pred, target, weight)
        if self.deviance:
            constant = torch.special.xlogy(target, target) - target
            value = value + reduce_per_element(self.inner, constant, weight)[0]
        return (value * self.value_factor if self.value_factor != 1 else value), residual

    def backward(self, residual, dvalue: Tensor | None = None) -> Tensor:
        gradient = self.inner.backward(residual, dvalue)
        return gradient * self.grad_factor if self.grad_factor != 1 else gradient

    def check_target(self, target, out_features, like, name="y"):
        return self.inner.check_target(target, out_features, like, name)

    def check_target_values(self, target, classes, name="y"):
        self.inner.check_target_values(target, classes, name)

    def check_labels(self, target, classes, name="y"):
        self.inner.check_labels(target, classes, name)


def regression_loss(loss, outputs: int) -> tuple[Loss, str]:
    """``(training loss, out_activation_)`` for the regressor's ``loss`` parameter."""
    if loss == "squared_error":  # reported: ½·mean over elements; gradient: ½·sum over outputs
        return SklearnLoss("mean", MSE(), 0.5, outputs / 2), "identity"
    if loss == "poisson":  # half the Poisson deviance with a log link, summed over outputs
        return SklearnLoss("mean", PoissonNLL(), outputs, outputs, deviance=True), "exp"
    if isinstance(loss, (CrossEntropy, BinaryCrossEntropyWithLogits)):
        raise ValueError(f"loss={loss!r} is a classification loss; use MLPClassifier")
    if isinstance(loss, Loss) and loss.reduction != "none":
        return loss, "exp" if isinstance(loss, PoissonNLL) else "identity"
    raise ValueError("loss must be 'squared_error', 'poisson' or an fnmlp regression loss "
                     f"(e.g. fnmlp.Huber()) with reduction 'mean' or 'sum', got {loss!r}")


def classification_loss(loss, target_type: str, outputs: int) -> tuple[Loss, str]:
    """``(training loss, out_activation_)`` for the classifier's ``loss`` parameter and the
    target type (``LabelBinarizer.y_type_``)."""
    softmax = target_type == "multiclass"
    if loss == "log_loss":
        if softmax:
            return CrossEntropy(), "softmax"
        bce = BinaryCrossEntropyWithLogits()  # sklearn sums the columns' losses
        return SklearnLoss("mean", bce, outputs, outputs), "logistic"
    if softmax and isinstance(loss, CrossEntropy) and loss.reduction != "none":
        return loss, "softmax"
    if not softmax and isinstance(loss, BinaryCrossEntropyWithLogits) \
            and loss.reduction != "none":
        return loss, "logistic"
    expected = "fnmlp.CrossEntropy" if softmax else "fnmlp.BinaryCrossEntropyWithLogits"
    raise ValueError(f"loss must be 'log_loss' or, for {target_type} targets, an {expected} "
                     f"with reduction 'mean' or 'sum', got {loss!r}")
