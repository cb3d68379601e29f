"""The two-way registry: every primitive, loss, optimizer and schedule converts to torch and
back to an equal spec; TorchTwin reads only the registry."""

import pytest
import torch
from torch import nn

import fnmlp
from fnmlp.interop import (loss_from_torch, loss_to_torch, optimizer_from_torch,
                           optimizer_to_torch)

S = fnmlp.schedules
OPTIMIZERS = [
    fnmlp.sgd(0.05, momentum=0.9, dampening=0.1, weight_decay=0.01),
    fnmlp.sgd(0.05, momentum=0.9, nesterov=True),
    fnmlp.adam(0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1, amsgrad=True),
    fnmlp.adamw(0.01, weight_decay=0.2),
    fnmlp.rmsprop(0.005, alpha=0.9, momentum=0.5, centered=True, weight_decay=0.01),
    fnmlp.adagrad(0.05, lr_decay=0.01, initial_accumulator_value=0.1, eps=1e-9),
    fnmlp.sgd(S.constant(0.05)),
    fnmlp.sgd(S.step_decay(0.05, step_size=10, gamma=0.5), momentum=0.5),
    fnmlp.adam(S.exponential(0.01, gamma=0.97)),
    fnmlp.adam(S.cosine(0.01, total_steps=100, eta_min=1e-4)),
    fnmlp.sgd(S.linear_warmup(0.05, warmup_steps=20, start_factor=0.1)),
    fnmlp.clip_by_global_norm(fnmlp.adam(S.cosine(0.01, total_steps=50)), max_norm=0.5),
    fnmlp.clip_by_global_norm(fnmlp.clip_by_global_norm(fnmlp.sgd(0.1), 2.0), 0.5),
    fnmlp.sgd(0.1, maximize=True), fnmlp.adam(0.1, maximize=True), fnmlp.rmsprop(maximize=True),
    fnmlp.adagrad(maximize=True),
]


@pytest.mark.parametrize("optimizer", OPTIMIZERS, ids=repr)
def test_optimizers_round_trip_through_torch(optimizer):
    """optimizer -> (torch.optim optimizer, scheduler, clip norms) -> the same optimizer, nested
    wrappers (clipping around a schedule, clipping around clipping) included."""
    parameters = [nn.Parameter(torch.zeros(3))]
    converted = optimizer_to_torch(optimizer, parameters)
    back = optimizer_from_torch(converted.optimizer, converted.scheduler, converted.clip_norms)
    assert back == optimizer


@pytest.mark.parametrize("loss", [
    fnmlp.MSE("sum"), fnmlp.L1(), fnmlp.Huber(delta=0.3), fnmlp.SmoothL1("sum", beta=0.2),
    fnmlp.PoissonNLL(), fnmlp.CrossEntropy("none"),
    fnmlp.CrossEntropy(label_smoothing=0.1, weight=(1.0, 0.5), ignore_index=4),
    fnmlp.BinaryCrossEntropyWithLogits("sum", weight=(0.5, 2.0), pos_weight=(3.0, 1.0))],
    ids=repr)
def test_losses_round_trip_through_torch(loss):
    assert loss_from_torch(loss_to_torch(loss)) == loss


def test_every_primitive_round_trips_through_an_nn_sequential():
    model = fnmlp.MLP(4, [
        fnmlp.Linear(6), fnmlp.BatchNorm(momentum=None), fnmlp.LeakyReLU(0.2), fnmlp.Dropout(0.3),
        fnmlp.Dense(6, fnmlp.ELU(0.5), layer_norm=True), fnmlp.Dense(6, fnmlp.GELU("tanh")),
        fnmlp.Dense(6, "silu", dropout=0.1), fnmlp.Dense(6, fnmlp.Softplus(2.0, 10.0)),
        "sigmoid", "tanh", "relu", "identity", "softmax", fnmlp.Linear(5), "log_softmax"])
    params = model.init(torch.Generator().manual_seed(0), dtype=torch.float64)
    state = model.init_state(dtype=torch.float64)
    module = fnmlp.to_torch(model, params, state)
    assert len(module) == len(model.layers)
    back, back_params, back_state = fnmlp.from_torch(module)
    assert back == model
    for a, b in zip(*(torch.utils._pytree.tree_leaves(t) for t in
                      ((params, state), (back_params, back_state)))):
        assert torch.equal(a, b)


