"""fnmlp.sklearn: scikit-learn's own estimator checks, its losses and alpha as scikit-learn
computes them, pipelines, searches, pickles and checkpoints."""

import pickle
import warnings

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from sklearn.base import clone
from sklearn.datasets import load_diabetes, load_iris, make_multilabel_classification
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import GridSearchCV, cross_val_score
from sklearn.neural_network import MLPClassifier as SkClassifier
from sklearn.neural_network import MLPRegressor as SkRegressor
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.estimator_checks import parametrize_with_checks

import fnmlp
from fnmlp.sklearn import MLPClassifier, MLPRegressor
from fnmlp.sklearn._losses import classification_loss, regression_loss

F64 = torch.float64


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        yield


# Every check of scikit-learn's suite, none skipped or expected to fail (its own skips are
# environmental: array-API input without SCIPY_ARRAY_API, decision_function we do not have).
@parametrize_with_checks([MLPRegressor(max_iter=100), MLPClassifier(max_iter=100)])
def test_scikit_learn_estimator_checks(estimator, check):
    check(estimator)


def _data(rows=40, features=5, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(rows, features))


# --- the objective: scikit-learn's losses, gradients and alpha --------------------------------


def _sklearn_backprop(sk, model, params, x, y, weight):
    """scikit-learn's loss and gradients at fnmlp's parameters (its private _backprop)."""
    linears = [p for p in params if isinstance(p, fnmlp.nn.LinearParams)]
    sk.coefs_ = [p.weight.numpy().T.copy() for p in linears]
    sk.intercepts_ = [p.bias.numpy().copy() for p in linears]
    sk.n_layers_ = len(linears) + 1
    layer_units = [x.shape[1]] + [c.shape[1] for c in sk.coefs_]
    activations = [x] + [None] * (len(layer_units) - 1)
    deltas = [None] * (len(activations) - 1)
    coef_grads = [np.empty_like(c) for c in sk.coefs_]
    intercept_grads = [np.empty_like(b) for b in sk.intercepts_]
    value, coef_grads, intercept_grads = sk._backprop(x, y, weight, activations, deltas,
                                                       coef_grads, intercept_grads)
    return value, coef_grads, intercept_grads


def _assert_same_objective(est, sk, y_sklearn, target, outputs, loss, weight):
    x = _data(9, 3)
    model = est._build_model(3, outputs)
    params = model.init(torch.Generator().manual_seed(1), dtype=F64)
    value, grads = model.value_and_grad(
        params, torch.from_numpy(x), target, loss,
        sample_weight=None if weight is None else torch.from_numpy(weight), l2=est.alpha)
    expected, coef_grads, intercept_grads = _sklearn_backprop(sk, model, params, x, y_sklearn,
                                                              weight)
    assert value.item() == pytest.approx(expected, rel=1e-12)
    ours = [g for g in grads if isinstance(g, fnmlp.nn.LinearParams)]
    for g, cg, ig in zip(ours, coef_grads, intercept_grads):
        np.testing.assert_allclose(g.weight.numpy().T, cg, rtol=1e-11, atol=1e-14)
        np.testing.assert_allclose(g.bias.numpy(), ig, rtol=1e-11, atol=1e-14)


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("name,outputs", [("squared_error", 1), ("squared_error", 3),
                                          ("poisson", 2)])
