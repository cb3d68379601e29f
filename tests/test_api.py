"""The public API's behaviour: pytrees, purity, immutability, the twin's conversions, metrics."""

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

import fnmlp
from helpers import assert_exact_where_checked, leaves, seed_data, seed_model


@pytest.fixture
def setup():
    model = seed_model()
    params = model.init(torch.Generator().manual_seed(0), dtype=torch.float64)
    x, y, xv, yv = seed_data()
    return model, params, x[:50], y[:50]


def test_params_are_frozen_pytrees(setup):
    model, params, _, _ = setup
    with pytest.raises(dataclasses.FrozenInstanceError):
        params[0].weight = torch.zeros(1)
    flat, _ = tree_flatten(params)
    assert len(flat) == 10 and all(isinstance(t, torch.Tensor) for t in flat)
    doubled = tree_map(lambda t: t * 2, params)
    assert isinstance(doubled[0], fnmlp.nn.LinearParams) and doubled[1] == ()
    assert torch.equal(doubled[0].weight, params[0].weight * 2)


def test_vmap_sees_through_params(setup):
    model, params, x, _ = setup
    stacked = tree_map(lambda t: torch.stack([t, t * 0.5]), params)
    out = torch.func.vmap(lambda p: fnmlp.nn._model.forward(model, p, x, model.init_state(
        dtype=torch.float64))[0])(stacked)
    assert out.shape == (2, 50, 3)
    torch.testing.assert_close(out[0], model.apply(params, x))


def test_spec_is_hashable_and_infers_shapes():
    a, b = seed_model(), seed_model()
    assert a == b and hash(a) == hash(b)
    assert a.widths == [6, 32, 32, 32, 32, 32, 32, 32, 32, 3]
    assert a.out_features == 3
    assert fnmlp.Dense(3, "linear") == fnmlp.Dense(3)


def test_dense_is_sugar_for_a_sequence_of_primitives():
    sugar = fnmlp.MLP(6, [fnmlp.Dense(8, "relu", layer_norm=True, dropout=0.1), fnmlp.Dense(3)])
    spelled = fnmlp.MLP(6, [fnmlp.Linear(8), fnmlp.LayerNorm(), "relu", fnmlp.Dropout(0.1),
                            fnmlp.Linear(3)])
    assert sugar == spelled and hash(sugar) == hash(spelled)
    assert [type(p).__name__ for p in sugar.layers] == ["Linear", "LayerNorm", "ReLU",
                                                       "Dropout", "Linear"]
    assert sugar.layers[3].stream == 3  # dropout masks are drawn per position
    with pytest.raises(TypeError, match="layers\\[1\\] must be an fnmlp primitive"):
        fnmlp.MLP(6, [fnmlp.Linear(3), 4])


def test_value_and_grad_matches_the_twins_autograd_gradients(setup):
    model, params, x, y = setup
    twin = fnmlp.to_torch(model, params)
    nn.MSELoss()(twin(x), y).backward()
    _, grads = model.value_and_grad(params, x, y)
    # the seed network: tanh, sigmoid and MSE are formulas against autograd's kernels, exact at
    # the checked CPU capabilities (tests/helpers.py); softmax is autograd's kernel itself
    for a, b in zip(leaves(grads), twin.parameters(), strict=True):
        assert_exact_where_checked(a, b.grad, rtol=1e-13, atol=1e-15, what="gradient")


def test_library_is_autograd_free(setup, monkeypatch):
    model, params, x, y = setup
    params = tree_map(lambda t: t.clone().requires_grad_(True), params)

    def forbidden(*args, **kwargs):
        raise AssertionError("autograd was used")

    monkeypatch.setattr(torch.autograd, "backward", forbidden)
    monkeypatch.setattr(torch.autograd, "grad", forbidden)
    monkeypatch.setattr(torch.Tensor, "backward", forbidden)
    loss, grads = model.value_and_grad(params, x, y)
    assert loss.grad_fn is None and all(g.grad_fn is None for g in leaves(grads))
    with torch.inference_mode():
        optimizer = fnmlp.sgd(0.01)
        loss, grads = model.value_and_grad(params, x, y)
        new, _ = optimizer.update(params, grads, optimizer.init(params))
        result = fnmlp.fit(model, params, x, y, epochs=2, batch_size=16, optimizer=optimizer)
    for t in [loss, *leaves(grads), *leaves(new), *leaves(result.params)]:
        assert t.grad_fn is None


