"""Checks on user input, raised before any work is done, with the fix in the message."""

from __future__ import annotations

import math
import numbers
import warnings

import numpy as np
import torch
from torch import Tensor


def as_data(value, name: str, like: Tensor) -> Tensor:
    """``value`` as data (x, float targets): a C-contiguous tensor in the parameters' dtype,
    on their device. The one place where input data takes the dtype and layout every
    computation sees, so that the kind of input and its memory layout (C or Fortran order,
    strided views, a DataFrame) change nothing in the results.

    The rule, for every entry point (``fnmlp.fit``, ``MLP.apply``, ``evaluate``,
    ``value_and_grad``, ``predict_proba``, a ``train_step`` call, ``Ensemble.fit``/``apply``):

    - Floating, integer or bool numbers (a torch tensor, NumPy array, pandas DataFrame, list,
      or anything with ``__array__``) take the parameters' dtype, in one copy at most and none
      when they already have it in C order (an array for parameters off the CPU: the one copy
      there). A float64 tensor trains float32 parameters, as a float64 array does. Complex
      numbers, strings and objects are refused.
    - A tensor must be on the parameters' device (moving data is explicit:
      ``x.to(device)``); a NumPy array has no device and is placed on theirs.
    - Nothing passed in is modified: a cast or reordering is a new tensor.
    - Class labels keep their own rule (integers: ``as_labels``). A SciPy sparse matrix is
      taken by ``fnmlp.fit`` (a network or an ensemble), ``MLP.apply`` and
      ``Ensemble.apply`` (evaluation mode), ``evaluate``, ``predict_proba`` and
      ``predict_classes``, densified a block of rows at a time (``as_rows``); here it is
      refused, with ``toarray()`` as the fix.

    Arguments:
        value: the data.
        name: its name in error messages ("x", "y", "x_valid").
        like: a parameter leaf, for the dtype and device.
    """
    if isinstance(value, Tensor):
        _check_strided(value, name)
        _check_device(value, name, like)
        _check_real(value, name)
        return _cast(value, like.dtype)
    if _is_array_like(value, name):
        return _from_array(_numeric_array(value, name, _NUMPY_DTYPES.get(like.dtype),
                                          booleans=True), like.dtype, like.device)
    raise TypeError(f"{name} must be a torch.Tensor or a NumPy array, got {type(value).__name__}")


def as_rows(value, name: str, like: Tensor):
    """``as_data``, except that a SciPy sparse matrix stays sparse: as CSR rows whose stored
    values are already what the dense data would hold in the parameters' dtype, checked to
    hold numbers, for ``check_finite`` (which so sees the cast values: a float64 1e300 for
    float32 parameters is inf, as in the dense data) and for ``dense_rows`` to densify a
    block of rows at a time, with no cast left to do.

    The matrix itself when it is CSR of that dtype already (with no duplicate entries), else
    one sparse copy: ``tocsr``'s, or one with the cast values (sharing the matrix's index
    arrays). Nothing passed in is modified.

    Arguments:
        value, name, like: as ``as_data``.
    """
    if not is_sparse(value):
        return as_data(value, name, like)
    dtype = np.dtype(value.dtype)
    if not (np.issubdtype(dtype, np.floating) or np.issubdtype(dtype, np.integer)
            or dtype == np.bool_):
        raise TypeError(f"{name} must hold real numbers, got a SciPy sparse matrix of {dtype}")
    if value.ndim != 2:
        return value  # check_matrix names a 1-D one
    rows = value.tocsr()
    own = rows is not value  # tocsr's copy, which may be changed in place
    if not rows.has_canonical_format:  # duplicates summed first, as toarray sums them
        if not own:
            rows, own = rows.copy(), True
        rows.sum_duplicates()
    data = _cast_values(rows.data, like.dtype)
    if data is rows.data:
        return rows
    if own:
        rows.data = data
        return rows
    return type(rows)((data, rows.indices, rows.indptr), shape=rows.shape, copy=False)


