"""Inputs are treated alike, as users of scikit-learn and Keras expect.

One dtype rule (``fnmlp._validate.as_data``) for every kind of input and every entry point:
floating, integer or bool data (tensor, NumPy array, DataFrame, list) takes the parameters'
dtype, in one copy at most; a tensor on another device is refused; nothing passed in is
modified. SciPy sparse x is taken by ``fit`` (densified batch by batch, bit-identical to the
dense data in eager), ``apply``, ``evaluate`` and ``predict_*`` (a block of rows at a time),
and refused with the ``toarray()`` fix elsewhere. ``predict_proba`` only where the outputs
are probabilities or ``loss=`` says that they are logits. A torch module is refused, naming
``fnmlp.from_torch``.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from torch.utils._pytree import tree_leaves
from torch.utils._python_dispatch import TorchDispatchMode

import fnmlp
from fnmlp import _validate

ROWS, FEATURES, OUTPUTS = 40, 6, 3
F32, F64 = torch.float32, torch.float64
SGD = fnmlp.sgd(0.1)


def _model(*head) -> fnmlp.MLP:
    return fnmlp.MLP(FEATURES, [fnmlp.Dense(8, "tanh"), *(head or [fnmlp.Dense(OUTPUTS)])])


def _data():
    """x: small integers (exact in every dtype below) with zeros (for sparse matrices);
    y: float targets; both float64 tensors."""
    g = torch.Generator().manual_seed(1)
    x = torch.randint(-3, 4, (ROWS, FEATURES), generator=g).double()
    x[x.abs() < 2] = 0
    y = torch.randn(ROWS, OUTPUTS, generator=g, dtype=F64)
    return x, y


def _pandas():
    """pandas, imported by the DataFrame cases only, which it skips where pandas is missing
    (it is in the dev extra): the dtype and sparse rules do not depend on it."""
    return pytest.importorskip("pandas")


def _frames(array: np.ndarray) -> list:
    """``[DataFrame(array)]`` where pandas is installed, else ``[]``: the tests that take a
    DataFrame among other kinds of input check the others without it."""
    try:
        import pandas
    except ImportError:
        return []
    return [pandas.DataFrame(array)]


def _mixed_dataframe(t: torch.Tensor):
    """A DataFrame of int64, float32 and float64 columns holding ``t``'s values."""
    frame = _pandas().DataFrame(t.numpy())
    return frame.astype({0: np.int64, 1: np.float32, 2: np.int8})


# name -> the same values as another kind of input
KINDS = {
    "float64 tensor": lambda t: t.double(),
    "float32 tensor": lambda t: t.float(),
    "float16 tensor": lambda t: t.half(),
    "int64 tensor": lambda t: t.long(),
    "int8 tensor": lambda t: t.to(torch.int8),
    "strided float32 tensor": lambda t: t.float().t().contiguous().t(),
    "float32 column slice": lambda t: torch.cat([t.float(), t.float()], dim=1)[:, :FEATURES],
    "float64 array": lambda t: t.numpy(),
    "float32 array": lambda t: t.float().numpy(),
    "int32 array": lambda t: t.int().numpy(),
    "Fortran float32 array": lambda t: np.asfortranarray(t.float().numpy()),
    "list": lambda t: t.tolist(),
    "list of ints": lambda t: t.long().tolist(),
    "dataframe": lambda t: _pandas().DataFrame(t.numpy()),
    "dataframe of mixed dtypes": _mixed_dataframe,
}


def _entry_points(model: fnmlp.MLP, params, y) -> dict:
    """name -> f(x) giving every tensor the entry point returns, for x of any kind."""
    ensemble = fnmlp.Ensemble(model, size=2)
    stacked = ensemble.stack([params, params])
    step = fnmlp.train_step(model, fnmlp.mse, SGD, compile=False)
    ensemble_step = fnmlp.train_step(ensemble, fnmlp.mse, SGD, compile=False)
    fit = dict(epochs=2, batch_size=16, optimizer=SGD, compile=False, shuffle=True)

    def generator():
        return torch.Generator().manual_seed(5)

    return {
        "fnmlp.fit": lambda x: tree_leaves(fnmlp.fit(model, params, x, y, generator=generator(),
                                                     **fit).params),
        "MLP.apply": lambda x: [model.apply(params, x)],
        "MLP.evaluate": lambda x: [torch.tensor(model.evaluate(params, x, y), dtype=F64)],
        "MLP.value_and_grad": lambda x: tree_leaves(model.value_and_grad(params, x, y)),
        "MLP.predict_proba": lambda x: [model.predict_proba(params, x,
                                                            loss=fnmlp.cross_entropy)],
        "train_step call": lambda x: tree_leaves(step(params, SGD.init(params), x, y)),
        "Ensemble.fit": lambda x: tree_leaves(fnmlp.fit(ensemble, stacked, x, y,
                                                        generator=generator(), **fit).params),
        "Ensemble.apply": lambda x: [ensemble.apply(stacked, x)],
        "ensemble's step call": lambda x: tree_leaves(ensemble_step(
            stacked, ensemble.init_optimizer(SGD, stacked), x, y)),
    }