def test_no_public_function_modifies_its_inputs(setup):
    model, params, x, y = setup
    originals = [t.clone() for t in leaves(params)] + [x.clone(), y.clone()]
    optimizer = fnmlp.sgd(0.01)
    state = optimizer.init(params)
    lr_before = state.learning_rate.clone()
    model.apply(params, x)
    _, grads = model.value_and_grad(params, x, y)
    grads_before = [g.clone() for g in leaves(grads)]
    new, _ = optimizer.update(params, grads, state)
    fnmlp.fit(model, params, x, y, epochs=2, batch_size=7, optimizer=optimizer,
              valid=(x, y), shuffle=True, generator=torch.Generator().manual_seed(0))
    fnmlp.to_torch(model, params)
    for before, after in zip(originals, leaves(params) + [x, y]):
        assert torch.equal(before, after)
    assert all(torch.equal(a, b) for a, b in zip(grads_before, leaves(grads)))
    assert torch.equal(state.learning_rate, lr_before)
    assert not torch.equal(new[0].weight, params[0].weight)


def test_fit_history_and_numpy_inputs(setup):
    model, params, x, y = setup
    optimizer = fnmlp.sgd(0.01)
    a = fnmlp.fit(model, params, x, y, epochs=3, batch_size=20, optimizer=optimizer,
                  valid=(x, y))
    b = fnmlp.fit(model, params, x.numpy(), y.numpy(), epochs=3, batch_size=20,
                  optimizer=optimizer, valid=(x.numpy(), y.numpy()))
    assert len(a.history.train_loss) == 3 and len(a.history.valid_loss) == 3
    assert a.history.train_loss == b.history.train_loss
    # the train loss is the mean of the batch losses (20, 20, 10), as in the notebook
    p, losses, state = params, [], optimizer.init(params)
    for start in range(0, 50, 20):
        loss, grads = model.value_and_grad(p, x[start:start + 20], y[start:start + 20])
        p, state = optimizer.update(p, grads, state)
        losses.append(loss.item())
    assert a.history.train_loss[0] == sum(losses) / 3
    assert fnmlp.fit(model, params, x, y, epochs=0, batch_size=5,
                     optimizer=optimizer).history.train_loss == []


def test_fit_shuffles_reproducibly_from_the_generator(setup):
    model, params, x, y = setup
    kwargs = dict(epochs=2, batch_size=8, optimizer=fnmlp.sgd(0.01), shuffle=True)
    a = fnmlp.fit(model, params, x, y, generator=torch.Generator().manual_seed(1), **kwargs)
    b = fnmlp.fit(model, params, x, y, generator=torch.Generator().manual_seed(1), **kwargs)
    c = fnmlp.fit(model, params, x, y, epochs=2, batch_size=8, optimizer=fnmlp.sgd(0.01))
    assert a.history.train_loss == b.history.train_loss != c.history.train_loss


def test_fit_continues_from_opt_state_and_prints_when_verbose(setup, capsys):
    model, params, x, y = setup
    first = fnmlp.fit(model, params, x, y, epochs=1, batch_size=50,
                      optimizer=fnmlp.sgd(0.01), verbose=True)
    assert "epoch 1/1  loss " in capsys.readouterr().out
    second = fnmlp.fit(model, first.params, x, y, epochs=1, batch_size=50,
                       optimizer=fnmlp.sgd(0.01), opt_state=first.opt_state)
    assert capsys.readouterr().out == ""
    both = fnmlp.fit(model, params, x, y, epochs=2, batch_size=50, optimizer=fnmlp.sgd(0.01))
    assert both.history.train_loss == first.history.train_loss + second.history.train_loss


def test_learning_rate_as_a_tensor(setup):
    model, params, x, y = setup
    a = fnmlp.fit(model, params, x, y, epochs=1, batch_size=10, optimizer=fnmlp.sgd(0.01))
    b = fnmlp.fit(model, params, x, y, epochs=1, batch_size=10,
                  optimizer=fnmlp.sgd(torch.tensor(0.01, dtype=torch.float64)))
    assert a.history.train_loss == b.history.train_loss
    optimizer = fnmlp.sgd(0.01)
    state = optimizer.with_learning_rate(optimizer.init(params), 0.5)
    assert state.learning_rate.item() == 0.5


def test_non_finite_loss_stops_fit_with_the_last_finite_parameters(setup):
    model, params, x, y = setup
    with pytest.raises(fnmlp.NonFiniteLossError,
                       match=r"epoch \d+ \(counted from 0; the verbose line's epoch \d+\), "
                       r"batch \d+") as info:
        fnmlp.fit(model, params, x * 1e3, y * 1e6, epochs=50, batch_size=10,
                  optimizer=fnmlp.sgd(1e3), valid=(x, y))
    error = info.value
    assert all(torch.isfinite(t).all() for t in leaves(error.params))
    assert len(error.history.train_loss) == error.epoch
    assert error.opt_state is not None


