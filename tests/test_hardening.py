"""Every public boundary checked, and the options PyTorch users reach for: each bad input gets a
clear early error naming the argument (or a correct result); each option matches torch."""

import math

import numpy as np
import pytest
import torch
from torch import nn

import fnmlp
from fnmlp.interop import loss_to_torch
from fnmlp.nn import get_activation
from fnmlp.nn._primitive import Context
from helpers import leaves, relative

F64 = torch.float64


def _model():
    return fnmlp.MLP(6, [fnmlp.Dense(8, "tanh"), fnmlp.Dense(3)])


def _setup(dtype=F64):
    model = _model()
    params = model.init(torch.Generator().manual_seed(0), dtype=dtype)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(20, 6, generator=g, dtype=dtype)
    y = torch.randn(20, 3, generator=g, dtype=dtype)
    return model, params, x, y


# --- optimizer.update checks its three trees ------------------------------------------------


def test_update_rejects_gradients_that_do_not_match_the_parameters():
    model, params, x, y = _setup()
    optimizer = fnmlp.sgd(0.1)
    state = optimizer.init(params)
    _, grads = model.value_and_grad(params, x, y)
    narrow = (fnmlp.LinearParams(grads[0].weight[:, :1], grads[0].bias),) + grads[1:]
    with pytest.raises(ValueError, match=r"grads\[0\].weight is \(8, 1\).* params\[0\].weight "
                                         r"is \(8, 6\)"):
        optimizer.update(params, narrow, state)
    with pytest.raises(ValueError, match="grads must be structured like params"):
        optimizer.update(params, grads[:2], state)
    with pytest.raises(ValueError, match=r"grads\[2\].bias is \(3,\) torch.float32"):
        optimizer.update(params, grads[:2] + (fnmlp.LinearParams(grads[2].weight,
                                                                 grads[2].bias.float()),), state)


@pytest.mark.parametrize("make_state, error, message", [
    (lambda p: None, TypeError, "state must be the SGDState .* got NoneType"),
    (lambda p: fnmlp.adam(0.1).init(p), TypeError, "state must be the SGDState .* AdamState"),
    (lambda p: fnmlp.sgd(0.1, momentum=0.9).init(p), ValueError,
     "momentum_buffer is set but .* keeps none"),
    (lambda p: fnmlp.sgd(0.1).init(tuple(
        fnmlp.LinearParams(t.weight.float(), t.bias.float()) if t else () for t in p)),
     ValueError, "learning_rate is torch.float32 on cpu but the parameters are torch.float64"),
])
def test_update_rejects_a_state_that_is_not_this_optimizers(make_state, error, message):
    model, params, x, y = _setup()
    _, grads = model.value_and_grad(params, x, y)
    with pytest.raises(error, match=message):
        fnmlp.sgd(0.1).update(params, grads, make_state(params))


def test_a_state_for_other_shapes_is_named():
    model, params, x, y = _setup()
    other = fnmlp.MLP(6, [fnmlp.Dense(5, "tanh"), fnmlp.Dense(3)]).init(dtype=F64)
    optimizer = fnmlp.adam(0.1)
    _, grads = model.value_and_grad(params, x, y)
    with pytest.raises(ValueError, match=r"state.exp_avg\[0\].weight is \(5, 6\)"):
        optimizer.update(params, grads, optimizer.init(other))
    with pytest.raises(ValueError, match=r"state.exp_avg\[0\].weight is \(5, 6\)"):
        fnmlp.fit(model, params, x, y, epochs=1, batch_size=5, optimizer=optimizer,
                  opt_state=optimizer.init(other))
    step = fnmlp.train_step(model, fnmlp.mse, optimizer, compile=False)
    with pytest.raises(ValueError, match=r"state.exp_avg\[0\].weight is \(5, 6\)"):
        step(params, optimizer.init(other), x, y)


def test_updates_never_record_autograd_history():
    model, params, x, y = _setup()
    params = tuple(fnmlp.LinearParams(nn.Parameter(p.weight.clone()), nn.Parameter(p.bias.clone()))
                   if p else () for p in params)
    for optimizer in (fnmlp.sgd(0.01, momentum=0.9), fnmlp.adam(1e-3)):
        state, current = optimizer.init(params), params
        for _ in range(50):
            _, grads = model.value_and_grad(current, x, y)
            current, state = optimizer.update(current, grads, state)
        assert all(t.grad_fn is None and not t.requires_grad
                   for t in leaves(current) + leaves(state))