def _same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(torch.equal(p, q) for p, q in zip(a, b))


# --- one dtype rule -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_of_input_takes_the_parameters_dtype_at_every_entry_point(dtype, kind):
    """A tensor of another dtype (float, integer) is taken as an array of it always was: in
    the parameters' dtype, giving bit-identical results to data of that dtype."""
    model = _model()
    params = model.init(torch.Generator().manual_seed(0), dtype=dtype)
    x, y = _data()
    for name, call in _entry_points(model, params, y.to(dtype)).items():
        got, expected = call(KINDS[kind](x)), call(x.to(dtype))
        assert _same(got, expected), f"{name} with a {kind}"
    assert model.apply(params, KINDS[kind](x)).dtype == dtype


def test_bool_features_are_zeros_and_ones_for_tensors_and_arrays():
    model = _model()
    params = model.init(torch.Generator().manual_seed(0), dtype=F64)
    x, y = _data()
    mask = x > 0
    for name, call in _entry_points(model, params, y).items():
        expected = call(mask.double())
        for data in (mask, mask.numpy(), *_frames(mask.numpy())):
            assert _same(call(data), expected), f"{name} with bools {type(data).__name__}"


def test_float_targets_of_any_dtype_take_the_parameters_dtype():
    model = _model()
    params = model.init(torch.Generator().manual_seed(0), dtype=F64)
    x, y = _data()
    y32 = y.float()
    for name, call in _entry_points(model, params, y32.double()).items():
        if name in ("MLP.apply", "MLP.predict_proba", "Ensemble.apply"):
            continue
        expected = call(x)
        for targets in (y32, y32.numpy(), *_frames(y32.numpy())):
            got = _entry_points(model, params, targets)[name](x)
            assert _same(got, expected), f"{name} with y {type(targets).__name__}"


def test_class_labels_keep_their_own_rule():
    """Labels are integers of any integer dtype; float labels are refused, with the fix."""
    model = _model()
    params = model.init(torch.Generator().manual_seed(0), dtype=F64)
    x, _ = _data()
    labels = torch.arange(ROWS) % OUTPUTS
    expected = model.evaluate(params, x, labels, fnmlp.cross_entropy)
    for given in (labels.int(), labels.to(torch.uint8), labels.numpy().astype(np.int16),
                  labels.tolist()):
        assert model.evaluate(params, x, given, fnmlp.cross_entropy) == expected
    with pytest.raises(TypeError, match=r"class labels y must be integers \(use y.long\(\)\)"):
        model.evaluate(params, x, labels.double(), fnmlp.cross_entropy)


@pytest.mark.parametrize("bad, message", [
    (lambda x: x.to(torch.complex64), "x must hold real numbers, got torch.complex64"),
    (lambda x: x.numpy().astype(np.complex128), "x must hold numbers, got a NumPy array of "
                                                "complex128"),
    (lambda x: x.numpy().astype(str), "x must hold numbers"),
    (lambda x: _pandas().DataFrame(x.numpy()).astype(str), "x must hold numbers"),
])
def test_data_that_is_not_real_numbers_is_refused(bad, message):
    model = _model()
    params = model.init(torch.Generator().manual_seed(0), dtype=F64)
    x, y = _data()
    for name, call in _entry_points(model, params, y).items():
        with pytest.raises(TypeError, match=message):
            call(bad(x))


def test_a_tensor_on_another_device_is_refused_and_an_array_is_placed_on_the_parameters():
    """Moving data is explicit; a NumPy array has no device (the meta device here: shapes
    only, on any machine)."""
    model = _model()
    params = model.init(torch.Generator().manual_seed(0), dtype=F64)
    x, y = _data()
    on_meta = _validate.as_data(x.float().numpy(), "x", torch.empty(0, device="meta"))
    assert on_meta.device.type == "meta" and on_meta.dtype == F32
    for name, call in _entry_points(model, params, y).items():
        with pytest.raises(ValueError, match=r"x is on meta but the parameters are on cpu; "
                                             r"move it with x.to\('cpu'\)"):
            call(x.float().to("meta"))  # the device is named, not the dtype