def test_to_torch_and_from_torch_round_trip(setup):
    model, params, x, _ = setup
    twin = fnmlp.to_torch(model, params)
    assert [type(m).__name__ for m in twin] == [
        "Linear", "Tanh", "Linear", "Softmax", "Linear", "Sigmoid", "Linear", "ReLU", "Linear"]
    with torch.no_grad():  # the same forward kernels both sides: exact on every CPU
        assert torch.equal(twin(x), model.apply(params, x))
    model2, params2, state2 = fnmlp.from_torch(twin)
    assert model2 == model and state2 == ((),) * len(model.layers)
    assert all(torch.equal(a, b) for a, b in zip(leaves(params2), leaves(params)))
    with torch.no_grad():  # copies, not views of the module's parameters
        twin[0].weight.add_(1)
    assert torch.equal(params2[0].weight, params[0].weight)


def test_from_torch_takes_any_serial_composition():
    module = nn.Sequential(nn.Tanh(), nn.Linear(4, 3), nn.Identity(), nn.Linear(3, 2),
                           nn.ReLU(), nn.Sigmoid(), nn.BatchNorm1d(2))
    model, params, state = fnmlp.from_torch(module)
    assert [type(p).__name__ for p in model.layers] == [
        "Tanh", "Linear", "Identity", "Linear", "ReLU", "Sigmoid", "BatchNorm"]
    assert model.in_features == 4 and model.out_features == 2
    x = torch.randn(5, 4)
    with torch.no_grad():  # BatchNorm's evaluation formula against nn.BatchNorm1d's kernel
        assert_exact_where_checked(model.apply(params, x, state=state), module.eval()(x),
                                   rtol=1e-6, atol=1e-7, what="from_torch forward")


@pytest.mark.parametrize("module, message", [
    (nn.Sequential(nn.Linear(4, 3), nn.Conv1d(1, 1, 1)), "Conv1d.*supported modules: nn.Linear"),
    (nn.Sequential(nn.Tanh(), nn.ReLU()), "holds no nn.Linear"),
    (nn.Sequential(nn.Linear(4, 3, bias=False)), "without bias"),
    (nn.Sequential(nn.Linear(4, 3), nn.Softmax(dim=0)), "row-wise"),
    (nn.Sequential(nn.Linear(4, 3), nn.Linear(2, 2)), "expects 2 inputs"),
    (nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(2)), "expects 2 inputs"),
    (nn.Linear(4, 3), "nn.Sequential"),
])
def test_from_torch_rejects_what_it_cannot_express(module, message):
    with pytest.raises((TypeError, ValueError), match=message):
        fnmlp.from_torch(module)


def test_metrics():
    from fnmlp import metrics
    a = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
    assert metrics.mape(a, a) == 0.0 and metrics.mape(2.0, 2.0) == 0.0
    assert metrics.mape(a * 1.1, a) == pytest.approx(0.1)
    assert metrics.mean_squared_error(a + 1, a) == 1.0
    assert metrics.r2(a, a) == 1.0
    from sklearn.metrics import r2_score
    b = a + torch.tensor([[0.3, -0.2], [0.1, 0.4]], dtype=torch.float64)
    assert metrics.r2(b, a) == pytest.approx(r2_score(a.numpy(), b.numpy()))
    with pytest.raises(ValueError, match="shape"):
        metrics.mean_squared_error(a, a[0])
    assert metrics.mape(np.ones(3), np.ones(3)) == 0.0


def test_twin_round_trip_covers_every_module():
    model = fnmlp.MLP(4, [
        fnmlp.Dense(6, fnmlp.LeakyReLU(0.2), layer_norm=True, dropout=0.3),
        fnmlp.Dense(6, fnmlp.ELU(0.5)), fnmlp.Dense(6, fnmlp.GELU("tanh")),
        fnmlp.Dense(6, "silu", dropout=0.1), fnmlp.Dense(6, fnmlp.Softplus(2.0, 10.0)),
        fnmlp.Dense(5, "log_softmax"),
    ])
    params = model.init(torch.Generator().manual_seed(0), dtype=torch.float64)
    twin = fnmlp.to_torch(model, params)
    assert [type(m).__name__ for m in twin][:5] == ["Linear", "LayerNorm", "LeakyReLU",
                                                    "Dropout", "Linear"]
    model2, params2, _ = fnmlp.from_torch(twin)
    assert model2 == model
    assert all(torch.equal(a, b) for a, b in zip(leaves(params2), leaves(params)))
    x = torch.randn(3, 4, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(twin.eval()(x), model.apply(params, x), rtol=1e-14, atol=0)


@pytest.mark.parametrize("module, message", [
    (nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(2)), "expects 2 inputs"),
    (nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3, elementwise_affine=False)),
     "elementwise_affine=True"),
    (nn.Sequential(nn.Linear(4, 3).double(), nn.LayerNorm(3)), "differ in dtype"),
])
def test_from_torch_rejects_layers_it_cannot_express(module, message):
    with pytest.raises(ValueError, match=message):
        fnmlp.from_torch(module)


