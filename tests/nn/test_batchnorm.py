"""BatchNorm (state as a pytree beside the parameters) and row weights, against torch.nn:
nn.BatchNorm1d's values, gradients, running statistics and evaluation outputs, step by step,
eager and compiled; weighted losses against torch.nn's per-row losses weighted."""

import pytest
import torch
from torch import nn

import fnmlp
from fnmlp.nn._primitive import Context
from helpers import leaves, relative

F64 = torch.float64


def _model():
    return fnmlp.MLP(5, [fnmlp.Linear(8), fnmlp.BatchNorm(), "relu", fnmlp.Linear(6),
                         fnmlp.BatchNorm(momentum=None, eps=1e-3), "tanh", fnmlp.Linear(3)])


def _data(rows=55, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 5, generator=g, dtype=F64) * 2 + 1
    y = torch.randn(rows, 3, generator=g, dtype=F64)
    weight = torch.rand(rows, generator=g, dtype=F64) + 0.25
    return x, y, weight


def _worst(a, b):
    return max(relative(p, q) for p, q in zip(leaves(a), leaves(b)))


@pytest.mark.parametrize("compile", [False, pytest.param(True, marks=pytest.mark.slow)],
                         ids=["eager", "compiled"])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
def test_batchnorm_network_matches_its_twin_step_by_step(compile, weighted, device):
    """Loss, parameters and running statistics after every step (batches of 16, 16, 16 and 7:
    the compiled step pads the last with rows of weight 0, which take no part in the batch
    statistics), then evaluation outputs: all within 1e-13 of nn.BatchNorm1d's twin."""
    if compile and device == "cuda":
        pytest.skip("the compiled CUDA step is covered by test_compile.py")
    model = _model()
    params = model.init(torch.Generator().manual_seed(1), dtype=F64, device=device)
    state = model.init_state(dtype=F64, device=device)
    x, y, weight = (t.to(device) for t in _data())
    optimizer = fnmlp.sgd(0.05, momentum=0.9)
    twin = fnmlp.TorchTwin(model, params, optimizer=optimizer, state=state)
    step = fnmlp.train_step(model, fnmlp.mse, optimizer, compile=compile)
    opt_state = optimizer.init(params)
    given_state = [t.clone() for t in leaves(state)]
    initial_state = state
    worst = 0.0
    for epoch in range(2):
        for start in range(0, 55, 16):
            rows = slice(start, start + 16)
            w = weight[rows] if weighted else None
            params, opt_state, loss, state = step(params, opt_state, x[rows], y[rows],
                                                  state=state, sample_weight=w)
            twin_loss = twin.step(x[rows], y[rows], sample_weight=w)
            worst = max(worst, relative(loss, twin_loss), _worst(params, twin.params()),
                        _worst(state, twin.state()))
    assert worst <= 1e-13, worst
    assert [int(s.num_batches_tracked) for s in state if s] == [8, 8]
    assert all(torch.equal(a, b) for a, b in zip(leaves(initial_state), given_state))
    with torch.no_grad():
        evaluated = model.apply(params, x, state=state)
        assert relative(evaluated, twin.module.eval()(x)) <= 1e-13
    if compile:
        assert step.executor.graphs.count() == 1


def test_rows_of_weight_zero_take_no_part_in_batch_statistics():
    """Forward and backward with zero-weight rows equal nn.BatchNorm1d on the other rows alone;
    the zero rows' input gradients are 0, and so is their effect on everything else."""
    norm = fnmlp.BatchNorm()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(9, 4, generator=g, dtype=F64)
    dy = torch.randn(9, 4, generator=g, dtype=F64)
    keep = torch.tensor([1, 0, 1, 1, 0, 1, 1, 0, 1], dtype=torch.bool)
    dy[~keep] = 0  # a weighted loss gives rows of weight 0 no gradient
    params = fnmlp.nn.NormParams(torch.rand(4, generator=g, dtype=F64) + 0.5,
                              torch.randn(4, generator=g, dtype=F64))
    state = norm.init_state(4, F64, "cpu")
    context = Context(train=True, row_weight=keep.to(F64) * 3)
    out, residual, new_state = norm.forward(params, x, state, context)
    dx, grads = norm.backward(params, residual, dy)

    twin = nn.BatchNorm1d(4, dtype=F64)
    with torch.no_grad():
        twin.weight.copy_(params.weight)
        twin.bias.copy_(params.bias)
    kept = x[keep].clone().requires_grad_(True)
    expected = twin(kept)
    expected.backward(dy[keep])
    assert relative(out[keep], expected.detach()) <= 1e-13
    assert relative(dx[keep], kept.grad) <= 1e-13 and torch.equal(dx[~keep], torch.zeros(3, 4,
                                                                                  dtype=F64))
    assert relative(grads.weight, twin.weight.grad) <= 1e-13
    assert relative(grads.bias, twin.bias.grad) <= 1e-13
    assert relative(new_state.running_mean, twin.running_mean) <= 1e-13
    assert relative(new_state.running_var, twin.running_var) <= 1e-13


