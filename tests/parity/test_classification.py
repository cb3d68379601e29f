"""Classification end to end: cross-entropy, Adam, dropout with a shared mask source and layer
norm, trained with fnmlp and with its twin, step by step and epoch by epoch."""

import pytest
import torch
from sklearn.datasets import load_digits

import fnmlp
from helpers import leaves, relative, torch_state_as_fnmlp

F64 = torch.float64


@pytest.fixture(scope="module")
def digits():
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=F64)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    return x[:320], torch.tensor(y[:320]), x[1400:], torch.tensor(y[1400:])


def _model():
    return fnmlp.MLP(64, [fnmlp.Dense(32, "relu", layer_norm=True, dropout=0.2),
                          fnmlp.Dense(16, "gelu", dropout=0.1), fnmlp.Dense(10)])


def test_classifier_matches_its_twin_step_by_step_and_epoch_by_epoch(digits):
    x, y, x_test, y_test = digits
    model = _model()
    params = model.init(torch.Generator().manual_seed(0), dtype=F64)
    optimizer = fnmlp.adam(1e-3)
    loss = fnmlp.cross_entropy
    twin = fnmlp.TorchTwin(model, params, optimizer=optimizer, loss=loss)
    step = fnmlp.train_step(model, loss, optimizer, compile=False)
    state = optimizer.init(params)
    worst_step, worst_epoch, steps = 0.0, 0.0, 0
    for epoch in range(4):
        ours, theirs = [], []
        for start in range(0, 320, 64):
            xb, yb = x[start:start + 64], y[start:start + 64]
            key = fnmlp.dropout_key(1234, steps)
            restart, restart_state = torch_state_as_fnmlp(optimizer, twin, steps)
            one, _, _ = step(restart, restart_state, xb, yb, key=key)
            params, state, value = step(params, state, xb, yb, key=key)
            theirs.append(twin.step(xb, yb, key).item())
            ours.append(value.item())
            worst_step = max(worst_step, max(relative(a, b) for a, b in
                                             zip(leaves(one), leaves(twin.params()))))
            steps += 1
        pairs = [(sum(ours) / len(ours), sum(theirs) / len(theirs)),
                 (model.evaluate(params, x_test, y_test, loss), twin.evaluate(x_test, y_test))]
        worst_epoch = max(worst_epoch, *(abs(a - b) / abs(b) for a, b in pairs))
    assert worst_step <= 1e-13, worst_step
    assert worst_epoch <= 1e-9, worst_epoch
    assert max(relative(a, b) for a, b in zip(leaves(params), leaves(twin.params()))) <= 1e-9


@pytest.mark.slow
def test_classifier_learns_and_compiles_into_one_graph(digits):
    x, y, x_test, y_test = digits
    model = _model()
    params = model.init(torch.Generator().manual_seed(1), dtype=F64)
    optimizer = fnmlp.adam(fnmlp.schedules.cosine(1e-2, total_steps=100, eta_min=1e-3))
    kwargs = dict(epochs=20, batch_size=64, optimizer=optimizer, loss=fnmlp.cross_entropy,
                  valid=(x_test, y_test))
    compiled = fnmlp.fit(model, params, x, y, compile=True,
                         generator=torch.Generator().manual_seed(3), **kwargs)
    eager = fnmlp.fit(model, params, x, y, generator=torch.Generator().manual_seed(3), **kwargs)
    assert max(abs(a - b) / b for a, b in zip(compiled.history.valid_loss,
                                              eager.history.valid_loss)) <= 1e-9
    step = fnmlp.train_step(model, fnmlp.cross_entropy, optimizer)
    assert step.executor.graphs.count() == 1
    accuracy = fnmlp.metrics.accuracy(
        model.predict_classes(compiled.params, x_test, loss=fnmlp.cross_entropy), y_test)
    assert accuracy > 0.8
    probabilities = model.predict_proba(compiled.params, x_test, loss=fnmlp.cross_entropy)
    torch.testing.assert_close(probabilities.sum(1), torch.ones(len(x_test), dtype=F64))


def test_dropout_needs_a_key_and_layers_check_their_options(digits):
    x, y, _, _ = digits
    model = _model()
    params = model.init(dtype=F64)
    with pytest.raises(ValueError, match="this model has dropout: pass key="):
        model.value_and_grad(params, x[:4], y[:4], loss=fnmlp.cross_entropy)
    for p in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match="dropout must be a probability in"):
            fnmlp.Dense(3, dropout=p)
    assert fnmlp.from_torch(fnmlp.to_torch(model, params))[0] == model