def test_optimizer_states_with_absent_buffers_are_pytrees(setup):
    model, params, x, y = setup
    state = fnmlp.sgd(0.1).init(params)  # no momentum: its buffer is None, no child
    doubled = tree_map(lambda t: t * 2, state)
    assert doubled.momentum_buffer is None and doubled.learning_rate.item() == 0.2
    assert len(tree_flatten(state)[0]) == 2


def test_binary_classifier_probabilities_and_classes():
    model = fnmlp.MLP(2, [fnmlp.Dense(1)])
    params = (fnmlp.nn.LinearParams(torch.tensor([[1.0, 0.0]]), torch.zeros(1)),)
    x = torch.tensor([[-2.0, 5.0], [0.5, 0.0], [3.0, 1.0]])
    bce = fnmlp.BinaryCrossEntropyWithLogits()
    proba = model.predict_proba(params, x, loss=bce)
    p = torch.sigmoid(x[:, :1])
    torch.testing.assert_close(proba, torch.cat([1 - p, p], dim=1))
    assert model.predict_classes(params, x, loss=bce).tolist() == [0, 1, 1]
    sigmoid_head = fnmlp.MLP(2, [fnmlp.Dense(1, "sigmoid")])
    torch.testing.assert_close(sigmoid_head.predict_proba(params + ((),), x), proba)


def test_eager_step_builds_no_graph_for_parameters_that_require_grad(setup):
    model, params, x, y = setup
    params = tree_map(lambda t: t.clone().requires_grad_(True), params)
    step = fnmlp.train_step(model, fnmlp.mse, fnmlp.sgd(0.01), compile=False)
    new, _, loss = step(params, fnmlp.sgd(0.01).init(params), x, y)
    assert loss.grad_fn is None and all(leaf.grad_fn is None for leaf in leaves(new))


def test_to_torch_leaves_the_global_generator_alone(setup):
    model, params, x, y = setup
    before = torch.random.get_rng_state()
    twin = fnmlp.to_torch(model, params)
    assert torch.equal(torch.random.get_rng_state(), before)
    # the same forward kernels both sides: exact on every CPU
    torch.testing.assert_close(twin(x), model.apply(params, x), rtol=0, atol=0)


def test_fast_flatten_round_trips_every_node_kind(setup):
    from fnmlp._tree import flatten, unflatten

    model, params, x, y = setup
    state = fnmlp.adam(0.1).init(params)  # amsgrad off: a None field
    tree = (params, state, [x, None], {"y": y}, ())
    leaves_, spec = flatten(tree)
    expected = [leaf for leaf in tree_flatten(tree)[0] if leaf is not None]  # None: no leaf
    assert len(leaves_) == len(expected) and all(a is b for a, b in zip(leaves_, expected))
    rebuilt = unflatten(leaves_, spec)
    assert tree_flatten(rebuilt)[1] == tree_flatten(tree)[1]
    assert all(a is b for a, b in zip(tree_flatten(rebuilt)[0], tree_flatten(tree)[0]))
    assert rebuilt[1].max_exp_avg_sq is None and rebuilt[2][1] is None and rebuilt[4] == ()


def test_fit_compiles_only_when_it_pays(capsys):
    """compile="auto" (fit's default): an estimate before the first step, said by verbose."""
    from fnmlp.train._auto import choose_compile

    model = fnmlp.workloads.seed_model()
    x, y, _, _ = fnmlp.workloads.seed_data(samples=400, train=400)
    params = model.init(torch.Generator().manual_seed(0), dtype=torch.float64)
    fnmlp.fit(model, params, x, y, epochs=1, batch_size=200, optimizer=fnmlp.sgd(0.01),
              verbose=True)
    assert "fnmlp: eager steps (auto: 2 steps" in capsys.readouterr().out
    assert choose_compile("auto", model, 100_000)[0]
    assert not choose_compile("auto", model, 600)[0]
    assert choose_compile("auto", model, 1000, cached=True)[0]  # compiled before: cheap
    assert choose_compile(False, model, 10**9) == (False, "compile=False")
    with pytest.raises(ValueError, match="compile must be"):
        fnmlp.fit(model, params, x, y, epochs=1, batch_size=200, optimizer=fnmlp.sgd(0.01),
                  compile="yes")


def test_the_package_says_it_is_typed():
    """``py.typed`` ships with the package (PEP 561), so type checkers read its annotations."""
    from importlib import resources

    assert resources.files("fnmlp").joinpath("py.typed").is_file()
