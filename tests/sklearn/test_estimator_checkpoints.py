"""The estimators on the one training engine: checkpoints with bit-exact resume, progress and
callbacks, as ``fnmlp.fit`` has them."""

import numpy as np
import pytest
import torch
from sklearn.datasets import load_diabetes, load_iris
from sklearn.preprocessing import StandardScaler

import fnmlp
from fnmlp.sklearn import MLPClassifier, MLPRegressor

pytestmark = pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")


def _diabetes():
    x, y = load_diabetes(return_X_y=True)
    return StandardScaler().fit_transform(x), y / 100


class Killed(Exception):
    pass


@pytest.mark.parametrize("options", [
    dict(solver="sgd", learning_rate="adaptive", n_iter_no_change=2, tol=1e-2),
    dict(solver="adam", early_stopping=True, n_iter_no_change=3),
    dict(solver="sgd", learning_rate="invscaling", layers=[fnmlp.Dense(16, "relu"),
                                                           fnmlp.Dropout(0.2)]),
], ids=["adaptive", "early-stopping", "invscaling-dropout"])
def test_a_killed_estimator_fit_resumes_bit_identically(tmp_path, options):
    x, y = _diabetes()
    kwargs = dict(hidden_layer_sizes=(16,), max_iter=12, random_state=0, batch_size=64,
                  **options)
    whole = MLPRegressor(**kwargs).fit(x, y)
    path = tmp_path / "estimator.fnmlp"

    def kill(iteration, logs):
        if iteration == 4:
            raise Killed

    with pytest.raises(Killed):
        MLPRegressor(checkpoint=path, on_epoch_end=kill, **kwargs).fit(x, y)
    resumed = MLPRegressor(checkpoint=path, resume=True, **kwargs).fit(x, y)
    assert resumed.n_iter_ == whole.n_iter_ and resumed.t_ == whole.t_
    assert resumed.loss_curve_ == whole.loss_curve_
    assert resumed.validation_scores_ == whole.validation_scores_
    for a, b in zip(resumed.coefs_ + resumed.intercepts_, whole.coefs_ + whole.intercepts_):
        np.testing.assert_array_equal(a, b)


def test_estimator_callbacks_see_the_loss_and_can_stop(capsys):
    x, y = load_iris(return_X_y=True)
    seen = []

    def on_epoch_end(iteration, logs):
        seen.append((iteration, logs))
        return iteration == 2

    clf = MLPClassifier(hidden_layer_sizes=(8,), max_iter=50, random_state=0, progress=True,
                        early_stopping=True, on_epoch_end=on_epoch_end).fit(x, y)
    assert [i for i, _ in seen] == [0, 1, 2] and clf.n_iter_ == 3
    assert seen[-1][1]["train_loss"] == clf.loss_curve_[-1]
    assert seen[-1][1]["valid_score"] == clf.validation_scores_[-1]
    # the logs of fnmlp.fit's callbacks (epoch_logs), with the estimator's valid_score
    assert list(seen[-1][1]) == ["epoch", "train_loss", "lr", "epoch_time", "samples_per_s",
                                 "valid_score"]
    assert seen[-1][1]["epoch"] == 2 and seen[-1][1]["lr"] == clf.learning_rate_init
    assert "epoch" in capsys.readouterr().err  # tqdm's bar


def test_estimator_run_options_are_checked_before_any_work(tmp_path):
    x, y = _diabetes()
    with pytest.raises(ValueError, match="resume=True needs checkpoint"):
        MLPRegressor(resume=True).fit(x, y)
    with pytest.raises(TypeError, match="on_epoch_end"):
        MLPRegressor(on_epoch_end=3).fit(x, y)
    with pytest.raises(ValueError, match="partial_fit"):
        MLPRegressor(checkpoint=tmp_path / "a.fnmlp").partial_fit(x, y)
    path = tmp_path / "b.fnmlp"
    MLPRegressor(hidden_layer_sizes=(4,), max_iter=2, checkpoint=path).fit(x, y)
    with pytest.raises(ValueError, match="batch_size"):
        MLPRegressor(hidden_layer_sizes=(4,), max_iter=4, batch_size=32, checkpoint=path,
                     resume=True).fit(x, y)
    assert torch.is_tensor(fnmlp.load(path).params[0].weight)


def test_cross_validation_with_one_checkpoint_refuses_to_resume_another_folds_fit(tmp_path):
    from sklearn.model_selection import KFold, cross_validate

    x, y = load_iris(return_X_y=True)
    path = tmp_path / "gs.fnmlp"
    estimator = MLPClassifier(max_iter=15, random_state=0, checkpoint=path, resume=True)
    with pytest.raises(ValueError, match="holds a fit on other data \\(its fingerprint "
                                         "differs\\)"):  # fold 2 would resume fold 1's fit
        cross_validate(estimator, x, y, cv=KFold(3, shuffle=True, random_state=0),
                       return_estimator=True, error_score="raise")
    again = MLPClassifier(max_iter=15, random_state=0, checkpoint=path, resume=True)
    fold = next(KFold(3, shuffle=True, random_state=0).split(x))[0]
    fresh = MLPClassifier(max_iter=15, random_state=0).fit(x[fold], y[fold])
    resumed = again.fit(x[fold], y[fold])  # fold 1's own data: its finished fit
    assert all(np.array_equal(a, b) for a, b in zip(resumed.coefs_, fresh.coefs_))


def test_a_resume_on_other_sparse_data_or_validation_split_is_refused(tmp_path):
    import scipy.sparse as sp

    x, y = _diabetes()
    path = tmp_path / "sparse.fnmlp"
    kwargs = dict(hidden_layer_sizes=(8,), max_iter=3, random_state=0, checkpoint=path)
    MLPRegressor(**kwargs).fit(sp.csr_matrix(x), y)
    with pytest.raises(ValueError, match="fit on other data"):
        MLPRegressor(**kwargs, resume=True).fit(sp.csr_matrix(x * 2), y)
    MLPRegressor(**kwargs, resume=True).fit(sp.csr_matrix(x), y)  # the same: resumes
    MLPRegressor(**kwargs, early_stopping=True).fit(x, y)
    with pytest.raises(ValueError, match="fit on other data"):  # another validation split
        MLPRegressor(**{**kwargs, "random_state": 1}, early_stopping=True, resume=True).fit(
            x, y)


def test_a_string_for_layers_is_refused_with_what_it_takes():
    with pytest.raises(TypeError, match="layers takes a list of layers .*got the string "
                                        "'relu'"):
        MLPRegressor(layers="relu").fit(np.ones((4, 2)), np.ones(4))