def test_arrays_go_to_the_parameters_device(device):
    model = _model()
    params = model.init(torch.Generator().manual_seed(0), dtype=F32, device=device)
    x, y = _data()
    out = model.apply(params, x.numpy())
    assert out.device.type == device and out.dtype == F32
    for data in (x.numpy(), *_frames(x.numpy())):
        assert model.evaluate(params, data, y.numpy()) == pytest.approx(
            model.evaluate(params, x.float().to(device), y.float().to(device)), rel=0, abs=0)
    if device != "cpu":
        with pytest.raises(ValueError, match=rf"x is on cpu but the parameters are on "
                                             rf"{device}.*; move it with x.to"):
            model.apply(params, x)


def test_nothing_passed_in_is_modified():
    model = _model()
    params = model.init(torch.Generator().manual_seed(0), dtype=F64)
    x, y = _data()
    inputs = [x.float().t().contiguous().t(), x.long(), x.float().numpy(),
              *_frames(x.numpy()), sp.csr_matrix(x.numpy())]
    copies = [(t.clone() if isinstance(t, torch.Tensor) else t.copy()) for t in inputs]
    pointers = [t.data_ptr() for t in inputs if isinstance(t, torch.Tensor)]
    for name, call in _entry_points(model, params, y).items():
        for given in inputs:
            if not sp.issparse(given) or name in ("fnmlp.fit", "MLP.apply", "MLP.evaluate",
                                                  "MLP.predict_proba"):
                call(given)
    for given, copy in zip(inputs, copies):
        if isinstance(given, torch.Tensor):
            assert given.dtype == copy.dtype and given.stride() == copy.stride()
            assert torch.equal(given, copy)
        elif sp.issparse(given):
            assert (given != copy).nnz == 0 and given.has_sorted_indices
        elif isinstance(given, np.ndarray):
            np.testing.assert_array_equal(given, copy)
        else:
            _pandas().testing.assert_frame_equal(given, copy)
    assert pointers == [t.data_ptr() for t in inputs if isinstance(t, torch.Tensor)]


class _Copies(TorchDispatchMode):
    """Counts the operations that copy a tensor of ``shape``."""

    def __init__(self, shape: tuple):
        super().__init__()
        self.shape, self.count = shape, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        names = ("aten.clone", "aten.copy_", "aten._to_copy", "aten.contiguous")
        if (str(func.overloadpacket).startswith(names) and args
                and isinstance(args[0], torch.Tensor) and tuple(args[0].shape) == self.shape):
            self.count += 1
        return func(*args, **(kwargs or {}))


def _copies(function, shape) -> int:
    with _Copies(shape) as mode:
        function()
    return mode.count


def test_a_cast_is_one_copy_and_data_of_the_right_dtype_none():
    model = _model()
    params = model.init(torch.Generator().manual_seed(0), dtype=F64)
    x, y = _data()
    like = params[0].weight
    strided = x.float().t().contiguous().t()
    cast = _validate.as_data(strided, "x", like)
    assert cast.dtype == F64 and cast.is_contiguous() and torch.equal(cast, x)
    assert _validate.as_data(x, "x", like) is x
    assert _copies(lambda: model.apply(params, strided), x.shape) == 1
    integers = x.long()
    assert _copies(lambda: model.apply(params, integers), x.shape) == 1
    assert _copies(lambda: model.apply(params, x), x.shape) == 0
    assert _copies(lambda: fnmlp.fit(model, params, strided, y, epochs=1, batch_size=ROWS,
                                     optimizer=SGD, compile=False), x.shape) == 1
    w = torch.ones(ROWS, dtype=F32).expand(2, ROWS)[0]
    assert torch.equal(_validate.as_weights(w, ROWS, like), torch.ones(ROWS, dtype=F64))


def test_a_tensor_that_requires_grad_is_cast_without_a_graph():
    model = _model()
    params = model.init(torch.Generator().manual_seed(0), dtype=F64)
    x, _ = _data()
    leaf = x.float().requires_grad_(True)
    out = model.apply(params, leaf)
    assert out.grad_fn is None and torch.equal(out, model.apply(params, x))


