"""Optimizer boundaries and the options torch users reach for: `update` checks its three trees
(params, grads, state) and names any mismatch; each option matches torch.optim."""

import pytest
import torch
from torch import nn

import fnmlp
from helpers import leaves, relative, small_regression

F64 = torch.float64


def test_update_rejects_gradients_that_do_not_match_the_parameters():
    model, params, x, y = small_regression()
    optimizer = fnmlp.sgd(0.1)
    state = optimizer.init(params)
    _, grads = model.value_and_grad(params, x, y)
    narrow = (fnmlp.nn.LinearParams(grads[0].weight[:, :1], grads[0].bias),) + grads[1:]
    with pytest.raises(ValueError, match=r"grads\[0\].weight is \(8, 1\).* params\[0\].weight "
                                         r"is \(8, 6\)"):
        optimizer.update(params, narrow, state)
    with pytest.raises(ValueError, match="grads must be structured like params"):
        optimizer.update(params, grads[:2], state)
    with pytest.raises(ValueError, match=r"grads\[2\].bias is \(3,\) torch.float32"):
        optimizer.update(params, grads[:2] + (fnmlp.nn.LinearParams(grads[2].weight,
                                                                 grads[2].bias.float()),), state)


@pytest.mark.parametrize("make_state, error, message", [
    (lambda p: None, TypeError, "state must be the SGDState .* got NoneType"),
    (lambda p: fnmlp.adam(0.1).init(p), TypeError, "state must be the SGDState .* AdamState"),
    (lambda p: fnmlp.sgd(0.1, momentum=0.9).init(p), ValueError,
     "momentum_buffer is set but .* keeps none"),
    (lambda p: fnmlp.sgd(0.1).init(tuple(
        fnmlp.nn.LinearParams(t.weight.float(), t.bias.float()) if t else () for t in p)),
     ValueError, "learning_rate is torch.float32 on cpu but the parameters are torch.float64"),
])
def test_update_rejects_a_state_that_is_not_this_optimizers(make_state, error, message):
    model, params, x, y = small_regression()
    _, grads = model.value_and_grad(params, x, y)
    with pytest.raises(error, match=message):
        fnmlp.sgd(0.1).update(params, grads, make_state(params))


def test_a_state_for_other_shapes_is_named():
    model, params, x, y = small_regression()
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
    model, params, x, y = small_regression()
    params = tuple(fnmlp.nn.LinearParams(nn.Parameter(p.weight.clone()),
                                         nn.Parameter(p.bias.clone()))
                   if p else () for p in params)
    for optimizer in (fnmlp.sgd(0.01, momentum=0.9), fnmlp.adam(1e-3)):
        state, current = optimizer.init(params), params
        for _ in range(50):
            _, grads = model.value_and_grad(current, x, y)
            current, state = optimizer.update(current, grads, state)
        assert all(t.grad_fn is None and not t.requires_grad
                   for t in leaves(current) + leaves(state))


@pytest.mark.parametrize("optimizer", [
    fnmlp.sgd(0.05, momentum=0.9, maximize=True), fnmlp.adam(0.01, maximize=True),
    fnmlp.adamw(0.01, maximize=True), fnmlp.rmsprop(0.005, centered=True, maximize=True),
    fnmlp.adagrad(0.05, maximize=True),
    fnmlp.adam(0.01, weight_decay=0.1, decoupled_weight_decay=True),
    fnmlp.adam(0.01, betas=(torch.tensor(0.8), torch.tensor(0.99))),
    fnmlp.sgd(),  # torch.optim.SGD's default lr, 1e-3
], ids=repr)
def test_optimizer_options_match_torch(optimizer):
    model, params, x, y = small_regression()
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
