"""Property-based tests over the public API (hypothesis): random architectures, dtypes, shapes,
batch sizes and optimizer settings against the twin; random malformed inputs must raise a
ValueError/TypeError naming the argument; no input is ever changed."""

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import fnmlp
from helpers import leaves, relative

ACTIVATIONS = ["identity", "relu", "leaky_relu", "elu", "gelu", "gelu_tanh", "silu", "softplus",
               "sigmoid", "tanh", "softmax", "log_softmax"]
SETTINGS = settings(max_examples=40, deadline=None, derandomize=True,  # the same cases in CI
                    suppress_health_check=[HealthCheck.too_slow])


@st.composite
def networks(draw):
    """(model, batch rows, dtype): a few layers of random widths and options."""
    in_features = draw(st.integers(1, 6))
    layers = []
    for _ in range(draw(st.integers(1, 3))):
        layers.append(fnmlp.Dense(draw(st.integers(1, 7)), draw(st.sampled_from(ACTIVATIONS)),
                                  layer_norm=draw(st.booleans())))
        if draw(st.booleans()):
            layers.append(fnmlp.BatchNorm(momentum=draw(st.sampled_from([0.1, 0.5, None]))))
    layers.append(fnmlp.Linear(draw(st.integers(1, 4))))
    rows = draw(st.integers(2, 9))
    dtype = draw(st.sampled_from([torch.float64, torch.float32]))
    return fnmlp.MLP(in_features, layers), rows, dtype


OPTIMIZERS = st.one_of(
    st.builds(lambda lr, m, wd, nesterov, maximize: fnmlp.sgd(
        lr, momentum=m, weight_decay=wd, nesterov=nesterov and m > 0, maximize=maximize),
        st.floats(1e-3, 0.2), st.sampled_from([0.0, 0.5, 0.9]), st.sampled_from([0.0, 0.01]),
        st.booleans(), st.booleans()),
    st.builds(lambda lr, amsgrad, wd, decoupled: fnmlp.adam(
        lr, amsgrad=amsgrad, weight_decay=wd, decoupled_weight_decay=decoupled),
        st.floats(1e-4, 0.05), st.booleans(), st.sampled_from([0.0, 0.1]), st.booleans()),
    st.builds(lambda lr, centered, m: fnmlp.rmsprop(lr, centered=centered, momentum=m),
              st.floats(1e-4, 0.02), st.booleans(), st.sampled_from([0.0, 0.5])),
    st.builds(lambda lr, decay: fnmlp.adagrad(lr, lr_decay=decay), st.floats(1e-3, 0.1),
              st.sampled_from([0.0, 0.01])),
)


def _data(model, rows, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, model.in_features, generator=g, dtype=dtype)
    y = torch.randn(rows, model.out_features, generator=g, dtype=dtype)
    return x, y


@SETTINGS
@given(network=networks(), optimizer=OPTIMIZERS, seed=st.integers(0, 2**16),
       weighted=st.booleans())
def test_random_networks_step_like_their_twins_and_change_no_input(network, optimizer, seed,
                                                                   weighted):
    model, rows, dtype = network
    # The bias just before a BatchNorm, and everything before a LayerNorm of one feature, has a
    # gradient of exactly 0 in exact arithmetic, pure rounding here; adaptive optimizers scale
    # it to a full step (±lr), so the last bits of the two runs' rounding would show. SGD keeps
    # it at the rounding level.
    degenerate = model.has_state or any(
        isinstance(layer, fnmlp.LayerNorm) and width == 1
        for layer, width in zip(model.layers, model.widths))
    assume(not (degenerate and not isinstance(optimizer, fnmlp.optim.SGD)))
    params = model.init(torch.Generator().manual_seed(seed), dtype=dtype)
    state = model.init_state(dtype=dtype)
    x, y = _data(model, rows, dtype, seed)
    weight = torch.rand(rows, dtype=dtype) + 0.1 if weighted else None
    opt_state = optimizer.init(params)
    inputs = [params, state, opt_state, x, y] + ([weight] if weighted else [])
    before = [t.clone() for t in leaves(inputs)]
    twin = fnmlp.TorchTwin(model, params, optimizer=optimizer, state=state)
    step = fnmlp.train_step(model, fnmlp.mse, optimizer, compile=False)
    new_params, _, loss, new_state = step(params, opt_state, x, y, state=state,
                                          sample_weight=weight)
    twin_loss = twin.step(x, y, sample_weight=weight)
    tolerance = 1e-10 if dtype == torch.float64 else 1e-3
    scale = max(1.0, max(t.abs().max().item() for t in leaves(params)))
    assert relative(loss, twin_loss) <= tolerance
    for ours, theirs in zip(leaves((new_params, new_state)), leaves((twin.params(),
                                                                      twin.state()))):
        assert (ours - theirs).abs().max().item() <= tolerance * scale
    assert all(torch.equal(a, b) for a, b in zip(leaves(inputs), before))