@pytest.mark.parametrize("options", [dict(affine=False), dict(track_running_stats=False),
                                     dict(momentum=0.3, eps=1e-2)])
def test_batchnorm_options_round_trip_and_match_torch(options):
    model = fnmlp.MLP(4, [fnmlp.Linear(6), fnmlp.BatchNorm(**options), fnmlp.Linear(2)])
    params = model.init(torch.Generator().manual_seed(3), dtype=F64)
    state = model.init_state(dtype=F64)
    module = fnmlp.to_torch(model, params, state)
    assert isinstance(module[1], nn.BatchNorm1d)
    back, back_params, back_state = fnmlp.from_torch(module)
    assert back == model
    x, y, _ = _data(12)
    x = x[:, :4]
    value, grads, new_state = model.value_and_grad(params, x, y[:, :2], state=state)
    expected = nn.MSELoss()(module.train()(x), y[:, :2])
    expected.backward()
    assert relative(value, expected.detach()) <= 1e-13
    # (one comparison over all gradients: the bias before a batch norm has a gradient of ~0)
    assert relative(torch.cat([g.reshape(-1) for g in leaves(grads)]),
                    torch.cat([p.grad.reshape(-1) for p in module.parameters()])) <= 1e-13
    assert _worst(new_state, fnmlp.from_torch(module)[2]) <= 1e-13 if leaves(new_state) else True
    with torch.no_grad():
        assert relative(model.apply(params, x, state=new_state), module.eval()(x)) <= 1e-13


def test_fit_carries_the_state_and_evaluates_with_running_statistics():
    model = _model()
    params = model.init(torch.Generator().manual_seed(4), dtype=F64)
    x, y, weight = _data(64)
    # (not Adam: it scales the ~1e-17 gradients of a bias before a batch norm, pure rounding,
    # to full-size steps, so the last-bit differences of the two runs would show)
    optimizer = fnmlp.sgd(0.05, momentum=0.5)
    result = fnmlp.fit(model, params, x, y, epochs=3, batch_size=16, optimizer=optimizer,
                       valid=(x, y), sample_weight=weight)
    twin = fnmlp.TorchTwin(model, params, optimizer=optimizer)
    for _ in range(3):
        for start in range(0, 64, 16):
            twin.step(x[start:start + 16], y[start:start + 16],
                      sample_weight=weight[start:start + 16])
    assert _worst(result.params, twin.params()) <= 1e-12
    assert _worst(result.state, twin.state()) <= 1e-12
    assert abs(result.history.valid_loss[-1] - twin.evaluate(x, y)) <= 1e-12 * twin.evaluate(x, y)
    resumed = fnmlp.fit(model, result.params, x, y, epochs=1, batch_size=16, optimizer=optimizer,
                        opt_state=result.opt_state, state=result.state)
    assert int(resumed.state[1].num_batches_tracked) == 16


def test_state_errors_are_clear():
    model = _model()
    params = model.init(torch.Generator().manual_seed(5), dtype=F64)
    x, y, _ = _data(10)
    with pytest.raises(ValueError, match="keeps running statistics .* pass state="):
        model.value_and_grad(params, x, y)
    with pytest.raises(ValueError, match="keeps running statistics"):
        model.apply(params, x)  # evaluation needs the running statistics
    with pytest.raises(ValueError, match=r"got 1 \(batch 2 of 9 rows in batches of 4"):
        fnmlp.fit(model, params, x[:9], y[:9], epochs=1, batch_size=4, optimizer=fnmlp.sgd(0.1))
    with pytest.raises(ValueError, match=r"state\[1\].running_mean has shape"):
        wrong = fnmlp.MLP(5, [fnmlp.Linear(7), fnmlp.BatchNorm(), "relu", fnmlp.Linear(6),
                              fnmlp.BatchNorm(momentum=None, eps=1e-3), "tanh", fnmlp.Linear(3)])
        model.value_and_grad(params, x, y, state=wrong.init_state(dtype=F64))
    with pytest.raises(ValueError, match=r"state\[1\].running_mean is torch.float32 on cpu "
                                         r"but the parameters are torch.float64"):
        model.value_and_grad(params, x, y, state=model.init_state())
    with pytest.raises(ValueError, match="momentum must be"):
        fnmlp.BatchNorm(momentum=2.0)