def test_regression_objective_and_alpha_equal_scikit_learns(name, outputs, weighted):
    rng = np.random.default_rng(2)
    y = rng.uniform(0.1, 2.0, size=(9, outputs))
    weight = rng.uniform(0.2, 2.0, size=9) if weighted else None
    est = MLPRegressor(loss=name, hidden_layer_sizes=(5, 4), activation="tanh", alpha=0.3)
    sk = SkRegressor(loss=name, hidden_layer_sizes=(5, 4), activation="tanh", alpha=0.3)
    sk.out_activation_ = "exp" if name == "poisson" else "identity"
    loss, _ = regression_loss(name, outputs)
    _assert_same_objective(est, sk, y, torch.from_numpy(y), outputs, loss, weight)


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("kind", ["binary", "multiclass", "multilabel"])
def test_classification_objective_and_alpha_equal_scikit_learns(kind, weighted):
    rng = np.random.default_rng(3)
    classes = {"binary": 1, "multiclass": 4, "multilabel": 3}[kind]
    if kind == "multiclass":
        labels = rng.integers(0, 4, size=9)
        indicator = np.eye(4)[labels]
        target = torch.from_numpy(labels)
    else:
        indicator = rng.integers(0, 2, size=(9, classes)).astype(float)
        target = torch.from_numpy(indicator)
    weight = rng.uniform(0.2, 2.0, size=9) if weighted else None
    est = MLPClassifier(hidden_layer_sizes=(5,), activation="logistic", alpha=0.2)
    sk = SkClassifier(hidden_layer_sizes=(5,), activation="logistic", alpha=0.2)
    loss, sk.out_activation_ = classification_loss("log_loss", kind, classes)
    _assert_same_objective(est, sk, indicator, target, classes, loss, weight)


def test_l2_penalty_matches_autograd_and_leaves_biases_alone():
    model = fnmlp.MLP(4, [fnmlp.Dense(5, "relu"), fnmlp.Dense(2)])
    params = model.init(torch.Generator().manual_seed(0), dtype=F64)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(7, 4, generator=g, dtype=F64), torch.randn(7, 2, generator=g, dtype=F64)
    w = torch.rand(7, generator=g, dtype=F64)
    for reduction, norm in (("mean", w.sum()), ("sum", 1.0)):
        loss = fnmlp.MSE(reduction)
        value, grads = model.value_and_grad(params, x, y, loss, sample_weight=w, l2=0.7)
        leaves = [t.clone().requires_grad_() for t in (params[0].weight, params[0].bias,
                                                        params[2].weight, params[2].bias)]
        out = torch.relu(x @ leaves[0].T + leaves[1]) @ leaves[2].T + leaves[3]
        if reduction == "mean":  # the weighted mean of the rows' mean losses
            data_term = ((out - y) ** 2).mean(1).mul(w).sum() / w.sum()
        else:  # the weighted sum of the elements' losses
            data_term = ((out - y) ** 2).sum(1).mul(w).sum()
        expected = (data_term
                    + 0.35 * (leaves[0].pow(2).sum() + leaves[2].pow(2).sum()) / norm)
        expected.backward()
        assert value.item() == pytest.approx(expected.item(), rel=1e-13)
        ours = (grads[0].weight, grads[0].bias, grads[2].weight, grads[2].bias)
        for a, b in zip(ours, leaves):
            torch.testing.assert_close(a, b.grad, rtol=1e-13, atol=1e-15)
    with pytest.raises(ValueError, match="l2 must be"):
        model.value_and_grad(params, x, y, l2=-1.0)


# --- fitting like scikit-learn ----------------------------------------------------------------


def _diabetes():
    x, y = load_diabetes(return_X_y=True)
    return StandardScaler().fit_transform(x), y / 100


def test_regressor_scores_like_scikit_learn_on_diabetes():
    x, y = _diabetes()
    ours = MLPRegressor(hidden_layer_sizes=(32,), max_iter=150, random_state=0).fit(x[:300],
                                                                                    y[:300])
    theirs = SkRegressor(hidden_layer_sizes=(32,), max_iter=150, random_state=0).fit(x[:300],
                                                                                    y[:300])
    assert ours.n_iter_ == len(ours.loss_curve_) and ours.loss_ == ours.loss_curve_[-1]
    assert ours.best_loss_ == min(ours.loss_curve_) and ours.validation_scores_ is None
    assert abs(ours.score(x[300:], y[300:]) - theirs.score(x[300:], y[300:])) < 0.1
    assert ours.coefs_[0].shape == theirs.coefs_[0].shape == (10, 32)
    assert ours.out_activation_ == "identity" and ours.n_layers_ == 3


