"""The same answer whatever the input's layout.

Every entry point takes its data through one boundary (``fnmlp._validate.as_data``,
``as_labels`` and ``as_weights``; the estimators' ``_tensor`` goes through ``as_data`` too),
which makes it a C-contiguous tensor of the parameters' dtype, copying at most once and not at
all when it already is one. So C- or Fortran-ordered arrays, negatively strided NumPy views,
strided tensor views (transposed back, column or row slices), DataFrames and, for the
estimators, CSR and CSC matrices give results bit-identical (``torch.equal``) to those of the
C-contiguous tensor, for predictions and for (eager) fits, in float64 and float32.

Exact on every CPU by construction: after the boundary each layout is the same contiguous
tensor, so every kernel runs on the same input (checked at AVX512 and ATEN_CPU_CAPABILITY=avx2
on a 2-core AMD EPYC VM, torch 2.13; ``tests/test_cpu_capabilities.py`` reruns this file under
both).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fnmlp
from fnmlp import _validate
from helpers import leaves

DTYPES = [torch.float64, torch.float32]
ROWS, FEATURES, OUTPUTS = 90, 6, 3


# --- layouts ------------------------------------------------------------------------------------

def _negative(array: np.ndarray) -> np.ndarray:
    """``array``'s values as a view with negative strides on both axes."""
    flipped = np.ascontiguousarray(array[::-1, ::-1] if array.ndim == 2 else array[::-1])
    view = flipped[::-1, ::-1] if array.ndim == 2 else flipped[::-1]
    assert all(stride < 0 for stride in view.strides)
    return view


def _column_slice_array(array: np.ndarray) -> np.ndarray:
    """A column slice of a wider array (of a 1-D one: every other element of a longer one)."""
    if array.ndim == 1:
        view = np.stack([array, np.zeros_like(array)], axis=1)[:, 0]
    else:
        view = np.concatenate([array, np.zeros_like(array)], axis=1)[:, :array.shape[1]]
    assert not view.flags.c_contiguous
    return view


def _transposed_twice(t: torch.Tensor) -> torch.Tensor:
    view = t.t().contiguous().t()
    assert not view.is_contiguous()
    return view


def _column_slice(t: torch.Tensor) -> torch.Tensor:
    """A column slice of a wider tensor (of a 1-D one: every other element of a longer one)."""
    if t.dim() == 1:
        view = torch.stack([torch.zeros_like(t), t], dim=1)[:, 1]
    else:
        view = torch.cat([torch.zeros_like(t), t], dim=1)[:, t.shape[1]:]
    assert not view.is_contiguous()
    return view


def _row_step(t: torch.Tensor) -> torch.Tensor:
    """Every other row of a tensor holding each row twice: a row stride of two rows."""
    view = torch.stack([t, t], dim=1).flatten(0, 1)[::2]
    assert not view.is_contiguous()
    return view


def _flipped_back(t: torch.Tensor) -> torch.Tensor:
    """``torch.flip`` of a flipped copy (torch has no negative strides: ``flip`` copies)."""
    return torch.flip(t.flip(0), [0])


def _dataframe(array: np.ndarray):
    pandas = pytest.importorskip("pandas")
    return pandas.DataFrame(array) if array.ndim == 2 else pandas.Series(array)


# name -> what it makes of a (rows, columns) or (rows,) C-contiguous tensor
LAYOUTS: dict[str, Callable] = {
    "numpy_c": lambda t: t.numpy(),
    "numpy_fortran": lambda t: np.asfortranarray(t.numpy()),
    "numpy_negative_strides": lambda t: _negative(t.numpy()),
    "numpy_column_slice": lambda t: _column_slice_array(t.numpy()),
    "list": lambda t: t.tolist(),
    "dataframe": lambda t: _dataframe(t.numpy()),
    "tensor_transposed_twice": _transposed_twice,
    "tensor_column_slice": _column_slice,
    "tensor_row_step": _row_step,
    "tensor_flipped_back": _flipped_back,
}
LAYOUTS_2D = {name: make for name, make in LAYOUTS.items()}
LAYOUTS_1D = {name: make for name, make in LAYOUTS.items()
              if name not in ("numpy_fortran", "tensor_transposed_twice")}