@pytest.mark.parametrize("bad, message", [
    (torch.ones(9, dtype=F64), r"one weight per row \(10,\)"),
    (-torch.ones(10, dtype=F64), "must be >= 0"),
    (torch.zeros(10, dtype=F64), "all zero"),
    (torch.full((10,), float("nan"), dtype=F64), "NaN"),
    ("heavy", "must be a torch.Tensor or a NumPy array"),
])
def test_bad_sample_weights(bad, message):
    model = fnmlp.MLP(5, [fnmlp.Dense(3)])
    params = model.init(dtype=F64)
    x, y, _ = _data(10)
    with pytest.raises((ValueError, TypeError), match=message):
        model.value_and_grad(params, x, y, sample_weight=bad)
    with pytest.raises((ValueError, TypeError), match=message):
        fnmlp.fit(model, params, x, y, epochs=1, batch_size=4, optimizer=fnmlp.sgd(0.1),
                  sample_weight=bad)


def test_unit_weights_give_the_unweighted_run_and_numpy_weights_work():
    model = fnmlp.MLP(5, [fnmlp.Dense(4, "tanh"), fnmlp.Dense(3)])
    params = model.init(torch.Generator().manual_seed(6), dtype=F64)
    x, y, weight = _data(30)
    plain = fnmlp.fit(model, params, x, y, epochs=2, batch_size=8, optimizer=fnmlp.sgd(0.1))
    ones = fnmlp.fit(model, params, x, y, epochs=2, batch_size=8, optimizer=fnmlp.sgd(0.1),
                     sample_weight=torch.ones(30, dtype=F64))
    assert _worst(ones.params, plain.params) <= 1e-13
    weighted = fnmlp.fit(model, params, x, y, epochs=2, batch_size=8, optimizer=fnmlp.sgd(0.1),
                         sample_weight=weight.numpy())
    assert _worst(weighted.params, plain.params) > 1e-6


@pytest.mark.parametrize("compile", [False, True])
def test_batch_statistics_need_two_counted_rows_everywhere(compile):
    """One row (or one row of non-zero weight) has no variance: the error comes before any
    work, from fit, the step (eager or compiled: its graph could not raise) and
    value_and_grad; a batch whose rows all weigh 0 is skipped by fit."""
    model = _model()
    params = model.init(torch.Generator().manual_seed(7), dtype=F64)
    state = model.init_state(dtype=F64)
    x, y, _ = _data(12)
    optimizer = fnmlp.sgd(0.1)
    with pytest.raises(ValueError, match="BatchNorm needs at least 2 rows of non-zero weight "
                                         "per training batch, got 1 .*batch 0"):
        fnmlp.fit(model, params, x, y, epochs=1, batch_size=1, optimizer=optimizer)
    step = fnmlp.train_step(model, fnmlp.mse, optimizer, compile=compile)
    with pytest.raises(ValueError, match="got 1"):
        step(params, optimizer.init(params), x[:1], y[:1], state=state)
    one = torch.tensor([0.0, 2.0, 0.0, 0.0], dtype=F64)
    with pytest.raises(ValueError, match="got 1"):
        model.value_and_grad(params, x[:4], y[:4], state=state, sample_weight=one)
    with pytest.raises(ValueError, match="got 1 .*batch 1"):
        fnmlp.fit(model, params, x[:8], y[:8], epochs=1, batch_size=4, optimizer=optimizer,
                  sample_weight=torch.cat([torch.ones(4, dtype=F64), one]))
    skipped = fnmlp.fit(model, params, x[:8], y[:8], epochs=1, batch_size=4, optimizer=optimizer,
                        sample_weight=torch.cat([torch.ones(4, dtype=F64),
                                                 torch.zeros(4, dtype=F64)]))
    assert int(skipped.state[1].num_batches_tracked) == 1  # the all-zero batch: no step
    assert all(torch.isfinite(t).all() for t in leaves(skipped.state))


def test_the_twin_refuses_zero_weights_with_batch_norm():
    model = _model()
    params = model.init(torch.Generator().manual_seed(8), dtype=F64)
    twin = fnmlp.TorchTwin(model, params, optimizer=fnmlp.sgd(0.1))
    x, y, _ = _data(4)
    with pytest.raises(ValueError, match="nn.BatchNorm1d has no row weights"):
        twin.step(x, y, sample_weight=torch.tensor([1.0, 0.0, 1.0, 1.0], dtype=F64))
