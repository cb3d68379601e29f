"""Checks on user input, raised before any work is done, with the fix in the message."""

from __future__ import annotations

import math
import numbers
import warnings

import numpy as np
import torch
from torch import Tensor


def as_data(value, name: str, like: Tensor) -> Tensor:
    """A C-contiguous tensor on ``like``'s device and dtype: the one place where input data
    takes the layout every computation sees, so that results do not depend on how the caller's
    data was laid out (C or Fortran order, strided views, a DataFrame).

    NumPy arrays (and lists, and objects with ``__array__``, such as pandas DataFrames) are
    converted, in one copy at most (none for a C-ordered array of that dtype on the CPU). A torch
    tensor must already have the dtype and device, since silently moving or casting a user's
    tensor hides bugs; a non-contiguous one is copied once, a contiguous one is used as is.
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
        return contiguous(value)
    if _is_array_like(value, name):
        return _from_array(_numeric_array(value, name, _NUMPY_DTYPES.get(like.dtype)),
                           like.dtype, like.device)
    raise TypeError(f"{name} must be a torch.Tensor or a NumPy array, got {type(value).__name__}")


def _from_array(array: np.ndarray, dtype: torch.dtype | None, device: torch.device) -> Tensor:
    """A C-contiguous ``array`` as a tensor of ``dtype`` (None: the array's) on ``device``,
    sharing its memory where it can (a read-only array, such as a memory map or a pandas
    column, too: fnmlp never writes to its input)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The given NumPy array is not writable")
        return torch.as_tensor(array, dtype=dtype, device=device)


def as_labels(value, name: str, like: Tensor) -> Tensor:
    """Integer class labels as a C-contiguous tensor on ``like``'s device (a tensor must be
    there already)."""
    if isinstance(value, Tensor):
        _check_strided(value, name)
        if value.device != like.device:
            raise ValueError(f"{name} is on {value.device} but the parameters are on "
                             f"{like.device}; move it with {name}.to('{like.device}')")
        return contiguous(value)
    return _from_array(_numeric_array(value, name), None, like.device)


def contiguous(value: Tensor) -> Tensor:
    """``value`` itself when C-contiguous, else one C-contiguous copy (never recorded by
    autograd)."""
    if value.is_contiguous():
        return value
    with torch.no_grad():
        return value.contiguous()


# the NumPy dtype an array is converted to for a tensor of this dtype, in the one copy that
# also orders it (both round as torch does; float16 is left to torch, which rounds via float32)
_NUMPY_DTYPES = {torch.float64: np.float64, torch.float32: np.float32}


def _is_array_like(value, name: str) -> bool:
    """Whether ``value`` converts to a NumPy array; raises for a SciPy sparse matrix (dense
    data only, as for sparse tensors: densifying could take any amount of memory)."""
    if type(value).__module__.startswith("scipy.sparse"):
        raise TypeError(f"{name} is a SciPy sparse matrix; fnmlp takes dense data: pass "
                        f"{name}.toarray() (fnmlp.sklearn's estimators take sparse input)")
    return isinstance(value, (np.ndarray, list, tuple)) or hasattr(value, "__array__")


def _numeric_array(value, name: str, dtype=None) -> np.ndarray:
    """A C-contiguous NumPy array of numbers, in ``dtype`` when given (views with negative
    strides and Fortran-ordered arrays are copied: torch cannot view the first, and the second
    would make products sum in another order)."""
    array = np.asarray(value)
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise TypeError(f"{name} must hold numbers, got a NumPy array of {array.dtype}")
    return np.ascontiguousarray(array, dtype=dtype)


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
        weight = contiguous(weight.to(like.dtype))
    elif _is_array_like(weight, name):
        weight = _from_array(_numeric_array(weight, name, _NUMPY_DTYPES.get(like.dtype)),
                             like.dtype, like.device)
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


def check_no_autocast(device: torch.device | str, where: str) -> None:
    """Refuse to run ``where`` under ``torch.autocast`` for ``device``'s type, before any
    work. fnmlp computes in its parameters' dtype: under autocast the products would run in
    another dtype than the elementwise math and the optimizer around them (a dtype error or
    silently mixed precision), so it is refused rather than half supported. An autocast for
    another device type (CUDA autocast around a CPU fit) changes nothing here and passes."""
    kind = torch.device(device).type
    try:
        enabled = torch.is_autocast_enabled(kind)
    except RuntimeError:  # a device type autocast does not know (meta)
        return
    if enabled:
        dtype = torch.get_autocast_dtype(kind)
        raise RuntimeError(
            f"{where} was called under torch.autocast({kind!r}, dtype={dtype}); fnmlp does not "
            "support autocast (mixed precision): it computes in its parameters' dtype. Call it "
            "outside the autocast block (or inside torch.autocast(..., enabled=False)); to "
            f"train or predict in {dtype}, make the parameters that dtype "
            f"(model.init(..., dtype={dtype}), or each tensor .to({dtype})) and pass data of "
            "that dtype")