ESTIMATOR_LAYOUTS: dict[str, Callable] = {
    "numpy_fortran": np.asfortranarray,
    "numpy_negative_strides": _negative,
    "numpy_column_slice": _column_slice_array,
    "csr": sp.csr_matrix,
    "csc": sp.csc_matrix,
    "dataframe": _dataframe,
}


def _layout(name: str, t: torch.Tensor):
    return (LAYOUTS_2D if t.dim() == 2 else LAYOUTS_1D)[name](t)


# --- data ---------------------------------------------------------------------------------------

def _model() -> fnmlp.MLP:
    """Products, a softmax (autograd's row-sum kernel) and the elementwise activations."""
    return fnmlp.MLP(FEATURES, [fnmlp.Dense(16, "tanh"), fnmlp.Dense(12, "softmax"),
                                fnmlp.Dense(8, "sigmoid"), fnmlp.Dense(OUTPUTS)])


def _data(dtype: torch.dtype, seed: int = 0):
    """``(x, y, weight)``: C-contiguous tensors of ``dtype`` (drawn in float64, rounded)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(ROWS, FEATURES, generator=g, dtype=torch.float64)
    y = torch.randn(ROWS, OUTPUTS, generator=g, dtype=torch.float64)
    weight = torch.rand(ROWS, generator=g, dtype=torch.float64) + 0.5
    return x.to(dtype), y.to(dtype), weight.to(dtype)


def _params(model, dtype):
    return model.init(torch.Generator().manual_seed(1), dtype=dtype)


def _assert_same_trees(got, expected) -> None:
    got, expected = leaves(got), leaves(expected)
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert a.dtype == b.dtype and torch.equal(a, b)


def _fit(model, params, x, y, **options):
    """A short eager fit: 3 epochs of shuffled batches of 32 (a short last one), Adam."""
    return fnmlp.fit(model, params, x, y, epochs=3, batch_size=32, optimizer=fnmlp.adam(1e-2),
                     shuffle=True, generator=torch.Generator().manual_seed(2), compile=False,
                     **options)


def _same_fit(got, expected) -> None:
    _assert_same_trees((got.params, got.opt_state), (expected.params, expected.opt_state))
    assert got.history.train_loss == expected.history.train_loss
    assert got.history.valid_loss == expected.history.valid_loss


# --- predictions --------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", list(LAYOUTS_2D))
@pytest.mark.parametrize("dtype", DTYPES)
def test_predictions_do_not_depend_on_the_layout(layout, dtype):
    model = _model()
    params = _params(model, dtype)
    x, y, _ = _data(dtype)
    data = _layout(layout, x)
    assert torch.equal(model.apply(params, data), model.apply(params, x))
    ce = fnmlp.cross_entropy
    assert torch.equal(model.predict_proba(params, data, loss=ce),
                       model.predict_proba(params, x, loss=ce))
    assert model.evaluate(params, data, _layout(layout, y)) == model.evaluate(params, x, y)
    loss, grads = model.value_and_grad(params, data, _layout(layout, y))
    expected_loss, expected_grads = model.value_and_grad(params, x, y)
    assert torch.equal(loss, expected_loss)
    _assert_same_trees(grads, expected_grads)


@pytest.mark.parametrize("dtype", DTYPES)
def test_float64_arrays_for_float32_parameters_round_as_torch_does(dtype):
    """A float64 array of any layout for float32 parameters: one copy that orders and rounds,
    the same numbers as ``tensor.to(float32)``."""
    model = _model()
    params = _params(model, dtype)
    x64 = _data(torch.float64)[0]
    expected = model.apply(params, x64.to(dtype))
    for layout in ("numpy_c", "numpy_fortran", "numpy_negative_strides", "numpy_column_slice"):
        assert torch.equal(model.apply(params, _layout(layout, x64)), expected), layout


# --- fits ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", list(LAYOUTS_2D))
@pytest.mark.parametrize("dtype", DTYPES)
def test_fits_do_not_depend_on_the_layout(layout, dtype):
    model = _model()
    params = _params(model, dtype)
    x, y, _ = _data(dtype)
    xv, yv, _ = _data(dtype, seed=3)
    expected = _fit(model, params, x, y, valid=(xv, yv))
    got = _fit(model, params, _layout(layout, x), _layout(layout, y),
               valid=(_layout(layout, xv), _layout(layout, yv)))
    _same_fit(got, expected)


@pytest.mark.parametrize("layout", list(LAYOUTS_1D))
def test_row_weights_and_labels_do_not_depend_on_the_layout(layout):
    model = fnmlp.MLP(FEATURES, [fnmlp.Dense(16, "relu"), fnmlp.Dense(4)])
    params = _params(model, torch.float64)
    x, _, weight = _data(torch.float64)
    labels = torch.arange(ROWS) % 4
    expected = _fit(model, params, x, labels, loss=fnmlp.cross_entropy, sample_weight=weight)
    got = _fit(model, params, x, _layout(layout, labels), loss=fnmlp.cross_entropy,
               sample_weight=_layout(layout, weight))
    _same_fit(got, expected)


@pytest.mark.parametrize("layout", ["numpy_fortran", "numpy_negative_strides", "dataframe",
                                    "tensor_transposed_twice", "tensor_row_step"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_one_step_does_not_depend_on_the_layout(layout, dtype):
    model = _model()
    params = _params(model, dtype)
    x, y, _ = _data(dtype)
    step = fnmlp.train_step(model, fnmlp.mse, fnmlp.sgd(0.1), compile=False)
    state = fnmlp.sgd(0.1).init(params)
    _assert_same_trees(step(params, state, _layout(layout, x), _layout(layout, y)),
                       step(params, state, x, y))


@pytest.mark.parametrize("layout", ["numpy_fortran", "numpy_negative_strides", "dataframe",
                                    "tensor_transposed_twice", "tensor_column_slice"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_ensemble_fits_and_predictions_do_not_depend_on_the_layout(layout, dtype):
    ensemble = fnmlp.Ensemble(_model(), size=3)
    params = ensemble.init(torch.Generator().manual_seed(1), dtype=dtype)
    x, y, weight = _data(dtype)
    options = dict(epochs=2, batch_size=32, optimizer=fnmlp.sgd(0.05), shuffle=True,
                   compile=False)
    expected = ensemble.fit(params, x, y, generator=torch.Generator().manual_seed(2),
                            sample_weight=weight, **options)
    got = ensemble.fit(params, _layout(layout, x), _layout(layout, y),
                       generator=torch.Generator().manual_seed(2),
                       sample_weight=_layout("numpy_negative_strides", weight), **options)
    _assert_same_trees(got.params, expected.params)
    assert torch.equal(ensemble.apply(got.params, _layout(layout, x)),
                       ensemble.apply(expected.params, x))
    per_member = torch.stack([weight, weight.flip(0), weight])
    _assert_same_trees(ensemble.check_weights(_negative(per_member.numpy()), ROWS, x),
                       ensemble.check_weights(per_member, ROWS, x))


# --- scikit-learn estimators --------------------------------------------------------------------

def _estimator_data(dtype: np.dtype):
    x, y, _ = _data(torch.float64)
    x = x.numpy().astype(dtype)
    return x, y.numpy()[:, 0].astype(dtype), (y.numpy()[:, 0] > 0).astype(int)


@pytest.mark.filterwarnings("ignore:Stochastic Optimizer")  # max_iter=3 does not converge
@pytest.mark.parametrize("layout", list(ESTIMATOR_LAYOUTS))
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_estimators_do_not_depend_on_the_layout(layout, dtype):
    from fnmlp.sklearn import MLPClassifier, MLPRegressor

    x, y, labels = _estimator_data(dtype)
    make = ESTIMATOR_LAYOUTS[layout]
    options = dict(hidden_layer_sizes=(12,), max_iter=3, batch_size=32, random_state=0,
                   tol=0.0, compile=False)
    for estimator, target in ((MLPRegressor, y), (MLPClassifier, labels)):
        expected = estimator(**options).fit(x, target)
        got = estimator(**options).fit(make(x), target)
        for a, b in zip(got.coefs_ + got.intercepts_, expected.coefs_ + expected.intercepts_):
            np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(got.predict(make(x)), expected.predict(x))
        assert got.score(make(x), target) == expected.score(x, target)
        expected.partial_fit(x, target)
        got.partial_fit(make(x), target)
        np.testing.assert_array_equal(got.predict(x), expected.predict(x))


# --- the boundary itself ------------------------------------------------------------------------

_COPIES = ("aten.clone", "aten.copy_", "aten._to_copy", "aten.contiguous")


class _CopiesOf(TorchDispatchMode):
    """Counts the operations that copy a tensor of ``shape``."""

    def __init__(self, shape: tuple):
        super().__init__()
        self.shape, self.count = shape, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        source = args[0] if args else None
        if (str(func.overloadpacket).startswith(_COPIES)
                and isinstance(source, torch.Tensor) and tuple(source.shape) == self.shape):
            self.count += 1
        return func(*args, **(kwargs or {}))


def _copies(function, shape) -> int:
    with _CopiesOf(shape) as mode:
        function()
    return mode.count


def test_a_contiguous_tensor_is_used_as_is_and_any_other_copied_once():
    """``as_data`` hands back the caller's contiguous tensor itself (no copy anywhere in a
    prediction or a fit, counted at the dispatcher), and copies a strided view exactly once."""
    model = _model()
    params = _params(model, torch.float64)
    x, y, weight = _data(torch.float64)
    assert model.check_data(params, x, y)[0] is x and model.check_data(params, x, y)[1] is y
    assert _validate.as_weights(weight, ROWS, x) is weight
    assert fnmlp.Ensemble(model, size=2).check_inputs(x, x) is x
    strided = _transposed_twice(x)
    again = _validate.as_data(strided, "x", x)
    assert again.is_contiguous() and again is not strided and torch.equal(again, x)

    def fit(data):
        return lambda: fnmlp.fit(model, params, data, y, epochs=1, batch_size=ROWS,
                                 optimizer=fnmlp.sgd(0.1), compile=False)

    assert _copies(lambda: model.apply(params, x), x.shape) == 0
    assert _copies(fit(x), x.shape) == 0
    assert _copies(lambda: model.apply(params, strided), x.shape) == 1
    assert _copies(fit(strided), x.shape) == 1


def test_a_c_ordered_array_of_the_parameters_dtype_is_not_copied():
    x = _data(torch.float64)[0]
    array = x.numpy().copy()
    assert _validate.as_data(array, "x", x).data_ptr() == array.ctypes.data
    from fnmlp.sklearn._base import _tensor
    assert _tensor(array, x).data_ptr() == array.ctypes.data
    read_only = array.copy()
    read_only.flags.writeable = False  # shared too, without torch's warning
    assert _validate.as_data(read_only, "x", x).data_ptr() == read_only.ctypes.data
    fortran = np.asfortranarray(array)
    converted = _validate.as_data(fortran, "x", x)
    assert converted.is_contiguous() and converted.data_ptr() != fortran.ctypes.data


def test_scipy_sparse_matrices_are_refused_with_the_fix_where_not_taken():
    """``fit``, ``apply``, ``evaluate`` and the estimators take sparse input, densified a block
    of rows at a time (bit-identical to the dense data: ``tests/test_inputs.py``); the
    gradient functions and row weights take dense data (as for sparse tensors)."""
    model = _model()
    params = _params(model, torch.float64)
    x, y, _ = _data(torch.float64)
    for make in (sp.csr_matrix, sp.csc_matrix):
        assert torch.equal(model.apply(params, make(x.numpy())), model.apply(params, x))
        with pytest.raises(TypeError, match=r"x is a SciPy sparse matrix.*x.toarray\(\)"):
            model.value_and_grad(params, make(x.numpy()), y)
        with pytest.raises(TypeError, match=r"sample_weight is a SciPy sparse matrix"):
            model.value_and_grad(params, x, y, sample_weight=make(np.ones((1, ROWS))))
