"""Metrics on predictions; each returns a Python float (losses, which return tensors and have
backward rules, are ``fnmlp.mse`` and friends)."""

from __future__ import annotations

import torch
from torch import Tensor


def _pair(prediction, target) -> tuple[Tensor, Tensor]:
    prediction = torch.as_tensor(prediction)
    target = torch.as_tensor(target, device=prediction.device)
    if prediction.shape != target.shape:
        raise ValueError(f"prediction has shape {tuple(prediction.shape)} but target has "
                         f"{tuple(target.shape)}")
    if prediction.numel() == 0:
        raise ValueError("prediction and target are empty")
    dtype = torch.promote_types(torch.promote_types(prediction.dtype, target.dtype),
                                torch.float32)
    return prediction.detach().to(dtype), target.detach().to(dtype)


def mape(prediction, target) -> float:
    """Mean absolute percentage error as the seed notebook computes it: a fraction, not percent.

    mean(|(target - prediction) / target|); 0 where both are 0 (identical values agree fully).

    Arguments:
        prediction, target: tensors, arrays or numbers of one shape.
    """
    prediction, target = _pair(prediction, target)
    error = (target - prediction).abs()
    ratio = torch.where(error == 0, torch.zeros_like(error), error / target.abs())
    return ratio.mean().item()


def mean_squared_error(prediction, target) -> float:
    """Mean squared error over all elements, as a float (the loss is ``fnmlp.mse``).

    Arguments:
        prediction, target: tensors or arrays of one shape."""
    prediction, target = _pair(prediction, target)
    return (prediction - target).pow(2).mean().item()


def r2(prediction, target) -> float:
    """Coefficient of determination, averaged uniformly over output columns (scikit-learn's
    default): 1 - SS_res / SS_tot per column.

    Arguments:
        prediction, target: (m,) or (m, n), m >= 2.
    """
    prediction, target = _pair(prediction, target)
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

    Arguments:
        prediction: class indices (m,) or scores (m, classes), whose argmax is taken.
        target: class indices (m,) or one-hot/probability rows (m, classes).
    """
    prediction, target = torch.as_tensor(prediction), torch.as_tensor(target)
    if prediction.dim() == 2:
        prediction = prediction.argmax(dim=1)
    if target.dim() == 2:
        target = target.argmax(dim=1)
    if prediction.shape != target.shape:
        raise ValueError(f"prediction has {tuple(prediction.shape)} labels but target has "
                         f"{tuple(target.shape)}")
    if prediction.numel() == 0:
        raise ValueError("prediction and target are empty")
    return (prediction.to(target.device) == target).double().mean().item()