# --- SciPy sparse -----------------------------------------------------------------------------

SPARSE = {"csr_matrix": sp.csr_matrix, "csc_matrix": sp.csc_matrix, "coo_matrix": sp.coo_matrix,
          "csr_array": sp.csr_array}


def _leaves_equal(a, b) -> bool:
    return _same(tree_leaves(a), tree_leaves(b))


@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize("make", SPARSE)
def test_fit_on_a_sparse_matrix_is_bit_identical_to_the_dense_data(dtype, make):
    """Densified batch by batch (shuffled, with dropout, row weights and a sparse validation
    set) the eager fit is the dense one, bit for bit."""
    model = fnmlp.MLP(FEATURES, [fnmlp.Dense(8, "tanh", dropout=0.2), fnmlp.Dense(OUTPUTS)])
    params = model.init(torch.Generator().manual_seed(0), dtype=dtype)
    x, y = _data()
    weight = torch.rand(ROWS, generator=torch.Generator().manual_seed(2), dtype=dtype)

    def fit(data, valid):
        return fnmlp.fit(model, params, data, y, epochs=3, batch_size=16, optimizer=SGD,
                         compile=False, shuffle=True, sample_weight=weight,
                         generator=torch.Generator().manual_seed(4), valid=(valid, y))

    dense = fit(x.to(dtype), x.to(dtype))
    sparse = fit(SPARSE[make](x.numpy()), SPARSE[make](x.numpy()))
    assert _leaves_equal(sparse.params, dense.params)
    assert sparse.history == dense.history


def test_a_sparse_fit_densifies_one_batch_at_a_time(monkeypatch):
    model = _model()
    params = model.init(torch.Generator().manual_seed(0), dtype=F64)
    x, y = _data()
    shapes = []
    dense_rows = _validate.dense_rows

    def spy(rows, name, like):
        shapes.append(rows.shape)
        return dense_rows(rows, name, like)

    monkeypatch.setattr(_validate, "dense_rows", spy)
    fnmlp.fit(model, params, sp.csr_matrix(x.numpy()), y, epochs=2, batch_size=16,
              optimizer=SGD, compile=False)
    assert shapes == [(16, FEATURES), (16, FEATURES), (8, FEATURES)] * 2


@pytest.mark.parametrize("make", SPARSE)
def test_apply_evaluate_and_predict_take_sparse_matrices(make):
    model = _model()
    params = model.init(torch.Generator().manual_seed(0), dtype=F32)
    x, y = _data()
    matrix = SPARSE[make](x.numpy())
    ce = fnmlp.cross_entropy
    labels = torch.arange(ROWS) % OUTPUTS
    assert torch.equal(model.apply(params, matrix), model.apply(params, x))
    assert model.evaluate(params, matrix, y) == model.evaluate(params, x, y)
    assert model.evaluate(params, matrix, labels, ce) == model.evaluate(params, x, labels, ce)
    assert torch.equal(model.predict_proba(params, matrix, loss=ce),
                       model.predict_proba(params, x, loss=ce))
    assert torch.equal(model.predict_classes(params, matrix, loss=ce),
                       model.predict_classes(params, x, loss=ce))


def test_sparse_predictions_are_made_a_block_of_rows_at_a_time(monkeypatch):
    """Bounded memory: at most ``block_rows`` dense rows at once, the same predictions."""
    model = fnmlp.MLP(FEATURES, [fnmlp.Dense(8, "tanh"), fnmlp.BatchNorm(),
                                 fnmlp.Dense(OUTPUTS)])
    params = model.init(torch.Generator().manual_seed(0), dtype=F64)
    state = model.init_state(dtype=F64)
    x, y = _data()
    matrix = sp.csr_matrix(x.numpy())
    shapes = []
    dense_rows = _validate.dense_rows

    def spy(rows, name, like):
        shapes.append(rows.shape[0])
        return dense_rows(rows, name, like)

    monkeypatch.setattr(_validate, "dense_rows", spy)
    monkeypatch.setattr(_validate, "block_rows", lambda columns, like: 7)
    blocked = model.apply(params, matrix, state=state)
    assert shapes == [7] * 5 + [5]
    torch.testing.assert_close(blocked, model.apply(params, x, state=state), rtol=1e-15,
                               atol=0)
    assert model.evaluate(params, matrix, y, state=state) == pytest.approx(
        model.evaluate(params, x, y, state=state), rel=1e-14)


