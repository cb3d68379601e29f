"""Model and layer boundaries: bad inputs (labels, sparse tensors, spec options, state dtypes)
get a clear early error naming the argument; odd-but-valid inputs give the correct result."""

import numpy as np
import pytest
import torch

import fnmlp
from helpers import relative, small_regression

F64 = torch.float64


def test_float_class_labels_are_named():
    model = fnmlp.MLP(4, [fnmlp.Dense(3)])
    params = model.init(dtype=F64)
    for labels in (torch.tensor([0.0, 1.0, 2.0, 1.0], dtype=F64), np.array([0.0, 1.0, 2.0, 1.0])):
        with pytest.raises(TypeError, match=r"class labels y must be integers \(use y.long\(\)\)"):
            model.value_and_grad(params, torch.zeros(4, 4, dtype=F64), labels, fnmlp.cross_entropy)


def test_numpy_views_with_negative_strides_are_converted():
    model, params, x, y = small_regression()
    flipped_x, flipped_y = x.numpy()[::-1], y.numpy()[::-1]
    loss, _ = model.value_and_grad(params, flipped_x, flipped_y,
                                   sample_weight=np.ones(20)[::-1])
    expected, _ = model.value_and_grad(params, x.flip(0), y.flip(0))
    assert relative(loss, expected) <= 1e-15


def test_sparse_tensors_get_a_clear_error():
    model, params, x, y = small_regression()
    with pytest.raises(TypeError, match=r"x is a torch.sparse_coo tensor.*x.to_dense\(\)"):
        model.value_and_grad(params, x.to_sparse(), y)


def test_dense_options_are_checked_and_any_real_number_works():
    for bad in (None, "yes"):
        with pytest.raises(TypeError, match="layer_norm must be True or False"):
            fnmlp.Dense(3, layer_norm=bad)
    assert fnmlp.Dense(3, dropout=np.float32(0.5)).dropout == 0.5
    assert fnmlp.Dropout(np.float64(0.25)).p == 0.25


@pytest.mark.parametrize("options, error, message", [
    (dict(units=0), ValueError, "units must be an integer >= 1, got 0"),
    (dict(units=2.5), ValueError, "units must be an integer"),
    (dict(activation="tanhh"), ValueError, "unknown activation 'tanhh'"),
    (dict(activation=5), TypeError, "activation must be a name or an fnmlp activation"),
    (dict(activation=fnmlp.Linear(3)), TypeError, "activation must be a name"),
    (dict(layer_norm=1), TypeError, "layer_norm must be True or False, got 1"),
    (dict(dropout=1.0), ValueError, r"dropout must be a probability in \[0, 1\), got 1.0"),
    (dict(dropout=-0.1), ValueError, "dropout must be a probability"),
    (dict(dropout="0.1"), ValueError, "dropout must be a probability"),
    (dict(dropout=float("nan")), ValueError, "dropout must be a probability"),
    (dict(init="xavier"), ValueError, "unknown init 'xavier'"),
    (dict(init=3), TypeError, "init must be an initializer name or None, got int"),
    (dict(layer_norm=True, norm_eps=0), ValueError, "norm_eps must be a number > 0, got 0"),
    (dict(layer_norm=True, norm_eps=-1e-5), ValueError, "norm_eps must be a number > 0"),
    (dict(layer_norm=True, norm_eps=float("nan")), ValueError, "norm_eps must be a number > 0"),
    (dict(layer_norm=True, norm_eps="1e-5"), ValueError, "norm_eps must be a number > 0"),
    (dict(layer_norm=True, norm_eps=True), ValueError, "norm_eps must be a number > 0"),
    (dict(norm_eps=0), ValueError, "norm_eps must be a number > 0"),  # even without the norm
])
def test_every_dense_option_is_checked_under_its_own_name(options, error, message):
    """Dense checks its options itself, before expanding into primitives, so that a message
    names the option the user wrote (``norm_eps``, not the ``LayerNorm``'s ``eps``)."""
    options = {"units": 3, **options}
    with pytest.raises(error, match=message):
        fnmlp.MLP(4, [fnmlp.Dense(**options)])
    with pytest.raises(error, match=message):
        fnmlp.Dense(**options)
    assert fnmlp.MLP(4, [fnmlp.Dense(3, layer_norm=True, norm_eps=1e-3)]).layers[1].eps == 1e-3


def test_classifier_heads_are_found_past_a_trailing_dropout():
    model = fnmlp.MLP(3, [fnmlp.Dense(1, "sigmoid", dropout=0.2)])
    params = model.init(torch.Generator().manual_seed(0), dtype=F64)
    x = torch.randn(50, 3, generator=torch.Generator().manual_seed(1), dtype=F64) * 3
    positive = model.apply(params, x)
    torch.testing.assert_close(model.predict_proba(params, x)[:, 1:], positive)
    assert torch.equal(model.predict_classes(params, x), (positive[:, 0] > 0.5).long())
    dropped = model.apply(params, x, train=True)  # no key: no dropout, as documented
    assert torch.equal(dropped, positive)


def test_a_state_of_another_dtype_names_the_parameters():
    model = fnmlp.MLP(3, [fnmlp.Linear(4), fnmlp.BatchNorm(), fnmlp.Linear(2)])
    params = model.init(dtype=F64)
    with pytest.raises(ValueError, match=r"state\[1\].running_mean is torch.float32 on cpu but "
                                         r"the parameters are torch.float64"):
        model.value_and_grad(params, torch.zeros(4, 3, dtype=F64), torch.zeros(4, 2, dtype=F64),
                             state=model.init_state())