def test_classifier_multiclass_binary_multilabel_and_string_labels():
    x, y = load_iris(return_X_y=True)
    x = StandardScaler().fit_transform(x)
    names = np.array(["setosa", "versicolor", "virginica"])[y]
    clf = MLPClassifier(hidden_layer_sizes=(16,), max_iter=300, random_state=0).fit(x, names)
    assert list(clf.classes_) == ["setosa", "versicolor", "virginica"]
    assert clf.out_activation_ == "softmax" and clf.score(x, names) > 0.9
    proba = clf.predict_proba(x)
    np.testing.assert_allclose(proba.sum(1), 1, rtol=1e-12)
    np.testing.assert_allclose(np.exp(clf.predict_log_proba(x)), proba, rtol=1e-10)
    assert (clf.classes_[proba.argmax(1)] == clf.predict(x)).all()
    binary = MLPClassifier(hidden_layer_sizes=(8,), max_iter=200, random_state=0).fit(x, y == 2)
    assert binary.out_activation_ == "logistic" and binary.predict_proba(x).shape == (150, 2)
    xm, ym = make_multilabel_classification(n_samples=80, n_classes=3, random_state=0)
    multi = MLPClassifier(hidden_layer_sizes=(8,), max_iter=50, random_state=0).fit(xm, ym)
    assert multi.predict(xm).shape == (80, 3) and multi.predict_proba(xm).shape == (80, 3)


def test_float32_stays_float32_and_dtype_overrides():
    x, y = _diabetes()
    est = MLPRegressor(hidden_layer_sizes=(8,), max_iter=5).fit(x.astype(np.float32), y)
    assert est.params_[0].weight.dtype == torch.float32
    assert est.predict(x.astype(np.float32)).dtype == np.float32
    est = MLPRegressor(hidden_layer_sizes=(8,), max_iter=5, dtype="float64").fit(
        x.astype(np.float32), y)
    assert est.params_[0].weight.dtype == F64


def test_sparse_input_trains_and_predicts_as_dense():
    x, y = _diabetes()
    x[np.abs(x) < 0.5] = 0
    kwargs = dict(hidden_layer_sizes=(8,), max_iter=20, random_state=0)
    dense = MLPRegressor(**kwargs).fit(x, y)
    sparse = MLPRegressor(**kwargs).fit(sp.csr_matrix(x), y)
    np.testing.assert_array_equal(dense.predict(x), sparse.predict(sp.csc_matrix(x)))


def test_early_stopping_records_validation_scores_and_keeps_the_best():
    x, y = _diabetes()
    est = MLPRegressor(hidden_layer_sizes=(16,), early_stopping=True, n_iter_no_change=3,
                       max_iter=300, random_state=0, learning_rate_init=0.01).fit(x, y)
    assert est.best_loss_ is None and len(est.validation_scores_) == est.n_iter_ < 300
    assert est.best_validation_score_ == max(est.validation_scores_)


@pytest.mark.parametrize("schedule", ["invscaling", "adaptive"])
def test_sgd_learning_rate_schedules(schedule):
    x, y = _diabetes()
    est = MLPRegressor(hidden_layer_sizes=(8,), solver="sgd", learning_rate=schedule,
                       learning_rate_init=0.01, max_iter=60, random_state=0, tol=1e-2,
                       n_iter_no_change=2, verbose=False).fit(x, y)
    lr = float(est._optimizer().learning_rate(est._opt_state))
    if schedule == "invscaling":
        assert lr == pytest.approx(0.01 / (est.t_ + 1) ** 0.5, rel=1e-6)
    else:
        assert lr < 0.01 or est.n_iter_ == 60


def test_partial_fit_warm_start_and_verbose(capsys):
    x, y = load_iris(return_X_y=True)
    clf = MLPClassifier(hidden_layer_sizes=(8,), random_state=0, verbose=True)
    for _ in range(3):
        clf.partial_fit(x[:100], y[:100], classes=[0, 1, 2])
    assert clf.n_iter_ == 1 and len(clf.loss_curve_) == 3 and clf.t_ == 300
    out = capsys.readouterr().out
    assert "eager steps (auto:" in out and "Iteration 1, loss =" in out
    with pytest.raises(ValueError, match="classes not in"):
        clf.partial_fit(x, np.full(150, 7))
    warm = MLPClassifier(hidden_layer_sizes=(8,), random_state=0, max_iter=5, warm_start=True)
    first = warm.fit(x, y).coefs_[0]
    assert not np.array_equal(warm.fit(x, y).coefs_[0], first)  # continued, not restarted
    assert len(warm.loss_curve_) == 10