def test_a_block_is_64_mib_of_dense_rows_and_at_least_one_row():
    like = torch.empty(0, dtype=F64)
    assert _validate.block_rows(8, like) == (1 << 26) // 64
    assert _validate.block_rows(10**9, like) == 1


def test_sparse_matrices_of_integers_and_bools_are_taken_as_numbers():
    model = _model()
    params = model.init(torch.Generator().manual_seed(0), dtype=F64)
    x, _ = _data()
    for values in (x.long(), x > 0):
        assert torch.equal(model.apply(params, sp.csr_matrix(values.numpy())),
                           model.apply(params, values.double()))


def test_sparse_matrices_are_checked_as_dense_data():
    model = _model()
    params = model.init(torch.Generator().manual_seed(0), dtype=F64)
    x, y = _data()
    bad = x.numpy().copy()
    bad[7, 2] = np.nan
    with pytest.raises(ValueError, match=r"x contains NaN or inf \(first in row 7\)"):
        model.apply(params, sp.csr_matrix(bad))
    with pytest.raises(ValueError, match=r"x contains NaN or inf \(first in row 7\)"):
        fnmlp.fit(model, params, sp.csc_matrix(bad), y, epochs=1, batch_size=8, optimizer=SGD)
    with pytest.raises(ValueError, match=r"x_valid contains NaN or inf \(first in row 7\)"):
        fnmlp.fit(model, params, x, y, epochs=1, batch_size=8, optimizer=SGD,
                  valid=(sp.csr_matrix(bad), y))
    with pytest.raises(ValueError, match="x has 5 features but the model expects 6"):
        model.apply(params, sp.csr_matrix(x.numpy()[:, :5]))
    with pytest.raises(ValueError, match="x has 40 rows but y has 39"):
        fnmlp.fit(model, params, sp.csr_matrix(x.numpy()), y[:39], epochs=1, batch_size=8,
                  optimizer=SGD)
    with pytest.raises(ValueError, match="x is empty"):
        model.apply(params, sp.csr_matrix((0, FEATURES)))
    with pytest.raises(TypeError, match="x must hold real numbers, got a SciPy sparse matrix "
                                        "of complex128"):
        model.apply(params, sp.csr_matrix(x.numpy().astype(np.complex128)))


