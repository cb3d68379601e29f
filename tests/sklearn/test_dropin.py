"""fnmlp.sklearn as a drop-in for sklearn.neural_network: solver="lbfgs", one network whatever
the input dtype, settable coefs_/intercepts_, early stopping on a DataFrame, and a diverging
fit ending as scikit-learn's does."""

import re
import warnings

import numpy as np
import pandas as pd
import pytest
import scipy.optimize
import scipy.sparse as sp
import torch
from sklearn.datasets import load_diabetes
from sklearn.exceptions import ConvergenceWarning, NotFittedError
from sklearn.neural_network import MLPClassifier as SkClassifier
from sklearn.neural_network import MLPRegressor as SkRegressor
from sklearn.preprocessing import StandardScaler
from sklearn.utils.estimator_checks import parametrize_with_checks

import fnmlp
from fnmlp.sklearn import MLPClassifier, MLPRegressor

SKLEARN_NON_FINITE = ("Solver produced non-finite parameter weights. The input data may "
                      "contain large values and need to be preprocessed.")


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        yield


def _small(rows=60, seed=0):
    """A small regression problem, its 3 classes and row weights."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, 3))
    y = np.sin(x[:, 0]) + 0.5 * x[:, 1] * x[:, 2]
    return x, y, np.digitize(y, [-0.5, 0.5]), rng.uniform(0.2, 2.0, size=rows)


def _diabetes():
    x, y = load_diabetes(return_X_y=True)
    return StandardScaler().fit_transform(x), y / 100


def _layers(estimator) -> list[np.ndarray]:
    return [*estimator.coefs_, *estimator.intercepts_]


# --- 1. solver="lbfgs" ------------------------------------------------------------------------


@parametrize_with_checks([MLPRegressor(solver="lbfgs", max_iter=50),
                          MLPClassifier(solver="lbfgs", max_iter=50)])
def test_scikit_learn_estimator_checks_with_lbfgs(estimator, check):
    check(estimator)


CASES = {
    "regression": (MLPRegressor, SkRegressor, lambda y, labels: y, False),
    "two-outputs-weighted": (MLPRegressor, SkRegressor, lambda y, labels: np.c_[y, y ** 2],
                             True),
    "multiclass": (MLPClassifier, SkClassifier, lambda y, labels: labels, False),
    "binary-weighted": (MLPClassifier, SkClassifier, lambda y, labels: labels > 0, True),
}


@pytest.mark.parametrize("case", CASES)
def test_lbfgs_from_the_same_weights_follows_scikit_learns_path(case):
    """Started from the same weights (set through coefs_/intercepts_ on both, then a
    warm_start fit), 20 L-BFGS iterations end at scikit-learn's weights and loss."""
    ours_class, sk_class, target, weighted = CASES[case]
    x, y, labels, weight = _small()
    y = target(y, labels)
    weight = weight if weighted else None
    kwargs = dict(solver="lbfgs", hidden_layer_sizes=(6,), activation="tanh", alpha=0.01,
                  random_state=0, max_iter=1)
    ours, theirs = ours_class(**kwargs).fit(x, y), sk_class(**kwargs).fit(x, y)
    rng = np.random.default_rng(1)
    start = [rng.uniform(-0.5, 0.5, a.shape) for a in _layers(theirs)]
    for estimator in (ours, theirs):
        estimator.coefs_ = [a.copy() for a in start[:2]]
        estimator.intercepts_ = [a.copy() for a in start[2:]]
        estimator.set_params(warm_start=True, max_iter=20).fit(x, y, sample_weight=weight)
    assert ours.n_iter_ == theirs.n_iter_ == 20
    assert ours.loss_ == pytest.approx(theirs.loss_, rel=1e-11)
    for a, b in zip(_layers(ours), _layers(theirs)):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("kind", ["regressor", "classifier"])
def test_lbfgs_fits_as_well_as_scikit_learns(kind):
    """Each from its own random draw: the final objectives are within a factor of 1.5."""
    x, y = _diabetes()
    ours_class, sk_class = {"regressor": (MLPRegressor, SkRegressor),
                            "classifier": (MLPClassifier, SkClassifier)}[kind]
    target = y if kind == "regressor" else y > 1.5
    kwargs = dict(solver="lbfgs", hidden_layer_sizes=(8,), alpha=1e-3, max_iter=400)
    ours = [ours_class(random_state=seed, **kwargs).fit(x, target).loss_ for seed in range(3)]
    theirs = [sk_class(random_state=seed, **kwargs).fit(x, target).loss_ for seed in range(3)]
    assert np.median(ours) < 1.5 * np.median(theirs)
    assert np.median(theirs) < 1.5 * np.median(ours)


