"""fit and train_step at their boundaries: non-finite starting parameters, out-of-range labels
(eager and compiled alike), all-zero-weight batches, and loss/optimizer options compiled into
the one graph."""

import math

import pytest
import torch

import fnmlp
from helpers import leaves, relative, small_regression

F64 = torch.float64


def test_fit_rejects_non_finite_initial_parameters():
    model, params, x, y = small_regression()
    bad = (fnmlp.nn.LinearParams(params[0].weight.clone().fill_(math.nan), params[0].bias),
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
    assert compiled.executor.graphs.count() == 1


def test_fit_skips_batches_whose_rows_all_weigh_zero():
    model, params, x, y = small_regression()
    weight = torch.ones(20, dtype=F64)
    weight[5:10] = 0
    result = fnmlp.fit(model, params, x, y, epochs=2, batch_size=5, optimizer=fnmlp.sgd(0.1),
                       sample_weight=weight)
    expected = fnmlp.fit(model, params, torch.cat([x[:5], x[10:]]), torch.cat([y[:5], y[10:]]),
                         epochs=2, batch_size=5, optimizer=fnmlp.sgd(0.1),
                         sample_weight=torch.ones(15, dtype=F64))
    assert result.history.train_loss == expected.history.train_loss
    assert int(result.opt_state.step) == 6


@pytest.mark.parametrize("option, value", [
    ("shuffle", "yes"), ("verbose", "yes"), ("verify", "x"), ("resume", "yes"),
    ("restore_best", "x"), ("shuffle", 1), ("verbose", None),
])
def test_fit_refuses_an_option_that_is_not_true_or_false(tmp_path, option, value):
    model, params, x, y = small_regression()
    extra = dict(checkpoint=tmp_path / "run.fnmlp") if option == "resume" else {}
    with pytest.raises(TypeError, match=f"{option} must be True or False, got {value!r}"):
        fnmlp.fit(model, params, x, y, epochs=1, batch_size=5, optimizer=fnmlp.sgd(0.1),
                  valid=(x, y), **{option: value}, **extra)
    assert not (tmp_path / "run.fnmlp").exists()


def test_min_delta_without_patience_or_restore_best_is_refused():
    model, params, x, y = small_regression()
    common = dict(epochs=1, batch_size=5, optimizer=fnmlp.sgd(0.1), valid=(x, y))
    with pytest.raises(ValueError, match="min_delta=0.01 only acts with patience="):
        fnmlp.fit(model, params, x, y, min_delta=0.01, **common)
    fnmlp.fit(model, params, x, y, min_delta=0.01, patience=2, **common)
    fnmlp.fit(model, params, x, y, min_delta=0.01, restore_best=True, **common)
    fnmlp.fit(model, params, x, y, min_delta=0.0, **common)