def _cast_values(data: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """A sparse matrix's stored values as the dense data would hold them in ``dtype``: itself
    when it has the NumPy dtype already, else one cast rounding as ``as_data``'s (NumPy's for
    float32 and float64; torch's for float16 and bfloat16, whose values are then stored,
    exactly, as float32: SciPy's sparse matrices hold neither)."""
    numpy_dtype = _NUMPY_DTYPES.get(dtype)
    if numpy_dtype is not None:
        return data.astype(numpy_dtype, copy=False)
    values = _from_array(np.ascontiguousarray(data), dtype, torch.device("cpu"))
    return values.to(torch.float32).numpy()


def dense_rows(rows, name: str, like: Tensor) -> Tensor:
    """A block of CSR rows (from ``as_rows``, their values cast already) as a C-contiguous
    tensor like ``like``: the values the dense data would give, bit for bit (for float16 and
    bfloat16 parameters, an exact cast from float32).

    Arguments:
        rows: a SciPy sparse matrix of rows.
        name, like: as ``as_data``.
    """
    return as_data(rows.toarray(), name, like)


def dense_blocks(rows, like: Tensor, block: int | None = None):
    """CSR rows (from ``as_rows``) as dense tensors like ``like`` (``dense_rows``), ``block``
    rows at a time (default: 64 MiB of dense rows, ``block_rows``): bounded memory for
    predictions on a sparse matrix."""
    block = block or block_rows(rows.shape[1], like)
    for start in range(0, rows.shape[0], block):
        yield dense_rows(rows[start:start + block], "x", like)


def is_sparse(value) -> bool:
    """Whether ``value`` is a SciPy sparse matrix or array (told by its type's module, so that
    SciPy is never imported for it)."""
    return type(value).__module__.startswith("scipy.sparse")


def block_rows(columns: int, like: Tensor, budget: int = 1 << 26) -> int:
    """How many rows of ``columns`` values of ``like``'s dtype fit in ``budget`` bytes (64 MiB
    by default; at least one): the block a sparse matrix is densified by."""
    return max(1, budget // (max(columns, 1) * like.element_size()))


def _check_device(value: Tensor, name: str, like: Tensor) -> None:
    if value.device != like.device:
        raise ValueError(f"{name} is on {value.device} but the parameters are on {like.device}; "
                         f"move it with {name}.to('{like.device}')")


def _check_real(value: Tensor, name: str) -> None:
    if value.is_complex():
        raise TypeError(f"{name} must hold real numbers, got {value.dtype}")


def _cast(value: Tensor, dtype: torch.dtype) -> Tensor:
    """``value`` in ``dtype`` and C order: itself when it is already, else one new tensor
    (never recorded by autograd)."""
    if value.dtype == dtype:
        return contiguous(value)
    with torch.no_grad():
        return value.to(dtype=dtype, memory_format=torch.contiguous_format)


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
        _check_device(value, name, like)
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
    """Whether ``value`` converts to a NumPy array; raises for a SciPy sparse matrix (taken
    only where ``as_rows`` is: densifying it whole could take any amount of memory)."""
    if is_sparse(value):
        raise TypeError(f"{name} is a SciPy sparse matrix, which this function does not take: "
                        f"pass {name}.toarray() (fnmlp.fit, MLP.apply, evaluate, "
                        "predict_proba and fnmlp.sklearn's estimators take sparse input, "
                        "densified a block of rows at a time)")
    return isinstance(value, (np.ndarray, list, tuple)) or hasattr(value, "__array__")


def _numeric_array(value, name: str, dtype=None, *, booleans: bool = False) -> np.ndarray:
    """A C-contiguous NumPy array of numbers (and of bools with ``booleans``), in ``dtype``
    when given (views with negative strides and Fortran-ordered arrays are copied: torch
    cannot view the first, and the second would make products sum in another order)."""
    array = np.asarray(value)
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)
            or (booleans and array.dtype == np.bool_)):
        raise TypeError(f"{name} must hold numbers, got a NumPy array of {array.dtype}")
    return np.ascontiguousarray(array, dtype=dtype)


def _check_strided(value: Tensor, name: str) -> None:
    if value.layout != torch.strided:
        raise TypeError(f"{name} is a {value.layout} tensor; fnmlp takes dense tensors: pass "
                        f"{name}.to_dense()")


def check_matrix(value: Tensor, name: str, columns: int, columns_meaning: str) -> None:
    """``value`` (a tensor, or CSR rows from ``as_rows``) is 2-D with ``columns`` columns and
    at least one row."""
    if value.ndim != 2:
        hint = f"; for one sample use {name}.reshape(1, -1)" if value.ndim == 1 else ""
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
    """Raise, naming the first row, if ``value`` (a tensor, or CSR rows) holds NaN or inf."""
    if is_sparse(value):
        _check_finite_sparse(value, name)
        return
    finite = torch.isfinite(value)
    if not bool(finite.all()):
        row = int((~finite).any(dim=1).nonzero()[0, 0])
        raise ValueError(f"{name} contains NaN or inf (first in row {row})")


def _check_finite_sparse(rows, name: str) -> None:
    """``check_finite`` of CSR rows: their stored values (the others are zeros), which
    ``as_rows`` cast to the parameters' dtype already, so that a value the cast makes inf
    is found here, as in the dense data."""
    if not np.issubdtype(rows.dtype, np.floating):
        return
    bad = np.flatnonzero(~np.isfinite(rows.data))
    if bad.size:
        row = int(np.searchsorted(rows.indptr, bad[0], side="right")) - 1
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
        _check_device(weight, name, like)
        if weight.is_complex() or weight.dtype == torch.bool:
            raise TypeError(f"{name} must hold real numbers, got {weight.dtype}")
        weight = _cast(weight, like.dtype)
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