def test_lbfgs_attributes_are_scikit_learns():
    """n_iter_ from scipy's nit, loss_ the objective (loss plus alpha's penalty) at the final
    weights, no loss curve, no stopping-rule record, no partial_fit."""
    x, y, labels, _ = _small()
    est = MLPRegressor(solver="lbfgs", hidden_layer_sizes=(5,), alpha=0.3, max_iter=500,
                       random_state=0).fit(x, y)
    sk = SkRegressor(solver="lbfgs", hidden_layer_sizes=(5,), alpha=0.3, max_iter=500,
                     random_state=0).fit(x, y)
    assert 0 < est.n_iter_ < 500 and est.t_ == 0
    value, _ = est.model_.value_and_grad(est.params_, torch.from_numpy(x),
                                         torch.from_numpy(y).reshape(-1, 1),
                                         est._training_loss(1)[0], l2=0.3)
    assert est.loss_ == pytest.approx(value.item(), rel=1e-12)
    for name in ("loss_curve_", "best_loss_", "validation_scores_", "best_validation_score_"):
        assert hasattr(est, name) == hasattr(sk, name) is False
    assert hasattr(SkClassifier(solver="lbfgs"), "partial_fit") is False
    for estimator in (est, MLPClassifier(solver="lbfgs")):
        assert not hasattr(estimator, "partial_fit")
        with pytest.raises(AttributeError, match="has no attribute 'partial_fit'") as info:
            estimator.partial_fit(x, labels)
        assert "lbfgs is not stochastic" in str(info.value.__cause__)
    assert hasattr(MLPRegressor(solver="sgd"), "partial_fit")


def test_lbfgs_passes_scikit_learns_options_to_scipy(monkeypatch):
    calls = []
    minimize = scipy.optimize.minimize

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return minimize(*args, **kwargs)

    monkeypatch.setattr(scipy.optimize, "minimize", spy)
    x, y, _, _ = _small()
    MLPRegressor(solver="lbfgs", hidden_layer_sizes=(4,), max_iter=7, max_fun=300, tol=1e-5,
                 random_state=0).fit(x, y)
    (kwargs,) = calls
    assert kwargs["method"] == "L-BFGS-B" and kwargs["jac"] is True
    options = {k: v for k, v in kwargs["options"].items() if k != "iprint"}
    assert options == {"maxfun": 300, "maxiter": 7, "gtol": 1e-5}
    assert kwargs["options"].get("iprint", -1) == -1


@pytest.mark.parametrize("limit,status", [(dict(max_iter=3), "ITERATIONS REACHED LIMIT"),
                                          (dict(max_fun=4), "EVALUATIONS EXCEEDS LIMIT")])
def test_lbfgs_warns_as_scikit_learn_where_a_limit_stops_it(limit, status):
    x, y, _, _ = _small()
    with pytest.warns(ConvergenceWarning, match=f"(?s)lbfgs failed to converge.*{status}"):
        est = MLPRegressor(solver="lbfgs", hidden_layer_sizes=(4,), random_state=0,
                           **limit).fit(x, y)
    assert est.n_iter_ <= limit.get("max_iter", 200)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        MLPRegressor(solver="lbfgs", hidden_layer_sizes=(4,), random_state=0,
                     max_iter=2000).fit(x, y)  # converges: no warning


def test_lbfgs_computes_in_float64_for_float32_data():
    """float32 X keeps float32 weights, but the objective is float64 as scikit-learn's: from
    the same (float32) weights, X and X in float64 take the very same path."""
    x, y, _, _ = _small()
    x32 = x.astype(np.float32)
    fits = []
    for data in (x32, x32.astype(np.float64)):
        est = MLPRegressor(solver="lbfgs", hidden_layer_sizes=(5,), random_state=0,
                           max_iter=1, dtype="float32").fit(data, y)
        est.coefs_ = [np.full(c.shape, 0.1) * np.arange(c.size).reshape(c.shape) / c.size
                      for c in est.coefs_]
        fits.append(est.set_params(warm_start=True, max_iter=15).fit(data, y))
    assert fits[0].params_[0].weight.dtype == torch.float32
    assert fits[0].loss_ == fits[1].loss_
    for a, b in zip(_layers(fits[0]), _layers(fits[1])):
        np.testing.assert_array_equal(a, b)