# --- data and spec checks ------------------------------------------------------------------


def test_fit_rejects_non_finite_initial_parameters():
    model, params, x, y = _setup()
    bad = (fnmlp.LinearParams(params[0].weight.clone().fill_(math.nan), params[0].bias),
           ) + params[1:]
    with pytest.raises(ValueError, match="params contain NaN or inf before training"):
        fnmlp.fit(model, bad, x, y, epochs=1, batch_size=5, optimizer=fnmlp.sgd(0.1))


@pytest.mark.parametrize("compile", [False, True])
@pytest.mark.parametrize("label", [7, -1])
def test_out_of_range_labels_raise_the_same_error_eager_and_compiled(compile, label):
    model = fnmlp.MLP(4, [fnmlp.Dense(3)])
    params = model.init(dtype=F64)
    labels = torch.tensor([0, 1, label, 2])
    step = fnmlp.train_step(model, fnmlp.cross_entropy, fnmlp.sgd(0.1), compile=compile)
    with pytest.raises(ValueError, match=f"label {label} in y is out of range: the model has 3"):
        step(params, fnmlp.sgd(0.1).init(params), torch.zeros(4, 4, dtype=F64), labels)


def test_float_class_labels_are_named():
    model = fnmlp.MLP(4, [fnmlp.Dense(3)])
    params = model.init(dtype=F64)
    for labels in (torch.tensor([0.0, 1.0, 2.0, 1.0], dtype=F64), np.array([0.0, 1.0, 2.0, 1.0])):
        with pytest.raises(TypeError, match=r"class labels y must be integers \(use y.long\(\)\)"):
            model.value_and_grad(params, torch.zeros(4, 4, dtype=F64), labels, fnmlp.cross_entropy)


def test_numpy_views_with_negative_strides_are_converted():
    model, params, x, y = _setup()
    flipped_x, flipped_y = x.numpy()[::-1], y.numpy()[::-1]
    loss, _ = model.value_and_grad(params, flipped_x, flipped_y,
                                   sample_weight=np.ones(20)[::-1])
    expected, _ = model.value_and_grad(params, x.flip(0), y.flip(0))
    assert relative(loss, expected) <= 1e-15


def test_sparse_tensors_get_a_clear_error():
    model, params, x, y = _setup()
    with pytest.raises(TypeError, match=r"x is a torch.sparse_coo tensor.*x.to_dense\(\)"):
        model.value_and_grad(params, x.to_sparse(), y)


def test_dense_options_are_checked_and_any_real_number_works():
    for bad in (None, "yes"):
        with pytest.raises(TypeError, match="layer_norm must be True or False"):
            fnmlp.Dense(3, layer_norm=bad)
    assert fnmlp.Dense(3, dropout=np.float32(0.5)).dropout == 0.5
    assert fnmlp.Dropout(np.float64(0.25)).p == 0.25


@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
def test_zero_width_inputs_work(name):
    activation = get_activation(name)
    z = torch.zeros(3, 0, dtype=F64)
    a, residual, _ = activation.forward((), z, (), Context())
    dz, _ = activation.backward((), residual, torch.zeros(3, 0, dtype=F64))
    assert a.shape == dz.shape == (3, 0)


NON_FINITE = [math.nan, math.inf, -math.inf, 0.0, 1.0, -1.0]


@pytest.mark.parametrize("name", [n for n in fnmlp.nn.activation_names() if n != "elu"])
def test_backward_at_nan_and_inf_matches_autograd(name):
    """NaN and ±inf inputs and cotangents: the explicit rule gives what autograd gives (NaN
    where it gives NaN). ELU is left out: its autograd disagrees with itself at NaN (see
    test_elu_at_nan_is_documented)."""
    from fnmlp.interop import _registry

    activation = get_activation(name)
    module = _registry.rule_for_primitive(activation).to_torch(activation, (), (), 0, {}, False)
    values = torch.tensor(NON_FINITE, dtype=F64)
    z = values.repeat(len(NON_FINITE), 1).t().contiguous().requires_grad_(True)
    da = values.repeat(len(NON_FINITE), 1)
    (expected,) = torch.autograd.grad(module(z), z, da)
    a, residual, _ = activation.forward((), z.detach(), (), Context())
    got, _ = activation.backward((), residual, da)
    torch.testing.assert_close(got, expected, rtol=1e-13, atol=1e-15, equal_nan=True)