@pytest.mark.parametrize("make", SPARSE)
def test_sparse_values_that_the_cast_makes_inf_are_refused_as_in_dense_data(make):
    """The finite check sees the values in the parameters' dtype: a float64 1e300 is inf in
    float32, in a sparse matrix as in the dense array (it was densified to inf unchecked)."""
    model = _model()
    params = model.init(torch.Generator().manual_seed(0), dtype=F32)
    ensemble = fnmlp.Ensemble(model, size=2)
    stacked = ensemble.stack([params, params])
    x, y = _data()
    big = x.numpy().copy()
    big[3, 1] = 1e300
    options = dict(epochs=1, batch_size=16, optimizer=SGD, compile=False)
    calls = {
        "MLP.apply": lambda data: model.apply(params, data),
        "MLP.evaluate": lambda data: model.evaluate(params, data, y),
        "MLP.predict_proba": lambda data: model.predict_proba(params, data,
                                                              loss=fnmlp.cross_entropy),
        "fnmlp.fit": lambda data: fnmlp.fit(model, params, data, y, **options),
        "Ensemble.apply": lambda data: ensemble.apply(stacked, data),
        "Ensemble.fit": lambda data: fnmlp.fit(ensemble, stacked, data, y, **options),
    }
    for data in (big, SPARSE[make](big)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # NumPy's overflow in the cast
            for name, call in calls.items():
                with pytest.raises(ValueError, match=r"x contains NaN or inf \(first in row 3\)"):
                    call(data)
                    pytest.fail(f"{name} took a value that is inf in float32 ({type(data)})")
            with pytest.raises(ValueError, match=r"x_valid contains NaN or inf \(first in row "
                                                 r"3\)"):
                fnmlp.fit(model, params, x, y, valid=(data, y), **options)


def test_sparse_integers_too_large_for_float16_are_refused_as_in_dense_data():
    like = torch.empty(0, dtype=torch.float16)
    values = np.zeros((4, 3), dtype=np.int32)
    values[2, 1] = 70000  # inf in float16
    for data in (values, sp.csr_matrix(values)):
        rows = (_validate.as_rows if sp.issparse(data) else _validate.as_data)(data, "x", like)
        with pytest.raises(ValueError, match=r"x contains NaN or inf \(first in row 2\)"):
            _validate.check_finite(rows, "x")


def test_sparse_values_are_cast_once_and_densified_bit_identical_to_dense_data():
    """``as_rows`` casts the stored values once (no copy when they have the dtype already,
    else one that shares the matrix's indices), so that densifying a block casts nothing;
    the user's matrix is left as it was."""
    x, _ = _data()
    values = x.numpy().copy()
    values[values != 0] *= 1 + 1e-9  # rounded by the cast to float32
    like32, like64 = torch.empty(0, dtype=F32), torch.empty(0, dtype=F64)
    matrix = sp.csr_matrix(values)
    assert _validate.as_rows(matrix, "x", like64) is matrix
    rows = _validate.as_rows(matrix, "x", like32)
    assert rows.dtype == np.float32 and matrix.dtype == np.float64
    assert np.shares_memory(rows.indices, matrix.indices)
    assert np.array_equal(matrix.toarray(), values)
    assert _copies(lambda: _validate.dense_rows(rows, "x", like32), x.shape) == 0
    assert torch.equal(_validate.dense_rows(rows, "x", like32),
                       _validate.as_data(values, "x", like32))
    for dtype in (torch.float16, torch.bfloat16):  # no SciPy dtype: float32, rounded alike
        like = torch.empty(0, dtype=dtype)
        assert torch.equal(_validate.dense_rows(_validate.as_rows(sp.csc_matrix(values), "x",
                                                                  like), "x", like),
                           _validate.as_data(values, "x", like))


def test_duplicate_sparse_entries_are_summed_before_the_cast_as_toarray_sums_them():
    """A CSR matrix holding an entry twice (not canonical) is the dense array ``toarray``
    gives: the sum, in the matrix's dtype, cast after (1e300 - 1e300 is 0, not inf - inf)."""
    data = np.array([1e300, -1e300, 1.5])
    matrix = sp.csr_matrix((data, np.array([0, 0, 1]), np.array([0, 2, 3])), shape=(2, 2))
    like = torch.empty(0, dtype=F32)
    rows = _validate.as_rows(matrix, "x", like)
    _validate.check_finite(rows, "x")
    assert torch.equal(_validate.dense_rows(rows, "x", like),
                       _validate.as_data(matrix.toarray(), "x", like))
    assert matrix.nnz == 3 and np.array_equal(matrix.data, data)  # the user's: as it was


def test_sparse_matrices_are_refused_with_toarray_where_they_are_not_taken():
    """The gradient functions, a step call and training-mode apply take dense data; the error
    names the fix."""
    model = _model()
    params = model.init(torch.Generator().manual_seed(0), dtype=F64)
    x, y = _data()
    matrix = sp.csr_matrix(x.numpy())
    calls = _entry_points(model, params, y)
    refused = {name: calls[name] for name in ("MLP.value_and_grad", "train_step call",
                                              "ensemble's step call")}
    refused["MLP.apply(train=True)"] = lambda x: model.apply(params, x, train=True)
    for name, call in refused.items():
        with pytest.raises(TypeError, match=r"x is a SciPy sparse matrix, which this function "
                                            r"does not take: pass x.toarray\(\)"):
            call(matrix)


def test_ensembles_fit_and_apply_sparse_matrices_as_dense_data():
    """Batch by batch in ``Ensemble.fit`` (shuffled, bagged), a block of rows at a time in
    ``Ensemble.apply``: bit-identical to the dense data."""
    ensemble = fnmlp.Ensemble(_model(), size=3)
    params = ensemble.init(torch.Generator().manual_seed(0), dtype=F64)
    x, y = _data()
    options = dict(epochs=2, batch_size=16, optimizer=SGD, shuffle=True, bagging=True,
                   compile=False, metrics={"r2": fnmlp.metrics.r2})

    def fitted(data):
        return ensemble.fit(params, data, y, valid=(data, y),
                            generator=torch.Generator().manual_seed(3), **options)

    dense, sparse = fitted(x), fitted(sp.csr_matrix(x.numpy()))
    assert sparse.history.train_loss == dense.history.train_loss
    assert sparse.history.valid_loss == dense.history.valid_loss
    for a, b in zip(tree_leaves(sparse.params), tree_leaves(dense.params)):
        assert torch.equal(a, b)
    assert torch.equal(ensemble.apply(dense.params, sp.csc_matrix(x.numpy())),
                       ensemble.apply(dense.params, x))
    with pytest.raises(TypeError, match=r"pass x.toarray\(\)"):
        ensemble.apply(dense.params, sp.csr_matrix(x.numpy()), train=True)


# --- DataFrames --------------------------------------------------------------------------------


def test_fit_and_apply_take_dataframes():
    pandas = _pandas()
    model = _model()
    params = model.init(torch.Generator().manual_seed(0), dtype=F32)
    x, y = _data()
    frame, targets = pandas.DataFrame(x.numpy()), pandas.DataFrame(y.numpy())
    options = dict(epochs=2, batch_size=16, optimizer=SGD, compile=False)
    from_frames = fnmlp.fit(model, params, frame, targets, valid=(frame, targets), **options)
    from_tensors = fnmlp.fit(model, params, x.float(), y.float(), valid=(x.float(), y.float()),
                             **options)
    assert _leaves_equal(from_frames.params, from_tensors.params)
    assert from_frames.history == from_tensors.history
    assert torch.equal(model.apply(params, frame), model.apply(params, x.float()))
    series_labels = pandas.Series((torch.arange(ROWS) % OUTPUTS).numpy())
    assert model.evaluate(params, frame, series_labels, fnmlp.cross_entropy) == \
        model.evaluate(params, x, torch.arange(ROWS) % OUTPUTS, fnmlp.cross_entropy)


def test_a_dataframe_of_sparse_columns_is_taken_as_its_dense_values():
    pandas = _pandas()
    model = _model()
    params = model.init(torch.Generator().manual_seed(0), dtype=F64)
    x, y = _data()
    frame = pandas.DataFrame.sparse.from_spmatrix(sp.csr_matrix(x.numpy()))
    assert torch.equal(model.apply(params, frame), model.apply(params, x))
    options = dict(epochs=1, batch_size=16, optimizer=SGD, compile=False)
    assert _leaves_equal(fnmlp.fit(model, params, frame, y, **options).params,
                         fnmlp.fit(model, params, x, y, **options).params)


# --- predict_proba --------------------------------------------------------------------------


def _head_outputs(*head, outputs=OUTPUTS, loss=None):
    model = _model(*head)
    params = model.init(torch.Generator().manual_seed(0), dtype=F64)
    x, _ = _data()
    return (model.predict_proba(params, x, loss=loss), model.predict_classes(params, x, loss=loss),
            model.apply(params, x))


def test_a_softmax_or_log_softmax_head_gives_probabilities_as_they_are():
    proba, classes, out = _head_outputs(fnmlp.Dense(OUTPUTS, "softmax"))
    assert torch.equal(proba, out) and torch.equal(classes, out.argmax(dim=1))
    proba, classes, out = _head_outputs(fnmlp.Dense(OUTPUTS, "log_softmax"), fnmlp.Dropout(0.1))
    assert torch.equal(proba, out.exp()) and torch.equal(classes, out.argmax(dim=1))
    with_loss = _head_outputs(fnmlp.Dense(OUTPUTS, "softmax"), loss=fnmlp.cross_entropy)
    assert torch.equal(with_loss[0], _head_outputs(fnmlp.Dense(OUTPUTS, "softmax"))[0])


def test_a_sigmoid_head_is_binary_for_one_output_and_multilabel_for_more():
    proba, classes, out = _head_outputs(fnmlp.Dense(1, "sigmoid"))
    assert proba.shape == (ROWS, 2) and torch.equal(proba, torch.cat([1 - out, out], dim=1))
    assert torch.equal(classes, (out[:, 0] > 0.5).long())
    proba, classes, out = _head_outputs(fnmlp.Dense(OUTPUTS, "sigmoid"), "identity")
    assert torch.equal(proba, out) and torch.equal(classes, (out > 0.5).long())


def test_logits_are_taken_as_such_only_when_loss_says_so():
    proba, classes, out = _head_outputs(loss=fnmlp.cross_entropy)
    assert torch.equal(proba, torch.softmax(out, dim=1))
    assert torch.equal(classes, out.argmax(dim=1))
    smoothed = _head_outputs(loss=fnmlp.CrossEntropy(label_smoothing=0.1))
    assert torch.equal(smoothed[0], proba)
    bce = fnmlp.BinaryCrossEntropyWithLogits()
    proba, classes, out = _head_outputs(fnmlp.Dense(1), loss=bce)
    p = torch.sigmoid(out)
    assert torch.equal(proba, torch.cat([1 - p, p], dim=1))
    assert torch.equal(classes, (p[:, 0] > 0.5).long())
    proba, classes, out = _head_outputs(loss=bce)
    assert torch.equal(proba, torch.sigmoid(out))
    assert torch.equal(classes, (torch.sigmoid(out) > 0.5).long())


@pytest.mark.parametrize("head, loss, message", [
    ([], None, r"^the network's outputs are not probabilities: its last primitive is Linear; "
               r"pass loss=fnmlp.cross_entropy if they are logits of a classifier trained "
               r"with it"),
    ([fnmlp.Dense(OUTPUTS, "tanh"), fnmlp.Dropout(0.5)], None, "its last primitive is Tanh"),
    ([fnmlp.Dense(OUTPUTS), fnmlp.Identity()], None, "its last primitive is Linear"),
    ([], fnmlp.mse, r"its last primitive is Linear, and loss=MSE\(.*\) is not a classifier's"),
    ([fnmlp.Dense(1)], fnmlp.nn.poisson_nll, "is not a classifier's"),
])
def test_other_outputs_are_not_probabilities(head, loss, message):
    """A regression network has no probabilities (scikit-learn's ``MLPRegressor`` has no
    ``predict_proba``): refused before any work, even before x is looked at."""
    model = _model(*head)
    params = model.init(torch.Generator().manual_seed(0), dtype=F64)
    for predict in (model.predict_proba, model.predict_classes):
        with pytest.raises(ValueError, match=message):
            predict(params, "not even data", loss=loss)


def test_loss_must_be_an_fnmlp_loss():
    model = _model()
    params = model.init(torch.Generator().manual_seed(0), dtype=F64)
    with pytest.raises(TypeError, match="loss must be an fnmlp loss"):
        model.predict_proba(params, _data()[0], loss="cross_entropy")


def test_the_estimators_predict_proba_as_scikit_learn():
    """Only the classifier has ``predict_proba`` (its loss fixes the link); the regressor has
    none, as scikit-learn's."""
    import fnmlp.sklearn
    import sklearn.neural_network

    assert not hasattr(fnmlp.sklearn.MLPRegressor(), "predict_proba")
    assert not hasattr(sklearn.neural_network.MLPRegressor(), "predict_proba")
    x, _ = _data()
    labels = (torch.arange(ROWS) % OUTPUTS).numpy()
    clf = fnmlp.sklearn.MLPClassifier(hidden_layer_sizes=(4,), max_iter=2, random_state=0,
                                      compile=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clf.fit(x.numpy(), labels)
    np.testing.assert_allclose(clf.predict_proba(sp.csr_matrix(x.numpy())).sum(axis=1), 1)


# --- models that are not fnmlp's -------------------------------------------------------------


def test_a_torch_module_is_refused_naming_from_torch(tmp_path):
    module = torch.nn.Linear(FEATURES, OUTPUTS)
    x, y = _data()
    hint = r"got Linear; .*a torch.nn module converts with fnmlp.from_torch\(module\)"
    calls = {
        "fnmlp.fit": lambda: fnmlp.fit(module, None, x, y, epochs=1, batch_size=8,
                                       optimizer=SGD),
        "fnmlp.train.fit": lambda: fnmlp.train.fit(module, None, x, y, epochs=1, batch_size=8,
                                                   optimizer=SGD),
        "fnmlp.train_step": lambda: fnmlp.train_step(module, fnmlp.mse, SGD),
        "fnmlp.train.train_step": lambda: fnmlp.train.train_step(module, fnmlp.mse, SGD),
        "fnmlp.Ensemble": lambda: fnmlp.Ensemble(module, size=2),
        "fnmlp.save": lambda: fnmlp.save(tmp_path / "model.fnmlp", module, None),
    }
    for name, call in calls.items():
        with pytest.raises(TypeError, match=hint):
            call()
    assert not list(tmp_path.iterdir())
    with pytest.raises(TypeError, match=r"to_torch takes an fnmlp.MLP, got Linear; it is torch "
                                        r"already \(fnmlp.from_torch\(module\)"):
        fnmlp.to_torch(module, None)
    ensemble = fnmlp.Ensemble(_model(), size=2)
    with pytest.raises(TypeError, match=r"an ensemble's member k is to_torch\(ensemble.model, "
                                        r"ensemble.member\(params, k\)\)"):
        fnmlp.to_torch(ensemble, ensemble.init(torch.Generator().manual_seed(0)))
