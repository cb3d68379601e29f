"""Every optimizer, schedule and clipping against torch.optim: each step from the same state
within 1e-13 (float64), 100 free steps within 1e-10, and compiled steps equal to eager ones."""

import dataclasses

import pytest
import torch

import fnmlp
from helpers import leaves, relative, torch_state_as_fnmlp

F64 = torch.float64
S = fnmlp.schedules

CONFIGS = {
    "sgd": fnmlp.sgd(0.05),
    "sgd-momentum": fnmlp.sgd(0.05, momentum=0.9),
    "sgd-dampening-wd": fnmlp.sgd(0.05, momentum=0.8, dampening=0.3, weight_decay=0.01),
    "sgd-nesterov": fnmlp.sgd(0.05, momentum=0.9, nesterov=True, weight_decay=0.001),
    "adam": fnmlp.adam(0.01),
    "adam-wd-amsgrad": fnmlp.adam(0.01, betas=(0.8, 0.99), weight_decay=0.01, amsgrad=True),
    "adamw": fnmlp.adamw(0.01, weight_decay=0.1),
    "adamw-amsgrad": fnmlp.adamw(0.01, eps=1e-6, amsgrad=True),
    "rmsprop": fnmlp.rmsprop(0.005),
    "rmsprop-centered-momentum": fnmlp.rmsprop(0.005, alpha=0.9, momentum=0.5, centered=True,
                                               weight_decay=0.01),
    "adagrad": fnmlp.adagrad(0.05),
    "adagrad-decay": fnmlp.adagrad(0.05, lr_decay=0.01, weight_decay=0.01,
                                   initial_accumulator_value=0.1),
    "sgd-step-decay": fnmlp.sgd(S.step_decay(0.05, step_size=10, gamma=0.5), momentum=0.5),
    "adam-exponential": fnmlp.adam(S.exponential(0.01, gamma=0.97)),
    "adam-cosine": fnmlp.adam(S.cosine(0.01, total_steps=100, eta_min=1e-4)),
    "sgd-warmup": fnmlp.sgd(S.linear_warmup(0.05, warmup_steps=20, start_factor=0.1)),
    "sgd-constant": fnmlp.sgd(S.constant(0.05)),
    "clipped-adam": fnmlp.clip_by_global_norm(fnmlp.adam(0.01), max_norm=0.5),
    "clipped-sgd": fnmlp.clip_by_global_norm(fnmlp.sgd(0.05, momentum=0.9), max_norm=0.1),
}


def _problem(seed=0):
    model = fnmlp.MLP(5, [fnmlp.Dense(8, "tanh"), fnmlp.Dense(6, "sigmoid"), fnmlp.Dense(3)])
    g = torch.Generator().manual_seed(seed)
    params = model.init(g, dtype=F64)
    x = torch.randn(40, 5, generator=g, dtype=F64)
    y = torch.randn(40, 3, generator=g, dtype=F64)
    return model, params, x, y


@pytest.mark.parametrize("name", list(CONFIGS))
def test_optimizer_matches_torch_step_by_step_and_free(name):
    optimizer = CONFIGS[name]
    model, params, x, y = _problem()
    twin = fnmlp.TorchTwin(model, params, optimizer=optimizer)
    free_params, free_state = params, optimizer.init(params)
    worst_step = 0.0
    for step in range(100):
        batch = slice((step * 8) % 40, (step * 8) % 40 + 8)
        xb, yb = x[batch], y[batch]
        # from the twin's current parameters and state: one step each
        start, state = torch_state_as_fnmlp(optimizer, twin, step)
        _, grads = model.value_and_grad(start, xb, yb)
        ours, _ = optimizer.update(start, grads, state)
        twin.step(xb, yb)
        worst_step = max(worst_step, max(relative(a, b) for a, b in zip(leaves(ours),
                                                                        leaves(twin.params()))))
        # free-running
        _, grads = model.value_and_grad(free_params, xb, yb)
        free_params, free_state = optimizer.update(free_params, grads, free_state)
    assert worst_step <= 1e-13, worst_step
    free = max(relative(a, b) for a, b in zip(leaves(free_params), leaves(twin.params())))
    assert free <= 1e-10, free
    assert float(free_state.step) == 100


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sgd-nesterov", "adam-wd-amsgrad", "adamw", "adam-cosine",
                                  "rmsprop-centered-momentum", "adagrad-decay", "clipped-adam"])