def test_elu_at_nan_is_documented():
    """fnmlp's ELU passes NaN through its negative branch (da·α·exp(NaN) = NaN), whatever the
    cotangent; torch's own autograd gives NaN or the cotangent depending on the kernel."""
    elu = fnmlp.ELU(0.5)
    z = torch.tensor([[math.nan, 1.0]], dtype=F64)
    _, residual, _ = elu.forward((), z, (), Context())
    got, _ = elu.backward((), residual, torch.ones_like(z))
    assert math.isnan(got[0, 0]) and got[0, 1] == 1.0


# --- losses: options and reductions, against torch ------------------------------------------


def _logits_and_labels(rows=9, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, classes, generator=g, dtype=F64) * 2
    labels = torch.randint(0, classes, (rows,), generator=g)
    return logits, labels


CE_OPTIONS = [
    dict(weight=(0.5, 2.0, 1.0, 0.25)),
    dict(ignore_index=2),
    dict(weight=(0.5, 2.0, 1.0, 0.25), ignore_index=1, label_smoothing=0.2),
    dict(label_smoothing=0.1, ignore_index=3),
]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", CE_OPTIONS, ids=str)
def test_cross_entropy_options_match_torch(options, reduction):
    loss = fnmlp.CrossEntropy(reduction, **options)
    logits, labels = _logits_and_labels()
    for target in (labels, torch.softmax(torch.randn(9, 4, dtype=F64), dim=1)):
        if target.dim() == 2 and "ignore_index" in options:
            continue  # torch ignores ignore_index for probability targets; so does fnmlp
        z = logits.clone().requires_grad_(True)
        expected = loss_to_torch(loss, dtype=F64)(z, target)
        cotangent = torch.rand(expected.shape, dtype=F64) + 0.5
        (expected_grad,) = torch.autograd.grad(expected, z, cotangent)
        value, residual = loss.forward(logits, target)
        assert relative(value, expected.detach()) <= 1e-13
        assert relative(loss.backward(residual, cotangent), expected_grad) <= 1e-13


@pytest.mark.parametrize("loss", [
    fnmlp.BinaryCrossEntropyWithLogits(pos_weight=(3.0, 0.5, 1.0)),
    fnmlp.BinaryCrossEntropyWithLogits("sum", weight=(0.2, 1.0, 2.0)),
    fnmlp.BinaryCrossEntropyWithLogits("none", weight=(0.2, 1.0, 2.0), pos_weight=(2.0, 1.0, 4.0)),
    fnmlp.SmoothL1(beta=0.5), fnmlp.SmoothL1("sum", beta=0.0), fnmlp.SmoothL1("none"),
    fnmlp.MSE("none"), fnmlp.L1("none"), fnmlp.Huber("none", delta=0.3), fnmlp.PoissonNLL(),
    fnmlp.PoissonNLL("sum"), fnmlp.PoissonNLL("none"),
], ids=repr)
def test_elementwise_loss_options_match_torch(loss):
    g = torch.Generator().manual_seed(3)
    pred = torch.randn(7, 3, generator=g, dtype=F64) * 2
    pred[0, 0] = 0.0
    target = torch.rand(7, 3, generator=g, dtype=F64)
    target[0, 0] = 0.0  # a zero difference: the kinks
    z = pred.clone().requires_grad_(True)
    expected = loss_to_torch(loss, loss.reduction, dtype=F64)(z, target)
    if loss.reduction == "none":  # fnmlp's "none" is per row: the mean over a row's elements
        expected = expected.mean(dim=1)
    cotangent = torch.rand(expected.shape, dtype=F64) + 0.5
    (expected_grad,) = torch.autograd.grad(expected, z, cotangent)
    value, residual = loss.forward(pred, target)
    assert relative(value, expected.detach()) <= 1e-13
    assert relative(loss.backward(residual, cotangent), expected_grad) <= 1e-13