def test_lbfgs_on_sparse_input_fits_as_on_dense():
    x, y = _diabetes()
    x[np.abs(x) < 0.5] = 0
    kwargs = dict(solver="lbfgs", hidden_layer_sizes=(6,), max_iter=30, random_state=0)
    dense = MLPRegressor(**kwargs).fit(x, y)
    sparse = MLPRegressor(**kwargs).fit(sp.csr_matrix(x), y)
    assert sparse.loss_ == pytest.approx(dense.loss_, rel=1e-12)
    np.testing.assert_allclose(sparse.predict(x), dense.predict(x), rtol=1e-10)


def test_lbfgs_callback_verbose_warm_start_and_save(tmp_path, capsys):
    x, y, labels, _ = _small()
    seen = []
    est = MLPClassifier(solver="lbfgs", hidden_layer_sizes=(5,), random_state=0, verbose=True,
                        on_epoch_end=lambda i, logs: seen.append(logs["train_loss"]) or i == 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)  # a callback's stop is no failure
        est.fit(x, labels)
    assert est.n_iter_ == 5 and len(seen) == 5 and seen[-1] == pytest.approx(est.loss_)
    out = capsys.readouterr().out
    assert "L-BFGS-B" in out and "Iteration 5, loss =" in out
    path = tmp_path / "lbfgs.fnmlp"
    est.save(path)
    back = fnmlp.sklearn.load(path)
    np.testing.assert_array_equal(back.predict_proba(x), est.predict_proba(x))
    assert back.solver == "lbfgs" and not hasattr(back, "loss_curve_")
    adam = back.set_params(solver="adam", warm_start=True, max_iter=3, on_epoch_end=None,
                           verbose=False).fit(x, labels)
    assert len(adam.loss_curve_) == 3  # a stochastic warm start after lbfgs has its curve