def test_fnmlp_layers_and_losses():
    x, y = load_iris(return_X_y=True)
    clf = MLPClassifier(layers=[fnmlp.Dense(16, "gelu", layer_norm=True), fnmlp.Dropout(0.1)],
                        loss=fnmlp.CrossEntropy(label_smoothing=0.05), max_iter=100,
                        random_state=0).fit(StandardScaler().fit_transform(x), y)
    assert isinstance(clf.model_.layers[1], fnmlp.LayerNorm) and clf.model_.has_dropout
    reg = MLPRegressor(hidden_layer_sizes=(8,), loss=fnmlp.Huber(delta=0.5), max_iter=10,
                       random_state=0).fit(*_diabetes())
    assert reg.out_activation_ == "identity"
    module = reg.to_torch()
    x_d = torch.from_numpy(_diabetes()[0])
    np.testing.assert_allclose(module(x_d).detach().numpy().ravel(), reg.predict(_diabetes()[0]),
                               rtol=1e-12)


@pytest.mark.parametrize("make,message", [
    (lambda: MLPRegressor(solver="newton"), "solver must be one of"),
    (lambda: MLPRegressor(alpha=-1), "alpha"),
    (lambda: MLPRegressor(hidden_layer_sizes=(4, 0)), "hidden_layer_sizes"),
    (lambda: MLPRegressor(loss="absolute"), "loss must be"),
    (lambda: MLPRegressor(loss=fnmlp.cross_entropy), "classification loss"),
    (lambda: MLPRegressor(compile="yes"), "compile"),
    (lambda: MLPRegressor(dtype="float16"), "dtype"),
    (lambda: MLPClassifier(loss=fnmlp.mse), "loss must be"),
])
def test_bad_hyperparameters_are_named(make, message):
    x, y = _diabetes()
    target = y if "Regressor" in type(make()).__name__ else (y > 1.5)
    with pytest.raises(ValueError, match=message):
        make().fit(x, target)


def test_poisson_needs_nonnegative_targets():
    x, y = _diabetes()
    with pytest.raises(ValueError, match="y >= 0"):
        MLPRegressor(loss="poisson").fit(x, y - 2)


@pytest.mark.parametrize("labels", [np.array(["a", "b"] * 10), np.array(["a", "b"] * 10,
                                                                          dtype=object),
                                    np.array(["1.5", "2"] * 10), [["a"], ["b"]] * 10])
def test_a_regressor_refuses_non_numeric_targets_naming_y_before_any_work(labels):
    x = np.random.default_rng(0).normal(size=(20, 3))
    regressor = MLPRegressor(hidden_layer_sizes=(4,), max_iter=2)
    with pytest.raises(ValueError, match="y must be numeric for MLPRegressor.*MLPClassifier"):
        regressor.fit(x, labels)
    assert not hasattr(regressor, "model_")  # refused before the network was built
    numbers_as_objects = np.array([1.5, 2] * 10, dtype=object)
    assert regressor.fit(x, numbers_as_objects).predict(x).shape == (20,)
    assert MLPClassifier(hidden_layer_sizes=(4,), max_iter=2).fit(x, np.ravel(labels)).classes_\
        .shape == (2,)  # a classifier takes string labels


# --- pipelines, searches, pickles, checkpoints ------------------------------------------------