@pytest.mark.parametrize("loss", [
    fnmlp.CrossEntropy(weight=(0.5, 2.0, 1.0, 0.25), ignore_index=1, label_smoothing=0.2),
    fnmlp.BinaryCrossEntropyWithLogits(weight=(0.2, 1.0, 2.0, 1.0), pos_weight=(2.0, 1, 4, 1)),
    fnmlp.SmoothL1(beta=0.5),
], ids=repr)
def test_loss_options_compose_with_row_weights(loss):
    """With sample_weight each row's loss and its share of the divisor are scaled by its
    weight: integer weights equal repeating the rows."""
    logits, labels = _logits_and_labels(rows=6)
    target = labels if isinstance(loss, fnmlp.CrossEntropy) else torch.rand(6, 4, dtype=F64)
    counts = torch.tensor([1, 3, 0, 2, 1, 1])
    value, residual = loss.forward(logits, target, counts.to(F64))
    grad = loss.backward(residual)
    rows = torch.arange(6).repeat_interleave(counts)
    expected, expected_residual = loss.forward(logits[rows], target[rows])
    expected_grad = torch.zeros_like(logits).index_add_(0, rows, loss.backward(expected_residual))
    assert relative(value, expected) <= 1e-13 and relative(grad, expected_grad) <= 1e-13


def test_loss_options_are_checked():
    with pytest.raises(ValueError, match="cross_entropy weight must be finite numbers"):
        fnmlp.CrossEntropy(weight=(1.0, float("nan")))
    with pytest.raises(TypeError, match="ignore_index must be an integer"):
        fnmlp.CrossEntropy(ignore_index=1.5)
    with pytest.raises(ValueError, match="beta must be >= 0"):
        fnmlp.SmoothL1(beta=-1)
    model = fnmlp.MLP(4, [fnmlp.Dense(3)])
    params = model.init(dtype=F64)
    with pytest.raises(ValueError, match="cross_entropy weight has 2 entries but the model has 3"):
        model.value_and_grad(params, torch.zeros(2, 4, dtype=F64), torch.tensor([0, 1]),
                             fnmlp.CrossEntropy(weight=(1.0, 2.0)))
    with pytest.raises(ValueError, match="per-row losses; training needs"):
        model.value_and_grad(params, torch.zeros(2, 4, dtype=F64), torch.zeros(2, 3, dtype=F64),
                             fnmlp.MSE("none"))


def test_the_twin_trains_with_class_weights_and_ignored_rows_like_fnmlp():
    model = fnmlp.MLP(5, [fnmlp.Dense(6, "relu"), fnmlp.Dense(4)])
    params = model.init(torch.Generator().manual_seed(2), dtype=F64)
    loss = fnmlp.CrossEntropy(weight=(0.5, 2.0, 1.0, 0.25), ignore_index=3, label_smoothing=0.1)
    optimizer = fnmlp.adam(0.01)
    twin = fnmlp.TorchTwin(model, params, optimizer=optimizer, loss=loss)
    x = torch.randn(16, 5, generator=torch.Generator().manual_seed(3), dtype=F64)
    labels = torch.randint(0, 4, (16,), generator=torch.Generator().manual_seed(4))
    weight = torch.rand(16, generator=torch.Generator().manual_seed(5), dtype=F64)
    result = fnmlp.fit(model, params, x, labels, epochs=3, batch_size=8, optimizer=optimizer,
                       loss=loss, sample_weight=weight)
    for _ in range(3):
        for start in (0, 8):
            twin.step(x[start:start + 8], labels[start:start + 8],
                      sample_weight=weight[start:start + 8])
    assert max(relative(a, b) for a, b in zip(leaves(result.params), leaves(twin.params()))) \
        <= 1e-12


# --- optimizers: the options torch users expect ---------------------------------------------


@pytest.mark.parametrize("optimizer", [
    fnmlp.sgd(0.05, momentum=0.9, maximize=True), fnmlp.adam(0.01, maximize=True),
    fnmlp.adamw(0.01, maximize=True), fnmlp.rmsprop(0.005, centered=True, maximize=True),
    fnmlp.adagrad(0.05, maximize=True),
    fnmlp.adam(0.01, weight_decay=0.1, decoupled_weight_decay=True),
    fnmlp.adam(0.01, betas=(torch.tensor(0.8), torch.tensor(0.99))),
    fnmlp.sgd(),  # torch.optim.SGD's default lr, 1e-3
], ids=repr)
def test_optimizer_options_match_torch(optimizer):
    model, params, x, y = _setup()
    twin = fnmlp.TorchTwin(model, params, optimizer=optimizer)
    state = optimizer.init(params)
    for step in range(10):
        xb, yb = x[step % 4 * 5:step % 4 * 5 + 5], y[step % 4 * 5:step % 4 * 5 + 5]
        _, grads = model.value_and_grad(params, xb, yb)
        params, state = optimizer.update(params, grads, state)
        twin.step(xb, yb)
    assert max(relative(a, b) for a, b in zip(leaves(params), leaves(twin.params()))) <= 1e-12


