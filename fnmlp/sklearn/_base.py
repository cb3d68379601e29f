"""What the two estimators share: hyperparameter checks, the network, scikit-learn's training
loop (its batches, stopping rules and learning-rate schedules) over fnmlp's train step, and
prediction."""

from __future__ import annotations

import dataclasses
import math
import numbers
import warnings
from typing import Any, cast

import numpy as np
import scipy.sparse as sp
import torch
from sklearn.base import BaseEstimator
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import train_test_split
from sklearn.utils import check_random_state
from sklearn.utils.validation import _check_sample_weight, check_is_fitted

import fnmlp
from fnmlp import _validate
from fnmlp._tree import tree_leaves, tree_map
from fnmlp.nn import MLP, Dense
from fnmlp.sklearn._lbfgs import check_lbfgs_model, fit_lbfgs
from fnmlp.sklearn._state import plain_state, restore_state
from fnmlp.train import NonFiniteLossError
from fnmlp.train.engine import (BatchSource, Carry, Checkpointer, EpochFunction, Policy,
                                Reporter, Run, TrainStep, check_run_options, checkpoint_settings,
                                choose_compile, choose_steps_per_call, compiled_before,
                                describe_threads,
                                network_identity, restore_run, train_loop)

SOLVERS = ("lbfgs", "sgd", "adam", "adamw", "rmsprop", "adagrad")
ACTIVATIONS = {"identity": "identity", "logistic": "sigmoid", "tanh": "tanh", "relu": "relu"}
LEARNING_RATES = ("constant", "invscaling", "adaptive")
_PREDICT_CHUNK = 65536  # rows densified (sparse input) or predicted at a time
_STOCHASTIC_RECORD = ("loss_curve_", "best_loss_", "validation_scores_",
                      "best_validation_score_", "_no_improvement_count")  # none for lbfgs
_SKLEARN_NON_FINITE = ("Solver produced non-finite parameter weights. The input data may contain "
                       "large values and need to be preprocessed.")


