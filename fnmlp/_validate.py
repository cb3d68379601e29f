"""Checks on user input, raised before any work is done, with the fix in the message."""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch
from torch import Tensor


def as_data(value, name: str, like: Tensor) -> Tensor:
    """A tensor on ``like``'s device and dtype.

    NumPy arrays (and lists) are converted; a torch tensor must already match, since silently
    moving or casting a user's tensor hides bugs.
    """
    if isinstance(value, Tensor):
        _check_strided(value, name)
        if value.dtype != like.dtype:
            raise TypeError(
                f"{name} has dtype {value.dtype} but the parameters are {like.dtype}; "
                f"convert with {name}.to({like.dtype})"
            )
        if value.device != like.device:
            raise ValueError(
                f"{name} is on {value.device} but the parameters are on {like.device}; "
                f"move it with {name}.to('{like.device}')"
            )
        return value
    if isinstance(value, (np.ndarray, list, tuple)):
        array = _numeric_array(value, name)
        return torch.as_tensor(array, dtype=like.dtype, device=like.device)
    raise TypeError(f"{name} must be a torch.Tensor or a NumPy array, got {type(value).__name__}")


def as_labels(value, name: str, like: Tensor) -> Tensor:
    """Integer class labels as a tensor on ``like``'s device (a tensor must be there already)."""
    if isinstance(value, Tensor):
        _check_strided(value, name)
        if value.device != like.device:
            raise ValueError(f"{name} is on {value.device} but the parameters are on "
                             f"{like.device}; move it with {name}.to('{like.device}')")
        return value
    return torch.as_tensor(_numeric_array(value, name), device=like.device)


def _numeric_array(value, name: str) -> np.ndarray:
    """A contiguous NumPy array of numbers (views with negative strides are copied: torch
    cannot view them)."""
    array = np.ascontiguousarray(np.asarray(value))
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise TypeError(f"{name} must hold numbers, got a NumPy array of {array.dtype}")
    return array


def _check_strided(value: Tensor, name: str) -> None:
    if value.layout != torch.strided:
        raise TypeError(f"{name} is a {value.layout} tensor; fnmlp takes dense tensors: pass "
                        f"{name}.to_dense()")


def check_matrix(value: Tensor, name: str, columns: int, columns_meaning: str) -> None:
    """``value`` is 2-D with ``columns`` columns and at least one row."""
    if value.dim() != 2:
        hint = f"; for one sample use {name}.reshape(1, -1)" if value.dim() == 1 else ""
        raise ValueError(
            f"{name} must be 2-D (samples, {columns_meaning}), got shape {tuple(value.shape)}{hint}"
        )
    if value.shape[0] == 0:
        raise ValueError(f"{name} is empty: it has 0 samples")
    if value.shape[1] != columns:
        raise ValueError(
            f"{name} has {value.shape[1]} {columns_meaning} but the model "
            f"{'expects' if columns_meaning == 'features' else 'outputs'} {columns}"
        )


def check_finite(value: Tensor, name: str) -> None:
    finite = torch.isfinite(value)
    if not bool(finite.all()):
        row = int((~finite).any(dim=1).nonzero()[0, 0])
        raise ValueError(f"{name} contains NaN or inf (first in row {row})")


def check_rows(x: Tensor, y: Tensor, x_name: str = "x", y_name: str = "y") -> None:
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"{x_name} has {x.shape[0]} rows but {y_name} has {y.shape[0]}")


def check_positive_int(value, name: str, *, allow_zero: bool = False) -> None:
    smallest = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < smallest:
        raise ValueError(f"{name} must be an integer >= {smallest}, got {value!r}")


def check_learning_rate(lr, name: str = "lr") -> None:
    if isinstance(lr, Tensor):
        if lr.dim() != 0 or lr.is_complex() or not lr.is_floating_point():
            raise ValueError(f"{name} must be a float or a 0-d floating tensor, got {lr!r}")
        value = float(lr)
    elif isinstance(lr, numbers.Real) and not isinstance(lr, bool):
        value = float(lr)
    else:
        raise TypeError(f"{name} must be a float or a 0-d tensor, got {type(lr).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be finite and > 0, got {value}")


def as_weights(weight, rows: int, like: Tensor, name: str = "sample_weight") -> Tensor | None:
    """Row weights (rows,) in ``like``'s dtype and device, or None: non-negative, finite and not
    all zero. NumPy arrays and lists are converted; a tensor must be on ``like``'s device."""
    if weight is None:
        return None
    if isinstance(weight, Tensor):
        _check_strided(weight, name)
        if weight.device != like.device:
            raise ValueError(f"{name} is on {weight.device} but the parameters are on "
                             f"{like.device}; move it with {name}.to('{like.device}')")
        if weight.is_complex() or weight.dtype == torch.bool:
            raise TypeError(f"{name} must hold real numbers, got {weight.dtype}")
        weight = weight.to(like.dtype)
    elif isinstance(weight, (np.ndarray, list, tuple)):
        weight = torch.as_tensor(_numeric_array(weight, name), dtype=like.dtype,
                                 device=like.device)
    else:
        raise TypeError(f"{name} must be a torch.Tensor or a NumPy array, got "
                        f"{type(weight).__name__}")
    if weight.dim() != 1 or weight.shape[0] != rows:
        raise ValueError(f"{name} must be 1-D with one weight per row ({rows},), got shape "
                         f"{tuple(weight.shape)}")
    if not bool(torch.isfinite(weight).all()):
        raise ValueError(f"{name} contains NaN or inf")
    if bool((weight < 0).any()):
        raise ValueError(f"{name} must be >= 0")
    if not bool((weight > 0).any()):
        raise ValueError(f"{name} is all zero: no row would count")
    return weight