@pytest.mark.parametrize("make, message", [
    (lambda p: torch.optim.SparseAdam(p), "SparseAdam has no fnmlp counterpart"),
    (lambda p: torch.optim.LBFGS(p), "LBFGS has no fnmlp counterpart"),
    (lambda p: torch.optim.SGD([{"params": p[:1]}, {"params": p[1:]}], lr=0.1),
     "one parameter group"),
])
def test_optimizers_fnmlp_cannot_express_are_named(make, message):
    parameters = [nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))]
    with pytest.raises((TypeError, ValueError), match=message):
        optimizer_from_torch(make(parameters))


def test_schedulers_and_losses_fnmlp_cannot_express_are_named():
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=0.1)
    with pytest.raises(TypeError, match="OneCycleLR has no fnmlp schedule"):
        optimizer_from_torch(optimizer, torch.optim.lr_scheduler.OneCycleLR(optimizer, 1.0, 10))
    with pytest.raises(ValueError, match="pos_weight=...\\) must be 1-D"):
        loss_from_torch(nn.BCEWithLogitsLoss(pos_weight=torch.ones(2, 3)))
    with pytest.raises(TypeError, match="NLLLoss has no fnmlp counterpart"):
        loss_from_torch(nn.NLLLoss())
    with pytest.raises(ValueError, match="per-element losses; fnmlp's 'none' is per row"):
        loss_from_torch(nn.MSELoss(reduction="none"))
    with pytest.raises(ValueError, match="fnmlp's 'none' gives per-row losses"):
        loss_to_torch(fnmlp.L1("none"))


def test_constant_lr_with_a_lasting_factor_converts_to_the_scaled_rate():
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=0.1)
    scheduler = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=0.5, total_iters=0)
    assert optimizer_from_torch(optimizer, scheduler) == fnmlp.sgd(S.constant(0.05))
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=0.1)
    scheduler = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=0.5, total_iters=3)
    with pytest.raises(ValueError, match="ConstantLR with factor != 1 for a number of steps"):
        optimizer_from_torch(optimizer, scheduler)


def test_the_twin_trains_a_scheduled_clipped_optimizer_like_fnmlp():
    model = fnmlp.MLP(3, [fnmlp.Dense(5, "tanh"), fnmlp.Dense(2)])
    params = model.init(torch.Generator().manual_seed(1), dtype=torch.float64)
    optimizer = fnmlp.clip_by_global_norm(fnmlp.sgd(S.cosine(0.5, total_steps=10),
                                                    momentum=0.9), max_norm=0.1)
    twin = fnmlp.TorchTwin(model, params, optimizer=optimizer)
    assert twin.clip_norms == (0.1,) and isinstance(
        twin.scheduler, torch.optim.lr_scheduler.CosineAnnealingLR)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(8, 3, generator=g, dtype=torch.float64)
    y = torch.randn(8, 2, generator=g, dtype=torch.float64)
    state = optimizer.init(params)
    for _ in range(10):
        _, grads = model.value_and_grad(params, x, y)
        params, state = optimizer.update(params, grads, state)
        twin.step(x, y)
    for a, b in zip(torch.utils._pytree.tree_leaves(params),
                    torch.utils._pytree.tree_leaves(twin.params())):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_to_torch_of_a_model_with_running_statistics_needs_its_state():
    model = fnmlp.MLP(3, [fnmlp.Linear(4), fnmlp.BatchNorm(), fnmlp.Linear(2)])
    params = model.init(torch.Generator().manual_seed(0), dtype=torch.float64)
    x = torch.randn(16, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    trained = fnmlp.fit(model, params, x, x[:, :2], epochs=3, batch_size=8,
                        optimizer=fnmlp.sgd(0.1))
    with pytest.raises(ValueError, match="keeps running statistics \\(BatchNorm\\): pass "
                                         "state=... from training"):
        fnmlp.to_torch(model, trained.params)  # fresh statistics would predict otherwise
    twin = fnmlp.to_torch(model, trained.params, trained.state).eval()
    with torch.no_grad():
        assert torch.allclose(twin(x), model.apply(trained.params, x, state=trained.state))
    fresh = fnmlp.to_torch(model, params, model.init_state(dtype=torch.float64))
    assert torch.equal(fresh[1].running_var, torch.ones(4, dtype=torch.float64))
    twin = fnmlp.TorchTwin(model, params, optimizer=fnmlp.sgd(0.1))  # trains from fresh ones
    assert torch.equal(twin.module[1].running_mean, torch.zeros(4, dtype=torch.float64))
    plain = fnmlp.MLP(3, [fnmlp.Linear(2)])  # no running statistics: no state needed
    fnmlp.to_torch(plain, plain.init(dtype=torch.float64))