@pytest.mark.parametrize("make,message", [
    (lambda: MLPRegressor(solver="lbfgs", layers=[fnmlp.Dense(4, "relu", dropout=0.1)]),
     "lbfgs.*Dropout"),
    (lambda: MLPRegressor(solver="lbfgs", layers=[fnmlp.Dense(4), fnmlp.BatchNorm(),
                                                  fnmlp.ReLU()]), "lbfgs.*BatchNorm"),
    (lambda: MLPRegressor(solver="lbfgs", checkpoint="ckpt.fnmlp"),
     "'lbfgs' keeps no checkpoint"),
    (lambda: MLPRegressor(solver="lbfgs", max_fun=0), "max_fun"),
    (lambda: MLPRegressor(solver="newton"), "solver must be one of"),
])
def test_lbfgs_refuses_what_it_cannot_do_naming_it(make, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    x, y, _, _ = _small()
    with pytest.raises(ValueError, match=message):
        make().fit(x, y)


# --- 2. one network whatever the input dtype --------------------------------------------------


@pytest.mark.parametrize("kind", ["regressor", "classifier"])
def test_one_random_state_draws_one_network_whatever_the_dtype(kind):
    """The weights are drawn in float64, then cast: float32 and float64 data start from the
    same network (to float32's rounding) and end at the same predictions to float32
    precision after a short fit."""
    x, y = _diabetes()
    make = MLPRegressor if kind == "regressor" else MLPClassifier
    target = y if kind == "regressor" else y > 1.5
    start = dict(hidden_layer_sizes=(16,), random_state=3, solver="sgd", max_iter=1,
                 learning_rate_init=1e-12, momentum=0.0)
    f64, f32 = (make(**start).fit(x.astype(dtype), target) for dtype in (np.float64,
                                                                          np.float32))
    assert f32.params_[0].weight.dtype == torch.float32
    for a, b in zip(_layers(f32), _layers(f64)):
        np.testing.assert_array_equal(a, b.astype(np.float32))
    short = dict(hidden_layer_sizes=(16,), random_state=3, max_iter=5)
    f64, f32 = (make(**short).fit(x.astype(dtype), target) for dtype in (np.float64,
                                                                         np.float32))
    if kind == "regressor":
        np.testing.assert_allclose(f32.predict(x.astype(np.float32)), f64.predict(x),
                                   rtol=1e-4, atol=1e-4 * np.abs(f64.predict(x)).max())
    else:
        np.testing.assert_allclose(f32.predict_proba(x.astype(np.float32)),
                                   f64.predict_proba(x), atol=1e-4)


# --- 3. settable coefs_ and intercepts_ -------------------------------------------------------


def test_set_weights_are_what_predict_uses():
    x, y, _, _ = _small()
    est = MLPRegressor(hidden_layer_sizes=(4,), activation="tanh", max_iter=2,
                       random_state=0).fit(x, y)
    rng = np.random.default_rng(5)
    coefs = [rng.normal(size=(3, 4)), rng.normal(size=(4, 1))]
    intercepts = [rng.normal(size=4), rng.normal(size=1)]
    est.coefs_, est.intercepts_ = coefs, intercepts
    expected = (np.tanh(x @ coefs[0] + intercepts[0]) @ coefs[1] + intercepts[1]).ravel()
    np.testing.assert_allclose(est.predict(x), expected, rtol=1e-12)
    for a, b in zip(_layers(est), coefs + intercepts):
        np.testing.assert_array_equal(a, b)
    coefs[0][0, 0] = 99.0  # the estimator holds its own copy
    assert est.coefs_[0][0, 0] != 99.0
    est.coefs_[1] = np.zeros((4, 1))  # an item, as in scikit-learn's list
    est.intercepts_[1] = np.array([2.5])
    np.testing.assert_allclose(est.predict(x), 2.5)
    with pytest.raises(ValueError, match="read-only"):
        est.coefs_[0][0, 0] = 1.0  # a copy: editing it in place would change nothing


def test_partial_fit_continues_from_set_weights_as_scikit_learn():
    """One SGD epoch (one full batch, no shuffling) from weights set on both estimators
    gives scikit-learn's weights."""
    x, y, labels, _ = _small()
    kwargs = dict(hidden_layer_sizes=(5,), solver="sgd", batch_size=60, shuffle=False,
                  learning_rate_init=0.05, momentum=0.0, random_state=0)
    ours = MLPClassifier(**kwargs).partial_fit(x, labels, classes=[0, 1, 2])
    theirs = SkClassifier(**kwargs).partial_fit(x, labels, classes=[0, 1, 2])
    rng = np.random.default_rng(2)
    start = [rng.uniform(-0.5, 0.5, a.shape) for a in _layers(theirs)]
    for estimator in (ours, theirs):
        estimator.coefs_ = [a.copy() for a in start[:2]]
        estimator.intercepts_ = [a.copy() for a in start[2:]]
        estimator.partial_fit(x, labels)
    for a, b, c in zip(_layers(ours), _layers(theirs), start):
        assert not np.allclose(a, c)
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


def test_setting_weights_checks_them_naming_the_layer():
    x, y, _, _ = _small()
    with pytest.raises(NotFittedError, match="not fitted yet: coefs_ replaces"):
        MLPRegressor().coefs_ = [np.zeros((3, 4))]
    est = MLPRegressor(hidden_layer_sizes=(4,), max_iter=1, random_state=0).fit(x, y)
    before = est.predict(x)
    for value, message in [([np.zeros((3, 4))], "coefs_ needs 2 arrays"),
                           ([np.zeros((4, 3)), np.zeros((4, 1))], r"coefs_\[0\] must have "
                                                                  r"shape \(3, 4\)"),
                           ([np.zeros((3, 4)), np.full((4, 1), np.nan)], r"coefs_\[1\] contains"),
                           ([np.zeros((3, 4)), np.array([["a"]] * 4)], "real numbers")]:
        with pytest.raises(ValueError, match=message):
            est.coefs_ = value
    with pytest.raises(ValueError, match=r"intercepts_\[0\] must have shape \(4,\)"):
        est.intercepts_ = [np.zeros(3), np.zeros(1)]
    np.testing.assert_array_equal(est.predict(x), before)  # nothing changed


# --- 4. early stopping on a DataFrame ---------------------------------------------------------


@pytest.mark.parametrize("kind", ["regressor", "classifier"])
def test_early_stopping_on_a_dataframe_warns_nothing(kind):
    x, y = _diabetes()
    frame = pd.DataFrame(x, columns=[f"f{i}" for i in range(x.shape[1])])
    make = MLPRegressor if kind == "regressor" else MLPClassifier
    target = y if kind == "regressor" else y > 1.5
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.simplefilter("ignore", ConvergenceWarning)
        est = make(hidden_layer_sizes=(8,), early_stopping=True, max_iter=15,
                   random_state=0).fit(frame, target, sample_weight=np.ones(len(y)))
        est.score(frame, target)
    assert list(est.feature_names_in_) == list(frame.columns)
    assert len(est.validation_scores_) == est.n_iter_
    assert est.best_validation_score_ == max(est.validation_scores_)


# --- 5. a diverging fit -----------------------------------------------------------------------


def _diverging():
    """Large inputs and a large SGD step: the weights overflow within a few iterations."""
    x, y = load_diabetes(return_X_y=True)
    return x * 1000, y, dict(solver="sgd", learning_rate_init=1.0, max_iter=30, random_state=0,
                             hidden_layer_sizes=(8,))


def test_a_diverging_fit_raises_scikit_learns_error_then_fnmlps_detail():
    x, y, kwargs = _diverging()
    with pytest.raises(ValueError, match=re.escape(SKLEARN_NON_FINITE)) as theirs, \
            np.errstate(over="ignore", invalid="ignore"):
        SkRegressor(**kwargs).fit(x, y)
    assert str(theirs.value) == SKLEARN_NON_FINITE
    with pytest.raises(ValueError) as ours:
        MLPRegressor(**kwargs).fit(x, y)
    assert str(ours.value).startswith(SKLEARN_NON_FINITE + " fnmlp: the loss became")


def test_a_diverging_fit_with_early_stopping_ends_as_scikit_learns():
    """No error (the validation score turns NaN instead of the scorer raising), the last
    validation score NaN, the best weights kept; scikit-learn does the same (it trains on to
    max_iter; fnmlp stops and says why)."""
    x, y, kwargs = _diverging()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = SkRegressor(early_stopping=True, **kwargs).fit(x, y)
    assert np.isnan(theirs.validation_scores_[-1])
    with pytest.warns(ConvergenceWarning, match=re.escape(SKLEARN_NON_FINITE) +
                      " fnmlp: the fit diverged in iteration"):
        ours = MLPRegressor(early_stopping=True, **kwargs).fit(x, y)
    scores = ours.validation_scores_
    assert np.isnan(scores[-1]) and len(scores) == ours.n_iter_ == len(ours.loss_curve_)
    assert ours.n_iter_ < kwargs["max_iter"] and np.isnan(ours.loss_)
    assert ours.best_validation_score_ == np.nanmax(scores)
    assert all(np.isfinite(a).all() for a in _layers(ours))
    assert np.isfinite(ours.predict(x)).all()


def test_the_validation_score_of_non_finite_predictions_is_nan():
    """scikit-learn's _score_with_function: NaN, where score() itself raises."""
    x, y = _diabetes()
    est = MLPRegressor(hidden_layer_sizes=(4,), max_iter=2, random_state=0).fit(x, y)
    assert est._validation_score(x, y, None) == pytest.approx(est.score(x, y))
    est.params_ = fnmlp._tree.tree_map(lambda t: torch.full_like(t, torch.inf), est.params_)
    assert np.isnan(est._validation_score(x, y, None))
    with pytest.raises(ValueError, match="NaN"):
        est.score(x, y)


def test_log_probabilities_are_minus_infinity_where_probabilities_are_zero():
    """As scikit-learn's np.log(predict_proba): a saturated network's log-probabilities."""
    x, _, labels, _ = _small()
    for target in (labels, labels > 0):
        clf = MLPClassifier(hidden_layer_sizes=(3,), max_iter=2, random_state=0).fit(x, target)
        clf.coefs_ = [np.full(c.shape, 300.0) * np.sign(np.arange(c.size).reshape(c.shape) - 2)
                      for c in clf.coefs_]
        proba, log_proba = clf.predict_proba(x), clf.predict_log_proba(x)
        assert (proba == 0).any()
        np.testing.assert_array_equal(np.isneginf(log_proba), proba == 0)
        finite = proba > 0
        np.testing.assert_allclose(np.exp(log_proba[finite]), proba[finite], rtol=1e-9)
