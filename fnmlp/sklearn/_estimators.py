"""``MLPRegressor`` and ``MLPClassifier``: scikit-learn's MLP estimators trained by fnmlp."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.base import ClassifierMixin, RegressorMixin
from sklearn.preprocessing import LabelBinarizer
from sklearn.utils.multiclass import _check_partial_fit_first_call, type_of_target, unique_labels
from sklearn.utils.validation import column_or_1d, validate_data

from fnmlp.sklearn._base import BaseMLP, _tensor
from fnmlp.sklearn._losses import classification_loss, regression_loss

_SHARED_DOC = """
    Parameters as ``sklearn.neural_network.{name}`` (same names, meanings and defaults):
    ``hidden_layer_sizes``, ``activation`` ("identity", "logistic", "tanh", "relu"),
    ``solver`` ("sgd", "adam", and fnmlp's "adamw", "rmsprop", "adagrad"; no "lbfgs"), ``alpha``
    (L2 penalty on the weights, per sample), ``batch_size``, ``learning_rate``,
    ``learning_rate_init``, ``power_t``, ``max_iter``, ``shuffle``, ``random_state``, ``tol``,
    ``verbose``, ``warm_start``, ``momentum``, ``nesterovs_momentum``, ``early_stopping``,
    ``validation_fraction``, ``beta_1``, ``beta_2``, ``epsilon``, ``n_iter_no_change``,
    ``max_fun`` (accepted for compatibility; only L-BFGS uses it).

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
            ``train_loss`` (``loss_``) and, with ``early_stopping``, ``valid_score``; a true
            result stops the fit.

    Fitted attributes as scikit-learn's (``n_iter_``, ``loss_``, ``loss_curve_``,
    ``best_loss_``, ``validation_scores_``, ``best_validation_score_``, ``t_``,
    ``n_features_in_``, ``feature_names_in_``, ``n_layers_``, ``n_outputs_``,
    ``out_activation_``, ``coefs_``, ``intercepts_``{extra}) plus ``model_`` (the fnmlp spec),
    ``params_`` and ``state_`` (its pytrees); ``to_torch()`` gives the network as
    ``torch.nn``. ``save(path)``/``fnmlp.sklearn.load(path)`` use ``fnmlp.save``'s format.

    Differences from scikit-learn, by design: weights are drawn from a torch generator seeded
    by ``random_state`` (same distribution, other numbers); Adam adds ``epsilon`` as torch does
    (after the bias correction of the second moment); with the "invscaling" and "adaptive"
    schedules the momentum buffer holds gradients, not steps (torch's SGD).
"""


def _keep(estimator, arguments: dict) -> None:
    """Store the constructor's arguments as they are (scikit-learn's rule: no logic in
    ``__init__``; checks happen in ``fit``)."""
    for name, value in arguments.items():
        if name not in ("self", "__class__"):
            setattr(estimator, name, value)


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

    def partial_fit(self, X, y, sample_weight=None):
        """One epoch over (X, y), continuing from the last call (or a first fit)."""
        return self._fit(X, y, sample_weight, incremental=True)

    def predict(self, X) -> np.ndarray:
        """Predictions (n_samples,) or (n_samples, n_outputs)."""
        out = self._outputs(X)
        if self.out_activation_ == "exp":
            out = out.exp()
        out = out.cpu().numpy()
        return out.ravel() if self.n_outputs_ == 1 else out

    def _training_loss(self, outputs: int):
        return regression_loss(self.loss, outputs)

    def _validate_input(self, X, y, incremental, reset):
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

    def partial_fit(self, X, y, sample_weight=None, classes=None):
        """One epoch over (X, y); the first call needs ``classes`` (every label there will
        be), unless y is a multilabel indicator matrix."""
        if _check_partial_fit_first_call(self, classes):
            self._label_binarizer = LabelBinarizer()
            if type_of_target(y).startswith("multilabel"):
                self._label_binarizer.fit(y)
            else:
                self._label_binarizer.fit(classes)
        return self._fit(X, y, sample_weight, incremental=True)

    def predict(self, X) -> np.ndarray:
        """Class labels (n_samples,), or an indicator matrix for multilabel targets."""
        out = self._outputs(X)
        if self.out_activation_ == "softmax":
            return self.classes_[out.argmax(dim=1).cpu().numpy()]
        positive = (out > 0).cpu().numpy().astype(np.int64)  # logit > 0 <=> probability > 0.5
        return self._label_binarizer.inverse_transform(
            positive[:, 0] if self.n_outputs_ == 1 else positive)

    def predict_proba(self, X) -> np.ndarray:
        """Class probabilities (n_samples, n_classes), in the order of ``classes_``."""
        out = self._outputs(X)
        if self.out_activation_ == "softmax":
            return torch.softmax(out, dim=1).cpu().numpy()
        probability = torch.sigmoid(out).cpu().numpy()
        if self.n_outputs_ == 1:
            return np.hstack([1 - probability, probability])
        return probability

    def predict_log_proba(self, X) -> np.ndarray:
        """log of ``predict_proba``, computed stably from the logits."""
        out = self._outputs(X)
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