class BaseMLP(BaseEstimator):
    """The shared machinery; ``MLPRegressor`` and ``MLPClassifier`` add targets and outputs."""

    # set by fit (annotations only: no class attributes, so hasattr still tells what was fit)
    _opt_state: Any  # the optimizer's state; None until a stochastic solver steps
    loss_curve_: list[float]  # the stochastic solvers' record (``_start_record``)
    validation_scores_: list[float] | None  # None without early_stopping
    best_validation_score_: float | None
    best_loss_: float | None  # None with early_stopping

    # --- hyperparameters ---------------------------------------------------------------------

    def _check_hyperparameters(self) -> None:
        """Raise ``ValueError`` naming the first bad hyperparameter (before any work)."""
        if isinstance(self.layers, (str, bytes)):  # else iterated: "unknown activation 'r'"
            raise TypeError(f"layers takes a list of layers (primitives such as "
                            f"fnmlp.Linear(64), fnmlp.Dense(64, 'relu'), or activation names "
                            f"such as 'relu'), got the string {self.layers!r}; e.g. "
                            f"layers=[fnmlp.Linear(64), {self.layers!r}]")
        if self.layers is None:
            sizes = self.hidden_layer_sizes
            sizes = list(sizes) if hasattr(sizes, "__iter__") else [sizes]
            # the casts: typeshed's numbers.Integral and numbers.Real declare __lt__ and
            # __le__ but no __gt__ or __ge__
            if not all(isinstance(s, numbers.Integral) and not isinstance(s, bool)
                       and cast(int, s) > 0 for s in sizes):
                raise ValueError(f"hidden_layer_sizes must be positive integers, got "
                                 f"{self.hidden_layer_sizes!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)}, got "
                             f"{self.activation!r}")
        if self.solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got {self.solver!r}")
        if self.learning_rate not in LEARNING_RATES:
            raise ValueError(f"learning_rate must be one of {LEARNING_RATES}, got "
                             f"{self.learning_rate!r}")
        _number(self.alpha, "alpha", 0)
        _number(self.learning_rate_init, "learning_rate_init", 0, strict=True)
        _number(self.power_t, "power_t", 0)
        _number(self.tol, "tol", 0)
        _number(self.momentum, "momentum", 0, 1)
        _number(self.validation_fraction, "validation_fraction", 0, 1, strict_high=True)
        _number(self.beta_1, "beta_1", 0, 1, strict_high=True)
        _number(self.beta_2, "beta_2", 0, 1, strict_high=True)
        _number(self.epsilon, "epsilon", 0, strict=True)
        _integer(self.max_iter, "max_iter")
        _integer(self.max_fun, "max_fun")
        if self.n_iter_no_change != np.inf:
            _integer(self.n_iter_no_change, "n_iter_no_change")
        if self.batch_size != "auto":
            _integer(self.batch_size, "batch_size")
        for name in ("shuffle", "warm_start", "nesterovs_momentum", "early_stopping"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.compile not in ("auto", True, False):
            raise ValueError(f"compile must be 'auto', True or False, got {self.compile!r}")
        if self.dtype not in (None, "float32", "float64", torch.float32, torch.float64):
            raise ValueError(f"dtype must be None (follow X), 'float32' or 'float64', got "
                             f"{self.dtype!r}")
        torch.device(self.device)  # raises on a bad device name
        check_run_options(self.checkpoint, 1, self.resume, None, 0.0, False, self.on_epoch_end,
                          self.progress, None, None)
        if self.solver == "lbfgs":
            check_lbfgs_model(self)

    def _torch_dtype(self, x_dtype) -> torch.dtype:
        if self.dtype is None:
            return torch.float32 if x_dtype == np.float32 else torch.float64
        return getattr(torch, self.dtype) if isinstance(self.dtype, str) else self.dtype

    def _hidden_layers(self) -> list:
        if self.layers is not None:
            return list(self.layers)
        sizes = self.hidden_layer_sizes
        sizes = list(sizes) if hasattr(sizes, "__iter__") else [sizes]
        return [Dense(int(s), ACTIVATIONS[self.activation], init=self._initializer())
                for s in sizes]

    def _initializer(self) -> str | None:
        """scikit-learn's draw for its own layers; fnmlp's default for a ``layers=`` spec."""
        if self.layers is not None:
            return None
        return "sklearn_logistic" if self.activation == "logistic" else "sklearn"

    def _build_model(self, n_features: int, n_outputs: int) -> MLP:
        return MLP(n_features, [*self._hidden_layers(),
                                fnmlp.Linear(n_outputs, initializer=self._initializer())])

    def _optimizer(self):
        """The stochastic solver as an fnmlp optimizer (None for lbfgs, which is scipy's)."""
        if self.solver == "lbfgs":
            return None
        lr = float(self.learning_rate_init)
        if self.solver == "sgd":
            return fnmlp.sgd(lr, momentum=float(self.momentum),
                             nesterov=bool(self.nesterovs_momentum) and self.momentum > 0)
        if self.solver in ("adam", "adamw"):
            factory = fnmlp.adam if self.solver == "adam" else fnmlp.adamw
            return factory(lr, betas=(float(self.beta_1), float(self.beta_2)),
                           eps=float(self.epsilon))
        if self.solver == "rmsprop":
            return fnmlp.rmsprop(lr, eps=float(self.epsilon))
        return fnmlp.adagrad(lr, eps=float(self.epsilon))

    # --- fitting -----------------------------------------------------------------------------

    def _fit(self, X, y, sample_weight=None, incremental: bool = False):
        self._check_hyperparameters()
        _validate.check_no_autocast(self.device, f"{type(self).__name__}.fit")
        if self.early_stopping and incremental:
            raise ValueError("partial_fit does not support early_stopping=True")
        if incremental and (self.checkpoint is not None or self.resume):
            raise ValueError("checkpoint= and resume= are for fit; partial_fit takes one "
                             "iteration and keeps no checkpoint")
        first_pass = not hasattr(self, "params_") or (not self.warm_start and not incremental)
        X, targets = self._validate_input(X, y, incremental, reset=first_pass)
        if sample_weight is not None:
            sample_weight = _check_sample_weight(sample_weight, X, dtype=X.dtype,
                                                 ensure_non_negative=True)
            if not sample_weight.any():
                raise ValueError("sample_weight is zero for every sample: nothing to fit")
        random_state = check_random_state(self.random_state)
        outputs = targets.shape[1] if targets.ndim == 2 else 1
        loss, out_activation = self._training_loss(outputs)
        if first_pass:
            self._start(X.shape[1], outputs, self._torch_dtype(X.dtype), random_state)
        elif self.model_.out_features != outputs:
            raise ValueError(f"y has {outputs} outputs but the fitted network has "
                             f"{self.model_.out_features}; fit again without warm_start")
        self.out_activation_ = out_activation
        if self.solver == "lbfgs":
            self._fit_lbfgs(X, targets, sample_weight, loss)
            return self
        if not hasattr(self, "loss_curve_"):  # a warm start after an lbfgs fit
            self._start_record()
        optimizer = self._optimizer()
        if not incremental or self._opt_state is None:
            self._opt_state = optimizer.init(self.params_)
        split = self._split(X, targets, sample_weight, random_state)
        self._run(split, loss, optimizer, random_state, incremental)
        return self

    def _start(self, n_features: int, outputs: int, dtype: torch.dtype, random_state) -> None:
        """A fresh network and a fresh record of the fit."""
        self.model_ = self._build_model(n_features, outputs)
        generator = torch.Generator().manual_seed(_seed(random_state))
        # drawn in float64, then cast (as scikit-learn): one network whatever X's dtype
        params = self.model_.init(generator, dtype=torch.float64)
        device = torch.device(self.device)
        self.params_ = tree_map(lambda t: t.to(device=device, dtype=dtype), params)
        self.state_ = self.model_.init_state(dtype=dtype, device=device)
        self.n_outputs_, self.n_layers_ = outputs, len(self._hidden_layers()) + 2
        self._opt_state, self._dropout_seed, self._steps = None, _seed(random_state), 0
        self.n_iter_, self.t_ = 0, 0
        if self.solver == "lbfgs":  # scikit-learn's lbfgs keeps no curve and no stopping rule
            for name in _STOCHASTIC_RECORD:
                self.__dict__.pop(name, None)
        else:
            self._start_record()

    def _start_record(self) -> None:
        """The stochastic solvers' record: the loss curve and the stopping rule's state."""
        self.loss_curve_ = []
        self._no_improvement_count = 0
        if self.early_stopping:
            self.validation_scores_, self.best_validation_score_ = [], -np.inf
            self.best_loss_ = None
        else:
            self.best_loss_ = np.inf
            self.validation_scores_ = self.best_validation_score_ = None

    def _fit_lbfgs(self, X, targets, sample_weight, loss) -> None:
        """scikit-learn's lbfgs solver on every row in float64 (``_lbfgs.fit_lbfgs``), then
        its check of the weights."""
        like = torch.empty(0, dtype=torch.float64, device=tree_leaves(self.params_)[0].device)
        x = _tensor(X.toarray() if sp.issparse(X) else X, like)
        weight = None if sample_weight is None else _tensor(sample_weight, like)
        fit_lbfgs(self, x, self._target_tensor(targets, like), weight, loss)
        if not all(bool(t.isfinite().all()) for t in tree_leaves(self.params_)):
            raise _non_finite(f"L-BFGS-B ended with NaN or inf weights (loss {self.loss_}); "
                              "scale the inputs, or raise alpha")

    def _split(self, X, targets, sample_weight, random_state):
        """``(x, y, w)`` to train on and ``(x, y, w)`` to validate on (or None)."""
        if not self.early_stopping:
            return (X, targets, sample_weight), None
        stratify = targets if self._stratify(targets) else None
        arrays = [X, targets] + ([sample_weight] if sample_weight is not None else [])
        parts = train_test_split(*arrays, random_state=random_state,
                                 test_size=self.validation_fraction, stratify=stratify)
        train, valid = parts[0::2], parts[1::2]
        if valid[0].shape[0] < 2:
            raise ValueError("The validation set is too small. Increase 'validation_fraction' "
                             "or the size of your dataset.")
        if len(train) == 2:
            train, valid = (*train, None), (*valid, None)
        return tuple(train), tuple(valid)

    def _run(self, split, loss, optimizer, random_state, incremental: bool) -> None:
        """scikit-learn's stochastic solver loop, run by fnmlp's one training loop: epochs of
        shuffled batches, then ``_SolverRules`` (the stopping rule on the training loss or
        validation score, ``invscaling``/``adaptive`` rates)."""
        (x, y, weight), valid = split
        n = x.shape[0]
        like = tree_leaves(self.params_)[0]
        batch_size = min(200, n) if self.batch_size == "auto" else self.batch_size
        if batch_size > n:
            warnings.warn("Got `batch_size` less than 1 or larger than sample size. It is "
                          "going to be clipped", stacklevel=3)
        batch_size = int(np.clip(batch_size, 1, n))
        steps = math.ceil(n / batch_size) * (1 if incremental else self.max_iter)
        l2 = float(self.alpha)
        compiled, reason = choose_compile(
            self.compile, self.model_, steps,
            cached=self.compile == "auto" and compiled_before(
                network_identity(self.model_, loss, optimizer, l2, None, "auto")))
        if self.verbose:
            print(f"fnmlp: {'compiled' if compiled else 'eager'} steps ({reason}); "
                  f"{describe_threads('auto', self.model_, batch_size)}")
        step = TrainStep(self.model_, loss, optimizer, compile=compiled, l2=l2)
        sparse = sp.issparse(x)
        source = BatchSource(
            x if sparse else _tensor(x, like), self._target_tensor(y, like),
            None if weight is None else _tensor(weight, like), batch_size=batch_size,
            shuffle=bool(self.shuffle),
            generator=torch.Generator().manual_seed(_seed(random_state)),
            pad_to=batch_size if compiled and n > batch_size else None,
            steps_per_call=choose_steps_per_call("auto", compiled=compiled, device=like.device,
                                                 batches=-(-n // batch_size)),
            densify=(lambda part: _tensor(part.toarray(), like)) if sparse else None)
        epochs = 1 if incremental else self.max_iter
        settings, run = {}, None
        if self.checkpoint is not None:
            settings = checkpoint_settings(
                self.model_, optimizer, loss, batch_size=batch_size, shuffle=bool(self.shuffle),
                rows=n, weighted=weight is not None, l2=l2,
                early_stopping=bool(self.early_stopping), data=(x, y, weight, valid))
            if self.resume:
                run = restore_run(self.checkpoint, self.model_, optimizer, like,
                                  source.generator, settings, epochs)
        rules = _SolverRules(self, optimizer, valid, n, incremental)
        if run is None:
            self.n_iter_ = 0
            self._best = (self.params_, self.state_)
            run = Run(Carry(self.params_, self._opt_state, self.state_),
                      steps_done=self._steps,
                      dropout_seed=self._dropout_seed if self.model_.has_dropout else None)
        else:
            rules.restore(run)
        policies = [rules, Reporter(False, bool(self.progress), range(run.epoch, epochs))]
        if self.on_epoch_end is not None:
            policies.append(EpochFunction(self.on_epoch_end))
        saver = None if self.checkpoint is None else Checkpointer(
            self.checkpoint, step, source.generator, settings)
        diverged = None
        try:
            train_loop(step, source, run, epochs=epochs, policies=policies, checkpoint=saver)
        except (NonFiniteLossError, _Diverged) as error:
            if not self.early_stopping:
                raise _non_finite(f"{error}" if isinstance(error, NonFiniteLossError) else
                                  f"{error}; try a smaller learning_rate_init") from error
            diverged = error
        finally:
            self._steps = run.steps_done
        self.params_, self._opt_state, self.state_ = run.carry
        if diverged is not None:
            self._record_divergence(diverged.epoch, _divergence_detail(diverged), n)
        elif not incremental and not rules.stopped and self.n_iter_ == self.max_iter:
            warnings.warn(f"Stochastic Optimizer: Maximum iterations ({self.max_iter}) "
                          "reached and the optimization hasn't converged yet.",
                          ConvergenceWarning, stacklevel=3)
        if self.early_stopping:
            self.params_, self.state_ = self._best

    def _record_divergence(self, epoch: int, detail: str, rows: int) -> None:
        """How scikit-learn ends a diverged fit with ``early_stopping``: no error, the last
        validation score NaN and the best weights kept (by ``_run``). scikit-learn trains on to
        ``max_iter``, NaN after NaN; this fit stops at once, and a ConvergenceWarning says so."""
        scores = cast("list[float]", self.validation_scores_)  # kept with early_stopping
        if epoch >= self.n_iter_:  # the diverged iteration, not recorded by the rules yet
            self.n_iter_ += 1
            self.t_ += rows
            self.loss_ = math.nan
            self.loss_curve_.append(math.nan)
            scores.append(math.nan)
        best = next((i + 1 for i, s in enumerate(scores) if s == self.best_validation_score_),
                    None)
        kept = "the initial weights" if best is None else f"the weights of iteration {best}"
        warnings.warn(f"{_SKLEARN_NON_FINITE} fnmlp: the fit diverged in iteration "
                      f"{self.n_iter_} ({detail}); it stopped there and keeps {kept}, the "
                      "best validation score's.", ConvergenceWarning, stacklevel=5)

    def _validation_score(self, x, y, sample_weight) -> float:
        """scikit-learn's ``_score`` of the validation split: ``score`` without validating
        ``x`` again (split from a DataFrame, it has lost the feature names ``fit`` saw), NaN
        where the predictions are not finite (a diverging fit) instead of the scorer's error."""
        prediction = self._predict_outputs(self._network_outputs(x))
        if np.issubdtype(prediction.dtype, np.floating) and not np.isfinite(prediction).all():
            return math.nan
        return float(self._score_function(y, prediction, sample_weight=sample_weight))

    def _update_no_improvement_count(self, valid) -> None:
        if valid is not None:
            score = self._validation_score(valid[0], self._labels(valid[1]), valid[2])
            # the casts: a validation split means early_stopping, which keeps the scores
            cast("list[float]", self.validation_scores_).append(score)
            best_score = cast(float, self.best_validation_score_)
            if self.verbose:
                print("Validation score: %f" % score)
            if score < best_score + self.tol:
                self._no_improvement_count += 1
            else:
                self._no_improvement_count = 0
            if score > best_score:
                self.best_validation_score_ = score
                self._best = (self.params_, self.state_)
        else:
            best_loss = cast(float, self.best_loss_)  # a float without early_stopping
            if self.loss_curve_[-1] > best_loss - self.tol:
                self._no_improvement_count += 1
            else:
                self._no_improvement_count = 0
            self.best_loss_ = min(best_loss, self.loss_curve_[-1])

    # --- prediction --------------------------------------------------------------------------

    def _outputs(self, X) -> torch.Tensor:
        """The network's outputs (before ``out_activation_``) for ``X``, validated here."""
        check_is_fitted(self)
        like = tree_leaves(self.params_)[0]
        _validate.check_no_autocast(like.device, f"{type(self).__name__}.predict")
        return self._network_outputs(self._validate_predict(X))

    def _network_outputs(self, X) -> torch.Tensor:
        """The network's outputs (before ``out_activation_``) for validated ``X``."""
        like = tree_leaves(self.params_)[0]
        chunks = []
        for start in range(0, X.shape[0], _PREDICT_CHUNK):
            rows = slice(start, start + _PREDICT_CHUNK)
            chunks.append(self.model_.unchecked_apply(self.params_, _rows(X, rows, like), like,
                                               self.state_, train=False, key=None))
        return torch.cat(chunks) if chunks else torch.empty(0, self.n_outputs_)

    def save(self, path) -> None:
        """Write the fitted estimator to ``path`` in ``fnmlp.save``'s format (atomic, verified,
        no pickle); ``fnmlp.sklearn.load(path)`` reads it back."""
        from fnmlp.sklearn._persist import save

        save(self, path)

    def to_torch(self) -> torch.nn.Sequential:
        """The fitted network as a ``torch.nn.Sequential`` (its outputs are before
        ``out_activation_``: logits for a classifier, log-rates for the Poisson loss)."""
        check_is_fitted(self)
        return fnmlp.to_torch(self.model_, self.params_, self.state_)

    @property
    def coefs_(self) -> list[np.ndarray]:
        """scikit-learn's view of the weights: one (fan_in, fan_out) array per ``Linear``, read
        only (copies). Assign a list (``est.coefs_ = [...]``, or an item: ``est.coefs_[0] =
        w``) to replace the network's weights; ``predict``, ``partial_fit`` and a
        ``warm_start`` fit then start from them."""
        return self._weights("weight")

    @coefs_.setter
    def coefs_(self, arrays) -> None:
        self._set_weights("weight", arrays)

    @property
    def intercepts_(self) -> list[np.ndarray]:
        """scikit-learn's view of the biases: one (fan_out,) array per ``Linear``, read only;
        assignable as ``coefs_``."""
        return self._weights("bias")

    @intercepts_.setter
    def intercepts_(self, arrays) -> None:
        self._set_weights("bias", arrays)

    def _linear_indices(self) -> list[int]:
        """Where the ``Linear`` layers' parameters are in ``params_``."""
        return [i for i, p in enumerate(self.params_) if isinstance(p, fnmlp.nn.LinearParams)]

    def _weights(self, name: str) -> _Weights:
        """Every ``Linear``'s ``name`` ("weight" or "bias") in scikit-learn's layout."""
        check_is_fitted(self)
        arrays = []
        for i in self._linear_indices():
            array = getattr(self.params_[i], name).detach().cpu().numpy()
            array = (array.T if name == "weight" else array).copy()
            array.flags.writeable = False
            arrays.append(array)
        return _Weights(arrays, self, name)

    def _set_weights(self, name: str, arrays) -> None:
        """Replace every ``Linear``'s ``name`` ("weight" or "bias") by ``arrays`` in
        scikit-learn's layout, each checked (shape, real and finite values) and copied into
        the network's dtype and device."""
        attribute = "coefs_" if name == "weight" else "intercepts_"
        check_is_fitted(self, msg=f"This %(name)s instance is not fitted yet: {attribute} "
                                  "replaces the weights of a fitted network (fit it first, "
                                  "for example with max_iter=1)")
        indices, arrays = self._linear_indices(), list(arrays)
        if len(arrays) != len(indices):
            raise ValueError(f"{attribute} needs {len(indices)} arrays, one per layer, got "
                             f"{len(arrays)}")
        params = list(self.params_)
        for layer, (i, array) in enumerate(zip(indices, arrays)):
            current = getattr(params[i], name)
            tensor = _layer_tensor(array, current, name == "weight", f"{attribute}[{layer}]")
            params[i] = dataclasses.replace(params[i], **{name: tensor})
        self.params_ = tuple(params)

    def __getstate__(self) -> dict:
        """The estimator as plain data (``_state.plain_state``): the network and specs as JSON
        text, the tensors as NumPy arrays. pickle and ``skops.io`` (``save_pipeline``) both
        store this, so that a file holds no torch object and skops needs no type beyond
        NumPy's, scikit-learn's and the estimator's class."""
        return plain_state(super().__getstate__())

    def __setstate__(self, state: dict) -> None:
        """The estimator from ``__getstate__``'s data (or an older pickle's state)."""
        super().__setstate__(restore_state(state))

    def __sklearn_is_fitted__(self) -> bool:
        return hasattr(self, "params_")

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.sparse = True
        return tags


def _rows(x, rows, like: torch.Tensor) -> torch.Tensor:
    """Rows of a tensor, or of a sparse matrix densified into a tensor like ``like``."""
    if isinstance(x, torch.Tensor):
        return x[rows]
    if isinstance(rows, torch.Tensor):
        rows = rows.numpy()
    part = x[rows].toarray() if sp.issparse(x) else np.ascontiguousarray(x[rows])
    return _tensor(part, like)


def _tensor(array: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    """``array`` as a C-contiguous tensor like ``like`` (the products then sum in the same order
    whatever the input's layout: a CSC matrix densifies Fortran-ordered), sharing memory where
    it can (a read-only array, such as a memory map, too: fnmlp never writes to its input)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The given NumPy array is not writable")
        return torch.as_tensor(np.ascontiguousarray(array), dtype=like.dtype,
                               device=like.device)


def _to_json(value):
    """A solver attribute as JSON data (non-finite floats as strings)."""
    if isinstance(value, list):
        return [_to_json(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _from_json(value):
    if isinstance(value, list):
        return [_from_json(v) for v in value]
    return float(value) if isinstance(value, str) else value


class _Weights(list):
    """``coefs_`` or ``intercepts_``: read-only copies of the network's arrays, in a list whose
    item assignment (``est.coefs_[0] = w``) sets the network's, as scikit-learn's list would."""

    def __init__(self, arrays: list[np.ndarray], owner: BaseMLP, name: str):
        super().__init__(arrays)
        self._owner, self._name = owner, name

    def __setitem__(self, index, value) -> None:
        super().__setitem__(index, value)
        self._owner._set_weights(self._name, list(self))


def _layer_tensor(array, current: torch.Tensor, transpose: bool, name: str) -> torch.Tensor:
    """``array`` (scikit-learn's layout: a weight (fan_in, fan_out), transposed to fnmlp's)
    as a new tensor like ``current``, after checking its shape and values."""
    array = np.asarray(array)
    expected = tuple(current.shape[::-1]) if transpose else tuple(current.shape)
    if array.shape != expected:
        raise ValueError(f"{name} must have shape {expected}, got {array.shape}")
    if array.dtype.kind not in "iuf":
        raise ValueError(f"{name} must hold real numbers, got dtype {array.dtype}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} contains NaN or inf")
    array = np.ascontiguousarray(array.T if transpose else array)
    return torch.tensor(array, dtype=current.dtype, device=current.device)


class _Diverged(Exception):
    """An iteration's loss was NaN or inf (``_SolverRules``), handled as the training loop's
    ``NonFiniteLossError``; ``epoch``: the iteration (from 0), not recorded."""

    def __init__(self, detail: str, epoch: int):
        super().__init__(detail)
        self.epoch = epoch


def _divergence_detail(error: Exception) -> str:
    """What went wrong, from a ``NonFiniteLossError`` (its first clause: the rest tells of
    what the error carries) or a ``_Diverged``."""
    if isinstance(error, NonFiniteLossError):
        return str(error).split("; ")[0] + ", epochs counted from 0"
    return str(error)


def _non_finite(detail: str) -> ValueError:
    """scikit-learn's error for a diverged fit (its words first), with fnmlp's ``detail``."""
    return ValueError(f"{_SKLEARN_NON_FINITE} fnmlp: {detail}.")


def stochastic_solver(estimator: BaseMLP) -> bool:
    """``available_if``'s test for ``partial_fit``: as scikit-learn's, none for lbfgs."""
    if estimator.solver == "lbfgs":
        raise AttributeError("partial_fit is only available for stochastic optimizers. "
                             "lbfgs is not stochastic.")
    return True


def _weighted_sum(values: list[float], weights: list[int]) -> float:
    """sum(v·w), correctly rounded; inf or NaN where the terms are (``fsum`` raises there)."""
    try:
        return math.fsum(value * weight for value, weight in zip(values, weights))
    except (OverflowError, ValueError):
        return sum(value * weight for value, weight in zip(values, weights))


def _seed(random_state) -> int:
    """A torch seed drawn from a NumPy ``RandomState`` (as scikit-learn draws its own)."""
    return int(random_state.randint(np.iinfo(np.int32).max))


def _number(value, name: str, low: float, high: float = math.inf, *, strict: bool = False,
            strict_high: bool = False) -> None:
    number = cast(float, value)  # for typeshed's numbers.Real, which has no __gt__ or __ge__
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and \
        math.isfinite(number) and (number > low if strict else number >= low) and \
        (number < high if strict_high else number <= high)
    if not ok:
        interval = f"{'(' if strict else '['}{low}, {high}{')' if strict_high else ']'}"
        raise ValueError(f"{name} must be a number in {interval}, got {value!r}")


def _integer(value, name: str) -> None:
    if not (isinstance(value, numbers.Integral) and not isinstance(value, bool)
            and cast(int, value) >= 1):  # the cast: typeshed's Integral has no __ge__
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


class _SolverRules(Policy):
    """scikit-learn's rules after each epoch of its stochastic solvers: ``loss_`` (the batch
    losses weighted by their rows), ``n_iter_``, ``t_``, the curves, the stopping rule on the
    training loss (or the validation score with ``early_stopping``), and the ``invscaling`` /
    ``adaptive`` learning rates, written into the run's optimizer state."""

    def __init__(self, estimator: BaseMLP, optimizer, valid, rows: int, incremental: bool):
        self.estimator, self.optimizer, self.valid = estimator, optimizer, valid
        self.rows, self.incremental = rows, incremental
        self.lr = float(estimator.learning_rate_init)
        self.stopped = False

    _SAVED = ("n_iter_", "t_", "loss_", "loss_curve_", "best_loss_", "_no_improvement_count",
              "validation_scores_", "best_validation_score_")

    def on_epoch_end(self, run: Run, logs: dict) -> bool:
        stop = self._epoch_end(run, logs)
        est = self.estimator
        logs["train_losses"] = [est.loss_]  # scikit-learn's loss_ for the callbacks
        if est.early_stopping:
            logs["valid_score"] = cast("list[float]", est.validation_scores_)[-1]
            run.best = est._best
        if est.checkpoint is not None:  # the solver's own state: a checkpoint resumes it
            run.extras["sklearn"] = {"lr": self.lr, "stopped": self.stopped, **{
                name: _to_json(getattr(est, name)) for name in self._SAVED}}
        return stop

    def restore(self, run: Run) -> None:
        """The estimator's solver state from a resumed ``run``."""
        est, saved = self.estimator, run.extras["sklearn"]
        for name in self._SAVED:
            setattr(est, name, _from_json(saved[name]))
        self.lr, self.stopped = saved["lr"], saved["stopped"]
        est._best = run.best if run.best is not None else (run.carry.params, run.carry.state)
        if self.stopped:  # the stopping rule ended the fit: nothing is left to train
            run.stopped_epoch = [run.epoch]

    def _epoch_end(self, run: Run, logs: dict) -> bool:
        est = self.estimator
        est.params_, est._opt_state, est.state_ = run.carry
        values = [row[0] for row in logs["batch_losses"]]
        loss = _weighted_sum(values, logs["batch_rows"]) / self.rows
        if not math.isfinite(loss):
            raise _Diverged(f"the loss became {loss} in iteration {est.n_iter_ + 1}",
                            run.epoch - 1)
        est.n_iter_ += 1
        est.loss_ = loss
        est.t_ += self.rows
        est.loss_curve_.append(est.loss_)
        if est.verbose:
            print("Iteration %d, loss = %.8f" % (est.n_iter_, est.loss_))
        est._update_no_improvement_count(self.valid)
        if est.solver == "sgd" and est.learning_rate == "invscaling":
            self.lr = float(est.learning_rate_init) / (est.t_ + 1) ** est.power_t
            self._set_rate(run)
        if est._no_improvement_count > est.n_iter_no_change:
            what = "Validation score" if est.early_stopping else "Training loss"
            message = (f"{what} did not improve more than tol={est.tol:f} for "
                       f"{est.n_iter_no_change} consecutive epochs.")
            if est.solver != "sgd" or est.learning_rate != "adaptive":
                if est.verbose:
                    print(message + " Stopping.")
                self.stopped = True
                return True
            if self.lr <= 1e-6:
                if est.verbose:
                    print(message + " Learning rate too small. Stopping.")
                self.stopped = True
                return True
            self.lr /= 5.0
            self._set_rate(run)
            if est.verbose:
                print(message + f" Setting learning rate to {self.lr:f}")
            est._no_improvement_count = 0
        return False

    def _set_rate(self, run: Run) -> None:
        opt_state = self.optimizer.with_learning_rate(run.carry.opt_state, self.lr)
        run.carry = Carry(run.carry.params, opt_state, run.carry.state)
        self.estimator._opt_state = opt_state
