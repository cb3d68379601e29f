"""fnmlp.Ensemble: K members trained by one step equal each member trained alone."""

import math

import pytest
import torch

import fnmlp
from fnmlp._tree import flatten
from fnmlp.ensemble._fit import _bootstrap_counts
from fnmlp.workloads import seed_data, seed_model

F64 = torch.float64
TOLERANCE = 1e-13  # relative, float64; eager CPU runs are bit-identical here


def relative(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


def assert_trees_close(got, expected, tolerance=TOLERANCE):
    got_leaves, expected_leaves = flatten(got)[0], flatten(expected)[0]
    assert len(got_leaves) == len(expected_leaves)
    for a, b in zip(got_leaves, expected_leaves):
        assert a.shape == b.shape and a.dtype == b.dtype
        if not b.is_floating_point():
            assert torch.equal(a, b)
        else:
            assert relative(a, b) <= tolerance


@pytest.fixture(scope="module")
def seed_batch():
    x, y, _, _ = seed_data(dtype=F64)
    return x[:64], y[:64]


def small_model(*extra):
    return fnmlp.MLP(6, [fnmlp.Dense(16, "tanh"), *extra, fnmlp.Dense(8, "relu"),
                         fnmlp.Linear(3)])


def test_members_are_drawn_from_their_own_streams():
    model = seed_model()
    ensemble = fnmlp.Ensemble(model, size=3)
    params = ensemble.init(torch.Generator().manual_seed(5), dtype=F64)
    generators = ensemble.generators(torch.Generator().manual_seed(5))
    for i, generator in enumerate(generators):
        assert_trees_close(ensemble.member(params, i), model.init(generator, dtype=F64), 0.0)
    assert not torch.equal(params[0].weight[0], params[0].weight[1])
    restacked = ensemble.stack([ensemble.member(params, i) for i in range(3)])
    assert_trees_close(restacked, params, 0.0)


def test_apply_and_predict_are_each_members(seed_batch):
    x, _ = seed_batch
    model = seed_model()
    ensemble = fnmlp.Ensemble(model, size=4)
    params = ensemble.init(torch.Generator().manual_seed(0), dtype=F64)
    out = ensemble.apply(params, x)
    assert out.shape == (4, 64, 3)
    for i in range(4):
        assert relative(out[i], model.apply(ensemble.member(params, i), x)) <= TOLERANCE
    prediction = ensemble.predict(params, x)
    assert torch.allclose(prediction.mean, out.mean(0), rtol=0, atol=1e-15)
    assert torch.allclose(prediction.spread, out.std(0, correction=0), rtol=0, atol=1e-15)
    per_member_x = torch.stack([x + i for i in range(4)])
    out = ensemble.apply(params, per_member_x)
    for i in range(4):
        assert relative(out[i], model.apply(ensemble.member(params, i), x + i)) <= TOLERANCE
    single = fnmlp.Ensemble(model, size=1)
    assert torch.equal(single.predict(single.init(dtype=F64), x).spread, torch.zeros(64, 3,
                                                                                       dtype=F64))


@pytest.mark.parametrize("case", ["mse", "weighted", "per_member_weights", "per_member_x",
                                  "cross_entropy", "l2"])
def test_value_and_grad_equals_each_member_alone(case, seed_batch):
    x, y = seed_batch
    model, loss, K = seed_model(), fnmlp.mse, 3
    options, member_options = {}, [{} for _ in range(K)]
    g = torch.Generator().manual_seed(1)
    xs = [x] * K
    ys = [y] * K
    if case == "weighted":
        w = torch.rand(64, generator=g, dtype=F64)
        options["sample_weight"] = w
        member_options = [{"sample_weight": w}] * K
    if case == "per_member_weights":
        w = torch.rand(K, 64, generator=g, dtype=F64)
        options["sample_weight"] = w
        member_options = [{"sample_weight": w[i]} for i in range(K)]
    if case == "per_member_x":
        xs = [x * (i + 1) for i in range(K)]
        x = torch.stack(xs)
    if case == "cross_entropy":
        loss = fnmlp.cross_entropy
        y = torch.randint(0, 3, (64,), generator=g)
        ys = [y] * K
    if case == "l2":
        options["l2"] = 0.3
        member_options = [{"l2": 0.3}] * K
    ensemble = fnmlp.Ensemble(model, size=K)
    params = ensemble.init(torch.Generator().manual_seed(0), dtype=F64)
    values, grads = ensemble.value_and_grad(params, x, y, loss, **options)
    assert values.shape == (K,)
    for i in range(K):
        value, grad = model.value_and_grad(ensemble.member(params, i), xs[i], ys[i], loss,
                                           **member_options[i])
        assert relative(values[i], value) <= TOLERANCE
        assert_trees_close(ensemble.member(grads, i), grad)


OPTIMIZERS = {
    "sgd": (lambda lr, wd=0.0: fnmlp.sgd(lr, weight_decay=wd), [0.01, 0.03, 0.002]),
    "sgd_nesterov": (lambda lr, wd=0.0: fnmlp.sgd(lr, momentum=0.9, nesterov=True,
                                                  weight_decay=wd), [0.01, 0.02, 0.005]),
    "adam": (lambda lr, wd=0.0: fnmlp.adam(lr, weight_decay=wd), [1e-3, 3e-3, 1e-4]),
    "adamw": (lambda lr, wd=0.0: fnmlp.adamw(lr, weight_decay=wd), [1e-3, 3e-3, 1e-4]),
    "rmsprop": (lambda lr, wd=0.0: fnmlp.rmsprop(lr, momentum=0.5, weight_decay=wd),
                [1e-3, 3e-3, 1e-4]),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("decay", [False, True])
def test_a_sweep_in_one_step_equals_each_member_alone(name, decay, seed_batch):
    """Per-member learning rates (and weight decays): each member's run is its own run."""
    x, y = seed_batch
    make, rates = OPTIMIZERS[name]
    decays = [0.0, 0.1, 0.01] if decay else None
    model, K = seed_model(), 3
    ensemble = fnmlp.Ensemble(model, size=K)
    params = ensemble.init(torch.Generator().manual_seed(2), dtype=F64)
    step = ensemble.train_step(fnmlp.mse, make(rates[0]), compile=False, weight_decay=decays)
    opt_state = ensemble.init_optimizer(make(rates[0]), params, lr=rates)
    p, s = params, opt_state
    for _ in range(4):
        p, s, losses = step(p, s, x, y)
    for i in range(K):
        optimizer = make(rates[i], decays[i] if decay else 0.0)
        alone = fnmlp.train_step(model, fnmlp.mse, optimizer, compile=False)
        pi, si = ensemble.member(params, i), optimizer.init(ensemble.member(params, i))
        for _ in range(4):
            pi, si, value = alone(pi, si, x, y)
        assert_trees_close(ensemble.member(p, i), pi)
        assert_trees_close(ensemble.member(s, i), si)
        assert relative(losses[i], value) <= TOLERANCE


def test_dropout_keys_and_batchnorm_state_per_member(seed_batch):
    x, y = seed_batch
    model = small_model(fnmlp.BatchNorm(), fnmlp.Dropout(0.3))
    K = 3
    ensemble = fnmlp.Ensemble(model, size=K)
    params = ensemble.init(torch.Generator().manual_seed(0), dtype=F64)
    state = ensemble.init_state(dtype=F64)
    optimizer = fnmlp.adam(1e-2)
    step = ensemble.train_step(fnmlp.mse, optimizer, compile=False)
    p, s, st = params, ensemble.init_optimizer(optimizer, params), state
    for t in range(3):
        p, s, _, st = step(p, s, x, y, state=st, key=ensemble.dropout_keys(7, t))
    for i in range(K):
        alone = fnmlp.train_step(model, fnmlp.mse, optimizer, compile=False)
        pi, si, sti = ensemble.member(params, i), optimizer.init(ensemble.member(params, i)), \
            ensemble.member(state, i)
        for t in range(3):
            pi, si, _, sti = alone(pi, si, x, y, state=sti,
                                   key=fnmlp.dropout_key(7, t * K + i))
        assert_trees_close(ensemble.member(p, i), pi)
        assert_trees_close(ensemble.member(st, i), sti)
    with pytest.raises(ValueError, match="dropout"):
        step(p, s, x, y, state=st)


def test_inactive_members_and_empty_batches_keep_everything(seed_batch):
    x, y = seed_batch
    ensemble = fnmlp.Ensemble(seed_model(), size=3)
    params = ensemble.init(torch.Generator().manual_seed(0), dtype=F64)
    optimizer = fnmlp.sgd(0.01, momentum=0.9)
    opt_state = ensemble.init_optimizer(optimizer, params)
    step = ensemble.train_step(fnmlp.mse, optimizer, compile=False)
    p, s, losses = step(params, opt_state, x, y, active=torch.tensor([True, False, True]))
    assert_trees_close(ensemble.member(p, 1), ensemble.member(params, 1), 0.0)
    assert_trees_close(ensemble.member(s, 1), ensemble.member(opt_state, 1), 0.0)
    assert not torch.equal(p[0].weight[0], params[0].weight[0])
    assert math.isfinite(losses[1].item())  # its loss is still measured
    weight = torch.ones(3, 64, dtype=F64)
    weight[2] = 0
    p, s, losses = step(params, opt_state, x, y, sample_weight=weight)
    assert_trees_close(ensemble.member(p, 2), ensemble.member(params, 2), 0.0)
    assert losses[2].item() == 0.0


def test_fit_with_bagging_equals_each_member_on_its_bootstrap_weights(seed_batch):
    x, y = seed_data(dtype=F64)[:2]
    x, y = x[:200], y[:200]
    model, K = seed_model(), 3
    ensemble = fnmlp.Ensemble(model, size=K)
    params = ensemble.init(torch.Generator().manual_seed(0), dtype=F64)
    optimizer = fnmlp.sgd(0.01)
    result = fnmlp.fit(ensemble, params, x, y, epochs=3, batch_size=64, optimizer=optimizer,
                       generator=torch.Generator().manual_seed(3), shuffle=False)
    assert len(result.history.train_loss) == 3 and len(result.history.train_loss[0]) == K
    bagged = ensemble.fit(params, x, y, epochs=3, batch_size=64, optimizer=optimizer,
                          bagging=True, generator=torch.Generator().manual_seed(3))
    counts = _bootstrap_counts(K, 200, torch.Generator().manual_seed(3), x)
    assert bool((counts.sum(1) == 200).all())
    for i in range(K):
        alone = fnmlp.fit(model, ensemble.member(params, i), x, y, epochs=3, batch_size=64,
                          optimizer=optimizer, sample_weight=counts[i])
        assert_trees_close(ensemble.member(bagged.params, i), alone.params)
        plain = fnmlp.fit(model, ensemble.member(params, i), x, y, epochs=3, batch_size=64,
                          optimizer=optimizer)
        assert_trees_close(ensemble.member(result.params, i), plain.params)
        assert result.history.train_loss[-1][i] == pytest.approx(
            plain.history.train_loss[-1], rel=1e-12)


def test_fit_stops_each_member_on_its_own(seed_batch):
    x, y = seed_data(dtype=F64)[:2]
    train, valid = (x[:200], y[:200]), (x[200:300], y[200:300])
    ensemble = fnmlp.Ensemble(seed_model(), size=3)
    params = ensemble.init(torch.Generator().manual_seed(0), dtype=F64)
    common = dict(batch_size=50, optimizer=fnmlp.sgd(0.05), valid=valid, lr=[0.05, 1e-12, 0.05])
    # the tiny rate cannot improve by min_delta: member 1 stops after `patience` epochs
    result = ensemble.fit(params, *train, epochs=8, patience=2, min_delta=1e-6, **common)
    history = result.history
    assert history.stopped_epoch[1] == 3 and history.best_epoch[1] == 0
    assert history.stopped_epoch[0] is None or history.stopped_epoch[0] > 3
    shorter = ensemble.fit(params, *train, epochs=3, **common)
    assert_trees_close(ensemble.member(result.params, 1), ensemble.member(shorter.params, 1),
                       0.0)
    best = ensemble.fit(params, *train, epochs=8, patience=2, min_delta=1e-6,
                        restore_best=True, **common)
    first_epoch = ensemble.fit(params, *train, epochs=1, **common)
    assert_trees_close(ensemble.member(best.params, 1), ensemble.member(first_epoch.params, 1),
                       0.0)
    valid_losses = [row[0] for row in best.history.valid_loss]
    assert best.history.best_epoch[0] == valid_losses.index(min(valid_losses))


def test_bad_arguments_are_named(seed_batch):
    x, y = seed_batch
    model = seed_model()
    with pytest.raises(ValueError, match="size"):
        fnmlp.Ensemble(model, size=0)
    with pytest.raises(TypeError, match="MLP"):
        fnmlp.Ensemble("net", size=2)
    ensemble = fnmlp.Ensemble(model, size=2)
    params = ensemble.init(torch.Generator().manual_seed(0), dtype=F64)
    with pytest.raises(ValueError, match="stacked"):
        ensemble.apply(model.init(dtype=F64), x)
    with pytest.raises(ValueError, match="lr"):
        ensemble.init_optimizer(fnmlp.sgd(0.1), params, lr=[0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="lr"):
        ensemble.init_optimizer(fnmlp.sgd(0.1), params, lr=[0.1, -1.0])
    with pytest.raises(ValueError, match="weight_decay=0"):
        ensemble.train_step(fnmlp.mse, fnmlp.adam(weight_decay=0.1), weight_decay=[0.1, 0.2])
    with pytest.raises(ValueError, match="clip"):
        ensemble.train_step(fnmlp.mse, fnmlp.clip_by_global_norm(fnmlp.sgd(0.1), 1.0),
                            weight_decay=0.1)
    with pytest.raises(ValueError, match="K=2"):
        ensemble.apply(params, torch.stack([x, x, x]))
    step = ensemble.train_step(fnmlp.mse, fnmlp.sgd(0.1), compile=False)
    opt_state = ensemble.init_optimizer(fnmlp.sgd(0.1), params)
    with pytest.raises(ValueError, match="active"):
        step(params, opt_state, x, y, active=torch.tensor([True]))
    with pytest.raises(ValueError, match="sample_weight"):
        step(params, opt_state, x, y, sample_weight=torch.ones(3, 64, dtype=F64))
    with pytest.raises(IndexError, match="member 2"):
        ensemble.member(params, 2)
    with pytest.raises(ValueError, match="distributed"):
        fnmlp.fit(ensemble, params, x, y, epochs=1, batch_size=8, optimizer=fnmlp.sgd(0.1),
                  distributed=True)


@pytest.mark.slow
def test_compiled_ensemble_step_matches_eager_without_recompiles(seed_batch):
    """One graph for every step, rate sweep, active mask and short batch (padded)."""
    x, y = seed_batch
    model = fnmlp.MLP(6, [fnmlp.Dense(8, "tanh"), fnmlp.Dense(3)])
    ensemble = fnmlp.Ensemble(model, size=3)
    params = ensemble.init(torch.Generator().manual_seed(0), dtype=F64)
    optimizer = fnmlp.adam(1e-2)
    compiled = ensemble.train_step(fnmlp.mse, optimizer, compile=True, weight_decay=[0, .1, .2])
    eager = ensemble.train_step(fnmlp.mse, optimizer, compile=False, weight_decay=[0, .1, .2])
    opt_state = ensemble.init_optimizer(optimizer, params, lr=[1e-2, 3e-3, 1e-3])
    pc, sc, pe, se = params, opt_state, params, opt_state
    batches = [(x, y, None), (x[:40], y[:40], None), (x, y, torch.tensor([True, False, True]))]
    for xb, yb, active in batches:
        pc, sc, lc = compiled(pc, sc, xb, yb, active=active)
        pe, se, le = eager(pe, se, xb, yb, active=active)
        assert_trees_close(pc, pe)
        assert_trees_close(sc, se)
        assert relative(lc, le) <= TOLERANCE
    assert compiled.executor.graphs.count() == 1


def test_fit_freezes_diverged_members_and_checks_its_inputs(seed_batch):
    x, y = seed_data(dtype=F64)[:2]
    x, y = x[:120], y[:120]
    ensemble = fnmlp.Ensemble(seed_model(), size=3)
    params = ensemble.init(torch.Generator().manual_seed(0), dtype=F64)
    result = ensemble.fit(params, x, y, epochs=3, batch_size=40, optimizer=fnmlp.sgd(0.01),
                          lr=[0.01, 1e30, 0.01])
    history = result.history
    assert history.diverged_epoch[1] is not None and history.diverged_epoch[0] is None
    assert all(bool(torch.isfinite(leaf).all()) for leaf in flatten(result.params)[0])
    assert math.isfinite(history.train_loss[-1][0]) and math.isfinite(history.train_loss[-1][2])
    # a member without any weight: no step, no loss
    weight = torch.ones(3, 120, dtype=F64)
    weight[2] = 0
    result = ensemble.fit(params, x, y, epochs=1, batch_size=40, optimizer=fnmlp.sgd(0.01),
                          sample_weight=weight)
    assert math.isnan(result.history.train_loss[0][2])
    assert_trees_close(ensemble.member(result.params, 2), ensemble.member(params, 2), 0.0)
    with pytest.raises(TypeError, match="pair"):
        ensemble.fit(params, x, y, epochs=1, batch_size=40, optimizer=fnmlp.sgd(0.01),
                     valid=(x,))
    with pytest.raises(ValueError, match="shared by the members"):
        ensemble.fit(params, x, torch.stack([y] * 3), epochs=1, batch_size=40,
                     optimizer=fnmlp.sgd(0.01))


def test_labels_targets_and_batch_statistics_are_checked_before_work(seed_batch):
    x, _ = seed_batch
    classifier = fnmlp.Ensemble(fnmlp.MLP(6, [fnmlp.Dense(8, "relu"), fnmlp.Linear(3)]), 2)
    params = classifier.init(torch.Generator().manual_seed(0), dtype=F64)
    step = classifier.train_step(fnmlp.cross_entropy, fnmlp.sgd(0.1), compile=False)
    opt_state = classifier.init_optimizer(fnmlp.sgd(0.1), params)
    labels = torch.zeros(64, dtype=torch.int64)
    labels[5] = 7
    with pytest.raises(ValueError, match="out of range"):
        step(params, opt_state, x, labels)
    # integer targets of a regression loss are shared targets, not per-member labels
    regressor = fnmlp.Ensemble(fnmlp.MLP(6, [fnmlp.Linear(2)]), 3)
    values, _ = regressor.value_and_grad(regressor.init(dtype=F64), x.numpy(),
                                         torch.randint(0, 5, (64, 2)).numpy())
    assert values.shape == (3,)
    normed = fnmlp.Ensemble(small_model(fnmlp.BatchNorm()), 2)
    params = normed.init(torch.Generator().manual_seed(0), dtype=F64)
    fitted = fnmlp.fit(normed, params, x, x[:, :3], epochs=1, batch_size=32,
                       optimizer=fnmlp.sgd(0.01))  # state=None: a fresh stacked state
    assert flatten(fitted.state)[0][0].shape[0] == 2
    with pytest.raises(ValueError, match="BatchNorm needs at least 2 rows"):
        fnmlp.fit(normed, params, x[:33], x[:33, :3], epochs=1, batch_size=32,
                  optimizer=fnmlp.sgd(0.01))


def test_fnmlp_train_step_routes_an_ensemble_to_its_own_step(seed_batch):
    """``fnmlp.train_step(ensemble, ...)`` is ``ensemble.train_step(...)``: every member in one
    call, with the ensemble's options (per-member weight decay)."""
    from fnmlp.ensemble._step import EnsembleStep

    x, y = seed_batch
    ensemble = fnmlp.Ensemble(small_model(), size=2)
    params = ensemble.init(torch.Generator().manual_seed(0), dtype=F64)
    opt_state = ensemble.init_optimizer(fnmlp.sgd(0.1), params)
    routed = fnmlp.train_step(ensemble, fnmlp.mse, fnmlp.sgd(0.1), compile=False,
                              weight_decay=[0.0, 0.1])
    direct = ensemble.train_step(fnmlp.mse, fnmlp.sgd(0.1), compile=False,
                                 weight_decay=[0.0, 0.1])
    assert isinstance(routed, EnsembleStep)
    got, expected = routed(params, opt_state, x, y), direct(params, opt_state, x, y)
    assert got[2].shape == (2,)
    assert all(torch.equal(a, b) for a, b in zip(flatten(got)[0], flatten(expected)[0]))


@pytest.mark.parametrize("index", [2, 3, -3, 100])
def test_a_member_index_out_of_range_is_named(index):
    ensemble = fnmlp.Ensemble(small_model(), size=2)
    params = ensemble.init(torch.Generator().manual_seed(0), dtype=F64)
    with pytest.raises(IndexError, match=rf"member {index} of an ensemble of 2"):
        ensemble.member(params, index)
    assert torch.equal(ensemble.member(params, -2)[0].weight, params[0].weight[0])
    with pytest.raises(TypeError):
        ensemble.member(params, 1.0)


@pytest.mark.parametrize("option, value", [("bagging", "x"), ("shuffle", "yes"),
                                           ("restore_best", 1), ("verbose", "yes")])
def test_fit_refuses_an_option_that_is_not_true_or_false(seed_batch, option, value):
    x, y = seed_batch
    ensemble = fnmlp.Ensemble(seed_model(), size=2)
    params = ensemble.init(torch.Generator().manual_seed(0), dtype=F64)
    with pytest.raises(TypeError, match=f"{option} must be True or False, got {value!r}"):
        ensemble.fit(params, x, y, epochs=1, batch_size=8, optimizer=fnmlp.sgd(0.1),
                     valid=(x, y), **{option: value})
    with pytest.raises(ValueError, match="min_delta=0.5 only acts with patience="):
        ensemble.fit(params, x, y, epochs=1, batch_size=8, optimizer=fnmlp.sgd(0.1),
                     valid=(x, y), min_delta=0.5)


def test_a_metric_that_cannot_run_is_refused_before_any_work(seed_batch):
    x, y = seed_batch
    ensemble = fnmlp.Ensemble(seed_model(), size=2)
    params = ensemble.init(torch.Generator().manual_seed(0), dtype=F64)
    steps = []
    with pytest.raises(TypeError, match=r"metrics\['m'\] must take two positional"):
        ensemble.fit(params, x, y, epochs=1, batch_size=8, optimizer=fnmlp.sgd(0.1),
                     metrics={"m": lambda p: 1.0},
                     on_epoch_end=lambda epoch, logs: steps.append(epoch))
    with pytest.raises(TypeError, match=r"metrics\['m'\].*must return a number, got list"):
        ensemble.fit(params, x, y, epochs=1, batch_size=8, optimizer=fnmlp.sgd(0.1),
                     metrics={"m": lambda p, t: [1.0]},
                     on_epoch_end=lambda epoch, logs: steps.append(epoch))
    assert steps == []
    result = ensemble.fit(params, x, y, epochs=1, batch_size=8, optimizer=fnmlp.sgd(0.1),
                          metrics={"m": lambda p, t: float(p.shape[0])}, valid=(x, y),
                          on_epoch_end=lambda epoch, logs: steps.append(logs["m"]))
    assert steps == [[float(x.shape[0])] * 2] and len(result.history.train_loss) == 1