def test_pipeline_grid_search_cross_val_clone_and_pickle(tmp_path):
    x, y = load_iris(return_X_y=True)
    pipe = make_pipeline(StandardScaler(), MLPClassifier(max_iter=200, random_state=0,
                                                         learning_rate_init=0.01))
    search = GridSearchCV(pipe, {"mlpclassifier__hidden_layer_sizes": [(4,), (16,)],
                                 "mlpclassifier__alpha": [1e-4, 1e-2]}, cv=3, n_jobs=2)
    search.fit(x, y)
    assert search.best_score_ > 0.85
    scores = cross_val_score(make_pipeline(StandardScaler(), MLPClassifier(
        hidden_layer_sizes=(8,), max_iter=200, learning_rate_init=0.01, random_state=0)),
        x, y, cv=3)
    assert scores.shape == (3,) and scores.mean() > 0.85
    fitted = search.best_estimator_
    again = pickle.loads(pickle.dumps(fitted))
    np.testing.assert_array_equal(again.predict_proba(x), fitted.predict_proba(x))
    twin = clone(fitted[-1])
    assert twin.get_params() == fitted[-1].get_params() and not hasattr(twin, "params_")
    twin.set_params(hidden_layer_sizes=(3,))
    assert twin.hidden_layer_sizes == (3,)


def test_save_and_load_use_the_checkpoint_format(tmp_path):
    x, y = load_iris(return_X_y=True)
    names = np.array(["a", "b", "c"])[y]
    clf = MLPClassifier(hidden_layer_sizes=(8,), max_iter=20, random_state=0,
                        loss=fnmlp.CrossEntropy(label_smoothing=0.1),
                        layers=[fnmlp.Dense(8, "tanh")]).fit(x, names)
    path = tmp_path / "clf.fnmlp"
    clf.save(path)
    assert fnmlp.load(path).metadata["sklearn"]["estimator"] == "MLPClassifier"
    back = fnmlp.sklearn.load(path)
    np.testing.assert_array_equal(back.predict_proba(x), clf.predict_proba(x))
    assert list(back.classes_) == ["a", "b", "c"] and back.loss_curve_ == clf.loss_curve_
    assert back.get_params()["loss"] == clf.loss
    back.partial_fit(x, names)  # continues: the optimizer state came back too
    assert back.t_ == clf.t_ + 150
    model_only = tmp_path / "model.fnmlp"
    fnmlp.save(model_only, clf.model_, clf.params_)
    with pytest.raises(fnmlp.CheckpointError, match="not of a scikit-learn estimator"):
        fnmlp.sklearn.load(model_only)


@pytest.mark.slow
def test_compiled_fit_matches_eager():
    """compile=True trains the same network (≤ 1e-10 after 30 steps, f64)."""
    x, y = _diabetes()
    kwargs = dict(hidden_layer_sizes=(16,), max_iter=10, random_state=0, batch_size=128)
    eager = MLPRegressor(compile=False, **kwargs).fit(x, y)
    compiled = MLPRegressor(compile=True, **kwargs).fit(x, y)
    np.testing.assert_allclose(compiled.predict(x), eager.predict(x), rtol=1e-10)
    np.testing.assert_allclose(compiled.loss_curve_, eager.loss_curve_, rtol=1e-10)


def test_fit_and_train_step_take_l2():
    """fit(l2=) is the eager value_and_grad(l2=) followed by the update, step by step."""
    model = fnmlp.MLP(3, [fnmlp.Dense(4, "tanh"), fnmlp.Dense(1)])
    params = model.init(torch.Generator().manual_seed(0), dtype=F64)
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(10, 3, generator=g, dtype=F64), torch.randn(10, 1, generator=g, dtype=F64)
    optimizer = fnmlp.sgd(0.1)
    result = fnmlp.fit(model, params, x, y, epochs=2, batch_size=4, optimizer=optimizer, l2=0.5)
    expected, state = params, optimizer.init(params)
    for _ in range(2):
        for start in range(0, 10, 4):
            _, grads = model.value_and_grad(expected, x[start:start + 4], y[start:start + 4],
                                            l2=0.5)
            expected, state = optimizer.update(expected, grads, state)
    for a, b in zip(fnmlp._tree.tree_leaves(result.params), fnmlp._tree.tree_leaves(expected)):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="l2 must be"):
        fnmlp.train_step(model, fnmlp.mse, optimizer, compile=False, l2=float("nan"))
