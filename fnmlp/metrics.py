"""Metrics on predictions; each returns a Python float (losses, which return tensors and have
backward rules, are ``fnmlp.mse`` and friends)."""

from __future__ import annotations

import numbers

import torch
from torch import Tensor

from fnmlp._validate import _from_array, _is_array_like, _numeric_array


def _as_tensor(value, name: str, device: torch.device | None = None) -> Tensor:
    """``value`` (a tensor, NumPy array, pandas DataFrame or Series, list or number) as a
    detached tensor of real numbers or bools, on ``device`` when given: the one conversion
    predictions and targets both go through."""
    if isinstance(value, Tensor):
        if value.is_complex():
            raise TypeError(f"{name} must hold real numbers, got {value.dtype}")
        value = value.detach()
    elif isinstance(value, numbers.Real):
        value = torch.tensor(value)
    elif _is_array_like(value, name):
        value = _from_array(_numeric_array(value, name, booleans=True), None,
                            torch.device("cpu"))
    else:
        raise TypeError(f"{name} must be a tensor, a NumPy array, a DataFrame or a number, got "
                        f"{type(value).__name__}")
    return value if device is None else value.to(device)


def _pair(prediction, target) -> tuple[Tensor, Tensor]:
    """Prediction and target as float tensors of one shape (a (m,) one against an (m, 1) one
    taken as a column, as scikit-learn does)."""
    prediction = _as_tensor(prediction, "prediction")
    target = _as_tensor(target, "target", prediction.device)
    if prediction.dim() == 1 and target.shape == (*prediction.shape, 1):
        prediction = prediction[:, None]
    elif target.dim() == 1 and prediction.shape == (*target.shape, 1):
        target = target[:, None]
    if prediction.shape != target.shape:
        raise ValueError(f"prediction has shape {tuple(prediction.shape)} but target has "
                         f"{tuple(target.shape)}")
    if prediction.numel() == 0:
        raise ValueError("prediction and target are empty")
    dtype = torch.promote_types(torch.promote_types(prediction.dtype, target.dtype),
                                torch.float32)
    return prediction.to(dtype), target.to(dtype)


def mape(prediction, target) -> float:
    """Mean absolute percentage error as the seed notebook computes it: a fraction, not percent.

    mean(|(target - prediction) / target|); 0 where both are 0 (identical values agree fully).

    Arguments:
        prediction, target: tensors, NumPy arrays, DataFrames or numbers of one shape ((m,)
            against (m, 1) is taken as one column).
    """
    prediction, target = _pair(prediction, target)
    error = (target - prediction).abs()
    ratio = torch.where(error == 0, torch.zeros_like(error), error / target.abs())
    return ratio.mean().item()


def mean_squared_error(prediction, target) -> float:
    """Mean squared error over all elements, as a float (the loss is ``fnmlp.mse``).

    Arguments:
        prediction, target: tensors, NumPy arrays or DataFrames of one shape ((m,) against
            (m, 1) is taken as one column)."""
    prediction, target = _pair(prediction, target)
    return (prediction - target).pow(2).mean().item()


def r2(prediction, target) -> float:
    """Coefficient of determination, averaged uniformly over output columns (scikit-learn's
    default): 1 - SS_res / SS_tot per column.

    Arguments:
        prediction, target: (m,) or (m, n), m >= 2: tensors, NumPy arrays or DataFrames
            ((m,) against (m, 1) is taken as one column).
    """
    prediction, target = _pair(prediction, target)
    if target.dim() not in (1, 2):
        raise ValueError(f"r2 takes (m,) or (m, n) values, got shape {tuple(target.shape)}")
    if target.dim() == 1:
        prediction, target = prediction[:, None], target[:, None]
    if target.shape[0] < 2:
        raise ValueError("r2 needs at least 2 samples")
    residual = (target - prediction).pow(2).sum(dim=0)
    total = (target - target.mean(dim=0)).pow(2).sum(dim=0)
    score = torch.where(total == 0, (residual == 0).to(target.dtype), 1 - residual / total)
    return score.mean().item()


def accuracy(prediction, target) -> float:
    """Fraction of rows classified right.

    How the prediction gives each row's class, by its shape:

    - (m,): the class indices themselves (``MLP.predict_classes`` of a softmax or
      one-output classifier);
    - (m, 1): one output, a binary classifier's logit: class 1 where it is > 0 (probability
      > 1/2, as ``MLP.predict_classes`` decides for one output). Threshold a sigmoid
      *probability* yourself (``(p > 0.5).long()``, or ``predict_classes``): in [0, 1] it
      is always >= 0;
    - (m, k), k >= 2: scores (logits or probabilities) whose argmax is the class.

    The target: class indices (m,) or one column of them (m, 1) (0/1 for a binary
    classifier), or one-hot/probability rows (m, k) whose argmax is the class (k as the
    prediction's columns, when it has several).

    Arguments:
        prediction, target: tensors, NumPy arrays or DataFrames, shaped as above.
    """
    prediction = _as_tensor(prediction, "prediction")
    target = _as_tensor(target, "target", prediction.device)
    for name, value in (("prediction", prediction), ("target", target)):
        if value.dim() not in (1, 2):
            raise ValueError(f"{name} must be (m,) or (m, k), got shape {tuple(value.shape)}")
    if (prediction.dim() == 2 and target.dim() == 2 and target.shape[1] > 1
            and prediction.shape[1] != target.shape[1]):
        raise ValueError(f"prediction has {prediction.shape[1]} columns but the one-hot/"
                         f"probability target has {target.shape[1]}")
    if prediction.dim() == 2:
        prediction = (prediction[:, 0] > 0 if prediction.shape[1] == 1
                      else prediction.argmax(dim=1))
    if target.dim() == 2:
        target = target[:, 0] if target.shape[1] == 1 else target.argmax(dim=1)
    if prediction.shape != target.shape:
        raise ValueError(f"prediction has {tuple(prediction.shape)} labels but target has "
                         f"{tuple(target.shape)}")
    if prediction.numel() == 0:
        raise ValueError("prediction and target are empty")
    return (prediction == target).double().mean().item()