def test_compiled_step_matches_eager_for_every_optimizer(name):
    """One graph per optimizer over 12 steps (schedules included): no recompiles, and every
    step equal to the eager step within 1e-13."""
    optimizer = CONFIGS[name]
    model, params, x, y = _problem(seed=1)
    compiled = fnmlp.train_step(model, fnmlp.mse, optimizer, compiler="inductor")
    eager = fnmlp.train_step(model, fnmlp.mse, optimizer, compile=False)
    state = optimizer.init(params)
    for step in range(12):
        xb, yb = x[(step % 5) * 8:(step % 5) * 8 + 8], y[(step % 5) * 8:(step % 5) * 8 + 8]
        new_c, state_c, loss_c = compiled(params, state, xb, yb)
        new_e, state_e, loss_e = eager(params, state, xb, yb)
        worst = max(relative(a, b) for a, b in zip(
            leaves(new_c) + fnmlp._tree.flatten(state_c)[0] + [loss_c],
            leaves(new_e) + fnmlp._tree.flatten(state_e)[0] + [loss_e]))
        assert worst <= 1e-13, (step, worst)
        params, state = new_e, state_e
    assert compiled.executor.graphs.count() == 1


@pytest.mark.parametrize("call, message", [
    (lambda: fnmlp.sgd(0.1, momentum=-1), "momentum must be"),
    (lambda: fnmlp.sgd(0.1, nesterov=True), "nesterov momentum requires momentum > 0"),
    (lambda: fnmlp.adam(0.1, betas=(0.9, 1.0)), "beta2 must be"),
    (lambda: fnmlp.adam(0.1, betas=0.9), "betas must be a pair"),
    (lambda: fnmlp.adam(0.1, eps=0), "eps must be"),
    (lambda: fnmlp.rmsprop(0.1, alpha=1.5), "alpha must be"),
    (lambda: fnmlp.adagrad(0.1, lr_decay=-1), "lr_decay must be"),
    (lambda: fnmlp.clip_by_global_norm(fnmlp.sgd(0.1), 0), "max_norm must be"),
    (lambda: fnmlp.adam(-1.0), "lr must be finite and > 0"),
    (lambda: S.cosine(0.1, total_steps=0), "total_steps must be"),
    (lambda: S.linear_warmup(0.1, 10, start_factor=0), "start_factor must be"),
])
def test_bad_optimizer_arguments(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_unknown_optimizer_option_is_named():
    with pytest.raises(TypeError, match="bets"):
        fnmlp.adam(0.1, bets=(0.9, 0.99))


def test_schedules_are_pure_functions_of_the_step():
    schedule = S.cosine(0.1, total_steps=10)
    steps = torch.arange(11, dtype=F64)
    values = schedule(steps)
    assert values[0].item() == pytest.approx(0.1) and values[-1].item() == pytest.approx(0.0)
    assert torch.equal(schedule(steps), values)
    assert S.linear_warmup(1.0, 4, 0.2)(torch.tensor(8.0)).item() == 1.0
    assert S.step_decay(1.0, 3, 0.5)(torch.tensor(7.0)).item() == 0.25


def test_the_step_count_is_exact_past_float32_precision():
    params = (fnmlp.nn.LinearParams(torch.ones(2, 2), torch.zeros(2)),)
    grads = (fnmlp.nn.LinearParams(torch.ones(2, 2), torch.ones(2)),)
    optimizer = fnmlp.adam(0.01)
    state = dataclasses.replace(optimizer.init(params), step=torch.tensor(2**24))
    for _ in range(3):
        params, state = optimizer.update(params, grads, state)
    assert state.step.dtype == torch.int64 and state.step.item() == 2**24 + 3
    assert all(leaf.dtype == torch.float32 for leaf in leaves(params))


def test_cosine_floor_is_absolute_when_the_rate_is_changed():
    optimizer = fnmlp.sgd(S.cosine(0.1, total_steps=10, eta_min=0.01))
    params = (fnmlp.nn.LinearParams(torch.ones(1, 1, dtype=F64), torch.zeros(1, dtype=F64)),)
    state = optimizer.with_learning_rate(optimizer.init(params), 0.5)
    assert optimizer.learning_rate(state).item() == 0.5
    end = dataclasses.replace(state, step=torch.tensor(10))
    assert optimizer.learning_rate(end).item() == pytest.approx(0.01, rel=1e-15)
    assert S.cosine(0.1, 10, 0.01)(10).item() == pytest.approx(0.01, rel=1e-15)


@pytest.mark.parametrize("optimizer", [fnmlp.adam(0.01), fnmlp.sgd(0.05, momentum=0.9)],
                         ids=repr)
def test_a_transposed_weight_is_updated_as_a_contiguous_one(optimizer):
    g = torch.Generator().manual_seed(0)
    weight, grad = torch.randn(5, 4, generator=g, dtype=F64), torch.randn(4, 5, generator=g,
                                                                           dtype=F64)
    strided = fnmlp.nn.LinearParams(weight.t(), torch.zeros(4, dtype=F64))
    plain = fnmlp.nn.LinearParams(weight.t().contiguous(), torch.zeros(4, dtype=F64))
    grads = fnmlp.nn.LinearParams(grad, torch.ones(4, dtype=F64))
    results = []
    for params in (strided, plain):
        state = optimizer.init(params)
        for _ in range(3):  # the strided one takes the formulas, the plain one the kernel
            params, state = optimizer.update(params, grads, state, fused=True)
        results.append(params)
    assert relative(results[0].weight, results[1].weight) <= 1e-15
