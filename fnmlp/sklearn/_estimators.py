"""``MLPRegressor`` and ``MLPClassifier``: scikit-learn's MLP estimators trained by fnmlp."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.base import ClassifierMixin, RegressorMixin
from sklearn.metrics import accuracy_score, r2_score
from sklearn.preprocessing import LabelBinarizer
from sklearn.utils.metaestimators import available_if
from sklearn.utils.multiclass import _check_partial_fit_first_call, type_of_target, unique_labels
from sklearn.utils.validation import column_or_1d, validate_data

from fnmlp.sklearn._base import BaseMLP, _tensor, stochastic_solver
from fnmlp.sklearn._losses import classification_loss, regression_loss

_SHARED_DOC = """
    Parameters as ``sklearn.neural_network.{name}`` (same names, meanings and defaults):
    ``hidden_layer_sizes``, ``activation`` ("identity", "logistic", "tanh", "relu"),
    ``solver`` ("lbfgs", "sgd", "adam", and fnmlp's "adamw", "rmsprop", "adagrad"), ``alpha``
    (L2 penalty on the weights, per sample), ``batch_size``, ``learning_rate``,
    ``learning_rate_init``, ``power_t``, ``max_iter``, ``shuffle``, ``random_state``, ``tol``,
    ``verbose``, ``warm_start``, ``momentum``, ``nesterovs_momentum``, ``early_stopping``,
    ``validation_fraction``, ``beta_1``, ``beta_2``, ``epsilon``, ``n_iter_no_change``,
    ``max_fun``.

    solver="lbfgs" is scikit-learn's: ``scipy.optimize.minimize(method="L-BFGS-B")`` on the
    full batch (sparse X densified), the objective (loss plus alpha's penalty) and its
    gradient by fnmlp's ``value_and_grad`` in float64 whatever X's dtype, with ``maxfun=
    max_fun``, ``maxiter=max_iter``, ``gtol=tol``; it sets ``n_iter_`` and ``loss_`` (no
    ``loss_curve_``, no early stopping), has no ``partial_fit``, and refuses layers with
    dropout or batch statistics and ``checkpoint``/``resume``; ``compile`` does not apply.

    fnmlp's own:
        layers: the hidden layers as an fnmlp spec (anything ``fnmlp.MLP`` takes, e.g.
            ``[fnmlp.Dense(64, "gelu", layer_norm=True), fnmlp.Dropout(0.1)]``), instead of
            ``hidden_layer_sizes``/``activation``; the output ``Linear`` is added.
        dtype: "float32" or "float64"; None follows X (float32 stays float32).
        device: where the network lives ("cpu", "cuda", ...).
        compile: True, False or "auto" (compile the step when the estimate says it pays for
            itself; ``verbose`` says which and why).
        loss: {loss_doc}
        checkpoint, resume: ``fit`` checkpoints itself to this file after every iteration
            (``fnmlp.fit``'s format, the solver's counters, curves and rates included); with
            ``resume=True`` and the file present, ``fit`` continues from it and ends
            bit-identical to an uninterrupted fit (``partial_fit`` takes neither).
        progress: a progress bar over the iterations (tqdm).
        on_epoch_end: ``f(iteration, logs) -> stop?`` after every iteration, ``logs`` holding
            ``epoch``, ``train_loss`` (``loss_``), ``lr``, ``epoch_time``, ``samples_per_s``
            (as ``fnmlp.fit``'s logs) and, with ``early_stopping``, ``valid_score``; for lbfgs
            ``epoch`` and ``train_loss`` (the objective). A true result stops the fit.

    Fitted attributes as scikit-learn's (``n_iter_``, ``loss_``, ``loss_curve_``,
    ``best_loss_``, ``validation_scores_``, ``best_validation_score_``, ``t_``,
    ``n_features_in_``, ``feature_names_in_``, ``n_layers_``, ``n_outputs_``,
    ``out_activation_``, ``coefs_``, ``intercepts_``{extra}) plus ``model_`` (the fnmlp spec),
    ``params_`` and ``state_`` (its pytrees). ``coefs_`` and ``intercepts_`` are read-only
    copies; assigning them (a list, or one item) replaces a fitted network's weights, which
    ``predict``, ``partial_fit`` and a ``warm_start`` fit then use.
    ``to_torch()`` gives the network as ``torch.nn``. ``save(path)``/
    ``fnmlp.sklearn.load(path)`` use ``fnmlp.save``'s format.

    As scikit-learn, the initial weights are drawn in float64 and then cast, so one
    ``random_state`` gives one network whatever X's dtype; the validation split of
    ``early_stopping`` is scored without validating it again (no feature-name warning for a
    DataFrame), NaN where the predictions are not finite; a diverged fit raises scikit-learn's
    ValueError ("Solver produced non-finite parameter weights. ...", then fnmlp's detail), but
    with ``early_stopping`` ends without error, its last validation score NaN, keeping the
    best weights.

    Differences from scikit-learn, by design: weights are drawn from a torch generator seeded
    by ``random_state`` (same distribution, other numbers); Adam adds ``epsilon`` as torch does
    (after the bias correction of the second moment); with the "invscaling" and "adaptive"
    schedules the momentum buffer holds gradients, not steps (torch's SGD); a diverged fit
    stops at the iteration where it diverged (scikit-learn trains on to ``max_iter``, and with
    ``early_stopping`` warns then that it reached it; fnmlp's ConvergenceWarning says that it
    diverged); partial_fit is absent for lbfgs in both estimators (scikit-learn 1.9's
    regressor still lists it).
"""


def _keep(estimator, arguments: dict) -> None:
    """Store the constructor's arguments as they are (scikit-learn's rule: no logic in
    ``__init__``; checks happen in ``fit``)."""
    for name, value in arguments.items():
        if name not in ("self", "__class__"):
            setattr(estimator, name, value)


def _check_numeric_targets(y) -> None:
    """Refuse regression targets that are not numbers, naming y, before any work: strings
    (class labels, or numbers as text) and objects that do not convert to float. None and
    arrays that cannot be built at all are left to ``validate_data``'s own message."""
    try:
        array = np.asarray(y)
    except (TypeError, ValueError):
        return
    if y is None or array.dtype.kind in "biufc":
        return
    if array.dtype.kind == "O":
        try:
            array.astype(np.float64)
            return
        except (TypeError, ValueError):
            pass
    example = next((value for value in array.ravel() if not _is_number(value)), None)
    example = example.item() if isinstance(example, np.generic) else example
    raise ValueError(f"y must be numeric for MLPRegressor, got values of dtype {array.dtype} "
                     f"such as {example!r}; a regressor predicts numbers: convert y with "
                     "y.astype(float) if it holds numbers as text, or use MLPClassifier for "
                     "class labels")


def _is_number(value) -> bool:
    """Whether ``value`` is a number (not a string that reads as one)."""
    if isinstance(value, (str, bytes)):
        return False
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


class MLPRegressor(RegressorMixin, BaseMLP):
    def __init__(self, loss="squared_error", hidden_layer_sizes=(100,), activation="relu", *,
                 solver="adam", alpha=0.0001, batch_size="auto", learning_rate="constant",
                 learning_rate_init=0.001, power_t=0.5, max_iter=200, shuffle=True,
                 random_state=None, tol=1e-4, verbose=False, warm_start=False, momentum=0.9,
                 nesterovs_momentum=True, early_stopping=False, validation_fraction=0.1,
                 beta_1=0.9, beta_2=0.999, epsilon=1e-8, n_iter_no_change=10, max_fun=15000,
                 layers=None, dtype=None, device="cpu", compile="auto", checkpoint=None,
                 resume=False, progress=False, on_epoch_end=None):
        _keep(self, locals())

    def fit(self, X, y, sample_weight=None):
        """Train on X (n_samples, n_features) and y (n_samples,) or (n_samples, n_outputs)."""
        return self._fit(X, y, sample_weight, incremental=False)

    @available_if(stochastic_solver)
    def partial_fit(self, X, y, sample_weight=None):
        """One epoch over (X, y), continuing from the last call (or a first fit); not with
        solver="lbfgs" (AttributeError, as scikit-learn)."""
        return self._fit(X, y, sample_weight, incremental=True)

    def predict(self, X) -> np.ndarray:
        """Predictions (n_samples,) or (n_samples, n_outputs)."""
        return self._predict_outputs(self._outputs(X))

    def _predict_outputs(self, out: torch.Tensor) -> np.ndarray:
        """``predict`` from the network's outputs."""
        if self.out_activation_ == "exp":
            out = out.exp()
        values = out.cpu().numpy()
        return values.ravel() if self.n_outputs_ == 1 else values

    _score_function = staticmethod(r2_score)  # RegressorMixin.score's

    def _training_loss(self, outputs: int):
        return regression_loss(self.loss, outputs)

    def _validate_input(self, X, y, incremental, reset):
        _check_numeric_targets(y)
        X, y = validate_data(self, X, y, accept_sparse=["csr", "csc"], multi_output=True,
                             y_numeric=True, dtype=(np.float64, np.float32), reset=reset)
        if y.ndim == 2 and y.shape[1] == 1:
            y = column_or_1d(y, warn=True)
        if self.loss == "poisson" and np.any(y < 0):
            raise ValueError("loss='poisson' needs y >= 0 (counts or rates)")
        return X, y

    def _validate_predict(self, X):
        return validate_data(self, X, accept_sparse=["csr", "csc"], reset=False,
                             dtype=(np.float64, np.float32))

    def _target_tensor(self, y, like: torch.Tensor) -> torch.Tensor:
        y = y.reshape(-1, 1) if y.ndim == 1 else y
        return _tensor(np.ascontiguousarray(y), like)

    def _stratify(self, targets) -> bool:
        return False

    def _labels(self, targets):
        return targets

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        tags.target_tags.positive_only = self.loss == "poisson"
        return tags


class MLPClassifier(ClassifierMixin, BaseMLP):
    def __init__(self, hidden_layer_sizes=(100,), activation="relu", *, solver="adam",
                 alpha=0.0001, batch_size="auto", learning_rate="constant",
                 learning_rate_init=0.001, power_t=0.5, max_iter=200, shuffle=True,
                 random_state=None, tol=1e-4, verbose=False, warm_start=False, momentum=0.9,
                 nesterovs_momentum=True, early_stopping=False, validation_fraction=0.1,
                 beta_1=0.9, beta_2=0.999, epsilon=1e-8, n_iter_no_change=10, max_fun=15000,
                 layers=None, dtype=None, device="cpu", compile="auto", loss="log_loss",
                 checkpoint=None, resume=False, progress=False, on_epoch_end=None):
        _keep(self, locals())

    def fit(self, X, y, sample_weight=None):
        """Train on X (n_samples, n_features) and labels y (n_samples,), or a label indicator
        matrix (n_samples, n_classes) for multilabel classification."""
        return self._fit(X, y, sample_weight, incremental=False)

    @available_if(stochastic_solver)
    def partial_fit(self, X, y, sample_weight=None, classes=None):
        """One epoch over (X, y); the first call needs ``classes`` (every label there will
        be), unless y is a multilabel indicator matrix. Not with solver="lbfgs"
        (AttributeError, as scikit-learn)."""
        if _check_partial_fit_first_call(self, classes):
            self._label_binarizer = LabelBinarizer()
            if type_of_target(y).startswith("multilabel"):
                self._label_binarizer.fit(y)
            else:
                self._label_binarizer.fit(classes)
        return self._fit(X, y, sample_weight, incremental=True)

    def predict(self, X) -> np.ndarray:
        """Class labels (n_samples,), or an indicator matrix for multilabel targets."""
        return self._predict_outputs(self._outputs(X))

    _score_function = staticmethod(accuracy_score)  # ClassifierMixin.score's

    def _predict_outputs(self, out: torch.Tensor) -> np.ndarray:
        """``predict`` from the network's outputs."""
        if self.out_activation_ == "softmax":
            return self.classes_[out.argmax(dim=1).cpu().numpy()]
        positive = (out > 0).cpu().numpy().astype(np.int64)  # logit > 0 <=> probability > 0.5
        return self._label_binarizer.inverse_transform(
            positive[:, 0] if self.n_outputs_ == 1 else positive)

    def predict_proba(self, X) -> np.ndarray:
        """Class probabilities (n_samples, n_classes), in the order of ``classes_``."""
        return self._probabilities(self._outputs(X))

    def predict_log_proba(self, X) -> np.ndarray:
        """log of ``predict_proba``, computed stably from the logits; -inf exactly where
        ``predict_proba`` is 0 (as scikit-learn's ``np.log(predict_proba(X))``)."""
        out = self._outputs(X)
        log_p = self._log_probabilities(out)
        return np.where(self._probabilities(out) == 0, -np.inf, log_p)

    def _probabilities(self, out: torch.Tensor) -> np.ndarray:
        """``predict_proba`` from the network's outputs."""
        if self.out_activation_ == "softmax":
            return torch.softmax(out, dim=1).cpu().numpy()
        probability = torch.sigmoid(out).cpu().numpy()
        if self.n_outputs_ == 1:
            return np.hstack([1 - probability, probability])
        return probability

    def _log_probabilities(self, out: torch.Tensor) -> np.ndarray:
        """The log-probabilities from the network's outputs (log-softmax, log-sigmoid)."""
        if self.out_activation_ == "softmax":
            return torch.log_softmax(out, dim=1).cpu().numpy()
        log_p = torch.nn.functional.logsigmoid(out)
        if self.n_outputs_ == 1:
            return torch.cat([torch.nn.functional.logsigmoid(-out), log_p], dim=1).cpu().numpy()
        return log_p.cpu().numpy()

    def _training_loss(self, outputs: int):
        return classification_loss(self.loss, self._label_binarizer.y_type_, outputs)

    def _validate_input(self, X, y, incremental, reset):
        X, y = validate_data(self, X, y, accept_sparse=["csr", "csc"], multi_output=True,
                             dtype=(np.float64, np.float32), reset=reset)
        if y.ndim == 2 and y.shape[1] == 1:
            y = column_or_1d(y, warn=True)
        if not hasattr(self, "classes_") or (not self.warm_start and not incremental):
            self._label_binarizer = LabelBinarizer()
            self._label_binarizer.fit(y)
            self.classes_ = self._label_binarizer.classes_
        else:
            classes = unique_labels(y)
            if self.warm_start:
                if set(classes) != set(self.classes_):
                    raise ValueError("warm_start can only be used where `y` has the same "
                                     "classes as in the previous call to fit. Previously got "
                                     f"{self.classes_}, `y` has {classes}")
            elif len(np.setdiff1d(classes, self.classes_, assume_unique=True)):
                raise ValueError(f"`y` has classes not in `self.classes_`. `self.classes_` has "
                                 f"{self.classes_}. 'y' has {classes}.")
        return X, self._label_binarizer.transform(y).astype(bool)

    def _validate_predict(self, X):
        return validate_data(self, X, accept_sparse=["csr", "csc"], reset=False,
                             dtype=(np.float64, np.float32))

    def _target_tensor(self, y, like: torch.Tensor) -> torch.Tensor:
        if self._label_binarizer.y_type_ == "multiclass":  # class indices for cross-entropy
            return torch.as_tensor(y.argmax(axis=1), dtype=torch.long, device=like.device)
        return _tensor(y, like)

    def _stratify(self, targets) -> bool:
        return targets.shape[1] == 1  # binary, as scikit-learn (not multiclass or multilabel)

    def _labels(self, targets):
        return self._label_binarizer.inverse_transform(targets)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.classifier_tags.multi_label = True
        return tags


MLPRegressor.__doc__ = ("Multi-layer perceptron regression (squared error or Poisson), trained "
                        "by fnmlp.\n" + _SHARED_DOC.format(
                            name="MLPRegressor", extra="",
                            loss_doc='"squared_error" (default), "poisson" (log link, '
                                     'y >= 0), or an fnmlp regression loss such as '
                                     '``fnmlp.Huber(delta=1.0)``.'))
MLPClassifier.__doc__ = ("Multi-layer perceptron classification (binary, multiclass, "
                         "multilabel), trained by fnmlp.\n" + _SHARED_DOC.format(
                             name="MLPClassifier", extra=", ``classes_``",
                             loss_doc='"log_loss" (default), or an fnmlp '
                                      '``CrossEntropy`` (multiclass: label smoothing, class '
                                      'weights) or ``BinaryCrossEntropyWithLogits`` (binary, '
                                      'multilabel: pos_weight).'))