def test_adam_with_torch_decoupled_weight_decay_converts():
    from fnmlp.interop import optimizer_from_torch

    torch_adam = torch.optim.Adam([nn.Parameter(torch.zeros(2))], lr=0.01, weight_decay=0.1,
                                  decoupled_weight_decay=True)
    assert optimizer_from_torch(torch_adam) == fnmlp.adamw(0.01, weight_decay=0.1)
    assert fnmlp.sgd().lr == torch.optim.SGD([nn.Parameter(torch.zeros(1))]).defaults["lr"]


@pytest.mark.slow
@pytest.mark.parametrize("loss, optimizer", [
    (fnmlp.CrossEntropy(weight=(0.5, 2.0, 1.0, 0.25), ignore_index=3, label_smoothing=0.1),
     fnmlp.adam(0.01, betas=(torch.tensor(0.8), 0.99), decoupled_weight_decay=True,
                weight_decay=0.1)),
    (fnmlp.BinaryCrossEntropyWithLogits(weight=(0.2, 1.0, 2.0, 1.0), pos_weight=(2.0, 1, 4, 1)),
     fnmlp.rmsprop(0.01, maximize=True)),
    (fnmlp.SmoothL1(beta=0.5), fnmlp.sgd(0.05, momentum=0.9, nesterov=True, maximize=True)),
], ids=["cross_entropy-adam", "bce-rmsprop", "smooth_l1-sgd"])
def test_loss_and_optimizer_options_inside_the_compiled_step(loss, optimizer):
    """Each option compiles into the one graph: every step (a padded short batch and row weights
    included) agrees with the eager step within 1e-13, with one graph."""
    model = fnmlp.MLP(5, [fnmlp.Dense(6, "tanh"), fnmlp.Dense(4)])
    g = torch.Generator().manual_seed(0)
    params = model.init(g, dtype=F64)
    x = torch.randn(13, 5, generator=g, dtype=F64)
    y = (torch.randint(0, 4, (13,), generator=g) if isinstance(loss, fnmlp.CrossEntropy)
         else torch.rand(13, 4, generator=g, dtype=F64))
    weight = torch.rand(13, generator=g, dtype=F64) + 0.1
    compiled = fnmlp.train_step(model, loss, optimizer)
    eager = fnmlp.train_step(model, loss, optimizer, compile=False)
    state = optimizer.init(params)
    for start in (0, 6, 12, 0, 6, 12):  # batches of 6, 6 and 1
        rows = slice(start, start + 6)
        new_c, state_c, loss_c = compiled(params, state, x[rows], y[rows],
                                          sample_weight=weight[rows])
        params, state, loss_e = eager(params, state, x[rows], y[rows],
                                      sample_weight=weight[rows])
        assert max(relative(a, b) for a, b in zip(leaves((new_c, state_c, loss_c)),
                                                  leaves((params, state, loss_e)))) <= 1e-13
    assert len(compiled.compiled.graphs) == 1


def test_fit_skips_batches_whose_rows_all_weigh_zero():
    model, params, x, y = _setup()
    weight = torch.ones(20, dtype=F64)
    weight[5:10] = 0
    result = fnmlp.fit(model, params, x, y, epochs=2, batch_size=5, optimizer=fnmlp.sgd(0.1),
                       sample_weight=weight)
    expected = fnmlp.fit(model, params, torch.cat([x[:5], x[10:]]), torch.cat([y[:5], y[10:]]),
                         epochs=2, batch_size=5, optimizer=fnmlp.sgd(0.1),
                         sample_weight=torch.ones(15, dtype=F64))
    assert result.history.train_loss == expected.history.train_loss
    assert int(result.opt_state.step) == 6


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