CORRUPTIONS = {
    "x features": (lambda x, y, w: (x[:, :-1], y, w), "x has"),
    "x rows": (lambda x, y, w: (x[:-1], y, w), "x has .* rows but y has"),
    "y columns": (lambda x, y, w: (x, torch.cat([y, y], 1), w), "y has"),
    "x dtype": (lambda x, y, w: (x.to(torch.complex128), y, w), "x must hold real numbers"),
    "y NaN": (lambda x, y, w: (x, y.index_fill(0, torch.tensor([0]), float("nan")), w),
              "y contains NaN"),
    "x inf": (lambda x, y, w: (x.index_fill(0, torch.tensor([1]), float("inf")), y, w),
              "x contains NaN or inf"),
    "x 1-D": (lambda x, y, w: (x[0], y, w), "x must be 2-D"),
    "weight length": (lambda x, y, w: (x, y, torch.ones(x.shape[0] + 1, dtype=x.dtype)),
                      "sample_weight must be 1-D with one weight per row"),
    "weight negative": (lambda x, y, w: (x, y, -torch.ones(x.shape[0], dtype=x.dtype)),
                        "sample_weight must be >= 0"),
    "weight type": (lambda x, y, w: (x, y, "heavy"), "sample_weight must be a torch.Tensor"),
    "x type": (lambda x, y, w: ({"x": x}, y, w), "x must be a torch.Tensor"),
}


@SETTINGS
@given(network=networks(), corruption=st.sampled_from(sorted(CORRUPTIONS)),
       seed=st.integers(0, 2**16), entry=st.sampled_from(["value_and_grad", "fit", "step"]))
def test_malformed_inputs_raise_errors_naming_them_and_change_nothing(network, corruption, seed,
                                                                      entry):
    model, rows, dtype = network
    rows = max(rows, 3)
    params = model.init(torch.Generator().manual_seed(seed), dtype=torch.float64)
    state = model.init_state(dtype=torch.float64)
    x, y = _data(model, rows, torch.float64, seed)
    change, message = CORRUPTIONS[corruption]
    bad_x, bad_y, bad_w = change(x, y, None)
    before = [t.clone() for t in leaves((params, state, x, y))]
    optimizer = fnmlp.sgd(0.1)
    calls = {
        "value_and_grad": lambda: model.value_and_grad(params, bad_x, bad_y, state=state,
                                                       sample_weight=bad_w),
        "fit": lambda: fnmlp.fit(model, params, bad_x, bad_y, epochs=1, batch_size=rows,
                                 optimizer=optimizer, state=state, sample_weight=bad_w),
        "step": lambda: fnmlp.train_step(model, fnmlp.mse, optimizer, compile=False)(
            params, optimizer.init(params), bad_x, bad_y, state=state, sample_weight=bad_w),
    }
    if entry == "step" and corruption in ("y NaN", "x inf"):
        return  # a step checks no values (that would sync every step); fit and the rest do
    with pytest.raises((ValueError, TypeError), match=message):
        calls[entry]()
    assert all(torch.equal(a, b) for a, b in zip(leaves((params, state, x, y)), before))
