"""Bad input gets a clear error that names the problem, before any work is done."""

import numpy as np
import pytest
import torch

import fnmlp
from helpers import seed_model


@pytest.fixture
def setup():
    model = seed_model()
    params = model.init(torch.Generator().manual_seed(0), dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(20, 6, generator=g, dtype=torch.float64)
    y = torch.randn(20, 3, generator=g, dtype=torch.float64)
    return model, params, x, y


def _fit(model, params, x, y, **overrides):
    kwargs = dict(epochs=1, batch_size=5, optimizer=fnmlp.sgd(0.01))
    kwargs.update(overrides)
    return fnmlp.fit(model, params, x, y, **kwargs)


@pytest.mark.parametrize("change, error, message", [
    (lambda x, y: (x[:, :5], y), ValueError, "x has 5 features but the model expects 6"),
    (lambda x, y: (x, y[:19]), ValueError, "x has 20 rows but y has 19"),
    (lambda x, y: (x, y[:, :2]), ValueError, "y has 2 columns but the model outputs 3"),
    (lambda x, y: (x.to(torch.complex128), y), TypeError, "x must hold real numbers"),
    (lambda x, y: (x.to("meta"), y), ValueError, "x is on meta but the parameters are on cpu"),
    (lambda x, y: (x.index_put((torch.tensor([3]), torch.tensor([2])),
                               torch.tensor(float("nan"), dtype=x.dtype)), y),
     ValueError, r"x contains NaN or inf \(first in row 3\)"),
    (lambda x, y: (x, y.index_fill(0, torch.tensor([0]), float("inf"))), ValueError,
     r"y contains NaN or inf \(first in row 0\)"),
    (lambda x, y: (x[:0], y[:0]), ValueError, "x is empty"),
    (lambda x, y: (x[0], y[0]), ValueError, r"x must be 2-D .* x.reshape\(1, -1\)"),
    (lambda x, y: ("data", y), TypeError, "x must be a torch.Tensor or a NumPy array"),
])
def test_bad_data(setup, change, error, message):
    model, params, x, y = setup
    bad_x, bad_y = change(x, y)
    for call in (lambda: model.value_and_grad(params, bad_x, bad_y),
                 lambda: _fit(model, params, bad_x, bad_y)):
        with pytest.raises(error, match=message):
            call()


def test_bad_data_in_apply_and_valid(setup):
    model, params, x, y = setup
    with pytest.raises(ValueError, match="x has 5 features"):
        model.apply(params, x[:, :5])
    with pytest.raises(ValueError, match="x_valid has 4 features"):
        _fit(model, params, x, y, valid=(x[:, :4], y))
    with pytest.raises(ValueError, match="x_valid has 20 rows but y_valid has 3"):
        _fit(model, params, x, y, valid=(x, y[:3]))
    with pytest.raises(TypeError, match="valid must be a pair"):
        _fit(model, params, x, y, valid=x)


@pytest.mark.parametrize("overrides, error, message", [
    (dict(batch_size=0), ValueError, "batch_size must be an integer >= 1, got 0"),
    (dict(batch_size=2.5), ValueError, "batch_size must be an integer"),
    (dict(epochs=-1), ValueError, "epochs must be an integer >= 0, got -1"),
    (dict(optimizer="sgd"), TypeError, "optimizer must be an fnmlp optimizer"),
    (dict(loss="mse"), TypeError, "loss must be an fnmlp loss"),
])
def test_bad_fit_arguments(setup, overrides, error, message):
    model, params, x, y = setup
    with pytest.raises(error, match=message):
        _fit(model, params, x, y, **overrides)


@pytest.mark.parametrize("lr, error, message", [
    (0.0, ValueError, "lr must be finite and > 0, got 0.0"),
    (-0.1, ValueError, "lr must be finite and > 0"),
    (float("nan"), ValueError, "lr must be finite"),
    (float("inf"), ValueError, "lr must be finite"),
    (torch.tensor([0.1, 0.2]), ValueError, "0-d"),
    ("0.1", TypeError, "lr must be a float"),
])
def test_bad_learning_rate(lr, error, message):
    with pytest.raises(error, match=message):
        fnmlp.sgd(lr)


def test_bad_spec_and_params(setup):
    model, params, x, y = setup
    with pytest.raises(ValueError, match="unknown activation 'tanhh'; supported: .*identity.*tanh"):
        fnmlp.Dense(3, "tanhh")
    with pytest.raises(ValueError, match="units must be an integer >= 1"):
        fnmlp.Dense(0)
    with pytest.raises(ValueError, match="in_features must be"):
        fnmlp.MLP(0, [fnmlp.Dense(1)])
    with pytest.raises(ValueError, match="at least one layer"):
        fnmlp.MLP(3, [])
    with pytest.raises(TypeError, match="floating"):
        model.init(dtype=torch.int64)
    with pytest.raises(ValueError, match="unknown init 'xavier"):
        model.init(init="xavier")
    with pytest.raises(TypeError, match="tuple of 9 entries, one per primitive"):
        model.apply(params[:4], x)
    wrong = fnmlp.MLP(6, [fnmlp.Dense(4), fnmlp.Dense(3)]).init(dtype=torch.float64)
    with pytest.raises(TypeError, match="tuple of 9"):
        model.apply(wrong, x)
    mixed = (fnmlp.nn.LinearParams(params[0].weight.float(), params[0].bias.float()),) + params[1:]
    with pytest.raises(ValueError, match=r"params\[2\].weight is torch.float64 .* all must"):
        model.apply(mixed, x.float())
    shifted = (params[1],) + (params[0],) + params[2:]
    with pytest.raises(TypeError, match=r"params\[0\] does not fit Linear"):
        model.apply(shifted, x)
    narrow = (fnmlp.nn.LinearParams(params[0].weight[:, :5], params[0].bias),) + params[1:]
    with pytest.raises(ValueError, match=r"params\[0\].weight has shape \(32, 5\) but the model "
                                         r"needs \(32, 6\)"):
        model.apply(narrow, x)


def test_numpy_data_is_converted_not_rejected(setup):
    model, params, x, y = setup
    loss_np, _ = model.value_and_grad(params, x.numpy().astype(np.float32), y.numpy())
    assert loss_np.dtype == torch.float64


def test_nothing_changes_when_an_error_is_raised(setup):
    model, params, x, y = setup
    before = [t.clone() for t in (params[0].weight, x, y)]
    with pytest.raises(ValueError):
        _fit(model, params, x, y[:10])
    assert all(torch.equal(a, b) for a, b in zip(before, (params[0].weight, x, y)))


def test_every_fnmlp_error_has_one_base_and_keeps_its_builtin_one():
    from fnmlp.interop._spec import SpecError

    for error, builtin in [(fnmlp.CheckpointError, RuntimeError),
                           (fnmlp.NonFiniteLossError, RuntimeError),
                           (fnmlp.distributed.DistributedError, RuntimeError),
                           (fnmlp.CompileVerificationError, RuntimeError),
                           (SpecError, ValueError)]:
        assert issubclass(error, fnmlp.FnmlpError) and issubclass(error, builtin)


def test_a_torch_module_is_refused_naming_from_torch(setup):
    _, _, x, y = setup
    module = torch.nn.Linear(6, 3, dtype=torch.float64)
    with pytest.raises(TypeError, match=r"got Linear; .*fnmlp.from_torch\(module\)"):
        _fit(module, None, x, y)
    with pytest.raises(TypeError, match=r"fnmlp.from_torch\(module\)"):
        fnmlp.train_step(module, fnmlp.mse, fnmlp.sgd(0.1))
    with pytest.raises(TypeError, match=r"fnmlp.from_torch\(module\)"):
        fnmlp.train.fit(module, None, x, y, epochs=1, batch_size=5, optimizer=fnmlp.sgd(0.1))


def _autocast_calls(device):
    """Every entry point that computes, as ``name -> call``, on ``device``."""
    import fnmlp.sklearn

    model = fnmlp.MLP(6, [fnmlp.Dense(8, "tanh"), fnmlp.Dense(3)])
    params = model.init(torch.Generator().manual_seed(0), device=device)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(20, 6, generator=g).to(device), torch.randn(20, 3, generator=g).to(device)
    ensemble = fnmlp.Ensemble(model, size=2)
    stacked = ensemble.init(torch.Generator().manual_seed(0), device=device)
    step = fnmlp.train_step(model, fnmlp.mse, fnmlp.adam(0.01), compile=False)
    ensemble_step = fnmlp.train_step(ensemble, fnmlp.mse, fnmlp.adam(0.01), compile=False)
    estimator = fnmlp.sklearn.MLPRegressor(hidden_layer_sizes=(4,), max_iter=2, device=device)
    fitted = fnmlp.sklearn.MLPRegressor(hidden_layer_sizes=(4,), max_iter=2, device=device) \
        .fit(x.cpu().numpy(), y.cpu().numpy())
    fit = dict(epochs=1, batch_size=5, compile=False)
    return {
        "fnmlp.fit": lambda: fnmlp.fit(model, params, x, y, optimizer=fnmlp.adam(0.01), **fit),
        "fnmlp.fit sgd": lambda: fnmlp.fit(model, params, x, y, optimizer=fnmlp.sgd(0.1), **fit),
        "MLP.apply": lambda: model.apply(params, x),
        "MLP.value_and_grad": lambda: model.value_and_grad(params, x, y),
        "MLP.evaluate": lambda: model.evaluate(params, x, y),
        "MLP.apply (predict_proba)": lambda: model.predict_proba(params, x,
                                                                 loss=fnmlp.cross_entropy),
        "fnmlp.train_step": lambda: step(params, fnmlp.adam(0.01).init(params), x, y),
        "Ensemble.fit": lambda: fnmlp.fit(ensemble, stacked, x, y, optimizer=fnmlp.sgd(0.1),
                                          **fit),
        "Ensemble.apply (predict)": lambda: ensemble.predict(stacked, x),
        "Ensemble.value_and_grad": lambda: ensemble.value_and_grad(stacked, x, y),
        "ensemble's training step": lambda: ensemble_step(
            stacked, ensemble.init_optimizer(fnmlp.adam(0.01), stacked), x, y),
        "MLPRegressor.fit": lambda: estimator.fit(x.cpu().numpy(), y.cpu().numpy()),
        "MLPRegressor.predict": lambda: fitted.predict(x.cpu().numpy()),
    }


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_autocast_is_refused_before_any_work_and_saying_what_to_do(device):
    """fnmlp computes in its parameters' dtype; under ``torch.autocast`` the products would run
    in another (Adam failed on a dtype error, SGD mixed dtypes, ``apply`` returned bfloat16),
    so every entry point refuses it, and works again outside or with autocast disabled."""
    autocast_dtype = torch.bfloat16 if device == "cpu" else torch.float16
    for name, call in _autocast_calls(device).items():
        with torch.autocast(device, dtype=autocast_dtype):
            with pytest.raises(RuntimeError, match=rf"{name.split(' ')[0]}.* under "
                                                   rf"torch.autocast\('{device}', "
                                                   rf"dtype={autocast_dtype}\).*"
                                                   rf"model.init\(..., dtype={autocast_dtype}\)"):
                call()
            with torch.autocast(device, enabled=False):
                call()  # the escape the message names
        call()


def test_an_autocast_of_another_device_type_changes_nothing():
    model = fnmlp.MLP(6, [fnmlp.Dense(8, "tanh"), fnmlp.Dense(3)])
    params = model.init(torch.Generator().manual_seed(0))
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(1))
    expected = model.apply(params, x)
    with torch.autocast("cuda", dtype=torch.float16, enabled=torch.cuda.is_available()):
        got = model.apply(params, x)  # CUDA autocast leaves CPU products alone
    assert got.dtype == torch.float32 and torch.equal(got, expected)


@pytest.mark.parametrize("labels", [torch.tensor([0, 2, 1, 0]), np.array([0, 2, 1, 0])])
def test_integer_labels_with_a_regression_loss_point_to_cross_entropy(labels):
    model = fnmlp.MLP(3, [fnmlp.Dense(5, "tanh"), fnmlp.Dense(3)])
    params = model.init(torch.Generator().manual_seed(0), dtype=torch.float64)
    x = torch.zeros(4, 3, dtype=torch.float64)
    with pytest.raises(TypeError, match="y holds integer class labels, but MSE takes float "
                                        "targets .*loss=fnmlp.cross_entropy"):
        fnmlp.fit(model, params, x, labels, epochs=1, batch_size=2, optimizer=fnmlp.sgd(0.1))
    fnmlp.fit(model, params, x, labels, epochs=1, batch_size=2, optimizer=fnmlp.sgd(0.1),
              loss=fnmlp.cross_entropy, compile=False)  # the hint works
